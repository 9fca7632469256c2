"""Two FP8 grouped_mlp calls of the triton backend at the Pangu shape (bench/bench_fp8.py's weights and
routing), for Nsight Compute:
    ncu --kernel-name regex:_fp8_gemm_kernel --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python tests/gpu/ncu_fp8.py 4096
(the first call compiles; the second call's gate_up and down launches are the profiled ones)."""
import sys

import torch

import moge_kernels as mk
from moge_kernels import fp8

H, I, E, G = 5120, 1344, 64, 8
T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
torch.manual_seed(0)
layer = mk.MoGELayer(H, I, E, G).to("cuda", torch.bfloat16).eval().quantize_("fp8_block")
gu, dn = fp8.layer_weights(layer)
hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
with torch.no_grad(), mk.use_backend("triton"):
    x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer.gate(hidden), G, 1, layer.router_scale)
    for _ in range(2):
        mk.grouped_mlp(x, gu, dn, offsets)
torch.cuda.synchronize()
