#!/bin/bash
# One device call for the expert kernels: versions, parallel precompile, GPU tests, memcheck, config
# sweep, benchmark table. Usage (repo root, on the GPU machine): bash bench/experts_device.sh [steps]
# steps: comma list of pre,test,memcheck,sweep,bench (default all). Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${1:-pre,test,memcheck,sweep,bench}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if has pre; then
  stamp precompile
  timeout ${PRE_TIMEOUT:-150} python3 -c "
import sys, torch; sys.path.insert(0, 'bench')
import bench_experts as b
b.precompile((torch.bfloat16,), 10, table_dtypes=(torch.float16,))
" 2>&1 | grep -v Warn | tee "$OUT/precompile.log"
fi
if has test; then
  stamp tests
  timeout ${TEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider tests/test_triton_grouped_gemm.py \
      -n ${TEST_WORKERS:-3} --durations=12 ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -60 | tee "$OUT/tests.log"
fi
if has memcheck; then
  stamp memcheck
  timeout 60 python3 bench/bench_experts.py --memcheck-case > "$OUT/memcheck_warm.log" 2>&1
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/bench_experts.py --memcheck-case \
      2>&1 | grep -v Warn | tail -25 | tee "$OUT/memcheck.log"
  echo "memcheck exit: ${PIPESTATUS[0]}" | tee -a "$OUT/memcheck.log"
fi
if has sweep; then
  stamp sweep
  timeout ${SWEEP_TIMEOUT:-150} python3 bench/bench_experts.py --sweep --T ${SWEEP_T:-1,1024,4096,16384} 2>&1 \
      | grep -v Warn | tee "$OUT/sweep.log"
fi
if has bench; then
  stamp bench
  timeout ${BENCH_TIMEOUT:-120} python3 bench/bench_experts.py --rounds ${ROUNDS:-9} --out "$OUT/experts_table.txt" 2>&1 \
      | grep -v Warn | tee "$OUT/bench.log"
fi
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv
stamp done
