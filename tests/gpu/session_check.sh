#!/bin/bash
# One device call's first part: build the CUDA extension, probe the C++ error paths, the whole test suite on
# the GPU (default backends). Logs under $OUT. SUITE_S (s, default 300) bounds the suite.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format="commit %h %s" | cut -c1-90
stamp "build"
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $?"; grep -E "error|moge_kernels build" "$OUT/build.log" | head -20
python3 -c "import moge_kernels as mk; print({k: (v['available'], v['reason'][:80]) for k, v in mk.backends().items()})"
if [ -z "${NO_PROBE:-}" ]; then stamp "probe"; bash tests/gpu/probe_cpp_errors.sh 2>&1 | tee "$OUT/probe.log"; fi
stamp "suite"
timeout ${SUITE_S:-300} python3 -m pytest -q -p no:cacheprovider -n 8 ${SUITE_ARGS:-tests} --durations=8 2>&1 \
    | grep -v Warn > "$OUT/suite.log"
echo "suite exit ${PIPESTATUS[0]}"; grep -E "passed|failed|FAILED|Error|crashed" "$OUT/suite.log" | tail -30
stamp done
