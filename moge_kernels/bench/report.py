"""Rows of results: derived figures (rates, ratios, floors), the printed tables, the JSON, the environment.

Per row: `ms` median time of one call (a CUDA-graph replay where the method is capturable); `called_ms`
the median of the same method as called, without a graph (host launch cost included: what eager users
get; equal to `ms` for methods timed as called); `tflops` useful FLOPs / time (gemm, mlp, layer only); `gbs` the
op's fewest bytes (moge_kernels.bench.problems.work) / time; `x_eager` = eager reference time / time and
`x_gmm` = torch._grouped_mm pipeline time / time (speed-ups: above 1 is faster than the baseline);
`floor_fraction` = floor / time (1.0 = at the physical floor), the floor being max(FLOPs / measured
matmul rate, bytes / measured copy bandwidth); `check` PASS / FAIL / skipped / unchecked (the self-check).

The floor assumes that the op's fewest bytes stream once from device memory at the copy bandwidth and
its FLOPs run at the dense matmul rate, both measured in the same run on a GPU-sized problem (1 GiB
copy, 8192^3 GEMM). That holds on a GPU, whose L2 the timing evicts before every call. On a CPU the
bench's small problems stay in the caches, faster than a 64 MiB copy, so the "floor" is no bound there
(rows came out above 100% of it): CPU rows carry no floor."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch

from .. import options
from .problems import floor_ms

COMPUTE_OPS = ("gemm", "mlp", "layer")


FLOOR_NOTE = "%floor = floor / time"
NO_FLOOR_NOTE = ("no floor on CPU: its caches beat the measured copy bandwidth "
                 "(moge_kernels/bench/report.py)")


def finalize(rows: list[dict], bandwidth_gbs: float, matmul_tflops: float, floors: bool = True) -> list[dict]:
    """Adds floor (where `floors`: on a GPU, see the module docstring), rates and ratios to timed rows
    (in place; also returned)."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["T"], r["op"]), {})[r["method"]] = r
    for r in rows:
        ms = r["ms"]
        if floors:
            r["floor_ms"], r["floor_bound"] = floor_ms(r["flops"], r["bytes"], bandwidth_gbs, matmul_tflops)
            r["floor_fraction"] = r["floor_ms"] / ms
        else:
            r["floor_ms"] = r["floor_bound"] = r["floor_fraction"] = None
        r["tflops"] = r["flops"] / ms / 1e9 if r["op"] in COMPUTE_OPS else None
        r["gbs"] = r["bytes"] / ms / 1e6
        case = by_case[(r["shape"], r["T"], r["op"])]
        for key, base in (("eager", "eager"), ("gmm", "grouped_mm")):
            other = case.get(base)
            r[f"{key}_ms"] = other["ms"] if other else None
            r[f"x_{key}"] = other["ms"] / ms if other else None
    return rows


def mark_checks(rows: list[dict], checks: list[dict], skipped: bool = False) -> list[dict]:
    """Sets each row's `check`: PASS or FAIL from the self-check (the eager reference is the reference),
    "skipped" when the self-check was skipped, "unchecked" for a method it did not run."""
    outcome = {}
    for c in checks:
        key = (c["op"], c["method"])
        outcome[key] = "FAIL" if not c["ok"] or outcome.get(key) == "FAIL" else "PASS"
    for r in rows:
        if skipped:
            r["check"] = "skipped"
        elif r["method"] == "eager":
            r["check"] = "PASS"
        else:
            r["check"] = outcome.get((r["op"], r["method"]), "unchecked")
    return rows


_CHECK_NOTES = {"PASS": "", "FAIL": "SELF-CHECK FAILED", "skipped": "self-check skipped",
                "unchecked": "not self-checked"}


# ------------------------------------------------------------------------------------ printing
def _fmt(value, spec, width):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{spec}}"


def _rate(value, width):
    """A rate in at most `width` characters: 798, 46.6, 0.123, 1.5e-05."""
    if value is None:
        return f"{'-':>{width}}"
    spec = ".0f" if value >= 1000 else ".1f" if value >= 10 else ".3f" if value >= 0.01 else ".1e"
    return f"{value:>{width}{spec}}"


