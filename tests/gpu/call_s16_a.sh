# Session 16, device call 1: permute copy tiles for few-expert shapes (gpt-oss-20b T=4096 is 1% over #18's goal), and
# #17's eager / graph / loop columns for every op at Pangu and Qwen3-30B, T = 1, 16, 1024, 4096. Logs under $OUT.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
q() { grep -v -E "Warning|warn\(" ; }
git log --oneline -1
timeout 150 python3 bench/bench_permute.py --tokens 4096,16384 --rounds 5 \
  --variants hfast2x2w,hfast2x2w_sort,hfast2x4w,hfast2x4w_sort,hfast1x2w 2>&1 | q > $OUT/permute.log
cat $OUT/permute.log
timeout 330 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1,16,1024,4096 --no-profile --rep-ms 20 \
  2>&1 | q > $OUT/host.log; cat $OUT/host.log
