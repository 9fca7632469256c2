"""H200 probe (one device call): an extended config sweep of the mid and prefill regimes, and where the
host time of eager calls goes. Figures land in bench/results/; usage on the GPU machine:
    python bench/h200_probe.py sweep --T 1024,4096     # extra candidates beside gemm_configs.CANDIDATES
    python bench/h200_probe.py host                    # eager vs graph per op at T=1, cProfile tops
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moge_kernels as mk  # noqa: E402
from moge_kernels.triton import gemm_configs  # noqa: E402
from moge_kernels.triton.gemm_configs import GemmConfig as C  # noqa: E402

W = dict(tma=True)          # SwiGLU through TMA is the wide box (the only TMA gate_up)
# Extra candidates: more programs per wave (narrower n, 64-row tiles), deeper pipelines, larger k slices.
EXTRA = {
    ("medium", True): [C(128, 128, 64, 8, 4, tail_m=16, split_n=True, **W),
                       C(128, 64, 64, 8, 5, tail_m=16, split_n=True, **W),
                       C(128, 64, 64, 4, 5, tail_m=16, split_n=True, **W),
                       C(64, 128, 64, 4, 4, split_n=True, **W),
                       C(64, 128, 64, 8, 4, split_n=True, **W),
                       C(64, 64, 64, 4, 6, split_n=True, **W),
                       C(128, 128, 128, 8, 2, tail_m=16, split_n=True, **W),
                       C(128, 128, 32, 8, 7, tail_m=16, split_n=True, **W)],
    ("medium", False): [C(128, 128, 64, 8, 4, tma=True, split_m=True),
                        C(128, 128, 64, 4, 5, tma=True, split_m=True),
                        C(64, 128, 64, 4, 6, tma=True),
                        C(64, 256, 64, 4, 4, tma=True),
                        C(128, 256, 64, 8, 4, tma=True, tail_m=64),
                        C(128, 256, 32, 8, 7, tma=True, split_m=True),
                        C(128, 128, 128, 8, 3, tma=True, split_m=True)],
    ("prefill", True): [C(128, 128, 64, 8, 4, split_n=True, **W),
                        C(128, 128, 64, 8, 3, split_n=True, **W),
                        C(128, 128, 32, 8, 7, split_n=True, **W),
                        C(128, 64, 64, 8, 5, split_n=True, **W)],
    ("prefill", False): [C(128, 256, 64, 8, 4, tma=True, persistent=1),
                         C(128, 256, 32, 8, 7, tma=True, persistent=1),
                         C(128, 128, 64, 8, 4, tma=True, persistent=1),
                         C(128, 128, 64, 8, 5, tma=True, persistent=2)],
}


def sweep(Ts):
    import bench_experts as b
    for key, extra in EXTRA.items():
        gemm_configs.CANDIDATES[key] = list(dict.fromkeys(gemm_configs.CANDIDATES[key] + extra))
    b.precompile((torch.bfloat16,), 16, table_dtypes=())
    b.sweep(Ts=Ts, rounds=5)


def host():
    from triton.testing import do_bench, do_bench_cudagraph
    dev, dt = "cuda", torch.bfloat16
    for name, (H, I, E, G, kg) in {"pangu": (5120, 1344, 64, 8, 1), "qwen3": (2048, 768, 128, 1, 8)}.items():
        for T in (1, 1024):
            hidden = torch.randn(T, H, device=dev, dtype=dt)
            logits = torch.randn(T, E, device=dev, dtype=dt)
            wgu = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * H ** -0.5
            wd = torch.randn(E, H, I, device=dev, dtype=dt) * I ** -0.5
            perm, w, ids, offs, ri = mk.grouped_dispatch(hidden, logits, G, kg)
            eo = mk.grouped_mlp(perm, wgu, wd, offs)
            calls = {
                "dispatch": lambda: mk.grouped_dispatch(hidden, logits, G, kg),
                "mlp": lambda: mk.grouped_mlp(perm, wgu, wd, offs),
                "combine": lambda: mk.grouped_combine(eo, w, ri),
                "layer": lambda: mk.moge_forward(hidden, logits, wgu, wd, G, kg),
            }
            for op, fn in calls.items():
                fn()
                eager = do_bench(fn, warmup=20, rep=100, return_mode="median")
                graph = do_bench_cudagraph(fn, rep=100, return_mode="median")
                print(f"{name:6} T={T:5} {op:9} eager {eager * 1e3:8.1f} us  graph {graph * 1e3:8.1f} us  "
                      f"host-bound excess {max(eager - graph, 0) * 1e3:7.1f} us", flush=True)
            if T == 1:
                for op in ("dispatch", "mlp", "combine"):
                    fn = calls[op]
                    prof = cProfile.Profile()
                    torch.cuda.synchronize()
                    prof.enable()
                    for _ in range(200):
                        fn()
                    prof.disable()
                    torch.cuda.synchronize()
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
                    print(f"--- cProfile {name} {op} x200 (tottime)\n" + "\n".join(s.getvalue().splitlines()[:34]))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("sweep", "host"))
    p.add_argument("--T", default="1024,4096")
    a = p.parse_args()
    sweep(tuple(int(t) for t in a.T.split(","))) if a.what == "sweep" else host()
