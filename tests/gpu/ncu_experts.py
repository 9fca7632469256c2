"""Two calls of the Triton grouped_mlp at the Pangu shape on one stream, for Nsight Compute:
    ncu --kernel-name regex:grouped_gemm --launch-skip 2 --launch-count 2 python tests/gpu/ncu_experts.py 1024
(the first call compiles; the second call's gate_up and down launches are the profiled ones)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
os.environ.setdefault("MOGE_TRITON_MLP_STREAMS", "0")
import bench_experts as be  # noqa: E402
import moge_kernels  # noqa: E402

moge_kernels.set_backend("triton")
T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
p = be.make_problem(T)
for _ in range(2):
    be.triton_mlp(p)
torch.cuda.synchronize()
