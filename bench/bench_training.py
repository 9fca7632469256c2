"""Training benchmark: forward + backward of the routed experts (and of the whole MoGELayer), bf16.

Pangu Pro MoE experts by default (H=5120, I=1344, E=64, G=8, top-1 per group so K=8), T in {4096, 16384}
tokens (M = T*K expert rows), routing from random softmax logits through the reference grouped top-k.
One sample = forward, then torch.autograd.grad of (x, w_gate_up, w_down) for a fixed random grad_y.

    floor = 3 x forward FLOPs (18*M*H*I) / dense cuBLAS rate, the rate measured in the same rounds
            (the larger of an 8192^3 GEMM and the expert-shaped [M, H] x [H, 2I] GEMM)

Methods (experts: x [M, H] expert-sorted -> y [M, H]):
    moge save        grouped_gemm -> swiglu -> grouped_gemm (MoGELayer's default): saves gate_up
    moge recompute   grouped_mlp (fused forward): the backward recomputes gate_up
    moge save/triton moge save with bwd_gemm="triton" (Triton dgrad/wgrad, not torch._grouped_mm)
    grouped_mm       torch._grouped_mm -> silu*up -> torch._grouped_mm, eager autograd
    eager reference  moge_kernels.reference.grouped_mlp under eager autograd (a loop over experts)
and the layer (router + dispatch + experts + combine, no shared expert):
    layer moge       MoGELayer with the auto backends      layer reference   the same on "reference"

Timing: interleaved rounds (every method once per round, rotating order), medians; the expert pipelines
(no host sync) are captured in a CUDA graph with their backward and timed as replays, the reference and
the layer rows as called (the mode column says which; the layer's capture failed inside the bf16 layer
backward in the first H100 run, cause not yet found, so the layer is timed eagerly, as a training step
runs). Peak memory is measured in a separate eager call: everything one forward +
backward allocates above the inputs and weights (saved activations, temporaries, and the gradients,
weight gradients included: 2.6 GB of the figure for Pangu's experts).

    python bench/bench_training.py                  # table; --out FILE writes it too
    python bench/bench_training.py --T 4096 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels  # noqa: E402
from moge_kernels import MoGELayer, reference  # noqa: E402
from moge_kernels.bench.report import print_table  # noqa: E402
from moge_kernels.bench.timing import capture_graph, elapsed_ms, warm_up  # noqa: E402

PANGU = dict(H=5120, I=1344, E=64, G=8, k_g=1)


def make_problem(T, H, I, E, G, k_g, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, generator=g, device=device) * 2
    _, topk_ids = reference.route(logits, G, k_g)
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    M = T * G * k_g
    x = torch.randn(M, H, generator=g, device=device).to(dtype).requires_grad_()
    grad_y = torch.randn(M, H, generator=g, device=device).to(dtype)
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w_down = torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):   # per expert: no fp32 copy of every weight at once
        w_gate_up[e] = (torch.randn(2 * I, H, generator=g, device=device) / H ** 0.5).to(dtype)
        w_down[e] = (torch.randn(H, I, generator=g, device=device) / I ** 0.5).to(dtype)
    return dict(T=T, M=M, H=H, I=I, E=E, x=x, grad_y=grad_y, offsets=offsets,
                w_gate_up=w_gate_up.requires_grad_(), w_down=w_down.requires_grad_())


# ----------------------------------------------------------------------------- expert pipelines
def moge_save(p):
    moge = torch.ops.moge
    gate_up = moge.grouped_gemm(p["x"], p["w_gate_up"], p["offsets"])
    return moge.grouped_gemm(moge.swiglu(gate_up), p["w_down"], p["offsets"])


def moge_recompute(p):
    return torch.ops.moge.grouped_mlp(p["x"], p["w_gate_up"], p["w_down"], p["offsets"])


def grouped_mm(p):
    offs = p["offsets"][1:]
    gate_up = torch._grouped_mm(p["x"], p["w_gate_up"].transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, p["w_down"].transpose(-2, -1), offs=offs)


def eager_reference(p):
    return reference.grouped_mlp(p["x"], p["w_gate_up"], p["w_down"], p["offsets"])


def fwd_bwd(pipeline, p):
    y = pipeline(p)
    return torch.autograd.grad(y, (p["x"], p["w_gate_up"], p["w_down"]), p["grad_y"])


# ----------------------------------------------------------------------------- timing
def capture(fn):
    """(callable, mode): a CUDA-graph replay of fn when it captures, else fn itself."""
    warm_up(fn)
    try:
        return capture_graph(fn, warm=False), "graph"
    except Exception as err:  # noqa: BLE001  a host sync inside: time it as called
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:90]})")
        return fn, "eager"


def peak_mib(fn):
    """Memory allocated by one eager call above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dense_rates(M, H, I, dtype):
    """[(name, run, flops)] of the dense cuBLAS ceilings."""
    d = 8192
    a, b = torch.randn(d, d, device="cuda").to(dtype), torch.randn(d, d, device="cuda").to(dtype)
    xa = torch.randn(M, H, device="cuda").to(dtype)
    wb = torch.randn(H, 2 * I, device="cuda").to(dtype)
    return [("8192^3", lambda: torch.mm(a, b), 2 * d ** 3),
            (f"[{M},{H}]x[{H},{2 * I}]", lambda: torch.mm(xa, wb), 2 * M * H * 2 * I)]


