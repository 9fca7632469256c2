#!/bin/bash
# One device call: build, then the steps named in STEPS (space-separated, in order), each bounded by its
# own timeout; logs under $OUT (one file per step). Steps:
#   probe       which C++ checks raise and which crash (tests/gpu/probe_cpp_errors.sh)
#   suite       the whole test suite on the GPU (-n 12, verbose log: FAILED lines even if cut short)
#   permute     bench_permute at T 4096/16384 with the candidate tilings and a per-launch profile
#   host        host cost per call, eager vs graph (issue 17's table), pangu and qwen3_30b
#   gaps        eager time at T=1/16 split into host, back-to-back loop and cold kernels (issue 17)
#   subsets     masked vs unmasked dispatch, pruned vs full layer (issue 20)
#   before      op times against 3b6eff9 in interleaved rounds (issue 16's no-regression check)
#   transformers  transformers experts, moge vs grouped_mm/batched_mm/eager, forward (issue 18)
#   fp8         the fp8 sweep and table (issue 21)
#   overlap     the layer with its shared expert on one stream / a side stream, bf16 then FP8 experts (issue 19)
#   ncu_fp8     Nsight Compute of the FP8 gate_up and down GEMMs at NCU_T (default 1 4096)
#   bench       python -m moge_kernels.bench, the package's main job (issue 19's ratios)
#   tests:<k>   pytest -q of the files matching tests/test_<k>*.py
#   pytest      pytest -q $PYTEST_ARGS (full failure reports in pytest.log)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log -1 --format="commit %h %s" | cut -c1-90
if [ -z "${NO_BUILD:-}" ]; then
  stamp build
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit $?"; grep -E " error|moge_kernels build: building" "$OUT/build.log" | head
fi
quiet() { grep -v -E "Warn|warn\(|^\s*$" ; }
for step in ${STEPS:-probe suite}; do
  stamp "$step"
  case $step in
    probe) timeout 100 bash tests/gpu/probe_cpp_errors.sh 2>&1 | tee "$OUT/probe.log" | grep -E "^\[|^#" ;;
    suite) timeout ${SUITE_S:-300} python3 -m pytest -v -p no:cacheprovider -n ${SUITE_N:-12} tests 2>&1 | quiet > "$OUT/suite.log"
           echo "suite exit ${PIPESTATUS[0]}"; grep -E "FAILED|ERROR|node down| passed| failed" "$OUT/suite.log" | tail -25 ;;
    permute) timeout ${PERMUTE_S:-300} python3 bench/bench_permute.py ${PERMUTE_ARGS:---tokens 4096,16384 --variants all --profile} 2>&1 | quiet \
           | tee "$OUT/permute.log" | tail -40 ;;
    host) timeout 100 python3 bench/host_overhead.py --shapes pangu,qwen3_30b --tokens 1,16,1024,4096 --no-profile \
           --rep-ms 100 2>&1 | quiet | tee "$OUT/host.log" | tail -60
          timeout 50 python3 bench/host_overhead.py --shapes pangu --tokens 4096 --rep-ms 50 2>&1 | quiet \
           > "$OUT/host_profile.log"; tail -40 "$OUT/host_profile.log" ;;
    gaps) timeout 120 python3 bench/host_overhead.py --gaps --shapes pangu,qwen3_30b --tokens 1,16 --rep-ms 50 2>&1 \
           | quiet | tee "$OUT/gaps.log" | tail -80 ;;
    subsets) timeout 70 python3 bench/bench_subsets.py --T 1,1024,4096 --layer-T 1,128,1024,4096 --rounds 4 2>&1 \
           | quiet | tee "$OUT/subsets.log" | tail -24 ;;
    before) timeout ${BEFORE_S:-300} python3 bench/before_after.py --base 3b6eff9 --T 1,16,128,1024,4096,16384 --rounds ${ROUNDS:-3} --confirm ${CONFIRM:-3} 2>&1 \
           | quiet | tee "$OUT/before_after.log" | tail -28 ;;
    transformers) timeout ${TF_S:-160} python3 bench/bench_transformers.py --models ${TF_MODELS:-qwen3,mixtral,gpt-oss} \
           --tokens ${TF_TOKENS:-1,128,1024,4096,16384} ${TF_ARGS:-} --modes ${TF_MODES:-fwd} --budget-s $(( ${TF_S:-160} - 15 )) 2>&1 | quiet \
           > "$OUT/transformers.log"; tail -50 "$OUT/transformers.log" ;;
    fp8) timeout ${FP8_S:-100} python3 bench/bench_fp8.py ${FP8_ARGS:---sweep --T 1,1024,4096} 2>&1 | quiet \
           | tee "$OUT/fp8.log" | tail -40 ;;
    overlap) for flag in "" --fp8; do
             timeout ${OVERLAP_S:-100} python3 bench/ab_shared_overlap.py $flag ${OVERLAP_ARGS:-} 2>&1 | quiet \
               | tee -a "$OUT/overlap.log" | tail -8
           done ;;
    ncu_fp8) for t in ${NCU_T:-1 4096}; do
             timeout 120 ncu --kernel-name regex:_fp8_gemm_kernel --launch-skip 2 --launch-count 2 \
               --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
               python3 tests/gpu/ncu_fp8.py $t > "$OUT/ncu_fp8_$t.log" 2>&1
             grep -E "_fp8_gemm_kernel|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Block Limit|Stall|Warp Cycles Per Issued|Executed Ipc|One or More" "$OUT/ncu_fp8_$t.log" | head -60
           done ;;
    bench) timeout ${BENCH_S:-240} python3 -m moge_kernels.bench 2>&1 | quiet | tee "$OUT/bench.log" | tail -60 ;;
    tests:*) k=${step#tests:}; timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider -n ${TESTS_N:-8} tests/test_${k}*.py 2>&1 \
           | quiet | tee "$OUT/tests_$k.log" | tail -15 ;;
    pytest) timeout ${PYTEST_S:-120} python3 -m pytest -q -p no:cacheprovider -n 8 $PYTEST_ARGS 2>&1 | quiet \
           > "$OUT/pytest.log"; grep -E "^(FAILED|ERROR)|passed|failed|^E " "$OUT/pytest.log" | head -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
stamp done
