"""grouped_permute at the routing widths of MoE models (CUDA, bf16): each GPU backend and the torch
sort/gather/scatter permute a transformers experts module runs today, as CUDA-graph replays with a cold L2,
against the memory floor (read T*H, write T*K*H, plus the ids, row_index and offsets) at the copy bandwidth
measured in the same run. Goal (issue 18): <= 1.3x the floor at T >= 4096.

    python3 bench/bench_permute.py [--tokens 1024,4096,16384] [--drop 0.0] [--variants default,...]
                                   [--profile] [--rounds 5]

--drop: fraction of slots given id -1 (expert parallelism: slots whose expert lives on another rank).
--variants: extra tilings of the triton kernel, each a column (see VARIANTS), so that one run picks
between them; 'none' for the backends only.
--profile: per-launch device time of the triton kernel at each shape (torch.profiler, eager calls), to
see whether ranking, scan or copy holds the time."""
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
    "gpt-oss-20b": (2880, 32, 4),
    "mixtral-8x7b": (4096, 8, 2),
    "pangu-pro-moe": (5120, 64, 8),
}

# Tilings of the triton kernel the --variants columns try, as overrides of its defaults: max_blocks (the
# count-block cap: each rank program's sort against the one-program scan), max_slots (the largest sort,
# past which blocks multiply), copy ((BLOCK_T, num_warps[, BLOCK_H[, H_FAST]]) of the copy tile: index round trips
# per byte against occupancy), pdl (False: the chain without programmatic dependent launch), fused_counts
# (the largest count table the copy programs scan past decode; 0: the scan launch there), rank_in_copy
# (where the slots are ranked: the rank launch's sort, False, or the copy programs, True).
VARIANTS = {
    "blocks64": dict(max_blocks=64),
    "blocks256": dict(max_blocks=256),
    "slots4096": dict(max_slots=4096),
    "copy2": dict(copy=(2, 2)),
    "copy8x8w": dict(copy=(8, 8)),
    "copy4x8w": dict(copy=(4, 8)),
    "copy2x4w": dict(copy=(2, 4)),
    "copy1x4w": dict(copy=(1, 4)),
    "copy_h512": dict(copy=(4, 2, 512)),
    "copy_h2048": dict(copy=(4, 8, 2048)),
    "no_pdl": dict(pdl=False),
    "hfast": dict(copy=(4, 4, 1024, True)),
    "hfast1x4w": dict(copy=(1, 4, 1024, True)),
    "no_hfast": dict(copy=(4, 4, 1024, False)),
    "hfast2x4w": dict(copy=(2, 4, 1024, True)),
    "hfast8x8w": dict(copy=(8, 8, 1024, True)),
    "hfast_h2048": dict(copy=(4, 8, 2048, True)),
    "fused0": dict(fused_counts=0),
    "fused1024": dict(fused_counts=1024),
    "sort_rank": dict(rank_in_copy=False),
    "copy_rank": dict(rank_in_copy=True),
    "fused2048": dict(fused_counts=2048),
    "fused8192": dict(fused_counts=8192),
    "hfast4x2w": dict(copy=(4, 2, 1024, True)),
    "hfast2x2w": dict(copy=(2, 2, 1024, True)),
    "hfast2x2w_sort": dict(copy=(2, 2, 1024, True), rank_in_copy=False),
    "hfast2x4w_sort": dict(copy=(2, 4, 1024, True), rank_in_copy=False),
    "hfast1x2w": dict(copy=(1, 2, 1024, True)),
}


