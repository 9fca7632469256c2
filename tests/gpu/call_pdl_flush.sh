# Device call: GPU tests of the swapped FP8 tiles and the dependent launches, then the A/Bs (PDL on/off,
# L2 eviction read/write) and the FP8 table rows. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
MOGE_BUILD_CUDA=0 timeout 120 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo build $?
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_fp8.py tests/test_triton_grouped_gemm.py \
  tests/test_eager_graphs.py tests/test_shared_stream.py -k "gpu or graph or stream" 2>&1 | q > $OUT/pytest.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -12
timeout 150 python3 bench/ab_pdl.py --cases mlp --tokens 1,16,128,1024 --rounds 3 2>&1 | q | tee $OUT/ab_pdl.log
timeout 100 python3 bench/ab_flush.py --T 1,16,1024 --rounds 3 2>&1 | q | tee $OUT/ab_flush.log
timeout 130 python3 bench/bench_fp8.py --T 1,16,128,1024 --rounds 3 2>&1 | q > $OUT/fp8.log; grep -E "^\||NVIDIA" $OUT/fp8.log
