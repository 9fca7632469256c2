#!/bin/bash
# The session's last device call: build, the GPU tests of what changed, a probe of C++ error paths, then
# the figures the issues ask for (host overhead, expert MLP vs floors, transformers experts, expert
# subsets, permute, FP8), each step bounded so the call ends within TOTAL seconds. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
stamp build
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 200 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $?"
stamp tests
timeout ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_layer.py tests/test_fp8.py \
    tests/test_expert_subsets.py tests/test_grouped_permute.py tests/test_integration_transformers.py \
    tests/test_triton_launch.py tests/test_options.py tests/test_ops_surface.py tests/test_autograd.py tests/test_registry.py \
    -k "not rejects_unknown_score_func" 2>&1 | grep -v Warn > "$OUT/tests.log"
echo "tests exit ${PIPESTATUS[0]}"; grep -E "passed|failed|FAILED" "$OUT/tests.log" | tail -12
stamp "probe: a C++ TORCH_CHECK from the extensions, in a subprocess"
for code in "torch.ops.moge_C.grouped_dispatch(torch.randn(4,8), torch.randn(4,8), 2, 1, None, False, 2)" \
            "torch.ops.moge_C.grouped_combine(torch.randn(4,8), torch.randn(3,2), torch.zeros(3,2,dtype=torch.int32), None)"; do
  timeout 60 python3 -X faulthandler -c "import torch, moge_kernels
try:
    $code
except Exception as e: print('raised', type(e).__name__, str(e)[:120])" 2>&1 | tail -3; echo "probe exit $?"
done
gcc --version | head -1
stamp "host overhead"
timeout 80 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1,16,1024,4096 --no-profile 2>&1 \
    | grep -v Warn | tee "$OUT/host.log" | tail -40
stamp "expert mlp vs floors"
timeout 80 python3 bench/bench_experts.py --T 1,128,1024,4096,16384 --rounds 5 --no-eager 2>&1 | grep -v Warn \
    | tee "$OUT/experts.log" | tail -12
stamp "expert mlp at the session's start (3b6eff9), same call"
if git rev-parse -q --verify 3b6eff9^{commit} >/dev/null 2>&1 && git worktree add -q /tmp/moge_old 3b6eff9 2>/dev/null; then
  (cd /tmp/moge_old && PYTHONPATH=/tmp/moge_old timeout 70 python3 bench/bench_experts.py --T 1,128,1024,4096,16384 \
      --rounds 3 --no-eager 2>&1 | grep -v Warn | tee "$OUT/experts_3b6eff9.log" | tail -9)
else echo "no git history here: no before run"; fi
stamp "transformers experts"
timeout 85 python3 bench/bench_transformers.py --models qwen3,mixtral --tokens 1,1024,4096 --modes fwd --impls moge,grouped_mm \
    --budget-s 70 2>&1 | grep -v Warn > "$OUT/transformers.log"; tail -40 "$OUT/transformers.log"
stamp "subsets"
timeout 45 python3 bench/bench_subsets.py --T 1,1024,4096 --layer-T 1024 --rounds 4 2>&1 | grep -v Warn \
    | tee "$OUT/subsets.log" | tail -14
stamp "permute"
timeout 30 python3 bench/bench_permute.py --tokens 1024,4096,16384 --drop 0.0 2>&1 | grep -v Warn \
    | tee "$OUT/permute.log" | tail -14
stamp "fp8"
timeout 45 python3 bench/bench_fp8.py --T 1,1024,4096 --rounds 3 2>&1 | grep -v Warn | tee "$OUT/fp8.log" | tail -10
stamp done
