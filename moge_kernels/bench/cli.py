"""The `moge-bench` command line: self-check, ceilings, timing sweep, table, JSON and plots."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import report
from .check import self_check
from .methods import BASELINES, available_backends, available_baselines, build_methods
from .problems import CPU_TOKENS, DEFAULT_OPS, GPU_TOKENS, OPS, SHAPES, WeightCache, make_problem, work
from .timing import Ceilings, Timer, flush_note, prepare

# Per (shape, T) and method, each round times n calls with n ~ ROUND_MS / (time of one call): enough
# samples for a stable median at small T, one call a round at large T. 9 GPU rounds keep the full sweep
# (3 shapes x 6 T x ~15 methods) near two minutes of timing on an H100.
GPU = dict(rounds=9, round_ms=10.0, max_calls=50, shapes=("pangu", "qwen_like", "pangu_tp8"),
           tokens=GPU_TOKENS)
GPU_QUICK = dict(GPU, rounds=3, shapes=("pangu",), tokens=(1, 128, 4096))
CPU = dict(rounds=5, round_ms=20.0, max_calls=20, shapes=("cpu_small",), tokens=CPU_TOKENS)
CPU_QUICK = dict(CPU, rounds=3, tokens=(1, 128))
CHECK_TOKENS, CHECK_TOKENS_QUICK = (1, 7, 64), (1, 16)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _csv(text, cast=str):
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else None


DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    doc = (sys.modules[__package__].__doc__ or "").strip()
    parser = argparse.ArgumentParser(prog="moge-bench", description=doc.splitlines()[0] if doc else None,
                                     epilog="\n".join(doc.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu (default: cuda when this torch has a GPU)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="bfloat16 (GPU default), float16, float32 (CPU default)")
    parser.add_argument("--quick", action="store_true", help="a short run: one shape, three T, three rounds")
    parser.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--tokens", default=None, help="comma list of T")
    parser.add_argument("--ops", default=None, help=f"comma list of {','.join(OPS)} "
                                                    f"(default {','.join(DEFAULT_OPS)})")
    parser.add_argument("--backends", default=None, help="comma list of backends to time (default: every "
                        "available one; triton on CPU, i.e. its interpreter, only when named)")
    parser.add_argument("--baselines", default=None, help="comma list of eager,grouped_mm,loop (default all)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per (shape, T)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="time every method as called, never as a CUDA-graph replay")
    parser.add_argument("--skip-self-check", action="store_true",
                        help="time without checking the methods against the reference first")
    parser.add_argument("--check-shape", default="pangu", help="shape of the self-check (default pangu)")
    parser.add_argument("--check-tokens", default=None, help="T values of the self-check")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: start no new (shape, T) after this long; the rest is skipped")
    parser.add_argument("--out", default=None, help="write results.json and the PNG plots into this folder")
    parser.add_argument("--json", default=None, help="write the JSON here (default OUT/results.json)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plot-only", default=None, metavar="JSON",
                        help="redraw the plots of an earlier run's JSON into --out, time nothing")
    return parser


def _names(parser, option, text, allowed) -> list | None:
    """The comma list of `option`, each name one of `allowed` (else an argparse error)."""
    names = _csv(text)
    if names is None:
        return None
    unknown = [n for n in names if n not in allowed]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names


def _tokens(parser, option, text) -> list | None:
    try:
        tokens = _csv(text, int)
    except ValueError:
        parser.error(f"{option} {text!r}: expected a comma list of integers, e.g. 1,128,4096")
    if tokens is not None and (not tokens or min(tokens) < 1):
        parser.error(f"{option} {text!r}: every T must be >= 1")
    return tokens


def _device(parser, text) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device {text!r}: not a device (cuda, cuda:N or cpu)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            parser.error(f"--device {text}: no CUDA device here (torch {torch.__version__} is {build}); "
                         f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_args(argv=None):
    """Parsed and checked arguments: a bad value is an argparse error (usage, one line, exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_only:
        return args
    args.device = _device(parser, args.device)
    args.shapes = _names(parser, "--shapes", args.shapes, tuple(SHAPES))
    args.ops = _names(parser, "--ops", args.ops, OPS)
    args.baselines = _names(parser, "--baselines", args.baselines, BASELINES)
    _names(parser, "--check-shape", args.check_shape, tuple(SHAPES))
    args.tokens = _tokens(parser, "--tokens", args.tokens)
    args.check_tokens = _tokens(parser, "--check-tokens", args.check_tokens)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    if args.backends is not None:
        import moge_kernels as mk
        report = mk.backends()
        requested = _names(parser, "--backends", args.backends,
                           tuple(b for b in report if b not in ("reference", "grouped_mm")))
        for b in requested:
            runs_here = args.device.type in report[b]["devices"] or "*" in report[b]["devices"]
            if not report[b]["available"] or not runs_here:
                why = report[b]["reason"] or f"it has no kernels for {args.device.type} tensors"
                parser.error(f"--backends {b}: not available on {args.device.type} here ({why})")
        args.backends = requested
    return args


def time_sweep(device, dtype, shapes, tokens, ops, backends, baselines, ceil: Ceilings, settings: dict,
               graphs: bool, time_limit=None, start=None) -> tuple[list[dict], list[str]]:
    """Timed rows (medians, before floors and ratios) and the cases skipped for the time limit."""
    timer = Timer(device)
    weights = WeightCache(dtype, device)
    cases = [(shape, T) for shape in shapes for T in tokens]
    rows, skipped = [], []
    start = start or time.time()
    for i, (shape, T) in enumerate(cases):
        if time_limit is not None and time.time() - start > time_limit:
            skipped = [f"{s['name']} T={t}" for s, t in cases[i:]]
            log(f"time limit of {time_limit:.0f} s reached: skipping {', '.join(skipped)}")
            break
        case_rows = time_case(make_problem(shape, T, dtype, device, weights=weights.get(shape), seed=T),
                              ops, backends, baselines, timer, ceil, settings, graphs)
        rows += case_rows
        summary = "; ".join(
            f"{op} " + " ".join(f"{r['method']} {r['ms']:.4g}" for r in case_rows if r["op"] == op)
            for op in ops)
        log(f"[{i + 1}/{len(cases)}] {shape['name']} T={T} ({time.time() - start:.0f} s): {summary} (ms)")
        if device.type == "cuda":
            torch.cuda.empty_cache()       # this case's graphs and tensors are gone: hand the memory back
    return rows, skipped


def time_case(p, ops, backends, baselines, timer: Timer, ceil: Ceilings, settings: dict,
              graphs: bool) -> list[dict]:
    """Every method of every op on problem p, interleaved over rounds; one row per (op, method)."""
    device, name = p.device, f"{p.shape['name']} T={p.T}"
    entries = []
    for m in build_methods(p, ops, backends, baselines):
        try:
            run, mode, note = prepare(m.fn, device, capture=graphs and m.capturable)
            estimate = timer.estimate(run)
        except Exception as err:  # noqa: BLE001  report the method and go on with the others
            log(f"    {name} {m.op} {m.name}: not timed ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0][:160]})")
            continue
        if note:
            log(f"    {name} {m.op} {m.name}: {note}")
        calls = max(1, min(settings["max_calls"], round(settings["round_ms"] / max(estimate, 1e-3))))
        entries.append(dict(method=m, run=run, mode=mode, note=note, calls=calls, samples=[],
                            called=[] if mode == "graph" else None))

    for r in range(settings["rounds"]):
        k = r % max(len(entries), 1)            # rotate the order: no method always runs first
        for e in entries[k:] + entries[:k]:
            if e["samples"] is None:
                continue
            try:
                e["samples"] += timer.samples(e["run"], e["calls"])
                if e["called"] is not None:      # the same method as called, no graph: host cost shows
                    e["called"] += timer.samples(e["method"].fn, e["calls"])
            except Exception as err:  # noqa: BLE001  a kernel that fails mid-run: drop it, keep the rest
                log(f"    {name} {e['method'].op} {e['method'].name}: dropped ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:160]})")
                e["samples"] = None
        if device.type == "cuda":
            ceil.sample()
    rows = []
    for e in entries:
        if not e["samples"]:
            continue
        m, samples = e["method"], sorted(e["samples"])
        flops, nbytes = work(p, m.op)
        rows.append(dict(
            shape=p.shape["name"], H=p.shape["H"], I=p.shape["I"], E=p.shape["E"], G=p.shape["G"],
            k_g=p.shape["k_g"], T=p.T, M=p.M, active_experts=p.active_experts, op=m.op, method=m.name,
            kind=m.kind, served_by=m.served_by, mode=e["mode"], note=e["note"],
            ms=statistics.median(samples), ms_p10=samples[len(samples) // 10],
            ms_p90=samples[(9 * len(samples)) // 10], samples=len(samples), flops=flops, bytes=nbytes,
            called_ms=statistics.median(e["called"]) if e["called"] else statistics.median(samples)))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        return _plot_only(args)
    started = time.time()
    device = args.device
    gpu = device.type == "cuda"
    if gpu and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    settings = dict((GPU_QUICK if args.quick else GPU) if gpu else (CPU_QUICK if args.quick else CPU))
    if args.rounds:
        settings["rounds"] = args.rounds
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    shapes = [SHAPES[s] for s in (args.shapes or settings["shapes"])]
    tokens = args.tokens or list(settings["tokens"])
    ops = args.ops or list(DEFAULT_OPS)
    backends = available_backends(device, args.backends)
    baselines, no_baseline = available_baselines(device, dtype, args.baselines)

    env = report.environment(device)
    print(f"moge_kernels bench on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {(env['commit'] or 'unknown')[:12]}{' (dirty)' if env.get('dirty') else ''} | {dtype}")
    import moge_kernels as mk
    print("backends: " + ", ".join(
        f"{b}={'yes' if r['available'] else 'no'}" for b, r in mk.backends().items()))
    print(f"timed here: {', '.join(backends) or 'no backend'}; baselines: {', '.join(baselines) or 'none'}"
          + "".join(f"\n  no {name} baseline: {why}" for name, why in no_baseline.items()))
    sys.stdout.flush()

    checks = []
    if not args.skip_self_check:
        check_shape = SHAPES[args.check_shape]
        check_tokens = args.check_tokens or (CHECK_TOKENS_QUICK if args.quick else CHECK_TOKENS)
        log(f"self-check: every timed method vs the eager reference, shape {check_shape['name']} "
            f"(H={check_shape['H']}, I={check_shape['I']}, E={check_shape['E']}, G={check_shape['G']}), "
            f"T in {tuple(check_tokens)}")
        checks = self_check(device, dtype, check_shape, check_tokens, ops, backends, baselines, log=log)
        failed = [c for c in checks if not c["ok"]]
        baseline_failed = [c for c in failed if c["method"] in BASELINES]
        print(f"\nself-check ({check_shape['name']} shape, T in {tuple(check_tokens)}): "
              f"{len(checks) - len(failed)}/{len(checks)} pass ({time.time() - started:.0f} s)")
        for c in failed:
            print(f"  FAIL T={c['T']} {c['op']} {c['method']}: {c['detail']}")
        if baseline_failed:
            print("  (a failing baseline is reported, not fatal: the exit status counts the backends)")
    else:
        print("\nself-check: skipped (--skip-self-check); the rows say so")

    log("measuring the device's copy bandwidth and matmul rate")
    ceil = Ceilings(device, dtype)
    ceil.sample(3)
    log(f"timing {len(shapes)} shape(s) x {len(tokens)} T x {len(ops)} op(s), {settings['rounds']} rounds")
    rows, skipped = time_sweep(device, dtype, shapes, tokens, ops, backends, baselines, ceil, settings,
                               graphs=not args.no_graphs, time_limit=args.time_limit, start=started)
    ceil.sample(3)
    report.finalize(rows, ceil.bandwidth_gbs, ceil.matmul_tflops, floors=gpu)
    report.mark_checks(rows, checks, skipped=args.skip_self_check)

    print(f"\nceilings measured in this run (medians): copy {ceil.bandwidth_gbs:.0f} GB/s (read + write), "
          f"dense matmul {ceil.matmul_tflops:.4g} TFLOP/s ({dtype})")
    print(f"median ms per call ({flush_note(gpu)}); mode graph = CUDA-graph replay, eager = as called; "
          "called ms = the same method as called (no graph: what eager users get); GB/s = the op's fewest "
          "bytes / time;\n"
          "x eager, x gmm = speed-up over the eager reference and the torch._grouped_mm pipeline; "
          + (report.FLOOR_NOTE if gpu else report.NO_FLOOR_NOTE) + "\n")
    print(report.format_table(rows))
    print(report.format_summary(rows))
    print(report.format_overhead(rows))
    total = time.time() - started
    print(f"\n{len(rows)} rows in {total:.0f} s" + (f"; skipped for the time limit: {', '.join(skipped)}"
                                                    if skipped else ""))

    json_path = args.json or (os.path.join(args.out, "results.json") if args.out else None)
    if json_path:
        report.write_json(json_path, environment=env, dtype=str(dtype).replace("torch.", ""),
                          settings=dict(settings, graphs=not args.no_graphs, ops=ops, backends=backends,
                                        baselines=baselines, no_baseline=no_baseline,
                                        shapes=[s["name"] for s in shapes], tokens=tokens),
                          ceilings=ceil.as_dict(), self_check=checks, rows=rows, skipped=skipped,
                          seconds=total)
        print(f"wrote {json_path}")
    if args.out and not args.no_plots:
        _draw(rows, args.out, f"({env['device']}, {str(dtype).replace('torch.', '')})")
    ceil.release()
    return 1 if any(not c["ok"] and c["method"] not in BASELINES for c in checks) else 0


def _draw(rows, out_dir, title) -> list[str]:
    try:
        from .plot import plot
        paths = plot(rows, out_dir, title)
    except ImportError as err:
        log(f"no plots: {err} (pip install matplotlib)")
        return []
    for path in paths:
        print(f"wrote {path}")
    return paths


def _plot_only(args) -> int:
    with open(args.plot_only) as f:
        data = json.load(f)
    out = args.out or os.path.dirname(os.path.abspath(args.plot_only))
    env = data.get("environment", {})
    _draw(data["rows"], out, f"({env.get('device', '')}, {data.get('dtype', '')})")
    return 0
