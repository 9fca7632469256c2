#!/bin/bash
# One device call: install the package the README's way (CUDA extension for sm90), then the whole test
# suite on the GPU with the default backend choice (triton on CUDA tensors), then the cuda-backend files
# again with MOGE_BACKEND=cuda. Logs under $OUT. TOTAL_TIMEOUT (s, default 560) bounds the whole call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( ${TOTAL_TIMEOUT:-560} - ($(date +%s) - T0) - 10 )); }
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stamp "pip install --no-build-isolation --no-deps -e ."
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1
echo "build exit: $?"; grep -E "moge_kernels build|error" "$OUT/build.log" | head
python3 -c "import moge_kernels as mk; print({k: v['available'] for k, v in mk.backends().items()})"
stamp "whole suite, default backends"
timeout $(left) python3 -m pytest -q -p no:cacheprovider -n 6 tests --durations=10 2>&1 \
    | grep -v Warn > "$OUT/suite.log"
echo "suite exit: ${PIPESTATUS[0]}"; tail -30 "$OUT/suite.log"
if [ "$(left)" -gt 40 ]; then
  stamp "cuda backend files, MOGE_BACKEND=cuda"
  MOGE_BACKEND=cuda timeout $(left) python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_backend.py \
      tests/test_ops_surface.py tests/test_autograd.py 2>&1 | grep -v Warn | tail -8 | tee "$OUT/suite_cuda.log"
fi
stamp done
