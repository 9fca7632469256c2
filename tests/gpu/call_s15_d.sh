# Session 15, device call 4: slots ranked by the copy programs (the default for count blocks <= 256 slots) against the
# rank launch's sort, and the permute GPU tests. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
timeout 120 python3 bench/bench_permute.py --tokens 1024,4096,16384 --rounds 5 --variants sort_rank,copy_rank 2>&1 \
  | q > $OUT/permute.log; cat $OUT/permute.log
timeout 50 python3 bench/bench_permute.py --tokens 4096 --models gpt-oss-20b,qwen3-30b-a3b --rounds 1 --variants sort_rank \
  --profile 2>&1 | q | grep "us/launch"
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_grouped_permute.py tests/test_integration_transformers.py \
  2>&1 | q > $OUT/pytest.log; grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -15
