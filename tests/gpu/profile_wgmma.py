"""One down-GEMM launch at the Pangu T=4096 shape (M=32768, E=64, K=1344, N=5120, bf16) with the cuda
backend, for ncu: MOGE_CUDA_GEMM_TILE picks the variant. Also prints its median time (CUDA events)."""
import sys

import torch

import moge_kernels as mk
from moge_kernels.testing import random_offsets

mk.set_backend("cuda")
M, E, K, N = 32768, 64, 1344, 5120
x = torch.randn(M, K, device="cuda").bfloat16()
w = (torch.randn(E, N, K, device="cuda") / K ** 0.5).bfloat16()
offsets = random_offsets(M, E, seed=1, device="cuda", empty_every=0)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
times = []
for _ in range(reps):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    mk.grouped_gemm(x, w, offsets)
    b.record()
    torch.cuda.synchronize()
    times.append(a.elapsed_time(b))
times.sort()
print(f"down GEMM M={M}: median {times[len(times) // 2]:.4f} ms over {reps}")
