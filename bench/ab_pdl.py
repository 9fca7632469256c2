"""Programmatic dependent launch (option triton_pdl) on and off, in interleaved rounds, as CUDA-graph
replays with a cold L2, medians per round, then the median over rounds (CUDA, bf16, sm_90+): the Triton
grouped_dispatch (Pangu routing), grouped_permute (Qwen3-30B, gpt-oss-20b, Mixtral widths), the
Pangu-shape grouped_mlp in bf16 and FP8 (fp8_block) and the bf16 layer (moge_forward, cases "layer",
where each op's first launch depends on the op before it). The floor: the bytes the call must move (for
the mlp and the layer, the weights of the experts with rows).

    python3 bench/ab_pdl.py [--tokens 1024,4096,16384] [--rounds 5] [--cases dispatch,permute,mlp,layer]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moge_kernels.bench.timing import Timer, capture_graph, measure_ceilings  # noqa: E402
import moge_kernels as mk  # noqa: E402
from moge_kernels import fp8  # noqa: E402
from moge_kernels.testing import make_expert_weights, make_routing_inputs, make_topk_ids  # noqa: E402
from moge_kernels.triton import dispatch as td, permute as tp  # noqa: E402

PERMUTE_MODELS = {"qwen3-30b-a3b": (2048, 128, 8), "gpt-oss-20b": (2880, 32, 4), "mixtral-8x7b": (4096, 8, 2)}


def _with_pdl(fn):
    def run(pdl):
        with mk.use_options(triton_pdl=pdl), torch.no_grad():
            return fn()
    return run


def mlp_cases(T):
    """The Pangu-shape grouped_mlp, bf16 and fp8_block weights, from Pangu routing."""
    H, I, E, G = 5120, 1344, 64, 8
    torch.manual_seed(0)
    layer = mk.MoGELayer(H, I, E, G).to("cuda", torch.bfloat16).eval()
    gu, dn = fp8.layer_weights(mk.MoGELayer(H, I, E, G).to("cuda", torch.bfloat16).eval().quantize_("fp8_block"))
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=T)
    x, _, _, offsets, _ = mk.grouped_dispatch(hidden, logits, G)
    active = int((offsets.diff() > 0).sum())
    yield ("mlp pangu bf16", active * 3 * H * I * 2,
           _with_pdl(lambda: mk.grouped_mlp(x, layer.w_gate_up, layer.w_down, offsets)))
    yield ("mlp pangu fp8", active * (gu.weight[0].numel() + dn.weight[0].numel()),
           _with_pdl(lambda: mk.grouped_mlp(x, gu, dn, offsets)))


def cases(T, kinds):
    """(name, floor bytes, fn(pdl)) of every timed call at T tokens."""
    if "mlp" in kinds:
        yield from mlp_cases(T)
    if "layer" in kinds:     # the whole layer: each op's first launch depends on the op before it
        H, I, E, G = 5120, 1344, 64, 8
        hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=T)
        w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=T)
        active = int((mk.grouped_dispatch(hidden, logits, G)[3].diff() > 0).sum())
        yield ("layer pangu bf16", active * 3 * H * I * 2,
               _with_pdl(lambda: mk.moge_forward(hidden, logits, w_gate_up, w_down, G)))
    hidden, logits = make_routing_inputs(T, 64, 5120, torch.bfloat16, "cuda", seed=T)
    if "dispatch" in kinds:
        yield ("dispatch pangu", T * 5120 * 2 * 9 + T * 64 * 4,
               lambda pdl: td.grouped_dispatch(hidden, logits, 8, pdl=pdl))
    for name, (H, E, K) in PERMUTE_MODELS.items() if "permute" in kinds else ():
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = make_topk_ids(T, K, E, seed=T, device="cuda", drop=0.0, empty_every=0)
        yield (f"permute {name}", T * H * 2 * (K + 1) + 2 * T * K * 4,
               lambda pdl, x=x, ids=ids, E=E: tp.grouped_permute(x, ids, E, pdl=pdl))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default="dispatch,permute,mlp,layer")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth, _ = measure_ceilings(device)
    timer = Timer(device)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s; ms = median over {args.rounds} "
          "interleaved rounds of the median of 20 graph replays (cold L2); (x) = ratio to the memory floor")
    print(f"{'case':28} {'T':>6} {'floor':>8} {'pdl on':>16} {'pdl off':>16} {'off/on':>7}")
    for T in (int(t) for t in args.tokens.split(",")):
        for name, floor_bytes, fn in cases(T, args.cases.split(",")):
            graphs = {pdl: capture_graph(lambda pdl=pdl: fn(pdl)) for pdl in (True, False)}
            times = {True: [], False: []}
            for _ in range(args.rounds):
                for pdl, graph in graphs.items():
                    times[pdl].append(sorted(timer.samples(graph, 20))[10])
            on, off = (statistics.median(times[p]) for p in (True, False))
            floor = floor_bytes / bandwidth * 1e3
            print(f"{name:28} {T:6d} {floor:8.4f} {on:8.4f} ({on / floor:4.2f}x) {off:8.4f} ({off / floor:4.2f}x)"
                  f" {off / on:6.3f}x", flush=True)
            del graphs


if __name__ == "__main__":
    main()
