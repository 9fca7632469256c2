# Session 16, device call 3: GPU tests by name (-v) after the wait-before-trigger fix of the ops' first dependent
# launches, then the layer A/B of programmatic dependent launch and the main bench at the Pangu shape. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
git log --oneline -1
timeout 200 python3 -m pytest -p no:cacheprovider -n 6 -v tests/test_triton_grouped_gemm.py tests/test_triton_combine.py \
  tests/test_fp8.py -k "gpu or dependent or triton_fp8" 2>&1 | q > $OUT/pytest1.log
grep -E "FAILED|ERROR|passed|failed" $OUT/pytest1.log | tail -25
timeout 120 python3 -m pytest -p no:cacheprovider -n 6 -v tests/test_grouped_permute.py tests/test_triton_dispatch.py \
  tests/test_layer.py 2>&1 | q > $OUT/pytest2.log
grep -E "FAILED|ERROR|passed|failed" $OUT/pytest2.log | tail -25
timeout 90 python3 bench/ab_pdl.py --tokens 1,16,1024 --cases layer,mlp --rounds 7 2>&1 | q
timeout 150 python3 -m moge_kernels.bench --shapes pangu --skip-self-check 2>&1 | q > $OUT/bench.log
grep -E "ceilings|^pangu" $OUT/bench.log | grep -E "ceilings|(mlp|layer) +(triton|grouped_mm) " | head -40
