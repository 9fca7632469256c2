"""FP8 expert benchmark (device): the package's FP8 grouped_mlp and FP8 layer vs its bf16 ones.

Pangu Pro MoE (H=5120, I=1344, E=64, G=8, K=8), T in {1, 16, 128, 1024, 4096, 16384}, bf16 activations,
routing from random logits. All timings are CUDA-graph replays with a cold L2 (moge_kernels.bench.timing),
medians over interleaved rounds. In the same run:
    copy      device copy bandwidth (read + write), as the floors of the bf16 bench use it
    fp8 mm    torch._scaled_mm at 8192^3 (e4m3, tensorwise scales, bf16 out): the dense FP8 rate
    floor     FP8 weight-read floor = (e4m3 bytes + fp32 scales of the experts that get rows) / copy
    peer      the torch._scaled_grouped_mm pipeline (rowwise scales: x quantized per token in torch,
              gate_up, silu * up, h quantized per token, down), where this torch has it
Both weight formats: fp8 = fp8_block, fp8c = fp8_channel (per-channel weights, per-token activations);
the FP8 layers keep the shared expert in bf16 (MoGELayer.quantize_'s default), "fp8 layer, fp8 shared"
quantizes it too (quantize_(shared_expert=True)): its speed and its accuracy against the bf16 layer
("fp8c layer, fp8c shared" the same in the per-channel format); fp8c runs with the current
options.fp8_fast_accum (default off: fp32 promotion every 128 k; MOGE_FP8_FAST_ACCUM=1 times the
fast accumulation); the mlp's ratio to the weight-read floor and to its FLOP floor at the fp8 mm rate.
Accuracy (printed): FP8 grouped_mlp vs the reference with the same quantization (goal <= 1e-2), the
gate_up GEMM alone in fp32 vs the reference, and vs bf16 on the unquantized weights; FP8 layer vs bf16
layer (goal <= 4e-2).

    python bench/bench_fp8.py                  # the table (about 3 minutes on an H200)
    python bench/bench_fp8.py --T 1,4096 --rounds 5
    python bench/bench_fp8.py --sweep          # the config sweep at T = 1, 1024, 4096, then the table
                                               # at those T (one device call, about 60-90 s)

--eager T,...  first the eager (no graph) host cost of the FP8 mlp a call, with the cached launches
              and with Triton's kernel[grid] launches, interleaved.
--kernels T,... first the GPU time of each kernel in one eager FP8 mlp and FP8 layer call (torch.profiler).
--sweep times the FP8 grouped_mlp (graph replays, cold L2, medians) with one GEMM's config forced to
each candidate of moge_kernels/triton/gemm_configs.FP8_CANDIDATES for the T's regime (the other GEMM at
its table entry), prints the winner of each (regime, GEMM) as the FP8_H200_TABLE line to commit, and
then the normal table; --sweep-fmt fp8_channel sweeps FP8_CHANNEL_CANDIDATES for FP8_CHANNEL_H200_TABLE.
A time budget (--budget, seconds) skips the candidates it has no time left for
and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import fp8, reference  # noqa: E402
from moge_kernels.bench.timing import Ceilings, Timer, capture_graph  # noqa: E402

TS = (1, 16, 128, 1024, 4096, 16384)
H, I, E, G, IS = 5120, 1344, 64, 8, 5376


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def scaled_mm_rate(n=8192):
    """Dense e4m3 GEMM rate (TFLOP/s) and its timer closure."""
    a = torch.randn(n, n, device="cuda").to(fp8.E4M3)
    b = torch.randn(n, n, device="cuda").to(fp8.E4M3).t()          # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    fn = lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    fn()
    return fn, 2 * n ** 3


def rowwise(x):
    """Per-row e4m3 + fp32 scales in torch (the peer pipeline's activation quantization)."""
    amax = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12)
    q = (x.float() * (448.0 / amax)).clamp(-448, 448).to(fp8.E4M3)
    return q, (amax / 448.0).reshape(-1)


def scaled_grouped_mm_pipeline(x, offsets, wgu_q, wgu_s, wd_q, wd_s):
    """x [M, H] bf16 -> [M, H] through torch._scaled_grouped_mm with rowwise scales."""
    ends = offsets[1:]
    q, s = rowwise(x)
    gate_up = torch._scaled_grouped_mm(q, wgu_q.transpose(-2, -1), s, wgu_s, offs=ends,
                                       out_dtype=torch.bfloat16)
    gate, up = gate_up.float().chunk(2, -1)
    h = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    hq, hs = rowwise(h)
    return torch._scaled_grouped_mm(hq, wd_q.transpose(-2, -1), hs, wd_s, offs=ends,
                                    out_dtype=torch.bfloat16)


