"""grouped_permute at the routing widths of transformers MoE models (CUDA, bf16): each GPU backend and the
torch sort/gather/scatter permute a transformers experts module runs today, as CUDA-graph replays with a
cold L2, against the memory floor (read T*H, write T*K*H, plus the ids, row_index and offsets) at the copy
bandwidth measured in the same run. Goal (issue 18): <= 1.3x the floor at T >= 4096.

    python3 bench/bench_permute.py [--tokens 1,128,1024,4096,16384] [--drop 0.0,0.5]

--drop: fraction of slots given id -1 (expert parallelism: slots whose expert lives on another rank)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import reference as R  # noqa: E402
from moge_kernels.bench import baselines as B  # noqa: E402
from moge_kernels.bench.timing import Timer, capture_graph, measure_ceilings  # noqa: E402
from moge_kernels.testing import make_topk_ids  # noqa: E402

MODELS = {   # name: (H, E, K)
    "qwen3-30b-a3b": (2048, 128, 8),
    "mixtral-8x7b": (4096, 8, 2),
    "gpt-oss-20b": (2880, 32, 4),
}


def graph_ms(fn, timer: Timer, reps: int = 20) -> float:
    return sorted(timer.samples(capture_graph(fn), reps))[reps // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,128,1024,4096,16384")
    parser.add_argument("--drop", default="0.0,0.5")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth, _ = measure_ceilings(device)                  # bytes/s, read + write
    timer = Timer(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; ms are medians of CUDA-graph replays, cold L2")
    print(f"{'model':15} {'T':>6} {'drop':>5} {'floor':>8} " + " ".join(f"{m:>16}" for m in
                                                                    ("triton", "cuda", "torch")))
    for name, (H, E, K) in MODELS.items():
        for T in (int(t) for t in args.tokens.split(",")):
            for drop in (float(d) for d in args.drop.split(",")):
                hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
                ids = make_topk_ids(T, K, E, seed=T, device=device, drop=drop, empty_every=0)
                floor_ms = (T * H * 2 + T * K * H * 2 + 2 * T * K * 4 + (E + 1) * 4) / bandwidth * 1e3
                ref = R.permute(hidden, ids, E)
                cells = []
                for method in ("triton", "cuda", "torch"):
                    if method == "torch":
                        fn = lambda: B.torch_permute(hidden, ids, E)   # noqa: E731
                    elif mk.backends()[method]["available"]:
                        def fn(method=method):
                            with mk.use_backend(method):
                                return mk.grouped_permute(hidden, ids, E)
                    else:
                        cells.append(f"{'n/a':>16}")
                        continue
                    assert all(torch.equal(a, b) for a, b in zip(fn(), ref)), f"{method} differs"
                    ms = graph_ms(fn, timer)
                    cells.append(f"{ms:8.4f} ({ms / floor_ms:4.2f}x)")
                print(f"{name:15} {T:6d} {drop:5.2f} {floor_ms:8.4f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
