"""Same-run before/after of the public ops' GPU time: this tree against an older commit of the package.

Each round times every op in a fresh process per tree, alternating trees (A B A B ...), so drift of the
card hits both alike; the table gives the median over rounds of each tree's CUDA-graph replay median
(the GPU time without host launch cost) and after/before. Pangu shape, bf16 hidden, fp32 router logits.

    python bench/before_after.py --base 3b6eff9 --T 1,16,128,1024,4096,16384 --rounds 3 --confirm 4

A process's placement of its 2.5 GB of weights moves a GEMM's time by a few percent from one process to
the next, so a single round can be off; the table gives the spread of the per-round ratios, and
--confirm N re-times every (op, T) above --threshold in N more rounds of its own (those cells only), their
medians taken over all rounds.

--base is a commit of this repository (checked out into a temporary git worktree) or a directory holding
an already built copy of the package. The old tree's extensions are built there when missing (CUDA ext
takes ~1 min on 16 cores). The timed calls use only API present in every version since the ops landed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

OPS = ("dispatch", "mlp", "combine", "gemm_gate_up")


def _child(Ts, only=None, H=5120, I=1344, E=64, G=8):
    import torch
    import moge_kernels as mk
    from triton.testing import do_bench_cudagraph
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    w_gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * H ** -0.5
    w_down = torch.randn(E, H, I, device=dev, dtype=dt) * I ** -0.5
    out = {}
    for T in Ts:
        hidden = torch.randn(T, H, device=dev, dtype=dt)
        logits = torch.randn(T, E, device=dev, dtype=torch.float32)
        permuted, weights, ids, offsets, row_index = mk.grouped_dispatch(hidden, logits, G)
        expert_out = mk.grouped_mlp(permuted, w_gate_up, w_down, offsets)
        calls = {
            "dispatch": lambda: mk.grouped_dispatch(hidden, logits, G),
            "mlp": lambda: mk.grouped_mlp(permuted, w_gate_up, w_down, offsets),
            "combine": lambda: mk.grouped_combine(expert_out, weights, row_index),
            "gemm_gate_up": lambda: mk.grouped_gemm(permuted, w_gate_up, offsets),
        }
        for name, fn in calls.items():
            if only is not None and f"{name}@{T}" not in only:
                continue
            fn()
            torch.cuda.synchronize()
            out[f"{name}@{T}"] = do_bench_cudagraph(fn, rep=60)
    print("RESULT " + json.dumps(out), flush=True)


def _tree_for(base: str, tmp: str) -> str:
    if os.path.isdir(base):
        return os.path.abspath(base)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = os.path.join(tmp, "base")
    subprocess.run(["git", "-C", repo, "worktree", "add", "-q", "--detach", tree, base], check=True)
    return tree


def _ensure_built(tree: str) -> None:
    import glob
    if glob.glob(os.path.join(tree, "moge_kernels", "_C*.so")):
        return
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a"),
               MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _run_tree(tree: str, Ts, only=None) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--T", ",".join(map(str, Ts))]
    if only:
        cmd += ["--only", ",".join(only)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child in {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="3b6eff9")
    p.add_argument("--T", default="1,16,128,1024,4096,16384")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--confirm", type=int, default=0,
                   help="extra rounds, of their own, for the cells whose median ratio is above --threshold")
    p.add_argument("--threshold", type=float, default=1.02)
    p.add_argument("--child", action="store_true")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)   # child: these op@T cells only
    args = p.parse_args(argv)
    Ts = [int(t) for t in args.T.split(",")]
    if args.child:
        return _child(Ts, None if args.only is None else set(args.only.split(",")))
    import torch
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        base = _tree_for(args.base, tmp)
        _ensure_built(base)
        runs = {"before": [], "after": []}
        for _ in range(args.rounds):
            runs["before"].append(_run_tree(base, Ts))
            runs["after"].append(_run_tree(here, Ts))
        above = [f"{op}@{T}" for op in OPS for T in Ts if _ratio(runs, f"{op}@{T}")[0] > args.threshold]
        confirmed = set(above) if args.confirm and above else set()
        for _ in range(args.confirm if above else 0):
            Ts_above = sorted({int(cell.split("@")[1]) for cell in above})
            runs["before"].append(_run_tree(base, Ts_above, above))
            runs["after"].append(_run_tree(here, Ts_above, above))
    head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | before = {args.base}, after = "
          f"{head} (+ working tree) | Pangu shape bf16 | ms, median over {args.rounds} interleaved rounds of "
          "do_bench_cudagraph medians")
    print(f"{'op':>13} {'T':>6} {'before':>9} {'after':>9} {'after/before':>12} {'rounds':>6} "
          f"{'per-round ratios':>16}")
    worst = 0.0
    for op in OPS:
        for T in Ts:
            key = f"{op}@{T}"
            ratio, b, a, per_round = _ratio(runs, key)
            worst = max(worst, ratio)
            spread = f"{min(per_round):.3f}-{max(per_round):.3f}"
            print(f"{op:>13} {T:>6} {b:>9.4f} {a:>9.4f} {ratio:>11.3f}x {len(per_round):>6} {spread:>16}"
                  + ("  (re-timed)" if key in confirmed else ""))
    print(f"slowest after/before: {worst:.3f}x (goal <= 1.02x)")


def _ratio(runs, key):
    """(median after / median before, median before, median after, per-round ratios) of one cell, over
    the rounds that timed it."""
    pairs = [(b[key], a[key]) for b, a in zip(runs["before"], runs["after"]) if key in b and key in a]
    before = statistics.median(b for b, _ in pairs)
    after = statistics.median(a for _, a in pairs)
    return after / before, before, after, [a / b for b, a in pairs]


if __name__ == "__main__":
    main()
