"""The `cuda` backend (csrc/cuda/) against the Triton backend, the eager reference and, for the expert MLP,
the torch._grouped_mm pipeline: dispatch, combine and grouped_mlp on the Pangu Pro MoE layer (H=5120,
I=1344, E=64, G=8, k_g=1 so K=8, bf16), T in {1, 16, 128, 1024, 4096, 16384}.

    python bench/bench_cuda.py                         # the table
    python bench/bench_cuda.py --T 1,4096 --out bench/results/cuda_h100.txt
    python bench/bench_cuda.py --backends cuda,reference --deadline 120

Timing: each backend's kernel function is called directly (registry lookup done once, no Python argument
checks of the public op). Capturable pipelines (cuda, triton, _grouped_mm) are timed as CUDA-graph replays,
so launch gaps do not count; the eager reference syncs with the host, so it is timed as called. Median of
events over a fixed wall-clock budget after warm-up. Ceilings are measured in the same run: the copy
bandwidth (a 1 GiB device-to-device copy, bytes read + written) and the dense bf16 GEMM rate (8192^3).

    dispatch floor = (T*H*2 read + T*K*H*2 written + T*E*4 logits) / copy bandwidth
    combine floor  = (T*K*H*2 read + T*H*2 written) / copy bandwidth
    mlp floor      = max(6*T*K*H*I / dense rate, bytes of the active experts' weights / copy bandwidth)
Ratios are time / other time: cuda/triton < 2 and, for grouped_mlp, cuda/gmm < 1.5 at T >= 4096 and
cuda/floor < 1.5 at T <= 16 are the targets of the cuda backend. A second table times grouped_mlp at
T >= 1024 with each variant of the cuda backend's big tensor-core tile (MOGE_CUDA_GEMM_TILE, --gemm-variants),
in the same run. --ops grouped_mlp times only the expert MLP.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import reference as R  # noqa: E402
from moge_kernels import registry  # noqa: E402
from moge_kernels.bench.timing import capture_graph, measure_ceilings, median_ms  # noqa: E402

PANGU = dict(H=5120, I=1344, E=64, G=8, k_g=1)
DEFAULT_TS = (1, 16, 128, 1024, 4096, 16384)
OPS = ("grouped_dispatch", "grouped_combine", "grouped_mlp")


# ----------------------------------------------------------------------------- timing
def time_graph(fn, budget_ms=60.0):
    """fn() captured once in a CUDA graph; the median replay time (ms)."""
    ms = median_ms(capture_graph(fn), min_seconds=budget_ms / 1e3)
    torch.cuda.empty_cache()
    return ms


def time_eager(fn, budget_ms=60.0):
    fn()
    torch.cuda.synchronize()
    return median_ms(fn, min_seconds=budget_ms / 1e3)


# ----------------------------------------------------------------------------- problems
def make_weights(E, H, I, dtype=torch.bfloat16, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device="cuda")
    w_down = torch.empty(E, H, I, dtype=dtype, device="cuda")
    for e in range(E):   # one expert at a time: no fp32 copy of all the weights
        w_gate_up[e] = (torch.randn(2 * I, H, generator=g, device="cuda") / H ** 0.5).to(dtype)
        w_down[e] = (torch.randn(H, I, generator=g, device="cuda") / I ** 0.5).to(dtype)
    return w_gate_up, w_down


def grouped_mm_mlp(x, w_gate_up, w_down, expert_offsets):
    """The torch._grouped_mm pipeline: gate_up GEMM, SwiGLU (eager), down GEMM."""
    offs = expert_offsets[1:]
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)


def backend_fn(backend, op):
    """The function `torch.ops.moge.<op>` would call on CUDA with `backend` selected, or None."""
    fn = registry._kernels.get((backend, op))
    if fn is None or not registry._runs_on(backend, "cuda"):
        return None
    return fn


# ----------------------------------------------------------------------------- the benchmark
def run(Ts, backends, deadline_s, budget_ms, gemm_variants=(), variants_from_T=1024, ops=OPS, log=print):
    started = time.perf_counter()
    H, I, E, G, k_g = (PANGU[k] for k in ("H", "I", "E", "G", "k_g"))
    K = G * k_g
    bandwidth, rate = measure_ceilings()
    log(f"ceilings: copy {bandwidth / 1e12:.2f} TB/s (read + write), dense bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    w_gate_up, w_down = make_weights(E, H, I)
    expert_bytes = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    rows = []

    def out_of_time(slack=0.0):
        return time.perf_counter() - started > deadline_s + slack

    for T in Ts:
        g = torch.Generator(device="cuda").manual_seed(T)
        hidden = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
        logits = torch.randn(T, E, generator=g, device="cuda") * 2
        expert_scale = torch.rand(E, generator=g, device="cuda") + 0.5
        permuted, topk_weights, _, offsets, row_index = R.grouped_dispatch(hidden, logits, G, k_g, expert_scale)
        expert_out = torch.randn(T * K, H, generator=g, device="cuda").to(torch.bfloat16)
        active = int((offsets[1:] > offsets[:-1]).sum().item())
        args = {
            "grouped_dispatch": (hidden, logits, G, k_g, expert_scale, False, "softmax"),
            "grouped_combine": (expert_out, topk_weights, row_index, None),
            "grouped_mlp": (permuted, w_gate_up, w_down, offsets, None),
        }
        floors = {
            "grouped_dispatch": (T * H * 2 + T * K * H * 2 + T * E * 4) / bandwidth,
            "grouped_combine": (T * K * H * 2 + T * H * 2) / bandwidth,
            "grouped_mlp": max(6 * T * K * H * I / rate, active * expert_bytes / bandwidth),
        }
        for op in ops:
            row = dict(op=op, T=T, floor=floors[op] * 1e3)
            for backend in backends:
                fn = backend_fn(backend, op)
                if fn is None or (backend != "cuda" and out_of_time()):
                    continue
                call = (lambda fn=fn, a=args[op]: fn(*a))
                try:
                    row[backend] = (time_eager if backend == "reference" else time_graph)(call, budget_ms)
                except Exception as err:  # a broken backend must not cost the others' numbers
                    log(f"  {op} T={T} {backend}: {type(err).__name__}: {str(err)[:200]}")
            if op == "grouped_mlp" and T >= variants_from_T and backend_fn("cuda", op) is not None:
                for variant in gemm_variants:          # the big tile's variants (option cuda_gemm_tile)
                    if out_of_time(slack=20):
                        break
                    try:
                        with mk.use_options(cuda_gemm_tile=variant):
                            row[f"cuda[{variant}]"] = time_graph(lambda a=args[op]: backend_fn("cuda", op)(*a),
                                                                 budget_ms)
                    except Exception as err:
                        log(f"  grouped_mlp T={T} cuda[{variant}]: {type(err).__name__}: {str(err)[:200]}")
            if op == "grouped_mlp" and "gmm" in backends and hasattr(torch, "_grouped_mm") and not out_of_time():
                try:
                    row["gmm"] = time_graph(lambda: grouped_mm_mlp(permuted, w_gate_up, w_down, offsets), budget_ms)
                except Exception as err:
                    log(f"  grouped_mm T={T}: {type(err).__name__}: {str(err)[:200]}")
            rows.append(row)
            log(format_row(row, backends))
        del hidden, logits, permuted, expert_out, args
        torch.cuda.empty_cache()
    return rows, (bandwidth, rate)


COLUMNS = ("cuda", "triton", "gmm", "reference")


def format_row(row, backends=COLUMNS):
    def ms(key):
        return f"{row[key]:9.4f}" if key in row else f"{'-':>9}"

    def ratio(a, b):
        return f"{row[a] / row[b]:7.2f}" if a in row and b in row else f"{'-':>7}"

    return (f"{row['op']:<17}{row['T']:>6} " + " ".join(ms(c) for c in COLUMNS) + f" {row['floor']:9.4f}"
            + " " + ratio("cuda", "triton") + " " + ratio("cuda", "gmm") + " " + ratio("cuda", "floor"))


def format_variants(rows, variants):
    """grouped_mlp with each variant of the cuda backend's big tile, and its ratio to _grouped_mm."""
    timed = [r for r in rows if r["op"] == "grouped_mlp" and any(f"cuda[{v}]" in r for v in variants)]
    if not timed:
        return ""
    lines = ["# grouped_mlp, cuda backend, big-tile variants (cuda_gemm_tile, MOGE_CUDA_GEMM_TILE; moge_kernels/options.py); "
             "ms and ratio to the _grouped_mm pipeline",
             f"{'T':>6} " + " ".join(f"{v + ' ms':>10} {'/gmm':>6}" for v in variants)]
    for r in timed:
        cells = []
        for v in variants:
            key = f"cuda[{v}]"
            ms = f"{r[key]:10.4f}" if key in r else f"{'-':>10}"
            ratio = f"{r[key] / r['gmm']:6.2f}" if key in r and "gmm" in r else f"{'-':>6}"
            cells.append(f"{ms} {ratio}")
        lines.append(f"{r['T']:>6} " + " ".join(cells))
    return "\n".join(lines)


