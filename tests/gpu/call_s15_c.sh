# Session 15, device call 3: the permute at T=4096 with count-table budgets and copy tiles around the default. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
timeout 120 python3 bench/bench_permute.py --tokens 4096 --rounds 7 \
  --variants fused2048,fused8192,hfast4x2w,hfast2x2w 2>&1 | q > $OUT/permute.log; cat $OUT/permute.log
