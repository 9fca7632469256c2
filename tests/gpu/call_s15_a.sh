# Session 15, device call 1: session 14's unconfirmed GPU tests by name, grouped_permute's GPU tests, and the
# permute's copy-side variants (count tables scanned by the copy programs; H blocks of a token adjacent;
# the same bytes as one broadcast copy). Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
git log -1 --format="tree at %h %s" 2>/dev/null || true
MOGE_BUILD_CUDA=0 timeout 150 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo build $?
timeout 110 python3 bench/bench_permute.py --tokens 1024,4096,16384 --rounds 5 \
  --variants fused0,fused4096,hfast,hfast1x4w,copy8x8w 2>&1 | q > $OUT/permute.log; cat $OUT/permute.log
timeout 60 python3 bench/bench_permute.py --tokens 4096 --models gpt-oss-20b,mixtral-8x7b --rounds 1 \
  --variants fused0,hfast --profile 2>&1 | q > $OUT/permute_profile.log; grep "us/launch" $OUT/permute_profile.log
timeout 240 python3 -m pytest -q -rA -p no:cacheprovider -n 4 tests/test_fp8.py tests/test_triton_grouped_gemm.py \
  tests/test_grouped_permute.py -k "swapped_candidates or dependent_launch or permute or tilings or rank_blocks or small_tables" \
  2>&1 | q > $OUT/pytest.log
grep -E "^(PASSED|FAILED|ERROR).*(swapped|dependent)|^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -30
