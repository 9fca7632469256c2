"""The L2 eviction before each timed sample, a read (the default of moge_kernels.bench.timing) against a
memset (option bench_flush="write", as triton.testing.do_bench): the Pangu-shape bf16 and FP8 grouped_mlp as
CUDA-graph replays, both evictions in interleaved rounds of one run, medians, and the ratio to the
weight-read floor (weights of the experts with rows at the copy rate measured in the run). A memset
leaves the L2 dirty: the timed call writes those lines back as it evicts them.

    python3 bench/ab_flush.py [--T 1,16,128,1024] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import fp8  # noqa: E402
from moge_kernels.bench.timing import Ceilings, Timer, capture_graph  # noqa: E402

H, I, E, G = 5120, 1344, 64, 8


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="1,16,128,1024")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = mk.MoGELayer(H, I, E, G).to(dev, torch.bfloat16).eval()
    gu, dn = fp8.layer_weights(mk.MoGELayer(H, I, E, G).to(dev, torch.bfloat16).eval().quantize_("fp8_block"))
    timers = {mode: Timer(dev, flush=mode) for mode in ("read", "write")}
    ceil = Ceilings(dev, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: ms = medians of CUDA-graph replays over {args.rounds} interleaved "
          "rounds; floor = weights of the experts with rows at the copy rate of this run")
    print(f"{'T':>6} {'method':>9} {'floor':>8} {'read':>16} {'write':>16} {'write/read':>10}")
    for T in [int(t) for t in args.T.split(",")]:
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer.gate(hidden), G, 1, layer.router_scale)
            active = int((offsets.diff() > 0).sum())
            runs = {"bf16 mlp": capture_graph(lambda: mk.grouped_mlp(x, layer.w_gate_up, layer.w_down, offsets), dev),
                    "fp8 mlp": capture_graph(lambda: mk.grouped_mlp(x, gu, dn, offsets), dev)}
        bytes_ = {"bf16 mlp": active * 3 * H * I * 2,
                  "fp8 mlp": active * (gu.weight[0].numel() + dn.weight[0].numel()
                                       + 4 * (gu.scale[0].numel() + dn.scale[0].numel()))}
        times = {(m, f): [] for m in runs for f in timers}
        for r in range(args.rounds):
            order = list(timers) if r % 2 == 0 else list(timers)[::-1]
            for m, run in runs.items():
                for f in order:
                    times[(m, f)] += timers[f].samples(run, 10)
            ceil.sample(1)
        bw, _ = ceil.rates()
        for m in runs:
            floor = bytes_[m] / (bw * 1e9) * 1e3
            rd, wr = (statistics.median(times[(m, f)]) for f in ("read", "write"))
            print(f"{T:>6} {m:>9} {floor:8.4f} {rd:8.4f} ({rd / floor:.2f}x) {wr:8.4f} ({wr / floor:.2f}x) "
                  f"{wr / rd:9.3f}x", flush=True)
    print(f"copy rate {ceil.rates()[0]:.0f} GB/s")


if __name__ == "__main__":
    main()