# ----------------------------------------------------------------------------- one T
def bench_T(T, shape, rounds, dtype, layer_too=True, eager=True, log=print):
    H, I, E, G, k_g = shape["H"], shape["I"], shape["E"], shape["G"], shape["k_g"]
    p = make_problem(T, H, I, E, G, k_g, dtype, "cuda")
    M = p["M"]
    flops = 18 * M * H * I
    methods = {
        "moge save": lambda: fwd_bwd(moge_save, p),
        "moge recompute": lambda: fwd_bwd(moge_recompute, p),
        "moge save/triton": lambda: fwd_bwd(moge_save, p),
        "grouped_mm": lambda: fwd_bwd(grouped_mm, p),
    }
    opts = {"moge save/triton": dict(bwd_gemm="triton")}
    if eager:
        methods["eager reference"] = lambda: fwd_bwd(eager_reference, p)

    # correctness of the gradients against the torch._grouped_mm pipeline (same bf16 inputs)
    expect = fwd_bwd(grouped_mm, p)
    notes = {}
    for name in methods:
        with moge_kernels.use_options(**opts.get(name, {})):
            got = methods[name]()
        notes[name] = "dX %.1e dWgu %.1e dWd %.1e" % tuple(rel(g, e) for g, e in zip(got, expect))
        del got
    del expect

    layer_inputs = None
    if layer_too:
        torch.manual_seed(0)
        layer = MoGELayer(H, I, E, G, k_g, device="cuda", dtype=dtype)
        hidden = torch.randn(T, H, device="cuda").to(dtype).requires_grad_()
        grad_out = torch.randn(T, H, device="cuda").to(dtype)
        params = [hidden] + [q for q in layer.parameters()]
        layer_inputs = (layer, hidden, grad_out)

        def layer_step(backend):
            def run():
                with moge_kernels.use_backend(backend):
                    out = layer(hidden)
                    return torch.autograd.grad(out, params, grad_out)
            return run
        methods["layer moge"] = layer_step("auto")
        methods["layer reference"] = layer_step("reference")
        notes["layer moge"] = "router+dispatch+experts+combine"
        notes["layer reference"] = ""

    ceilings = dense_rates(M, H, I, dtype)     # allocated (and randomised) before any capture
    for _, run, _ in ceilings:
        run()
    runs, modes, mem = {}, {}, {}
    for name, fn in methods.items():
        with moge_kernels.use_options(**opts.get(name, {})):
            mem[name] = peak_mib(fn)
            if name in ("eager reference", "layer reference", "layer moge"):
                # the reference syncs with the host; the layer runs as a training step would, eagerly
                # (its capture failed in the first H100 run, see the docstring)
                fn()
                runs[name], modes[name] = fn, "eager"
            else:
                runs[name], modes[name] = capture(fn)
        log(f"  T={T} {name}: ready ({modes[name]}, peak {mem[name]:.0f} MiB)")
    samples = {name: [] for name in runs}
    ceil_ms = {name: [] for name, _, _ in ceilings}
    names = list(runs)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            with moge_kernels.use_options(**opts.get(name, {})):
                samples[name].append(elapsed_ms(runs[name]))
        for cname, run, _ in ceilings:
            ceil_ms[cname].append(min(elapsed_ms(run) for _ in range(3)))
    rates = {cname: f / statistics.median(ceil_ms[cname]) / 1e9 for cname, _, f in ceilings}
    peak_rate = max(rates.values())
    floor = flops / peak_rate / 1e9
    rows = []
    for name in names:
        ms = statistics.median(samples[name])
        rows.append(dict(T=T, method=name, ms=ms, tflops=flops / ms / 1e9, x_floor=ms / floor,
                         mode=modes[name], peak_mib=mem[name], note=notes.get(name, "")))
    del layer_inputs
    return rows, dict(T=T, M=M, rates=rates, floor_ms=floor)


def format_table(all_rows, all_ceil, device):
    out = [f"device: {device}; torch {torch.__version__}; bf16; Pangu experts H=5120 I=1344 E=64 G=8 k_g=1",
           "useful FLOPs = 18*M*H*I (forward + dgrad + wgrad), M = T*K; x floor = time / floor"]
    for c in all_ceil:
        rates = ", ".join(f"{k} {v:.0f}" for k, v in c["rates"].items())
        out.append(f"T={c['T']} (M={c['M']}): dense cuBLAS TFLOP/s {rates}; floor {c['floor_ms']:.3f} ms")
    out.append("")
    out.append(f"{'T':>6} {'method':18} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} {'mode':6} {'peak MiB':>9}  "
               "grads vs grouped_mm (rel. Frobenius)")
    for r in all_rows:
        out.append(f"{r['T']:>6} {r['method']:18} {r['ms']:9.3f} {r['tflops']:8.1f} {r['x_floor']:8.2f} "
                   f"{r['mode']:6} {r['peak_mib']:9.0f}  {r['note']}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager reference rows")
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer rows")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_training needs a CUDA device")
        return
    t0 = time.time()
    all_rows, all_ceil = [], []
    for T in [int(t) for t in args.T.split(",")]:
        rows, ceil = bench_T(T, PANGU, args.rounds, torch.bfloat16, layer_too=not args.no_layer,
                             eager=not args.no_eager)
        all_rows += rows
        all_ceil.append(ceil)
        torch.cuda.empty_cache()
    table = format_table(all_rows, all_ceil, torch.cuda.get_device_name())
    from moge_kernels import _grouped_mm
    table += ("\nbackward GEMMs: " + (f"torch._grouped_mm, except {_grouped_mm.refused} calls it refused "
                                      "(run on Triton: see the warnings above)" if _grouped_mm.refused else
                                      "torch._grouped_mm (moge save/triton: Triton kernels)"))
    print(f"(bench took {time.time() - t0:.0f} s)")
    print_table(table, args.out)


if __name__ == "__main__":
    main()