def format_table(rows: list[dict]) -> str:
    floors = any(r.get("floor_ms") is not None for r in rows)   # none on CPU
    header = (f"{'shape':<12} {'T':>6} {'op':<8} {'method':<13} {'mode':<5} {'ms':>9} {'called ms':>9} "
              f"{'TFLOP/s':>8} "
              f"{'GB/s':>7} {'x eager':>8} {'x gmm':>7} " + (f"{'floor ms':>9} {'%floor':>7} " if floors else "")
              + " note")
    lines = [header, "-" * len(header)]
    previous = None
    for r in rows:
        case = (r["shape"], r["T"])
        if previous is not None and case != previous:
            lines.append("")
        previous = case
        note = " ".join(x for x in (r.get("served_by", ""), r.get("note", ""),
                                    _CHECK_NOTES.get(r.get("check", "PASS"), r.get("check", ""))) if x)
        floor = (f"{_fmt(r['floor_ms'], '.4f', 9)} {_fmt(100 * r['floor_fraction'], '.1f', 6)}% "
                 if floors else "")
        lines.append(
            f"{r['shape']:<12} {r['T']:>6} {r['op']:<8} {r['method']:<13} {r['mode']:<5} "
            f"{_fmt(r['ms'], '.4f', 9)} {_fmt(r.get('called_ms'), '.4f', 9)} {_rate(r['tflops'], 8)} {_rate(r['gbs'], 7)} "
            f"{_fmt(r['x_eager'], '.2f', 7)}{'x' if r['x_eager'] else ' '} "
            f"{_fmt(r['x_gmm'], '.2f', 6)}{'x' if r['x_gmm'] else ' '} "
            f"{floor} {note}".rstrip())
    return "\n".join(lines)


def format_overhead(rows: list[dict]) -> str:
    """Per op and method of the graph-timed rows at the smallest T of each shape: the host cost of a call,
    as-called time minus graph-replay time."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        graph = [r for r in rows if r["shape"] == shape and r["mode"] == "graph" and r.get("called_ms")]
        if not graph:
            continue
        t_min = min(r["T"] for r in graph)
        parts = [f"{r['op']} {r['method']} {1e3 * (r['called_ms'] - r['ms']):.0f}"
                 for r in graph if r["T"] == t_min]
        lines.append(f"{shape} T={t_min}: " + "; ".join(parts))
    if not lines:
        return ""
    return "\nhost overhead per call (called ms - graph ms, us):\n" + "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Four pivots, one line per (shape, op, method), one column per T."""
    tokens = sorted({r["T"] for r in rows})
    keys = []
    for r in rows:
        key = (r["shape"], r["op"], r["method"])
        if key not in keys:
            keys.append(key)
    cell = {(r["shape"], r["op"], r["method"], r["T"]): r for r in rows}
    out = []
    for title, field, skip, spec in (
            ("speed-up over the eager reference (x)", "x_eager", "eager", ".2f"),
            ("speed-up over the torch._grouped_mm pipeline (x)", "x_gmm", "grouped_mm", ".2f"),
            ("fraction of the physical floor reached (%)", "floor_fraction", None, ".1f"),
            ("as called, no CUDA graph (ms)", "called_ms", None, ".4f")):
        if not any(r.get(field) for r in rows):
            continue
        out.append(f"\n{title}")
        columns = " ".join(f"{'T=' + str(t):>8}" for t in tokens)
        out.append(f"{'shape':<12} {'op':<8} {'method':<13} {columns}")
        for shape, op, method in keys:
            if method == skip:
                continue
            values = []
            for t in tokens:
                r = cell.get((shape, op, method, t))
                v = r.get(field) if r else None
                values.append(_fmt(None if v is None else (100 * v if field == "floor_fraction" else v),
                                   spec, 8))
            out.append(f"{shape:<12} {op:<8} {method:<13} " + " ".join(values))
    return "\n".join(out)


# ------------------------------------------------------------------------------------ environment, JSON
def _git(*args) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10)
        return res.stdout.strip() if res.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
               python=platform.python_version(), platform=platform.platform(),
               commit=options.BENCH_COMMIT or _git("rev-parse", "HEAD"),
               threads=torch.get_num_threads(), argv=sys.argv[1:],
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    # uncommitted changes to the code being timed make the commit an incomplete description
    env["dirty"] = bool(_git("status", "--porcelain", "--", "moge_kernels", "csrc")) if env["commit"] \
        else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1))
    else:
        env["device"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def write_json(path: str, **payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def print_table(table: str, path: str | None = None):
    """Print a bench script's table and, where `path` is given, write it there too."""
    print(table)
    if path:
        with open(path, "w") as f:
            f.write(table + "\n")