def sweep(Ts, dev, timer, layer, gu, dn, deadline, twins=False, only="", channel=False):
    """Per T: the mlp with gate_up, then down, forced to each candidate of the T's regime (the table's
    entry first); the winner of each as a table line. channel: the per-channel format's table and
    candidates (fast accumulation)."""
    from moge_kernels.triton import fp8_gemm, gemm_configs
    lines = []
    for T in Ts:
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer.gate(hidden), G, 1, layer.router_scale)
        M = x.shape[0]
        reg = gemm_configs.regime(M, E)
        with torch.no_grad(), mk.use_backend("reference"):
            want = mk.grouped_mlp(x, gu, dn, offsets)
        for gemm in ("gate_up", "down"):
            table = gemm_configs.fp8_table_config(M, E, gemm, dev, channel)
            pool = gemm_configs.FP8_CHANNEL_CANDIDATES if channel else gemm_configs.FP8_CANDIDATES
            cands = [table] + [c for c in pool[(reg, gemm)] if c != table and only in str(c)]
            if twins:   # each TMA candidate also with pointer loads: tells a TMA fault from a tile fault
                cands += [dataclasses.replace(c, tma=False) for c in cands
                          if c.tma and dataclasses.replace(c, tma=False) not in cands]
            timings = []
            for c in cands:
                if time.monotonic() > deadline:
                    print(f"  sweep T={T} {gemm} {c}: skipped (--budget spent)", flush=True)
                    continue
                fp8_gemm._forced[gemm] = c
                try:
                    with torch.no_grad(), mk.use_backend("triton"):
                        err = rel_err(mk.grouped_mlp(x, gu, dn, offsets), want)
                        ms = statistics.median(timer.samples(
                            capture_graph(lambda: mk.grouped_mlp(x, gu, dn, offsets), dev), 10))
                    ok = err <= 1e-2           # the accuracy bound against the reference
                    if ok:
                        timings.append((ms, c))
                    print(f"  sweep T={T} ({reg}) {gemm} {c}: {ms:.3f} ms, vs reference {err:.1e}"
                          f"{'' if ok else ' WRONG'}{'  (table)' if c == table else ''}", flush=True)
                except Exception as err:  # noqa: BLE001  a candidate that fails to compile or launch
                    print(f"  sweep T={T} {gemm} {c}: failed {type(err).__name__}: {str(err)[:100]}", flush=True)
                finally:
                    fp8_gemm._forced.clear()
            if timings:
                ms, best = min(timings, key=lambda t: t[0])
                table_ms = next((t for t, c in timings if c == table), float("nan"))
                lines.append((T, reg, gemm, ms, table_ms, best))
    print("\nsweep winners (mlp ms with that GEMM's config; table = the committed entry):")
    for T, reg, gemm, ms, table_ms, best in lines:
        print(f"  T={T:>5} {reg:>7} {gemm:>7}: {ms:.3f} ms (table {table_ms:.3f})  {best}")
    print(f"{'FP8_CHANNEL_H200_TABLE' if channel else 'FP8_H200_TABLE'} lines (moge_kernels/triton/gemm_configs.py):")
    for T, reg, gemm, ms, table_ms, best in lines:
        fields = [str(best.block_m), str(best.block_n), str(best.num_warps), str(best.num_stages)]
        fields += ["tma=True"] * best.tma + [f"maxnreg={best.maxnreg}"] * bool(best.maxnreg)
        fields += ["swap=True"] * best.swap
        print(f"    ({reg!r}, {gemm!r}): F({', '.join(fields)}),   # T={T}: {ms:.3f} ms")


