"""A/B of the Triton expert MLP: variants of the config table and of the stream split, timed interleaved.

Each variant is the committed table with some entries replaced and some options (moge_kernels.options) set,
at capture time (the choice is frozen into the CUDA graph that is then replayed). All variants, the dense
cuBLAS GEMMs of the same shapes and the 8192^3 ceiling are sampled in the same rounds; medians reported.

    python bench/ab_experts.py --T 1024,4096,16384 --variants base,s3,packed,one_stream
    python bench/ab_experts.py --T 1024 --variants "base;cfg:128,64,128,8,3,1,1,1,0,0/-"
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_experts as be  # noqa: E402
import moge_kernels  # noqa: E402
from moge_kernels import packing  # noqa: E402
from moge_kernels.bench.timing import Ceilings, capture_graph, elapsed_ms  # noqa: E402
from moge_kernels.triton import gemm_configs  # noqa: E402

C = gemm_configs.GemmConfig
BIG = ("medium", "prefill", "large")


# name -> (options, function of the table giving the replaced entries)
VARIANTS = {
    "base": ({}, lambda t: {}),
    "one_stream": ({"triton_mlp_streams": False}, lambda t: {}),
    # gate_up of the big regimes with 3 stages (its TMA path is the wide box since that became the only one)
    "s3": ({}, lambda t: {(r, True): dataclasses.replace(t[(r, True)], num_stages=3) for r in BIG}),
    # the table, with both weight tensors packed k-block-major (moge_kernels.packing)
    "packed": ({}, lambda t: {}),
}
PACKED = {"packed"}


def _spec_variant(name):
    """"cfg:GATE_UP/DOWN[/OPTION=V...]": configs in MOGE_TRITON_GEMM_CONFIG's syntax, '-' keeps the table,
    for every regime; then options by name (e.g. triton_mlp_streams=0)."""
    parts = name.split(":", 1)[1].split("/")
    gate_up, down, opts = parts[0], parts[1], dict(kv.split("=") for kv in parts[2:])

    def entries(table):
        out = {}
        for _, regime_name in gemm_configs.REGIMES:
            if gate_up != "-":
                out[(regime_name, True)] = gemm_configs._parse_forced(gate_up)
            if down != "-":
                out[(regime_name, False)] = gemm_configs._parse_forced(down)
        return out
    return opts, entries


def capture_variant(p, name):
    opts, entries = _spec_variant(name) if name.startswith("cfg:") else VARIANTS[name]
    family = gemm_configs.device_family(torch.cuda.current_device())
    table = gemm_configs.TABLES[family]
    saved_table = dict(table)
    table.update(entries(saved_table))
    if name in PACKED:
        if "w_gate_up_packed" not in p:
            p["w_gate_up_packed"] = packing.pack_expert_weights(p["w_gate_up"])
            p["w_down_packed"] = packing.pack_expert_weights(p["w_down"])
        q = dict(p, w_gate_up=p["w_gate_up_packed"], w_down=p["w_down_packed"])
    else:
        q = p
    try:
        with moge_kernels.use_options(**opts):
            return capture_graph(lambda: be.triton_mlp(q)), be.triton_mlp(q)
    finally:
        table.clear()
        table.update(saved_table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="1024,4096,16384")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--variants", default="base,s3,packed,one_stream")
    args = ap.parse_args(argv)
    moge_kernels.set_backend("triton")
    names = args.variants.split(";") if ";" in args.variants else args.variants.split(",")
    dtype, device = torch.bfloat16, "cuda"
    shape = be.PANGU
    ceil = Ceilings(torch.device(device), dtype)
    weights = be.make_weights(shape["E"], shape["H"], shape["I"], dtype, device)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; medians of {args.rounds} "
          f"interleaved rounds; %dense = useful TFLOP/s / 8192^3 cuBLAS rate of the same rounds; "
          f"%dshape = dense GEMMs at the real shapes / ms")
    for T in [int(t) for t in args.T.split(",")]:
        p = be.make_problem(T, shape["H"], shape["I"], shape["E"], shape["G"], shape["k_g"], dtype, device,
                            weights=weights)
        runs, outs = {}, {}
        for name in names:
            runs[name], outs[name] = capture_variant(p, name)
        if p["M"] >= 64 * p["E"]:
            runs["dense"] = capture_graph(lambda: be.dense_gemms(p))
        inner = {name: be.inner_for(run) for name, run in runs.items()}
        samples = {name: [] for name in runs}
        since = len(ceil.copy_ms)
        for _ in range(args.rounds):
            for name, run in runs.items():
                samples[name].append(elapsed_ms(run, inner[name]))
            ceil.sample(inner=5)
        copy_gbs, gemm_tf = ceil.rates(since)
        med = {name: statistics.median(v) for name, v in samples.items()}
        flops = be.flops_of(p)
        w_bytes, _ = be.bytes_of(p)
        floor_bytes = w_bytes / copy_gbs / 1e6
        print(f"T={T} M={p['M']}: copy {copy_gbs:.0f} GB/s, dense {gemm_tf:.0f} TFLOP/s, weight floor "
              f"{floor_bytes:.4f} ms, dense shapes {med.get('dense', float('nan')):.4f} ms")
        base = outs[names[0]].float()
        for name in names:
            t = med[name]
            diff = ((outs[name].float() - base).norm() / base.norm()).item()
            print(f"  {name:<14.60} {t:8.4f} ms  x{t / med[names[0]]:6.3f}  {flops / t / 1e9:6.1f} TFLOP/s  "
                  f"{100 * flops / t / 1e9 / gemm_tf:5.1f}% dense  "
                  f"{100 * med.get('dense', float('nan')) / t:5.1f}% dshape  {t / floor_bytes:6.3f}x wfloor  "
                  f"diff {diff:.1e}")
        del p, runs, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
