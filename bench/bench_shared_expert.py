"""Shared expert: which kernel runs the dense SwiGLU MLP fastest (H=5120, Is=5376, bf16: Pangu Pro MoE).

    cublas      F.linear -> moge.swiglu -> F.linear (moge_kernels.ops.shared_expert_mlp, what the layer runs)
    grouped     moge.grouped_mlp with one expert, expert_offsets [0, T] (made once, outside the timing)

Both as CUDA-graph replays with a cold L2 (moge_kernels.bench.timing), interleaved rounds, medians; the
forward only (inference) and forward + backward (training, cublas only: the grouped path's backward is
grouped_mlp's). Prints one row per T: ms of each and grouped / cublas.

    python bench/bench_shared_expert.py                 # T in 1 16 128 1024 4096 16384
    python bench/bench_shared_expert.py --tokens 1,4096 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics

import torch

import moge_kernels as mk
from moge_kernels.bench.timing import Timer, prepare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--shared-intermediate", type=int, default=5376)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    H, Is = args.hidden, args.shared_intermediate
    g = torch.Generator(device=device).manual_seed(0)
    w_gate_up = torch.randn(2 * Is, H, device=device, dtype=dtype, generator=g) * H ** -0.5
    w_down = torch.randn(H, Is, device=device, dtype=dtype, generator=g) * Is ** -0.5
    timer = Timer(device)
    print(f"shared expert H={H} Is={Is} bf16 on {torch.cuda.get_device_name(device)}; ms, graph replays")
    print(f"{'T':>6} {'cublas':>9} {'grouped':>9} {'grouped/cublas':>15} {'fwd+bwd cublas':>15}")
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
        offsets = torch.tensor([0, T], dtype=torch.int32, device=device)
        xg = x.clone().requires_grad_()
        wg, wd = w_gate_up.clone().requires_grad_(), w_down.clone().requires_grad_()
        grad_out = torch.randn(T, H, device=device, dtype=dtype, generator=g)
        fns = {
            "cublas": lambda: mk.ops.shared_expert_mlp(x, w_gate_up, w_down),
            "grouped": lambda: mk.grouped_mlp(x, w_gate_up[None], w_down[None], offsets),
            "train": lambda: torch.autograd.grad(mk.ops.shared_expert_mlp(xg, wg, wd), (xg, wg, wd), grad_out),
        }
        torch.testing.assert_close(fns["grouped"](), fns["cublas"](), atol=2e-2, rtol=2e-2)
        runs = {name: prepare(fn, device, capture=True)[0] for name, fn in fns.items()}
        samples = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]:
                samples[name] += timer.samples(runs[name], 5)
        ms = {name: statistics.median(s) for name, s in samples.items()}
        print(f"{T:>6} {ms['cublas']:>9.4f} {ms['grouped']:>9.4f} {ms['grouped'] / ms['cublas']:>15.3f} "
              f"{ms['train']:>15.4f}")


if __name__ == "__main__":
    main()
