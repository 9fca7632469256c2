# Session 15, device call 5 (last): the permute with slots ranked by the copy programs against the rank launch's sort,
# the permute GPU tests, the main bench at the Pangu shape, host cost at T=1. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
timeout 100 python3 bench/bench_permute.py --tokens 1024,4096,16384 --rounds 5 --variants sort_rank,copy_rank 2>&1 \
  | q > $OUT/permute.log; cat $OUT/permute.log
timeout 120 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_grouped_permute.py tests/test_triton_dispatch.py \
  2>&1 | q > $OUT/pytest.log; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -8
timeout 170 python3 -m moge_kernels.bench --shapes pangu --skip-self-check 2>&1 | q > $OUT/bench.log
grep -E "ceilings|^pangu" $OUT/bench.log | grep -E "ceilings|triton|grouped_mm" | head -80
timeout 80 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1 --no-profile --rep-ms 20 2>&1 | q > $OUT/host.log; tail -20 $OUT/host.log