def triton_variant(hidden, ids, E, max_blocks=None, max_slots=None, copy=None, pdl=None, fused_counts=None,
                   rank_in_copy=None):
    """grouped_permute of the triton backend with some of its choices overridden (VARIANTS)."""
    from moge_kernels.triton import permute as tp
    T, K = ids.shape
    count_block_t = tp._count_config(T, K, E, max_blocks, max_slots, fused_counts=0) \
        if max_blocks or max_slots else None
    copy_config = None
    if copy:
        block_h = copy[2] if len(copy) > 2 else tp.copy_config(T, hidden.shape[1])[1]
        copy_config = (copy[0], min(block_h, tp.pow2(hidden.shape[1])), copy[1], *copy[3:])
    return lambda: tp.grouped_permute(hidden, ids, E, count_block_t=count_block_t, copy_config=copy_config,
                                      pdl=pdl, fused_counts=fused_counts, rank_in_copy=rank_in_copy)


def profile_us(fn, reps: int = 10) -> str:
    """Device time per launch of each kernel fn runs (eager calls under torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    parts = []
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.count >= reps:
            us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / event.count
            parts.append(f"{event.key.split('(')[0][:24]}={us:.1f}")
    return " ".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--drop", default="0.0")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="none",
                        help=f"comma list of {', '.join(VARIANTS)}, or 'all', or 'none'")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 20 replays a column")
    args = parser.parse_args()
    variants = list(VARIANTS) if args.variants == "all" else \
        [] if args.variants == "none" else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    device = torch.device("cuda")
    bandwidth, _ = measure_ceilings(device)                  # bytes/s, read + write
    timer = Timer(device)
    methods = ["triton", "cuda", "torch"] + variants
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; ms are medians of CUDA-graph replays, cold L2 ({timer.describe()}); "
          f"(x) = ratio to the floor; torch = sort/gather/scatter peer")
    print(f"{'model':15} {'T':>6} {'drop':>5} {'floor':>8} " + " ".join(f"{m:>16}" for m in methods))
    for name in args.models.split(","):
        H, E, K = MODELS[name]
        for T in (int(t) for t in args.tokens.split(",")):
            for drop in (float(d) for d in args.drop.split(",")):
                hidden = torch.randn(T, H, device=device, dtype=torch.bfloat16)
                ids = make_topk_ids(T, K, E, seed=T, device=device, drop=drop, empty_every=0)
                floor_ms = (T * H * 2 + T * K * H * 2 + 2 * T * K * 4 + (E + 1) * 4) / bandwidth * 1e3
                ref = R.permute(hidden, ids, E)
                replays = {}
                for method in methods:
                    if method == "torch":
                        fn = lambda: B.torch_permute(hidden, ids, E)   # noqa: E731
                    elif method in VARIANTS:
                        fn = triton_variant(hidden, ids, E, **VARIANTS[method])
                    elif mk.backends()[method]["available"]:
                        def fn(method=method):
                            with mk.use_backend(method):
                                return mk.grouped_permute(hidden, ids, E)
                    else:
                        continue
                    assert all(torch.equal(a, b) for a, b in zip(fn(), ref)), f"{method} differs"
                    replays[method] = (fn, capture_graph(fn))
                # interleaved rounds: a drift of the clock or the neighbours hits every column alike
                medians = {m: [] for m in replays}
                for _ in range(args.rounds):
                    for method, (_, replay) in replays.items():
                        medians[method].append(sorted(timer.samples(replay, 20))[10])
                cells = []
                for method in methods:
                    if method not in replays:
                        cells.append(f"{'n/a':>16}")
                        continue
                    ms = sorted(medians[method])[len(medians[method]) // 2]
                    cells.append(f"{ms:8.4f} ({ms / floor_ms:4.2f}x)")
                print(f"{name:15} {T:6d} {drop:5.2f} {floor_ms:8.4f} " + " ".join(cells), flush=True)
                if args.profile:
                    for method in ["triton"] + [m for m in variants if m in replays]:
                        try:
                            line = profile_us(replays[method][0])
                        except Exception as err:  # noqa: BLE001  the table matters more than the profile
                            line = f"profile failed: {type(err).__name__}: {err}"
                        print(f"{'':15} {method} us/launch: {line}", flush=True)


if __name__ == "__main__":
    main()
