# Session 14's last device call: the new GPU tests, the main bench at the Pangu shape, the FP8 rows at
# T=1 and 128 (small regime's new gate_up tile), the permute at T >= 4096, host cost at T=1. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
MOGE_BUILD_CUDA=0 timeout 120 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1; echo build $?
timeout 140 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_fp8.py tests/test_triton_grouped_gemm.py \
  -k "swapped or dependent or decode_tiles or gpu_fp8_mlp_accuracy or graph_replay" 2>&1 | q > $OUT/pytest.log
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | tail -12
timeout 160 python3 -m moge_kernels.bench --shapes pangu --skip-self-check 2>&1 | q > $OUT/bench.log; grep -E "^pangu|ceilings|median ms" $OUT/bench.log | grep -E "ceilings|median|mlp|layer|permute|dispatch|combine" | head -80
timeout 70 python3 bench/bench_permute.py --tokens 4096,16384 --variants none --rounds 3 2>&1 | q > $OUT/permute.log; grep -v "us/launch" $OUT/permute.log | tail -10
timeout 80 python3 bench/bench_fp8.py --T 1,128 --rounds 3 2>&1 | q > $OUT/fp8.log; grep -E "^\||NVIDIA" $OUT/fp8.log
timeout 90 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1 --no-profile --rep-ms 30 2>&1 | q > $OUT/host.log; tail -22 $OUT/host.log