def eager_host(dev, gu, dn, layer, Ts):
    """Eager FP8 grouped_mlp calls: host time a call (perf_counter over 50 calls, no sync inside) and
    time a call back to back (CUDA events over 10 calls), with the cached launches (launch.Kernel) and
    with every FP8 launch through Triton's kernel[grid](...) (Kernel.fast off), interleaved."""
    from moge_kernels.bench.timing import elapsed_ms
    from moge_kernels.triton import fp8_gemm
    kernels = (fp8_gemm._gemm, fp8_gemm._quantize_rows, fp8_gemm._permute)
    fast0 = [k.fast for k in kernels]
    print("\neager FP8 grouped_mlp (no graph): host us a call / back-to-back ms a call")
    print("| T | cached launches: host us | ms | kernel[grid] launches: host us | ms |")
    print("|---|---|---|---|---|")
    for T in Ts:
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        with torch.no_grad(), mk.use_backend("triton"):
            x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer.gate(hidden), G, 1, layer.router_scale)
            fn = lambda: mk.grouped_mlp(x, gu, dn, offsets)  # noqa: E731
            res = {True: ([], []), False: ([], [])}
            for r in range(6):
                for fast in ((True, False) if r % 2 == 0 else (False, True)):
                    for k, f0 in zip(kernels, fast0):
                        k.fast = f0 and fast
                    fn()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(50):
                        fn()
                    res[fast][0].append((time.perf_counter() - start) / 50 * 1e6)
                    torch.cuda.synchronize()
                    res[fast][1].append(elapsed_ms(fn, inner=10))
            for k, f0 in zip(kernels, fast0):
                k.fast = f0
        med = {f: (statistics.median(a), statistics.median(b)) for f, (a, b) in res.items()}
        print(f"| {T} | {med[True][0]:.1f} | {med[True][1]:.3f} | {med[False][0]:.1f} | {med[False][1]:.3f} |",
              flush=True)