def format_table(rows, ceilings, device):
    bandwidth, rate = ceilings
    header = (f"{'op':<17}{'T':>6} " + " ".join(f"{c + ' ms':>9}" for c in COLUMNS) + f" {'floor ms':>9}"
              + f" {'cu/trit':>7} {'cu/gmm':>7} {'cu/flr':>7}")
    lines = [f"# {device}; torch {torch.__version__}; Pangu Pro MoE layer H=5120 I=1344 E=64 G=8 k_g=1, bf16",
             f"# ceilings measured in this run: copy {bandwidth / 1e12:.2f} TB/s (read + write), dense bf16 "
             f"GEMM {rate / 1e12:.0f} TFLOP/s",
             "# cuda / triton / gmm (torch._grouped_mm pipeline): CUDA-graph replays; reference: eager, as called",
             f"# cuda column: cuda_gemm_tile={mk.options.current.cuda_gemm_tile} (MOGE_CUDA_GEMM_TILE)",
             header, "-" * len(header)]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", default=",".join(map(str, DEFAULT_TS)))
    parser.add_argument("--backends", default="cuda,triton,gmm,reference")
    parser.add_argument("--deadline", type=float, default=1e9,
                        help="seconds after which only the cuda backend is still timed")
    parser.add_argument("--budget-ms", type=float, default=60.0, help="timing budget per measurement")
    parser.add_argument("--ops", default=",".join(OPS), help="ops to time")
    parser.add_argument("--gemm-variants", default="wgmma96,wgmma128,big",
                        help="big-tile variants of the cuda grouped_mlp timed at T >= 1024 ('' for none)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    for name, report in mk.backends().items():
        print(f"backend {name}: {'yes' if report['available'] else 'no: ' + report['reason'][:100]}")
    backends = [b for b in args.backends.split(",") if b]
    variants = [v for v in args.gemm_variants.split(",") if v]
    ops = [o for o in args.ops.split(",") if o]
    rows, ceilings = run([int(t) for t in args.T.split(",")], backends, args.deadline, args.budget_ms, variants,
                         ops=ops)
    table = format_table(rows, ceilings, torch.cuda.get_device_name())
    variant_table = format_variants(rows, variants)
    if variant_table:
        table += "\n\n" + variant_table
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
