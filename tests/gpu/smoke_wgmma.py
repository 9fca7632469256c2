"""Quick device check of the Hopper wgmma grouped GEMM before the long runs: one gate_up + down at the Pangu
widths and a ragged plain GEMM against the reference, each in a subprocess-safe short run (a hang shows as
the caller's timeout). Prints the relative error and the kernel names the profiler saw."""
import torch

import moge_kernels as mk
from moge_kernels import _cuda
from moge_kernels import reference as R
from moge_kernels.testing import make_expert_weights, random_offsets

mk.set_backend("cuda")
print("wgmma built:", _cuda.wgmma_built(), "device:", torch.cuda.get_device_name())
for M, E, Kd, N in [(700, 3, 136, 300), (4096, 8, 512, 256)]:
    x = torch.randn(M, Kd, device="cuda").bfloat16()
    w = (torch.randn(E, N, Kd, device="cuda") / Kd ** 0.5).bfloat16()
    offsets = random_offsets(M, E, seed=M, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = mk.grouped_gemm(x, w, offsets)
        torch.cuda.synchronize()
    ref = R.grouped_gemm(x.float(), w.float(), offsets)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    print(f"gemm M={M} E={E} K={Kd} N={N}: rel err {err:.2e}",
          sorted({e.name[:60] for e in prof.events() if "kernel" in e.name}))
M, E, H, I = 8192, 8, 5120, 1344
x = torch.randn(M, H, device="cuda").bfloat16()
offsets = random_offsets(M, E, seed=1, device="cuda", empty_every=0)
w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=2)
y = mk.grouped_mlp(x, w_gate_up, w_down, offsets)
ref = R.grouped_mlp(x.float(), w_gate_up.float(), w_down.float(), offsets)
print(f"mlp pangu M={M}: rel err {((y.float() - ref).norm() / ref.norm()).item():.2e}")