def kernel_times(dev, gu, dn, layer8, Ts):
    """GPU time per kernel of one eager FP8 grouped_mlp call and one FP8 layer call (torch.profiler, CUDA
    activities, 20 calls each, means), where a call's time goes between its kernels."""
    from torch.profiler import ProfilerActivity, profile
    for T in Ts:
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        with torch.no_grad(), mk.use_backend("triton"):
            x, _, _, offsets, _ = mk.grouped_dispatch(hidden, layer8.gate(hidden), G, 1, layer8.router_scale)
            for name, fn in (("fp8 mlp", lambda: mk.grouped_mlp(x, gu, dn, offsets)),
                             ("fp8 layer", lambda: layer8(hidden))):
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                rows = [(e.key, e.device_time_total / 20, e.count // 20) for e in prof.key_averages()
                        if e.device_time_total > 0]
                rows.sort(key=lambda r: -r[1])
                total = sum(r[1] for r in rows)
                print(f"\nkernels of one {name} call, T={T} (us of GPU time, mean of 20 eager calls; sum {total:.1f}):")
                for key, us, n in rows[:12]:
                    print(f"  {us:8.1f} us  x{n}  {key[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default=",".join(map(str, TS)))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--samples", type=int, default=3, help="samples per method per round")
    ap.add_argument("--sweep", action="store_true", help="config sweep first (default T: 1,1024,4096)")
    ap.add_argument("--sweep-only", default="", help="sweep only the candidates whose name has this text "
                    "(e.g. tma, r168), beside the table's entry")
    ap.add_argument("--budget", type=float, default=45.0, help="seconds the sweep may take")
    ap.add_argument("--twins", action="store_true",
                    help="the sweep times each TMA candidate with pointer loads too")
    ap.add_argument("--eager", default="", help="T list: eager host cost of the FP8 mlp first (e.g. 1,16,128)")
    ap.add_argument("--kernels", default="", help="T list: GPU time per kernel of an FP8 mlp and layer call "
                    "first (torch.profiler)")
    ap.add_argument("--sweep-fmt", default="fp8_block", choices=("fp8_block", "fp8_channel"),
                    help="the weight format the sweep times")
    args = ap.parse_args()
    if args.sweep and args.T == ",".join(map(str, TS)):
        args.T, args.rounds, args.samples = "1,1024,4096", min(args.rounds, 3), min(args.samples, 3)
    if not torch.cuda.is_available():
        sys.exit("bench_fp8.py needs a CUDA device")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    timer = Timer(dev)
    ceil = Ceilings(dev, torch.bfloat16)
    mm8, mm8_flops = scaled_mm_rate()
    mm8_ms = []

    layer = mk.MoGELayer(H, I, E, G, shared_intermediate_size=IS).to(dev, torch.bfloat16).eval()
    layer8 = copy.deepcopy(layer).quantize_("fp8_block")                           # bf16 shared expert
    layer8s = copy.deepcopy(layer).quantize_("fp8_block", shared_expert=True)      # shared expert in FP8
    gu, dn = fp8.layer_weights(layer8)
    # per-channel weights, per-token activations: one scale per row, so the FP8 dots chain through one
    # accumulator (promoted to fp32 every 128 k) instead of a scaled FMA per 128-k block
    layer8c = copy.deepcopy(layer).quantize_("fp8_channel")
    layer8cs = copy.deepcopy(layer).quantize_("fp8_channel", shared_expert=True)
    guc, dnc = fp8.layer_weights(layer8c)
    wgu, wd = layer.w_gate_up.detach(), layer.w_down.detach()
    # the peer's weights: per-channel (rowwise) e4m3 of the same weights
    pgu = mk.quantize_expert_weights(wgu, "fp8_channel", parts=2)
    pdn = mk.quantize_expert_weights(wd, "fp8_channel")
    peer_w = (pgu.weight, pgu.scale.reshape(E, -1), pdn.weight, pdn.scale.reshape(E, -1))
    has_peer = hasattr(torch, "_scaled_grouped_mm")

    if args.eager:
        eager_host(dev, gu, dn, layer, [int(t) for t in args.eager.split(",")])
    if args.kernels:
        kernel_times(dev, gu, dn, layer8, [int(t) for t in args.kernels.split(",")])
    if args.sweep:
        sweep([int(t) for t in args.T.split(",")], dev, timer, layer,
              *((gu, dn) if args.sweep_fmt == "fp8_block" else (guc, dnc)),
              time.monotonic() + args.budget, args.twins, args.sweep_only, args.sweep_fmt == "fp8_channel")

    rows = []
    for T in [int(t) for t in args.T.split(",")]:
        hidden = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        logits = layer.gate(hidden)
        x, _, _, offsets, _ = mk.grouped_dispatch(hidden, logits, G, 1, layer.router_scale)
        counts = (offsets[1:] - offsets[:-1])
        active = int((counts > 0).sum())
        fp8_bytes = active * (gu.weight[0].numel() + dn.weight[0].numel()
                              + 4 * (gu.scale[0].numel() + dn.scale[0].numel()))
        methods = {}
        with torch.no_grad(), mk.use_backend("triton"):
            methods["bf16 mlp"] = lambda: mk.grouped_mlp(x, wgu, wd, offsets)
            methods["fp8 mlp"] = lambda: mk.grouped_mlp(x, gu, dn, offsets)
            methods["bf16 layer"] = lambda: layer(hidden)
            methods["fp8 layer"] = lambda: layer8(hidden)
            methods["fp8 layer, fp8 shared"] = lambda: layer8s(hidden)
            methods["fp8c mlp"] = lambda: mk.grouped_mlp(x, guc, dnc, offsets)
            methods["fp8c layer"] = lambda: layer8c(hidden)
            methods["fp8c layer, fp8c shared"] = lambda: layer8cs(hidden)
            notes = []
            if has_peer:
                try:
                    scaled_grouped_mm_pipeline(x, offsets, *peer_w)
                    methods["peer _scaled_grouped_mm"] = lambda: scaled_grouped_mm_pipeline(x, offsets, *peer_w)
                except Exception as err:  # noqa: BLE001
                    notes.append(f"_scaled_grouped_mm: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
            replays = {}
            for name, fn in methods.items():
                try:
                    replays[name] = capture_graph(fn, dev)
                except Exception as err:  # noqa: BLE001
                    notes.append(f"{name}: not captured ({type(err).__name__}: {str(err)[:80]})")
            times = {name: [] for name in replays}
            for r in range(args.rounds):
                names = list(replays)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name] += timer.samples(replays[name], args.samples)
                ceil.sample(1)
                mm8_ms.append(min(timer.samples(mm8, 2)))
            med = {name: statistics.median(v) for name, v in times.items()}
            # accuracy
            y8 = mk.grouped_mlp(x, gu, dn, offsets)
            y16 = mk.grouped_mlp(x, wgu, wd, offsets)
            y8c = mk.grouped_mlp(x, guc, dnc, offsets)
            acc = {"fp8 mlp vs bf16": rel_err(y8, y16), "fp8c mlp vs bf16": rel_err(y8c, y16),
                   "fp8 layer vs bf16 layer": rel_err(layer8(hidden), layer(hidden)),
                   "fp8 layer (fp8 shared) vs bf16 layer": rel_err(layer8s(hidden), layer(hidden)),
                   "fp8c layer vs bf16 layer": rel_err(layer8c(hidden), layer(hidden)),
                   "fp8c layer (fp8c shared) vs bf16 layer": rel_err(layer8cs(hidden), layer(hidden))}
            if T in (16, 128, 4096):
                with mk.use_backend("reference"):
                    acc["fp8 mlp vs reference"] = rel_err(y8, mk.grouped_mlp(x, gu, dn, offsets))
                    acc["fp8c mlp vs reference"] = rel_err(y8c, mk.grouped_mlp(x, guc, dnc, offsets))
                    gemm_ref = mk.grouped_gemm(x.float(), gu, offsets)
                # the gate_up GEMM alone, fp32 out (no bf16 rounding): the tensor cores' FP8 accumulation
                # error, which the bf16 rounding and e4m3 quantization of h amplify at the mlp level
                acc["fp8 gate_up (fp32 out) vs reference"] = rel_err(mk.grouped_gemm(x.float(), gu, offsets),
                                                                     gemm_ref)
                del gemm_ref
        bw_gbs, _ = ceil.rates()
        floor_ms = fp8_bytes / (bw_gbs * 1e9) * 1e3
        rows.append((T, med, floor_ms, acc, notes))
        print(f"T={T}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
              + f", fp8 floor {floor_ms:.3f} ms; " + ", ".join(f"{k} {v:.2e}" for k, v in acc.items()),
              flush=True)
        for n in notes:
            print("   note:", n)
        del replays, methods

    bw, bf16_rate = ceil.rates()
    fp8_rate = mm8_flops / statistics.median(mm8_ms) / 1e9
    print(f"\n{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s, bf16 mm {bf16_rate:.0f} TFLOP/s, "
          f"fp8 _scaled_mm 8192^3 {fp8_rate:.0f} TFLOP/s; ms are graph-replay medians, cold L2 "
          f"({timer.describe()})")
    print("fp8 = block-scaled (fp8_block: 128x128 weight blocks, 1x128 activation groups); fp8c = fp8_channel "
          "(per-channel weights, per-token activations)")
    print("fp8 floor = FP8 weight-read floor; FLOP floor = the mlp's FLOPs at the fp8 _scaled_mm rate above")
    print("| T | bf16 mlp | fp8 mlp | fp8c mlp | fp8 floor | fp8 mlp / floor | fp8c / floor | "
          "fp8 mlp / FLOP floor | peer _scaled_grouped_mm | bf16 layer | fp8 layer | fp8 layer, fp8 shared | "
          "fp8c layer | fp8c layer, fp8c shared | layer speed-up fp8 / fp8 with fp8 shared / fp8c / fp8c with "
          "fp8c shared | fp8 / fp8c TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for T, med, floor_ms, acc, _ in rows:
        f = lambda k: f"{med[k]:.3f}" if k in med else "n/a"  # noqa: E731
        flops = 6 * T * 8 * H * I
        nan = float("nan")
        speed = lambda k: med["bf16 layer"] / med[k] if k in med and "bf16 layer" in med else nan  # noqa: E731
        ratio = lambda k: med[k] / floor_ms if k in med else nan  # noqa: E731
        tflops = lambda k: flops / med[k] / 1e9 if k in med else nan  # noqa: E731
        flop_floor_ms = flops / (fp8_rate * 1e9)
        flop_ratio = med["fp8 mlp"] / flop_floor_ms if "fp8 mlp" in med else nan
        print(f"| {T} | {f('bf16 mlp')} | {f('fp8 mlp')} | {f('fp8c mlp')} | {floor_ms:.3f} | "
              f"{ratio('fp8 mlp'):.2f}x | {ratio('fp8c mlp'):.2f}x | {flop_ratio:.2f}x | "
              f"{f('peer _scaled_grouped_mm')} | "
              f"{f('bf16 layer')} | {f('fp8 layer')} | {f('fp8 layer, fp8 shared')} | {f('fp8c layer')} | "
              f"{f('fp8c layer, fp8c shared')} | {speed('fp8 layer'):.2f}x / {speed('fp8 layer, fp8 shared'):.2f}x / "
              f"{speed('fp8c layer'):.2f}x / {speed('fp8c layer, fp8c shared'):.2f}x | "
              f"{tflops('fp8 mlp'):.0f} / {tflops('fp8c mlp'):.0f} |")
    print("\ngoals: T>=4096 layer speed-up >= 1.7x; T<=1024 fp8 mlp / floor <= 1.2x; fp8 mlp < peer at "
          "every T; fp8 mlp vs reference <= 1e-2; fp8 layer vs bf16 layer <= 4e-2")


if __name__ == "__main__":
    main()
