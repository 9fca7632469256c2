#!/bin/bash
# One device call for the `cuda` backend (csrc/cuda/): a clean build with the README's install command,
# the GPU tests with MOGE_BACKEND=cuda, compute-sanitizer memcheck + racecheck on small cases of every
# kernel, and the benchmark table. Usage (repo root, on the GPU machine):
#     bash tests/gpu/run_cuda_checks.sh [steps]      steps, run in this order: build,test,sanitize,bench,suite
# Logs go to $OUT (default /tmp/out). Every step has its own time limit (seconds, env overridable), cut to
# what is left of TOTAL_TIMEOUT (default 400 s) so that the whole run ends inside one device call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${1:-build,test,sanitize,bench,suite}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
# limit STEP_SECONDS: the step's own limit, or what is left of TOTAL_TIMEOUT minus a 10 s margin if less
limit() { local left=$(( ${TOTAL_TIMEOUT:-400} - ($(date +%s) - T0) - 10 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo $1; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if has build; then
  stamp "build: pip install --no-build-isolation --no-deps -e .  (clean tree: no .so, no build/)"
  ls moge_kernels/*.so build 2>/dev/null && echo "WARNING: the tree holds build outputs"
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} timeout $(limit ${BUILD_TIMEOUT:-240}) \
      python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  echo "build exit: $?"
  grep -E "error|moge_kernels build|spill" "$OUT/build.log" | head -20
  python3 -c "import moge_kernels as mk; r = mk.backends(); print({k: (v['available'], v['reason'][:80]) for k, v in r.items()})"
fi

if has test; then
  stamp "tests/test_cuda_backend.py + test_cuda_compile.py, MOGE_BACKEND=cuda"
  MOGE_BACKEND=cuda timeout $(limit ${TEST_TIMEOUT:-150}) python3 -m pytest -q -p no:cacheprovider -n ${TEST_WORKERS:-4} \
      tests/test_cuda_backend.py tests/test_cuda_compile.py --durations=6 2>&1 | grep -v Warn | tail -70 \
      | tee "$OUT/test_cuda.log"
fi


if has sanitize; then
  for tool in memcheck racecheck; do
    stamp "compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(limit ${SANITIZE_TIMEOUT:-75}) compute-sanitizer --tool $tool \
        --error-exitcode 9 python3 tests/gpu/sanitize_cuda.py > "$OUT/$tool.log" 2>&1
    echo "$tool exit: $?"
    grep -vE "^ok |Warn" "$OUT/$tool.log" | tail -12
  done
fi

if has bench; then
  stamp "bench/bench_cuda.py"
  timeout $(limit ${BENCH_TIMEOUT:-150}) python3 bench/bench_cuda.py --deadline ${BENCH_DEADLINE:-110} \
      --out "$OUT/cuda_h100.txt" 2>&1 | grep -v Warn | tee "$OUT/bench.log" | grep -v "^backend"
fi
if has suite; then
  # The rest of the suite with the cuda backend selected; the Triton files test the triton backend, whose
  # kernels take minutes to compile on a fresh machine, so they are left to their own device runs.
  stamp "rest of the suite, MOGE_BACKEND=cuda (without tests/test_triton_*.py)"
  MOGE_BACKEND=cuda timeout $(limit ${SUITE_TIMEOUT:-90}) python3 -m pytest -q -p no:cacheprovider -n ${TEST_WORKERS:-4} \
      tests --ignore-glob='tests/test_triton_*' --ignore=tests/test_cuda_compile.py \
      --ignore=tests/test_cuda_backend.py 2>&1 | grep -v Warn > "$OUT/test_suite.log"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/test_suite.log" | tail -15
fi

stamp done
