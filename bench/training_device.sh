#!/bin/bash
# One device call for training (issue 6): the benchmark table, then the GPU tests of autograd + layer.
# Usage (repo root, on the GPU machine): bash bench/training_device.sh. Logs and the table go to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
stamp bench
timeout ${BENCH_TIMEOUT:-210} python3 bench/bench_training.py --out "$OUT/training_h100.txt" 2>&1 \
    | grep -v "FP_FUSION\|warn_once" | tee "$OUT/bench.log" | tail -45
stamp tests
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider tests/test_autograd.py tests/test_layer.py \
    -k cuda --durations=8 2>&1 | tail -40 | tee "$OUT/tests.log"
stamp done
echo "=== table ==="; cat "$OUT/training_h100.txt" 2>/dev/null
