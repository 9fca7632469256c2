#!/bin/bash
# Which C++ TORCH_CHECKs of the extensions raise a Python error and which kill the process, each case in its
# own subprocess (a crash shows its native backtrace under gdb where gdb exists). Run after the build.
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-}
probe() {   # $1 name, $2 preamble (imports), $3 the call
  local code="$2
try:
    $3
    print('returned')
except Exception as e:
    print('raised', type(e).__name__, str(e).splitlines()[0][:110])"
  local out; out=$(timeout 90 python3 -X faulthandler -c "$code" 2>&1 | grep -v Warn | tail -4); local rc=$?
  echo "[$1] $out"
  if ! grep -q raised <<<"$out" && command -v gdb >/dev/null; then
    timeout 120 gdb -q -batch -ex run -ex bt --args python3 -c "$code" 2>&1 | grep -E "^#|signal" | head -25
  fi
}
FULL="import torch, moge_kernels"
ONLY_C="import torch, glob; torch.ops.load_library(glob.glob('moge_kernels/_C*.so')[0])"
X="torch.randn(4,8), torch.randn(4,8)"
probe "dispatch score_func=2, package"          "$FULL"   "torch.ops.moge_C.grouped_dispatch($X, 2, 1, None, False, 2)"
probe "dispatch score_func=2, _C alone"         "$ONLY_C" "torch.ops.moge_C.grouped_dispatch($X, 2, 1, None, False, 2)"
probe "dispatch num_groups=3 (int in message)"  "$ONLY_C" "torch.ops.moge_C.grouped_dispatch($X, 3, 1, None, False, 0)"
probe "dispatch hidden 1-D (no int)"            "$ONLY_C" "torch.ops.moge_C.grouped_dispatch(torch.randn(4), torch.randn(4,8), 2, 1, None, False, 0)"
probe "dispatch mask dtype (no int)"            "$ONLY_C" "torch.ops.moge_C.grouped_dispatch($X, 2, 1, None, False, 0, torch.ones(8))"
probe "permute num_experts=0 (no int)"          "$ONLY_C" "torch.ops.moge_C.grouped_permute(torch.randn(4,8), torch.zeros(4,2,dtype=torch.int32), 0)"
probe "combine rows (no int)"                   "$ONLY_C" "torch.ops.moge_C.grouped_combine(torch.randn(4,8), torch.randn(3,2), torch.zeros(3,2,dtype=torch.int32), None)"
probe "gemm offsets (int in message?)"          "$ONLY_C" "torch.ops.moge_C.grouped_gemm(torch.randn(4,8), torch.randn(2,3,8), torch.zeros(5,dtype=torch.int32))"
probe "dispatch valid call"                     "$ONLY_C" "print(len(torch.ops.moge_C.grouped_dispatch($X, 2, 1, None, False, 0)))"
gcc --version | head -1; python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)"
