"""Dispatch + combine benchmark: Triton `moge::grouped_dispatch` / `moge::grouped_combine` vs eager and the floor.

Pangu Pro MoE routing by default (H=5120, E=64, G=8, k_g=1 so K=8; bf16 hidden, fp32 router logits).
For each T: the kernel's time (triton.testing.do_bench median, which zeroes a 256 MB buffer before each
call, so every call starts with a cold L2 and the host's launch cost overlaps that memset), the eager
reference's time (moge_kernels.reference: route + argsort permute; K gathers + fp32 sum), and the memory
floor = bytes / device copy bandwidth, the bandwidth measured in the same run (1 GiB device-to-device
copy, bytes read + written):

    dispatch bytes = T*H*es (read hidden) + T*K*H*es (write permuted) + T*E*4 (read logits)
    combine bytes  = T*K*H*es (read expert_out) + T*H*es (write out)

'x floor' = kernel / floor (1.0 is the floor), 'x eager' = eager / kernel (speed-up). 'graph us' is the
dispatch timed as a CUDA-graph replay (no launch gaps), for the decode sizes.

    python bench/bench_dispatch_combine.py                  # the table, T in {1,16,128,1024,4096,16384}
    python bench/bench_dispatch_combine.py --T 1,4096 --sweep --profile --host
    python bench/bench_dispatch_combine.py --check          # small correctness run (compute-sanitizer)
Reusable: run(rows_out=None, Ts=..., ...) -> (rows, copy_gbs); format_table(rows, copy_gbs, device).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import reference as R  # noqa: E402
from moge_kernels.bench.report import print_table  # noqa: E402
from moge_kernels.bench.timing import capture_graph, measure_ceilings  # noqa: E402
from moge_kernels.testing import make_routing_inputs  # noqa: E402

DEFAULT_TS = (1, 16, 128, 1024, 4096, 16384)
PANGU = dict(H=5120, E=64, G=8, k_g=1)


def do_bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_inputs(T, H, E, G, k_g, dtype, device, seed=0, logits_dtype=torch.float32):
    hidden, logits = make_routing_inputs(T, E, H, dtype, device, seed=seed, logits_dtype=logits_dtype)
    permuted, weights, _, _, row_index = R.grouped_dispatch(hidden, logits, G, k_g)
    expert_out = torch.randn_like(permuted)
    return dict(hidden=hidden, logits=logits, weights=weights, row_index=row_index, expert_out=expert_out)


def run(rows_out=None, Ts=DEFAULT_TS, shape=PANGU, dtype=torch.bfloat16, logits_dtype=torch.float32,
        device="cuda", eager=True, graph=True, log=print):
    """Time dispatch and combine for each T; returns (rows, copy_gbs) and appends the rows to rows_out."""
    H, E, G, k_g = shape["H"], shape["E"], shape["G"], shape["k_g"]
    K = G * k_g
    es = torch.finfo(dtype).bits // 8
    copy_gbs = measure_ceilings(device)[0] / 1e9      # 1 GiB device-to-device copy, read + write
    bw = copy_gbs * 1e6                               # bytes per ms
    rows = []
    with mk.use_backend("triton"):
        for T in Ts:
            log(f"  T={T}")
            x = make_inputs(T, H, E, G, k_g, dtype, device, seed=T, logits_dtype=logits_dtype)
            dispatch = lambda: torch.ops.moge.grouped_dispatch(x["hidden"], x["logits"], G, k_g)  # noqa
            combine = lambda: torch.ops.moge.grouped_combine(x["expert_out"], x["weights"],  # noqa
                                                             x["row_index"])
            # the timed kernels are right before they are timed
            out, ref = dispatch(), R.grouped_dispatch(x["hidden"], x["logits"], G, k_g)
            for name, a, b in zip(("permuted", "weights", "ids", "offsets", "row_index"), out, ref):
                ok = torch.equal(a, b) if name != "weights" else torch.allclose(a, b, rtol=1e-6, atol=0)
                assert ok, f"T={T}: dispatch {name} differs from the reference"
            del out, ref
            torch.testing.assert_close(combine(), R.grouped_combine(x["expert_out"], x["weights"],
                                                                    x["row_index"]), rtol=1.6e-2, atol=1.6e-2)
            row = dict(T=T)
            row["dispatch_ms"] = do_bench(dispatch)
            row["dispatch_graph_ms"] = do_bench(capture_graph(dispatch)) if graph else float("nan")
            row["dispatch_eager_ms"] = do_bench(lambda: R.grouped_dispatch(x["hidden"], x["logits"], G, k_g)) \
                if eager else float("nan")
            row["dispatch_floor_ms"] = (T * H * es + T * K * H * es + T * E * x["logits"].element_size()) / bw
            row["combine_ms"] = do_bench(combine)
            row["combine_eager_ms"] = do_bench(lambda: R.grouped_combine(x["expert_out"], x["weights"],
                                                                         x["row_index"])) \
                if eager else float("nan")
            row["combine_floor_ms"] = (T * K * H * es + T * H * es) / bw
            for op in ("dispatch", "combine"):
                row[f"{op}_x_floor"] = row[f"{op}_ms"] / row[f"{op}_floor_ms"]
                row[f"{op}_x_eager"] = row[f"{op}_eager_ms"] / row[f"{op}_ms"]
            rows.append(row)
            del x
            torch.cuda.empty_cache()
    if rows_out is not None:
        rows_out.extend(rows)
    return rows, copy_gbs


def format_table(rows, copy_gbs, device_name, shape=PANGU, dtype=torch.bfloat16) -> str:
    lines = [f"dispatch + combine on {device_name} | torch {torch.__version__} | triton {_triton_version()} | "
             f"H={shape['H']} E={shape['E']} G={shape['G']} k_g={shape['k_g']} {dtype}, fp32 logits",
             f"measured copy bandwidth (read + write): {copy_gbs:.0f} GB/s; times are do_bench medians, ms",
             f"{'T':>6} | {'dispatch':>9} {'graph us':>9} {'eager':>8} {'floor':>8} {'x floor':>8} "
             f"{'x eager':>8} | {'combine':>9} {'eager':>8} {'floor':>8} {'x floor':>8} {'x eager':>8}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        lines.append(
            f"{r['T']:>6} | {r['dispatch_ms']:>9.4f} {r['dispatch_graph_ms'] * 1e3:>9.1f} "
            f"{r['dispatch_eager_ms']:>8.4f} {r['dispatch_floor_ms']:>8.4f} {r['dispatch_x_floor']:>7.2f}x "
            f"{r['dispatch_x_eager']:>7.1f}x | {r['combine_ms']:>9.4f} {r['combine_eager_ms']:>8.4f} "
            f"{r['combine_floor_ms']:>8.4f} {r['combine_x_floor']:>7.2f}x {r['combine_x_eager']:>7.1f}x")
    return "\n".join(lines)


def _triton_version():
    import triton
    return triton.__version__


# ----------------------------------------------------------------------------- tuning aids
COPY_CONFIGS = [(1, 512, 2), (1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (4, 1024, 4, True), (4, 512, 4), (1, 2048, 8)]
COMBINE_CONFIGS = [(1, 512, 2), (1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (2, 512, 4)]
ROUTE_BLOCKS = [1, 2, 4, 8, 16, 32, 64]


def sweep(Ts=(16, 128, 1024, 4096), shape=PANGU, dtype=torch.bfloat16, device="cuda", log=print):
    """Time candidate tiles (us, CUDA-graph replays: the GPU time without host launch cost)."""
    from moge_kernels.triton import combine as C, dispatch as D
    H, E, G, k_g = shape["H"], shape["E"], shape["G"], shape["k_g"]

    def us(fn):
        return do_bench(capture_graph(fn)) * 1e3

    for T in Ts:
        x = make_inputs(T, H, E, G, k_g, dtype, device, seed=T)
        h, lg = x["hidden"], x["logits"]
        cells = [f"route{b}={us(lambda: D.grouped_dispatch(h, lg, G, k_g, route_block_t=b)):.1f}"
                 for b in ROUTE_BLOCKS if b <= max(T, 1)]
        cells += [f"default={us(lambda: D.grouped_dispatch(h, lg, G, k_g)):.1f}"]
        log(f"sweep T={T} dispatch us: " + " ".join(cells))
        default_copy = D.copy_config(T, H)
        cells = [f"copy{c}{'*' if c == default_copy else ''}="
                 f"{us(lambda: D.grouped_dispatch(h, lg, G, k_g, copy_config=c)):.1f}" for c in COPY_CONFIGS]
        log(f"sweep T={T} dispatch us: " + " ".join(cells))
        default_comb = C._combine_config(T, H)
        cells = [f"comb{c}{'*' if c == default_comb else ''}="
                 f"{us(lambda: C.grouped_combine(x['expert_out'], x['weights'], x['row_index'], config=c)):.1f}"
                 for c in COMBINE_CONFIGS]
        log(f"sweep T={T} combine us: " + " ".join(cells))
        del x
        torch.cuda.empty_cache()


def profile(Ts=(1, 16, 128, 4096), shape=PANGU, dtype=torch.bfloat16, device="cuda", log=print):
    """Per-kernel device time of one dispatch and one combine (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    H, E, G, k_g = shape["H"], shape["E"], shape["G"], shape["k_g"]
    with mk.use_backend("triton"):
        for T in Ts:
            x = make_inputs(T, H, E, G, k_g, dtype, device, seed=T)
            fns = (lambda: torch.ops.moge.grouped_dispatch(x["hidden"], x["logits"], G, k_g),
                   lambda: torch.ops.moge.grouped_combine(x["expert_out"], x["weights"], x["row_index"]))
            for fn in fns:
                fn()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    for fn in fns:
                        fn()
                torch.cuda.synchronize()
            cells = []
            for evt in prof.key_averages():
                if evt.key.startswith("_") and "kernel" in evt.key:
                    total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
                    cells.append(f"{evt.key}={total / max(evt.count, 1):.2f}")
            log(f"profile T={T} us per launch: " + " ".join(cells))


def host_overhead(T=1, shape=PANGU, dtype=torch.bfloat16, device="cuda", calls=200, log=print):
    """Host microseconds per call (no synchronisation in the loop), and where dispatch's host time goes."""
    import cProfile
    import io
    import pstats
    import time
    H, E, G, k_g = shape["H"], shape["E"], shape["G"], shape["k_g"]
    x = make_inputs(T, H, E, G, k_g, dtype, device, seed=T)
    from moge_kernels.triton import combine as C, dispatch as D
    fns = {
        "op dispatch": lambda: torch.ops.moge.grouped_dispatch(x["hidden"], x["logits"], G, k_g),
        "launcher dispatch": lambda: D.grouped_dispatch(x["hidden"], x["logits"], G, k_g),
        "op combine": lambda: torch.ops.moge.grouped_combine(x["expert_out"], x["weights"], x["row_index"]),
        "launcher combine": lambda: C.grouped_combine(x["expert_out"], x["weights"], x["row_index"]),
        "torch.empty x1": lambda: torch.empty(T, 8, device=device),
    }
    with mk.use_backend("triton"):
        for name, fn in fns.items():
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            host_us = (time.perf_counter() - start) / calls * 1e6
            torch.cuda.synchronize()
            log(f"host T={T} {name}: {host_us:.1f} us/call")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fns["op dispatch"]()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
        log("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-2500:])


def check(device="cuda", dtype=torch.bfloat16):
    """Small dispatch + combine against the reference (the case compute-sanitizer runs)."""
    from moge_kernels.triton import dispatch as D
    with mk.use_backend("triton"):
        for T, E, G, k_g, H, rbt in [(1, 64, 8, 1, 5120, None), (37, 64, 8, 1, 200, None),
                                     (300, 64, 8, 1, 72, None), (45, 32, 4, 2, 33, 4), (9, 256, 16, 4, 17, 2)]:
            hidden, logits = make_routing_inputs(T, E, H, dtype, device, seed=T, dead_experts=3)
            out = D.grouped_dispatch(hidden, logits, G, k_g, route_block_t=rbt)
            ref = R.grouped_dispatch(hidden, logits, G, k_g)
            for a, b in zip(out[2:] + out[:1], ref[2:] + ref[:1]):
                assert torch.equal(a, b)
            torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=0)
            shared = torch.randn_like(hidden)
            comb = mk.grouped_combine(out[0], out[1], out[4], shared)
            torch.testing.assert_close(comb, R.grouped_combine(ref[0], ref[1], ref[4], shared),
                                       rtol=1.6e-2, atol=1.6e-2)
    if device == "cuda":
        torch.cuda.synchronize()
    print("check: dispatch + combine match the reference")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", default=None, help="comma list of token counts")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tiles")
    parser.add_argument("--profile", action="store_true", help="also list per-kernel device times")
    parser.add_argument("--host", action="store_true", help="also measure host time per call (T=1)")
    parser.add_argument("--check", action="store_true", help="only the small correctness run")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.check:
        check()
        return
    Ts = tuple(int(t) for t in args.T.split(",")) if args.T else DEFAULT_TS
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.host:
        host_overhead(log=log)
    if args.profile:
        profile(log=log)
    if args.sweep:
        sweep(log=log)
    rows, copy_gbs = run(Ts=Ts, eager=not args.no_eager, log=log)
    print_table(format_table(rows, copy_gbs, torch.cuda.get_device_name()), args.out)


if __name__ == "__main__":
    main()
