# Session 15, device call 6: the permute at its final default (afbd37f: RANK_IN_COPY_MAX_COMPARES), and the GPU tests of
# the permute, dispatch, layer and transformers integration. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
timeout 60 python3 bench/bench_permute.py --tokens 4096,16384 --rounds 5 --variants none 2>&1 | q > $OUT/permute.log
cat $OUT/permute.log
timeout 220 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_grouped_permute.py tests/test_triton_dispatch.py \
  tests/test_integration_transformers.py tests/test_layer.py 2>&1 | q > $OUT/pytest.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -12
