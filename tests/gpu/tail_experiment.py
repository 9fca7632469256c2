"""Do the row-tail tiles cost the T=1024 expert GEMMs their speed? The table's gate_up and down at M=8192,
E=64 (Pangu shapes, bf16) on the real routing's expert_offsets and on equal ones: 128 rows per expert (no
tail tile at all), 120 and 140 (a 12-row tail in every expert). CUDA-graph replays, median of 9.
    python tests/gpu/tail_experiment.py
"""
import os, sys, statistics, torch
sys.path.insert(0, "bench")
import bench_experts as be
from moge_kernels.bench.timing import capture_graph, elapsed_ms
from moge_kernels.triton.grouped_gemm import launch_grouped_gemm
from moge_kernels.triton import gemm_configs as gc
import moge_kernels
moge_kernels.set_backend("triton")
E, H, I = 64, 5120, 1344
w = be.make_weights(E, H, I)
p = be.make_problem(1024, weights=w)
M = p["M"]
counts_real = (p["expert_offsets"][1:] - p["expert_offsets"][:-1]).cpu()
print("real rows/expert: min", counts_real.min().item(), "max", counts_real.max().item(), ">128:", (counts_real > 128).sum().item())
def offs_of(counts):
    o = torch.zeros(E + 1, dtype=torch.int32); o[1:] = torch.cumsum(torch.tensor(counts), 0); return o.cuda()
cases = {"real": p["expert_offsets"], "equal128": offs_of([128] * E),
         "equal120": offs_of([120] * E + []) , "equal140": offs_of([140] * E)}
x = torch.randn(140 * E, H, device="cuda").to(torch.bfloat16)
h = torch.randn(140 * E, I, device="cuda").to(torch.bfloat16)
y = torch.empty(140 * E, H, device="cuda", dtype=torch.bfloat16)
runs = {}
for name, offs in cases.items():
    m = int(offs[-1].item())
    cg = gc.table_config(M, E, True, torch.bfloat16, x.device)
    cd = gc.table_config(M, E, False, torch.bfloat16, x.device)
    runs[name + " gate_up"] = capture_graph(lambda offs=offs, m=m: launch_grouped_gemm(x[:m], w[0], offs, h[:m], True, config=cg))
    runs[name + " down"] = capture_graph(lambda offs=offs, m=m: launch_grouped_gemm(h[:m], w[1], offs, y[:m], False, config=cd))
s = {k: [] for k in runs}
for _ in range(9):
    for k, r in runs.items():
        s[k].append(elapsed_ms(r, 10))
for k, v in s.items():
    ms = statistics.median(v)
    wb = E * (2 if "gate_up" in k else 1) * I * H * 2
    print(f"{k:<18} {ms:.4f} ms  weights {wb / ms / 1e6:.0f} GB/s")
