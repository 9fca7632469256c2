#!/bin/bash
# One device call: build the CUDA extension, the whole test suite on the GPU (default backends), then the
# host-overhead table and the FP8 sweep at the sizes that matter. Logs under $OUT.
# TOTAL (s, default 540) bounds the call; each step gets what is left.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( ${TOTAL:-540} - ($(date +%s) - T0) - 10 )); }
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
stamp "build"
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $?"; grep -E "error|moge_kernels build" "$OUT/build.log" | head -20
python3 -c "import moge_kernels as mk; print({k: (v['available'], v['reason'][:80]) for k, v in mk.backends().items()})"
stamp "suite"
timeout $(( $(left) - ${RESERVE:-150} )) python3 -m pytest -q -p no:cacheprovider -n 8 tests --durations=8 2>&1 \
    | grep -v Warn > "$OUT/suite.log"
echo "suite exit ${PIPESTATUS[0]}"; grep -E "passed|failed|FAILED|Error" "$OUT/suite.log" | tail -30
stamp "host overhead"
timeout 80 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1,1024 2>&1 | grep -v Warn > "$OUT/host.log"
head -60 "$OUT/host.log"
if [ "$(left)" -gt 40 ]; then
  stamp "fp8 sweep"
  timeout $(left) python3 bench/bench_fp8.py --sweep --T 16,1024,4096 2>&1 | grep -v Warn > "$OUT/fp8_sweep.log"
  tail -25 "$OUT/fp8_sweep.log"
fi
stamp done
