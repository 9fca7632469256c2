"""Expert-MLP benchmark: Triton `moge::grouped_mlp` vs the `torch._grouped_mm` pipeline and the eager loop.

Pangu Pro MoE experts by default (H=5120, I=1344, E=64, G=8, top-1 per group so K=8, bf16), realistic
routing (random softmax logits -> grouped top-1 through moge_kernels.reference.route -> expert_offsets).
Everything is measured in one run, interleaved round by round, medians reported: the two ceilings (a
device-to-device copy, bytes read + written; a dense 8192^3 cuBLAS GEMM) are sampled in the same rounds
as the kernels, because at large T the card reaches its power limit and clocks drop.

    floor  = max(6*T*K*H*I / dense_rate, active_expert_weight_bytes / copy_bandwidth)
    TFLOP/s counts useful FLOPs only (6*T*K*H*I); GB/s counts active weights + x read + h written and
    read + y written. For T with >= 64 rows per expert, also the same FLOPs as two dense cuBLAS GEMMs at
    the real shapes (`dense_gemms`), timed in the same rounds. Ratios are time / other time (< 1: ours is faster).

The Triton and _grouped_mm pipelines are timed as CUDA-graph replays (no launch gaps); the eager loop
(moge_kernels.reference.grouped_mlp) syncs with the host per call, so it is timed as called.

    python bench/bench_experts.py                      # the table, T in {1,16,128,1024,4096,16384}
    python bench/bench_experts.py --T 1,4096 --rounds 5
    python bench/bench_experts.py --sweep              # time every candidate config per regime
Reusable: `bench_experts(...) -> (rows, ceilings)`, `format_table(rows, ceilings, device)`, `sweep(...)`.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels  # noqa: E402
from moge_kernels import reference  # noqa: E402
from moge_kernels.bench.report import print_table  # noqa: E402
from moge_kernels.bench.timing import Ceilings, capture_graph, elapsed_ms  # noqa: E402

DEFAULT_TS = (1, 16, 128, 1024, 4096, 16384)
PANGU = dict(H=5120, I=1344, E=64, G=8, k_g=1)


# ----------------------------------------------------------------------------- problem
def make_problem(T, H=5120, I=1344, E=64, G=8, k_g=1, dtype=torch.bfloat16, device="cuda", seed=0,
                 weights=None):
    """Routed expert inputs: x [T*K, H] expert-sorted, expert_offsets [E+1] int32, weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, generator=g, device=device, dtype=torch.float32) * 2
    _, topk_ids = reference.route(logits, G, k_g)                       # [T, K] int32
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=E)
    expert_offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
    expert_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    M = T * G * k_g
    x = torch.randn(M, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    if weights is None:
        weights = make_weights(E, H, I, dtype, device, seed + 1)
    w_gate_up, w_down = weights
    return dict(T=T, M=M, H=H, I=I, E=E, K=G * k_g, x=x, expert_offsets=expert_offsets,
                w_gate_up=w_gate_up, w_down=w_down,
                active_experts=int((counts > 0).sum().item()))


def make_weights(E, H, I, dtype=torch.bfloat16, device="cuda", seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w_down = torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):   # per expert: no fp32 copy of all weights at once
        w_gate_up[e] = (torch.randn(2 * I, H, generator=g, device=device) / H ** 0.5).to(dtype)
        w_down[e] = (torch.randn(H, I, generator=g, device=device) / I ** 0.5).to(dtype)
    return w_gate_up, w_down


def triton_mlp(p):
    return torch.ops.moge.grouped_mlp(p["x"], p["w_gate_up"], p["w_down"], p["expert_offsets"])


def grouped_mm_mlp(p):
    """The torch._grouped_mm pipeline: gate_up GEMM, SwiGLU (eager), down GEMM."""
    offs = p["expert_offsets"][1:]                                       # group ends, int32
    gate_up = torch._grouped_mm(p["x"], p["w_gate_up"].transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    h = F.silu(gate) * up
    return torch._grouped_mm(h, p["w_down"].transpose(-2, -1), offs=offs)


def eager_mlp(p):
    return reference.grouped_mlp(p["x"], p["w_gate_up"], p["w_down"], p["expert_offsets"])


def dense_gemms(p):
    """The same FLOPs as one dense problem: all M rows times one expert's weights, the two cuBLAS GEMMs
    alone (x [M, H] @ gate_up^T, then h [M, I] @ down^T; no SwiGLU pass). The rate cuBLAS reaches at the
    real GEMM shapes, which is the bound a grouped GEMM can hope for (8192^3 flatters cuBLAS: K = 1344
    of the down GEMM is short)."""
    if "h_dense" not in p:
        p["h_dense"] = torch.randn(p["M"], p["I"], device=p["x"].device).to(p["x"].dtype)
    F.linear(p["x"], p["w_gate_up"][0])
    return F.linear(p["h_dense"], p["w_down"][0])


# ----------------------------------------------------------------------------- timing
def inner_for(run, target_ms=3.0):
    est = elapsed_ms(run)
    est = min(est, elapsed_ms(run))
    return max(1, min(200, int(target_ms / max(est, 1e-3))))


def flops_of(p):
    return 6 * p["M"] * p["H"] * p["I"]


def bytes_of(p):
    es = p["x"].element_size()
    weights = p["active_experts"] * 3 * p["H"] * p["I"] * es
    acts = (2 * p["M"] * p["H"] + 2 * p["M"] * p["I"]) * es
    return weights, weights + acts


def bench_experts(Ts=DEFAULT_TS, rounds=9, dtype=torch.bfloat16, device="cuda", shape=PANGU,
                  eager=True, grouped_mm=True, two_streams=False, packed=False, log=print):
    """Time the expert MLP per T; returns (rows, ceilings). Rows hold medians in ms and derived rates."""
    moge_kernels.set_backend("triton")
    ceil = Ceilings(torch.device(device), dtype)        # 1 GiB copy, dense 8192^3 matmul
    weights = make_weights(shape["E"], shape["H"], shape["I"], dtype, device)
    rows = []
    for T in Ts:
        p = make_problem(T, shape["H"], shape["I"], shape["E"], shape["G"], shape["k_g"], dtype, device,
                         weights=weights)
        methods = {"triton": capture_graph(lambda: triton_mlp(p))}
        if two_streams:                                 # triton_mlp forced onto one stream, for comparison
            with moge_kernels.use_options(triton_mlp_streams=False):
                methods["one_stream"] = capture_graph(lambda: triton_mlp(p))
        if packed:                                      # the same op on k-block-major packed weights
            q = dict(p, w_gate_up=moge_kernels.pack_expert_weights(p["w_gate_up"]),
                     w_down=moge_kernels.pack_expert_weights(p["w_down"]))
            methods["packed"] = capture_graph(lambda: triton_mlp(q))
        if grouped_mm:
            methods["grouped_mm"] = capture_graph(lambda: grouped_mm_mlp(p))
        if p["M"] >= 64 * p["E"]:                       # matrix-bound rows only: below, one expert's
            methods["dense"] = capture_graph(lambda: dense_gemms(p))   # weights are no comparison
        if eager:
            eager_mlp(p)
            methods["eager"] = lambda: eager_mlp(p)
        # sanity: the pipelines agree (relative Frobenius difference)
        ours = triton_mlp(p).float()
        check = grouped_mm_mlp(p).float() if grouped_mm else eager_mlp(p).float()
        rel = ((ours - check).norm() / check.norm().clamp_min(1e-30)).item()
        if packed:    # the packed layout changes where the bytes sit, not the arithmetic
            rel_packed = ((triton_mlp(q).float() - ours).norm() / ours.norm().clamp_min(1e-30)).item()
            log and log(f"T={T}: packed vs unpacked weights, relative difference {rel_packed:.1e}")
        inner = {name: inner_for(run) if name != "eager" else 1 for name, run in methods.items()}
        samples = {name: [] for name in methods}
        since = len(ceil.copy_ms)                       # this T's ceiling samples start here
        for _ in range(rounds):
            for name, run in methods.items():
                samples[name].append(elapsed_ms(run, inner[name]))
            ceil.sample(inner=5)
        med = {name: statistics.median(v) for name, v in samples.items()}
        copy_gbs, gemm_tf = ceil.rates(since)
        flops = flops_of(p)
        w_bytes, all_bytes = bytes_of(p)
        flop_floor = flops / gemm_tf / 1e9
        byte_floor = w_bytes / copy_gbs / 1e6
        t = med["triton"]
        row = dict(T=T, M=p["M"], active=p["active_experts"], ms=t, tflops=flops / t / 1e9,
                   gbs=all_bytes / t / 1e6, floor_ms=max(flop_floor, byte_floor),
                   floor_kind="flop" if flop_floor >= byte_floor else "bytes",
                   dense_tflops=gemm_tf, copy_gbs=copy_gbs, rel_diff=rel,
                   spread=(max(samples["triton"]) - min(samples["triton"])) / t)
        row["vs_floor"] = t / row["floor_ms"]
        row["pct_dense"] = row["tflops"] / gemm_tf
        if "dense" in med:
            row["dense_ms"] = med["dense"]
            row["pct_dense_shape"] = med["dense"] / t
        if "packed" in med:
            row["packed_ms"] = med["packed"]
            row["packed_vs_floor"] = med["packed"] / row["floor_ms"]
        for name in ("grouped_mm", "eager"):
            if name in med:
                row[name + "_ms"] = med[name]
                row["vs_" + name] = t / med[name]
        rows.append(row)
        if log:
            log(f"T={T}: triton {t:.4f} ms, " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()
                                                          if k != "triton")
                + f", rel diff {rel:.2e}")
        del p, methods
        torch.cuda.empty_cache()
    return rows, ceil


def format_table(rows, ceil, device_name=None):
    device_name = device_name or torch.cuda.get_device_name()
    lines = [
        f"moge grouped_mlp (Triton) vs torch._grouped_mm pipeline vs eager loop; {device_name}; "
        f"torch {torch.__version__}, triton {__import__('triton').__version__}"
        + (f", commit {os.environ['BENCH_COMMIT']}" if os.environ.get("BENCH_COMMIT") else ""),
        f"ceilings measured in this run (medians): copy {ceil.bandwidth_gbs:.0f} GB/s (read+write), "
        f"dense bf16 cuBLAS 8192^3 {ceil.matmul_tflops:.0f} TFLOP/s",
        "time ratios are ours / theirs (< 1: ours faster); floor = max(FLOPs/dense rate, "
        "active weight bytes/copy bandwidth)",
        "dense ms: the same FLOPs as two dense cuBLAS GEMMs at the real shapes ([M,H]x[H,2I], [M,I]x[I,H]); "
        "%dshape = dense ms / ms",
        "",
        f"{'T':>6} {'M':>7} {'act':>4} {'ms':>8} {'TFLOP/s':>8} {'%dense':>7} {'GB/s':>7} "
        f"{'floor ms':>9} {'kind':>5} {'/floor':>7} {'gmm ms':>8} {'/gmm':>6} {'eager ms':>9} "
        f"{'/eager':>7} {'dense ms':>9} {'%dshape':>8} {'relΔ':>8}"
        + (f" {'pk ms':>8} {'pk/flr':>7}" if any("packed_ms" in r for r in rows) else ""),
    ]
    for r in rows:
        lines.append(
            f"{r['T']:>6} {r['M']:>7} {r['active']:>4} {r['ms']:>8.4f} {r['tflops']:>8.1f} "
            f"{100 * r['pct_dense']:>6.1f}% {r['gbs']:>7.0f} {r['floor_ms']:>9.4f} {r['floor_kind']:>5} "
            f"{r['vs_floor']:>7.3f} {r.get('grouped_mm_ms', math.nan):>8.4f} "
            f"{r.get('vs_grouped_mm', math.nan):>6.3f} {r.get('eager_ms', math.nan):>9.3f} "
            f"{r.get('vs_eager', math.nan):>7.3f} {r.get('dense_ms', math.nan):>9.4f} "
            f"{100 * r.get('pct_dense_shape', math.nan):>7.1f}% {r['rel_diff']:>8.1e}"
            + (f" {r['packed_ms']:>8.4f} {r['packed_vs_floor']:>7.3f}" if "packed_ms" in r else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- config sweep
def sweep(Ts=DEFAULT_TS, dtype=torch.bfloat16, device="cuda", shape=PANGU, rounds=5, log=print):
    """Time each candidate config of the gate_up (SwiGLU) and down GEMMs per T; returns the best."""
    from moge_kernels.triton import gemm_configs
    from moge_kernels.triton.grouped_gemm import launch_grouped_gemm
    weights = make_weights(shape["E"], shape["H"], shape["I"], dtype, device)
    best = {}
    for T in Ts:
        p = make_problem(T, shape["H"], shape["I"], shape["E"], shape["G"], shape["k_g"], dtype, device,
                         weights=weights)
        x, offs = p["x"], p["expert_offsets"]
        h = torch.randn(p["M"], p["I"], device=device).to(dtype)      # never time on zeros
        y = torch.empty(p["M"], p["H"], dtype=dtype, device=device)
        for swiglu, w, inp, out in ((True, p["w_gate_up"], x, h), (False, p["w_down"], h, y)):
            cands = gemm_configs.candidates(p["M"], p["E"], swiglu, dtype, x.device)
            table = gemm_configs.table_config(p["M"], p["E"], swiglu, dtype, x.device)
            if table not in cands:
                cands.append(table)
            runs = {}
            for cfg in cands:
                try:
                    run = capture_graph(lambda: launch_grouped_gemm(inp, w, offs, out, swiglu, config=cfg))
                    runs[cfg] = (run, inner_for(run, 2.0))
                except Exception as err:  # noqa: BLE001  report and go on
                    log(f"  T={T} {'gate_up' if swiglu else 'down'} {cfg}: FAILED {type(err).__name__}: "
                        f"{str(err)[:200]}")
            samples = {cfg: [] for cfg in runs}
            for _ in range(rounds):            # interleaved: clock drift hits every config alike
                for cfg, (run, inner) in runs.items():
                    samples[cfg].append(elapsed_ms(run, inner))
            results = sorted(((statistics.median(v), cfg) for cfg, v in samples.items()),
                             key=lambda r: r[0])
            kind = "gate_up" if swiglu else "down"
            gemm_flops = 2 * p["M"] * p["H"] * p["I"] * (2 if swiglu else 1)
            for ms, cfg in results:
                mark = " <- table" if cfg == table else ""
                log(f"  T={T:>5} {kind:>7} {str(cfg):<36} {ms:8.4f} ms {gemm_flops / ms / 1e9:7.1f} "
                    f"TFLOP/s{mark}")
            if results:
                best[(T, kind)] = results[0]
            del runs
        del p, h, y
        torch.cuda.empty_cache()
    log("best per (T, kind):")
    for (T, kind), (ms, cfg) in best.items():
        log(f"  T={T:>5} {kind:>7} {cfg}  {ms:.4f} ms  ({gemm_configs.regime(T * 8, 64)})")
    return best


def _precompile_worker(jobs):
    """Compile (swiglu, config, dtype name) jobs in a separate process at the Pangu shapes (Triton's
    cache is shared through the disk, so the timing process then finds them compiled)."""
    from moge_kernels.triton.grouped_gemm import launch_grouped_gemm
    H, I, E = PANGU["H"], PANGU["I"], PANGU["E"]
    M = 256
    offs = torch.linspace(0, M, E + 1, device="cuda").to(torch.int32)
    bufs, failed = {}, []
    for swiglu, cfg, dtype_name in jobs:
        dtype = getattr(torch, dtype_name)
        if dtype not in bufs:
            bufs[dtype] = (torch.randn(M, H, device="cuda").to(dtype),
                           torch.empty(E, 2 * I, H, device="cuda", dtype=dtype).normal_(),
                           torch.empty(E, H, I, device="cuda", dtype=dtype).normal_(),
                           torch.empty(M, I, device="cuda", dtype=dtype),
                           torch.empty(M, H, device="cuda", dtype=dtype))
        x, w_gu, w_d, h, y = bufs[dtype]
        try:
            if swiglu:
                launch_grouped_gemm(x, w_gu, offs, h, True, config=cfg)
            else:
                launch_grouped_gemm(h, w_d, offs, y, False, config=cfg)
        except Exception as err:  # noqa: BLE001
            failed.append(f"{cfg} swiglu={swiglu} {dtype_name}: {type(err).__name__}: {str(err)[:200]}")
    torch.cuda.synchronize()
    return failed


def precompile(dtypes=(torch.bfloat16,), workers=8, table_dtypes=(torch.float16,)):
    """Compile every candidate and table config (in `dtypes`), and the table configs in
    `table_dtypes`, in parallel processes before anything is timed."""
    import concurrent.futures as cf
    import multiprocessing as mp
    from moge_kernels.triton import gemm_configs
    name = lambda dt: str(dt).split(".")[-1]   # noqa: E731
    jobs = set()
    table = gemm_configs.TABLES[gemm_configs.device_family(0)]
    for dtype in dtypes:
        for (_, swiglu), cands in gemm_configs.CANDIDATES.items():
            for cfg in cands:
                jobs.add((swiglu, gemm_configs.fit(cfg, swiglu, dtype), name(dtype)))
    for dtype in tuple(dtypes) + tuple(table_dtypes):
        for (_, swiglu), cfg in table.items():
            jobs.add((swiglu, gemm_configs.fit(cfg, swiglu, dtype), name(dtype)))
    jobs = sorted(jobs, key=str)
    chunks = [jobs[i::workers] for i in range(workers)]
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        failed = [f for fs in pool.map(_precompile_worker, chunks) for f in fs]
    print(f"precompiled {len(jobs)} kernels in {time.time() - t0:.1f} s; failed: {failed or 'none'}",
          flush=True)
    return failed


def memcheck_case(log=print):
    """A small ragged problem through every table config and each kernel path (TMA, split tails),
    for `compute-sanitizer --tool memcheck`; compares with the reference so a run also checks values."""
    from moge_kernels.triton import gemm_configs
    from moge_kernels.triton.gemm_configs import GemmConfig as C
    from moge_kernels.triton.grouped_gemm import launch_grouped_gemm
    from moge_kernels import testing
    dtype, dev = torch.bfloat16, "cuda"
    M, H, I, E = 300, 320, 96, 8            # H = 5*64: EVEN_K; I = 96 with BK = 64: the masked k path
    x = torch.randn(M, H, device=dev).to(dtype)
    wgu, wd = testing.make_expert_weights(E, H, I, dtype=dtype, device=dev)
    offs = testing.random_offsets(M, E, seed=3, empty_every=3, device=dev)
    ref_h = reference.swiglu(reference.grouped_gemm(x.float(), wgu.float(), offs))
    ref_y = reference.grouped_gemm(ref_h.to(dtype).float(), wd.float(), offs)
    configs = set(gemm_configs.TABLES[gemm_configs.device_family(0)].values())
    configs |= {C(128, 128, 64, 8, 3, tma=True, split_m=True, split_n=True),
                C(64, 64, 64, 4, 3, split_m=True, split_n=True), C(64, 64, 64, 4, 3, tma=True),
                C(128, 128, 64, 8, 3, tma=True, persistent=True), C(64, 64, 64, 4, 3, tma=True, persistent=True)}
    # and the packed layout (moge_kernels.packing): blocks of 64 for H = 320, of 32 for I = 96
    layouts = {"": (wgu, wd), " packed": (moge_kernels.pack_expert_weights(wgu, 64),
                                          moge_kernels.pack_expert_weights(wd, 32))}
    worst = 0.0
    for cfg in sorted(configs, key=str):
        for layout, (w1, w2) in layouts.items():
            h = torch.full((M, I), float("nan"), device=dev, dtype=dtype)
            y = torch.full((M, H), float("nan"), device=dev, dtype=dtype)
            launch_grouped_gemm(x, w1, offs, h, True, config=gemm_configs.fit(cfg, True, dtype))
            launch_grouped_gemm(h, w2, offs, y, False, config=gemm_configs.fit(cfg, False, dtype))
            torch.cuda.synchronize()
            err = max(testing.relative_error(h, ref_h), testing.relative_error(y, ref_y))
            worst = max(worst, err)
            log(f"memcheck case {cfg}{layout}: rel err {err:.2e}")
    assert worst < 2e-2, worst
    log(f"memcheck case done, worst rel err {worst:.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default=",".join(map(str, DEFAULT_TS)), help="token counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--sweep", action="store_true", help="time candidate configs instead of the table")
    ap.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                    help="compile all candidate configs in WORKERS processes first")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--two-streams", action="store_true",
                    help="also time grouped_mlp on one stream, MOGE_TRITON_MLP_STREAMS=0 (in the log lines)")
    ap.add_argument("--packed", action="store_true",
                    help="also time grouped_mlp on packed weights (moge_kernels.pack_expert_weights): pk columns")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("--memcheck-case", action="store_true",
                    help="run a small case through every kernel path (for compute-sanitizer)")
    args = ap.parse_args(argv)
    if args.memcheck_case:
        memcheck_case()
        return
    Ts = [int(t) for t in args.T.split(",") if t]
    dtype = getattr(torch, args.dtype)
    if args.precompile:
        precompile((dtype,), args.precompile)
    if args.sweep:
        sweep(Ts, dtype)
        return
    rows, ceil = bench_experts(Ts, args.rounds, dtype, eager=not args.no_eager, two_streams=args.two_streams,
                               packed=args.packed)
    print_table(format_table(rows, ceil), args.out)


if __name__ == "__main__":
    main()
