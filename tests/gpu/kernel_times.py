"""GPU time per kernel of one eager bf16 grouped_mlp call and one MoGELayer call (triton backend, Pangu
shape, torch.profiler CUDA activities, means of 20 calls): where a decode step's time goes between its
kernels and the gaps between them.
    python tests/gpu/kernel_times.py 1 16 1024"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import moge_kernels as mk

H, I, E, G = 5120, 1344, 64, 8
torch.manual_seed(0)
layer = mk.MoGELayer(H, I, E, G, shared_intermediate_size=5376).to("cuda", torch.bfloat16).eval()
for T in [int(t) for t in sys.argv[1:]] or [1]:
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), mk.use_backend("triton"):
        x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer.gate(hidden), G, 1, layer.router_scale)
        for name, fn in (("bf16 mlp", lambda: mk.grouped_mlp(x, layer.w_gate_up, layer.w_down, offsets)),
                         ("bf16 layer", lambda: layer(hidden))):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                start.record()
                for _ in range(20):
                    fn()
                end.record()
                torch.cuda.synchronize()
            rows = [(e.key, e.device_time_total / 20, e.count // 20) for e in prof.key_averages()
                    if e.device_time_total > 0]
            rows.sort(key=lambda r: -r[1])
            print(f"\n{name} T={T}: {start.elapsed_time(end) / 20 * 1e3:.1f} us a call back to back "
                  f"(profiled), kernels sum {sum(r[1] for r in rows):.1f} us:")
            for key, us, n in rows[:12]:
                print(f"  {us:8.1f} us  x{n}  {key[:100]}")
