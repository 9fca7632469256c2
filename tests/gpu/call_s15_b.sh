# Session 15, device call 2: the permute's copy tilings around the new default (H_FAST, fused count tables), the
# dispatch's copy tiles with and without H_FAST, and the permute/dispatch GPU tests. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
MOGE_BUILD_CUDA=0 timeout 150 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo build $?
timeout 100 python3 bench/bench_permute.py --tokens 4096,16384 --rounds 5 \
  --variants no_hfast,fused0,fused4096,hfast2x4w,hfast8x8w,hfast_h2048 2>&1 | q > $OUT/permute.log; cat $OUT/permute.log
timeout 60 python3 bench/bench_permute.py --tokens 4096 --models gpt-oss-20b --rounds 1 --variants fused4096 --profile 2>&1 \
  | q | grep "us/launch"
timeout 150 python3 bench/bench_dispatch_combine.py --T 1024,4096,16384 --sweep --no-eager 2>&1 | q > $OUT/dispatch.log; grep -E "sweep|x floor|^ *[0-9]" $OUT/dispatch.log | head -40
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_grouped_permute.py tests/test_triton_dispatch.py \
  2>&1 | q > $OUT/pytest.log; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -15
