#!/bin/bash
# One device call for the report: build the extensions (CPU + CUDA), run the full `moge-bench` sweep,
# then the pytest-benchmark tests at one T. Repo root, on the GPU machine:
#   MOGE_BENCH_COMMIT=<git hash of the tree> bash bench/cli_device.sh [extra moge-bench args]
# e.g. run(command="MOGE_BENCH_COMMIT=abc123 bash bench/cli_device.sh", kind="nvidia-h100-x1",
#          timeout_s=420). Everything lands in $OUT (6 files, within the device tool's 8):
#   build.log, bench.log, pytest_bench.json, results/{results.json, speedup_*.png, floor_fraction.png}.
# BUDGET (s, default 400) is the call's limit: the sweep starts no new (shape, T) after what is left of
# it minus a margin, so the table, JSON and plots are always written.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/moge-bench-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-400}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "[$(elapsed)s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv
stamp "build (CPU + CUDA extensions, sm90 only)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
    timeout ${BUILD_TIMEOUT:-150} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build exit $? (a failed CUDA build only drops the cuda backend)"; tail -2 "$OUT/build.log"
LIMIT=$(( BUDGET - $(elapsed) - 90 ))
stamp "moge-bench, new cases until +${LIMIT}s"
python3 -m moge_kernels.bench --out "$OUT/results" --time-limit "$LIMIT" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "check T="
echo "moge-bench exit ${PIPESTATUS[0]}"
LEFT=$(( BUDGET - $(elapsed) - 10 ))
if [ "$LEFT" -gt 30 ]; then
  stamp "pytest-benchmark at T=4096"
  MOGE_BENCH_TOKENS=4096 timeout "$LEFT" python3 -m pytest -q -p no:cacheprovider bench/ \
      --benchmark-json="$OUT/pytest_bench.json" --benchmark-columns=median,rounds 2>&1 | tail -4
fi
stamp done
