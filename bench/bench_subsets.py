"""Serving with fewer experts (issue 20) on the device, Pangu Pro MoE shape, bf16 (H=5120, I=1344, E=64,
G=8, k_g=1; fp32 router logits):

1. masked vs unmasked `grouped_dispatch` at every T, per GPU backend (triton, cuda): the mask is Pangu's
   300I Duo vote (`voted_expert_mask`, 5 of 8 per group) of the same logits. Goal: masked <= 1.05x.
2. a `MoGELayer` pruned to 4 of 8 experts per group (`prune_experts_`, keep set from
   `metrics.expert_importance` on calibration logits) vs the full layer, no shared expert (it is dense
   and the same in both), inference (no_grad). Goal at T=1024: pruned <= 0.55x the full layer's time.

Every time is a CUDA-graph replay after a cold-L2 flush (moge_kernels.bench.timing.Timer), the two sides
of each ratio sampled in alternating rounds so clock drift hits both; medians. About a minute on an H200.

    python bench/bench_subsets.py [--T 1,16,128,1024,4096,16384] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels.bench.timing import Timer, capture_graph, measure_ceilings  # noqa: E402
from moge_kernels.metrics import expert_importance  # noqa: E402
from moge_kernels.testing import make_routing_inputs  # noqa: E402

H, I, E, G, K_G = 5120, 1344, 64, 8, 1
DEFAULT_TS = (1, 16, 128, 1024, 4096, 16384)


def paired_medians(timer, fn_a, fn_b, rounds, per_round):
    """Median ms of fn_a and of fn_b, sampled in alternating rounds."""
    a, b = [], []
    for r in range(rounds):
        first, second = (fn_a, a), (fn_b, b)
        for fn, out in ((first, second) if r % 2 == 0 else (second, first)):
            out.extend(timer.samples(fn, per_round))
    return statistics.median(a), statistics.median(b)


def bench_dispatch(timer, Ts, rounds, per_round, device):
    backends = [b for b in ("triton", "cuda") if mk.backends()[b]["available"]]
    print(f"\n== grouped_dispatch, masked (voted 5 of 8 per group) vs unmasked, bf16 hidden, fp32 logits")
    print(f"{'backend':8s} {'T':>6s} {'unmasked ms':>12s} {'masked ms':>10s} {'masked/unmasked':>16s}  goal <= 1.05")
    worst = {}
    for backend in backends:
        with mk.use_backend(backend):
            for T in Ts:
                hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, device, seed=T)
                mask = mk.voted_expert_mask(logits, G, 5)
                plain = capture_graph(lambda: mk.grouped_dispatch(hidden, logits, G, K_G), device)
                masked = capture_graph(lambda: mk.grouped_dispatch(hidden, logits, G, K_G, expert_mask=mask),
                                       device)
                t_plain, t_masked = paired_medians(timer, plain, masked, rounds, per_round)
                ratio = t_masked / t_plain
                worst[backend] = max(worst.get(backend, 0.0), ratio)
                print(f"{backend:8s} {T:6d} {t_plain:12.4f} {t_masked:10.4f} {ratio:16.3f}"
                      f"  {'ok' if ratio <= 1.05 else 'ABOVE GOAL'}")
    for backend, ratio in worst.items():
        print(f"{backend}: worst masked/unmasked {ratio:.3f} ({'meets' if ratio <= 1.05 else 'misses'} <= 1.05)")


def bench_pruned_layer(timer, Ts, rounds, per_round, device):
    torch.manual_seed(0)
    full = mk.MoGELayer(H, I, E, G, K_G, device=device, dtype=torch.bfloat16).eval()
    pruned = mk.MoGELayer(H, I, E, G, K_G, device=device, dtype=torch.bfloat16).eval()
    pruned.load_state_dict(full.state_dict())
    with torch.no_grad():
        calib = full.gate(torch.randn(4096, H, device=device, dtype=torch.bfloat16))
        keep = expert_importance(calib, G, K_G, full.router_scale).top_experts(4)
        pruned.prune_experts_(keep)
    gib = lambda layer: (layer.w_gate_up.numel() + layer.w_down.numel()) * 2 / 2**30   # noqa: E731
    print(f"\n== MoGELayer pruned to 4 of 8 experts per group vs full (no shared expert, no_grad)")
    print(f"expert weights: full {gib(full):.2f} GiB, pruned {gib(pruned):.2f} GiB "
          f"({gib(pruned) / gib(full):.2f}x)")
    # Floors: the expert weights once at the copy rate, or the expert FLOPs at the dense matmul rate,
    # whichever is longer (both measured now). Pruning halves the weights but not the FLOPs: every token
    # still runs K experts, so where FLOPs bound the layer the pruned floor is not half the full one.
    copy_bps, mm_flops = measure_ceilings(device, torch.bfloat16)
    def weight_bytes(layer, x):
        """Bytes of the experts this batch routes to (an expert no token picks is never read)."""
        with torch.no_grad():
            offsets = mk.grouped_dispatch(x[:, :0], layer.gate(x), G, K_G, layer.router_scale)[3]
        active = int((offsets[1:] > offsets[:-1]).sum())
        per_expert = (layer.w_gate_up[0].numel() + layer.w_down[0].numel()) * 2
        return active * per_expert
    print(f"floors: max(routed experts' weights / copy {copy_bps / 1e9:.0f} GB/s, expert FLOPs / bf16 mm "
          f"{mm_flops / 1e12:.0f} TFLOP/s), measured in this run")
    print(f"{'T':>6s} {'full ms':>9s} {'pruned ms':>10s} {'pruned/full':>12s} {'full floor':>11s} "
          f"{'pruned floor':>13s} {'floor ratio':>12s} {'full/floor':>11s} {'pruned/floor':>13s}")
    for T in Ts:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            run_full = capture_graph(lambda: full(x), device)
            run_pruned = capture_graph(lambda: pruned(x), device)
        t_full, t_pruned = paired_medians(timer, run_full, run_pruned, rounds, per_round)
        ratio = t_pruned / t_full
        flops = 2 * T * K_G * G * 3 * H * I                      # gate_up (2I x H) + down (H x I) per row
        floor_full, floor_pruned = (max(weight_bytes(layer, x) / copy_bps, flops / mm_flops) * 1e3
                                    for layer in (full, pruned))
        goal = f"  goal <= 0.55: {'ok' if ratio <= 0.55 else 'MISSED'}" if T == 1024 else ""
        print(f"{T:6d} {t_full:9.4f} {t_pruned:10.4f} {ratio:12.3f} {floor_full:11.4f} {floor_pruned:13.4f} "
              f"{floor_pruned / floor_full:12.3f} {t_full / floor_full:10.2f}x {t_pruned / floor_pruned:12.2f}x"
              f"{goal}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", default=",".join(map(str, DEFAULT_TS)), help="token counts, comma-separated")
    parser.add_argument("--layer-T", default="128,1024,4096", help="token counts of the layer comparison")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_subsets.py times GPU kernels: it needs a CUDA device")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, backends: "
          + ", ".join(b for b, r in mk.backends().items() if r["available"]))
    timer = Timer(device)
    bench_dispatch(timer, [int(t) for t in args.T.split(",")], args.rounds, args.per_round, device)
    bench_pruned_layer(timer, [int(t) for t in args.layer_T.split(",")], args.rounds, args.per_round, device)


if __name__ == "__main__":
    main()
