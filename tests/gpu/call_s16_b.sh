# Session 16, device call 2: GPU tests of the cross-op dependent launches and the FP8 decode tiles that quantize in
# their loads; A/B of both; the permute's new copy tiles against the old default. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
git log --oneline -1
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 4 -rA tests/test_fp8.py tests/test_triton_grouped_gemm.py \
  tests/test_triton_combine.py tests/test_grouped_permute.py 2>&1 | q > $OUT/pytest.log
grep -E "^(FAILED|ERROR)|passed|failed|dependent_launch|quantize_in_load" $OUT/pytest.log | tail -40
timeout 100 python3 bench/ab_pdl.py --switch quant_in_load --tokens 1,16 --cases mlp --rounds 7 2>&1 | q
timeout 120 python3 bench/ab_pdl.py --switch pdl --tokens 1,16,128,1024 --cases layer --rounds 7 2>&1 | q
timeout 90 python3 bench/bench_permute.py --tokens 4096,16384 --rounds 7 --variants hfast,copy_rank 2>&1 | q
