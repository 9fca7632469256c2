"""The shared expert beside the routed experts, A/B (issue "H200 first": overlap of the routed experts
with the shared expert): the Pangu layer (H=5120, I=1344, E=64, G=8, shared 5376, bf16, triton backend)
through moge_forward with the option shared_expert_stream off (one stream: dispatch, routed grouped_mlp,
shared expert, combine) and on (the shared expert on a side stream, forked before the dispatch and
joined before the combine; ops.shared_expert_side_stream). Graph replays with a cold L2 and eager
back-to-back calls, interleaved rounds, medians; the layer's floor (weights of the experts that get rows +
the shared expert at the copy rate, or its FLOPs at the dense rate) measured in the same run. With --fp8
the routed experts are fp8_block (bf16 shared).

    python3 bench/ab_shared_overlap.py [--tokens 1,16,128,1024,4096] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels.bench.problems import floor_ms  # noqa: E402
from moge_kernels.bench.timing import Timer, capture_graph, elapsed_ms, measure_ceilings, warm_up  # noqa: E402

H, I, E, G, IS = 5120, 1344, 64, 8, 5376


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fp8", action="store_true", help="fp8_block routed experts")
    args = parser.parse_args()
    dev = torch.device("cuda")
    bandwidth, flops = measure_ceilings(dev)
    timer = Timer(dev)
    torch.manual_seed(0)
    w_gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w_down = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
    s_gate_up = torch.randn(2 * IS, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
    s_down = torch.randn(H, IS, device=dev, dtype=torch.bfloat16) * IS ** -0.5
    routed = (mk.quantize_expert_weights(w_gate_up, "fp8_block", parts=2),
              mk.quantize_expert_weights(w_down, "fp8_block")) if args.fp8 else (w_gate_up, w_down)

    def layer(hidden, logits, side):
        with mk.use_options(shared_expert_stream=side):
            return mk.moge_forward(hidden, logits, *routed, G, 1, None, False, "softmax", s_gate_up, s_down)

    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s, dense {flops / 1e12:.0f} TFLOP/s; "
          f"Pangu layer, {'fp8_block' if args.fp8 else 'bf16'} routed experts, bf16 shared expert; ms = median "
          f"over {args.rounds} interleaved rounds (graph: median of 10 cold-L2 replays; eager: 20 back-to-back "
          "calls); (x) = ratio to the layer floor")
    print(f"{'T':>6} {'floor':>7} {'graph 1 stream':>16} {'graph 2 streams':>16} {'eager 1 stream':>16} "
          f"{'eager 2 streams':>16} {'max diff':>9}")
    routed_bytes_per_expert = sum(w.weight[0].numel() + 4 * w.scale[0].numel() if args.fp8 else
                                  w[0].numel() * 2 for w in routed)
    for T in (int(t) for t in args.tokens.split(",")):
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        logits = torch.randn(T, E, device=dev)
        with torch.no_grad(), mk.use_backend("triton"):
            a, b = layer(hidden, logits, False), layer(hidden, logits, True)
            torch.cuda.synchronize()
            diff = (a.float() - b.float()).abs().max().item()
            offsets = mk.grouped_dispatch(hidden, logits, G)[3]
            active = int(((offsets[1:] - offsets[:-1]) > 0).sum())
            weight_bytes = active * routed_bytes_per_expert + 3 * H * IS * 2
            fl = 2 * T * (G * 3 * H * I + 3 * H * IS)
            floor, _ = floor_ms(fl, weight_bytes, bandwidth / 1e9, flops / 1e12)
            fns = {"one": lambda: layer(hidden, logits, False), "two": lambda: layer(hidden, logits, True)}
            graphs = {k: capture_graph(f, dev) for k, f in fns.items()}
            for f in fns.values():
                warm_up(f, dev)
            times = {(mode, k): [] for mode in ("graph", "eager") for k in fns}
            for r in range(args.rounds):
                for k in (("one", "two") if r % 2 == 0 else ("two", "one")):
                    times[("graph", k)].append(statistics.median(timer.samples(graphs[k], 10)))
                    times[("eager", k)].append(elapsed_ms(fns[k], inner=20))
        med = {key: statistics.median(v) for key, v in times.items()}
        cells = " ".join(f"{med[(m, k)]:8.4f} ({med[(m, k)] / floor:4.2f}x)"
                         for m in ("graph", "eager") for k in ("one", "two"))
        print(f"{T:6d} {floor:7.4f} {cells} {diff:9.2e}", flush=True)
        del graphs, fns


if __name__ == "__main__":
    main()
