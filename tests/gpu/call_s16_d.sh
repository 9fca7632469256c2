# Session 16, device call 4: the permute graph-capture test (seeded, flash-attention's rule), the FP8 GPU tests call 3's
# timeout cut, the layer A/B of programmatic dependent launch after the wait-before-trigger fix, host cost. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
timeout 150 python3 -m pytest -p no:cacheprovider -n 4 -v tests/test_grouped_permute.py::test_gpu_cuda_graph_capture \
  "tests/test_fp8.py::test_gpu_fp8_layer_pangu" "tests/test_fp8.py::test_gpu_fused_dispatch_graph_replay_and_compile" \
  "tests/test_fp8.py::test_gpu_small_case_for_memcheck" tests/test_fp8.py::test_gpu_fp8_dependent_launches_change_no_bit \
  2>&1 | q > $OUT/pytest.log
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/pytest.log | tail -30
timeout 70 python3 bench/ab_pdl.py --tokens 1,16,1024 --cases layer,mlp --rounds 5 2>&1 | q
timeout 90 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1,16 --no-profile --rep-ms 20 --fp8 none 2>&1 | q
