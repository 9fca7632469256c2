"""Project the expert-parallel layer time of MoGE vs plain top-k MoE to D = 8 and 16 devices.

Inputs, measured on a GPU by `bench/bench_ep.py` (section `measure`, stored in its JSON under "measure"):
  t_expert(m)      grouped_mlp time of ONE expert with m rows (weights read from HBM), Pangu shape
  t_all(T)         grouped_mlp time of all E experts for T tokens routed by MoGE (one device)
  t_a2a(bytes)     all_to_all_single time vs bytes per rank, equal splits, on the measuring host (D=2)
  t_dispatch(T), t_combine(T)   grouped_dispatch / grouped_combine on one device, T tokens
Routing: real routing (the selection of moge_kernels.reference.route, see route_ids) of skewed logits
(metrics.skewed_logits: token noise + a fixed per-expert popularity bias of strength `skew`), the SAME
logits for MoGE (grouped top-k_g) and for plain top-K; several batches per point.

Model of one layer (forward) on D devices, T tokens per device, device d owning experts [d*E/D, (d+1)*E/D):
  step = t_dispatch(T) + a2a_out + max_d experts_d + a2a_back + t_combine(T)
  experts_d = o + sum over d's experts e with m_e > 0 of max(w_time, slope * m_e)
      per expert: the larger of reading its weights and its GEMM FLOPs, where
      slope  = compute ms per row = the slope of t_expert(m) between its two largest m (compute bound),
      w_time = weight-streaming ms per active expert, solved so that the model reproduces t_all at the
               smallest measured T (all experts active, weight bound), o = t_expert(0) (launch);
      the model is then checked against t_all at the other T and against the measured EP runs
  a2a = lat + max_d max(intra-node bytes of d, sent or received) / bw_intra  [+ inter-node term]
        (+ one more `lat` for the per-expert count exchange; + host sync for top-k's dynamic splits)
Assumptions (stated, not measured):
  A1. the experts of one device run in one grouped kernel whose time is the sum over its active
      experts of max(weight read, FLOPs) (a per-expert roofline, calibrated as above; tile quantisation
      at small m_e and overlap between experts' tiles are ignored);
  A2. all_to_all: per-device link bandwidth and latency as measured between the 2 GPUs of the measuring
      host, independent of D inside one node (NVSwitch: every GPU sends to all peers at full rate); an
      all_to_all ends when the device with the most off-device bytes (sent or received) is done;
  A3. D=16 spans two 8-GPU nodes: the bytes to/from the other node go over `--inter-node-gbs` GB/s per
      GPU (default 50 GB/s, one 400 Gb/s NIC per GPU) at the same time as the intra-node bytes;
  A4. route+permute and combine are local, the same for MoGE and top-k (top-K routing on one group);
  A5. top-k pays one host sync per layer (split sizes to the host before the row exchange), taken from
      the bench's measured top-k minus MoGE exchange time at the smallest T when available;
  A6. no overlap of communication with computation, no capacity factor / token dropping, no shared
      expert (it is the same dense work for both and would add the same time to both);
  A7. the receiver's sort of its rows by expert (and back) costs two row gathers at 4.3 TB/s (H200's
      measured copy rate, KINDS.md), proportional to the rows the device receives.
At D=16 the Pangu routing (G=8 groups) leaves each device half a group: MoGE then balances device PAIRS
only. Both that and G=16 (one group of 4 per device, K=16, compared with top-16) are projected.

    python bench/simulate_ep.py --measured bench/results/ep_h200x2.json     # -> bench/results/ep_sim.*
    python bench/simulate_ep.py --analytic                                   # no measurement: floors only
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moge_kernels import metrics  # noqa: E402


# ----------------------------------------------------------------------------- measured curves
class Curve:
    """Piecewise-linear y(x) through measured points, extrapolated linearly past the ends."""

    def __init__(self, xs, ys):
        pts = sorted(zip(xs, ys))
        self.xs, self.ys = [p[0] for p in pts], [p[1] for p in pts]

    def __call__(self, x):
        xs, ys = self.xs, self.ys
        i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0, 0.0)


class Measured:
    """The model's inputs, from bench_ep.py's JSON or from analytic floors."""

    def __init__(self, expert, dispatch, combine, a2a_lat_ms, a2a_bw_gbs, sync_ms, H, elem_bytes, source,
                 launch_ms, w_time_ms, slope_ms):
        self.expert, self.dispatch, self.combine = expert, dispatch, combine
        self.launch_ms, self.w_time_ms, self.slope_ms = launch_ms, w_time_ms, slope_ms
        self.a2a_lat_ms, self.a2a_bw_gbs, self.sync_ms = a2a_lat_ms, a2a_bw_gbs, sync_ms
        self.H, self.elem_bytes, self.source = H, elem_bytes, source

    @classmethod
    def from_bench_json(cls, path):
        with open(path) as f:
            data = json.load(f)
        m = data["measure"]
        D = m["D"]
        expert = Curve([p["rows"] for p in m["expert_mlp"]], [p["ms"] for p in m["expert_mlp"]])
        dispatch = Curve([p["T"] for p in m["dispatch_combine"]], [p["dispatch_ms"] for p in m["dispatch_combine"]])
        combine = Curve([p["T"] for p in m["dispatch_combine"]], [p["combine_ms"] for p in m["dispatch_combine"]])
        # all_to_all: latency = the smallest non-empty exchange; bandwidth = off-device bytes per rank
        # ((D-1)/D of the buffer) over (time - latency) at the largest size.
        pts = [p for p in m["all_to_all"] if p["bytes_per_rank"] > 0]
        lat = min(p["ms"] for p in pts)
        big = max(pts, key=lambda p: p["bytes_per_rank"])
        bw = big["bytes_per_rank"] * (D - 1) / D / ((big["ms"] - lat) * 1e-3) / 1e9
        sync = 0.03
        bench = data.get("bench") or []
        if bench:
            small = min(bench, key=lambda r: r["T"])
            sync = max(small["topk"]["a2a_dispatch"] - small["moge"]["a2a_dispatch"], 0.0)
        elem = 2 if "bfloat16" in m["dtype"] or "float16" in m["dtype"] else 4
        src = f"measured: {path} ({data['header'][0]})"
        pts_e = sorted((p["rows"], p["ms"]) for p in m["expert_mlp"])
        (m1, t1), (m2, t2) = pts_e[-2], pts_e[-1]
        slope = (t2 - t1) / (m2 - m1)
        launch = pts_e[0][1] if pts_e[0][0] == 0 else 0.0
        meas = cls(expert, dispatch, combine, lat, bw, sync, m["H"], elem, src, launch, 0.0, slope)
        # w_time: reproduce t_all at the smallest T, on the same routing the bench used (seed 5)
        first = min(m["dispatch_combine"], key=lambda p: p["T"])
        rows = all_expert_rows(first["T"], m["E"], m["G"], m["k_g"], data["args"]["skew"])
        lo, hi = 0.0, first["grouped_mlp_all_experts_ms"]
        for _ in range(60):
            meas.w_time_ms = (lo + hi) / 2
            lo, hi = (meas.w_time_ms, hi) if expert_ms(meas, rows, 1)[0] < first["grouped_mlp_all_experts_ms"] \
                else (lo, meas.w_time_ms)
        meas.calibration = [(p["T"], expert_ms(meas, all_expert_rows(p["T"], m["E"], m["G"], m["k_g"],
                                                                     data["args"]["skew"]), 1)[0],
                             p["grouped_mlp_all_experts_ms"]) for p in m["dispatch_combine"]]
        return meas, data

    @classmethod
    def analytic(cls, H=5120, I=1344, tflops=700.0, hbm_tbs=4.3, launch_ms=0.008, a2a_lat_ms=0.03,
                 a2a_bw_gbs=150.0, sync_ms=0.03, K=8):
        """Floors only (no measurement): per-expert time = launch + max(FLOPs/peak, weight bytes/HBM)."""
        rows = [0, 1, 8, 64, 512, 4096, 32768, 262144]
        w_bytes = 3 * H * I * 2
        expert = Curve(rows, [launch_ms + max(6 * m * H * I / (tflops * 1e12), w_bytes / (hbm_tbs * 1e12)) * 1e3
                              if m else launch_ms for m in rows])
        Ts = [1, 128, 1024, 4096, 16384, 65536]
        move = lambda T: launch_ms + (T * H * 2 + T * K * H * 2) / (hbm_tbs * 1e12) * 1e3   # noqa: E731
        meas = cls(expert, Curve(Ts, [move(T) for T in Ts]), Curve(Ts, [move(T) for T in Ts]), a2a_lat_ms,
                   a2a_bw_gbs, sync_ms, H, 2,
                   f"analytic floors ({tflops} TFLOP/s, {hbm_tbs} TB/s, a2a {a2a_bw_gbs} GB/s + {a2a_lat_ms} ms)",
                   launch_ms, w_bytes / (hbm_tbs * 1e12) * 1e3, 6 * H * I / (tflops * 1e12) * 1e3)
        meas.calibration = []
        return meas


# ----------------------------------------------------------------------------- the model
def route_ids(logits, num_groups, topk_per_group):
    """Grouped top-k ids [T, G*k_g] with softmax scores: moge_kernels.reference.route's selection, with
    torch.topk instead of its stable sort (20x faster here; they differ only on exact score ties, which
    continuous random logits do not produce). num_groups=1 is plain top-k."""
    T, E = logits.shape
    S = E // num_groups
    scores = torch.softmax(logits.float(), dim=-1).view(T, num_groups, S)
    idx = scores.topk(topk_per_group, dim=-1).indices
    return (idx + torch.arange(num_groups).view(1, num_groups, 1) * S).reshape(T, -1)


def traffic(topk_ids_per_source, E, D):
    """rows[s, d]: rows device s sends to device d; expert_rows[e]: rows expert e receives."""
    El = E // D
    rows = torch.zeros(D, D, dtype=torch.int64)
    expert_rows = torch.zeros(E, dtype=torch.int64)
    for s, ids in enumerate(topk_ids_per_source):
        e_load = metrics.expert_load(ids, E)
        expert_rows += e_load
        rows[s] = e_load.view(D, El).sum(1)
    return rows, expert_rows


def a2a_ms(meas, rows, node_size, inter_gbs, inter_lat_ms):
    """One all_to_all of the rows matrix (and its reverse: symmetric in max(sent, received))."""
    D = rows.shape[0]
    row_bytes = meas.H * meas.elem_bytes
    node = torch.arange(D) // node_size
    same = node[:, None] == node[None, :]
    off = ~torch.eye(D, dtype=torch.bool)
    intra = (rows * (same & off)).float()
    inter = (rows * (~same)).float()
    intra_b = torch.maximum(intra.sum(1), intra.sum(0)).max().item() * row_bytes
    inter_b = torch.maximum(inter.sum(1), inter.sum(0)).max().item() * row_bytes
    t = meas.a2a_lat_ms + intra_b / (meas.a2a_bw_gbs * 1e9) * 1e3
    if inter_b > 0:
        t = max(t, inter_lat_ms + inter_b / (inter_gbs * 1e9) * 1e3)
    return t


def expert_ms(meas, expert_rows, D):
    """Per device: launch + sum over its active experts of max(weight read, slope * rows) (A1)."""
    per_dev = []
    for d_rows in expert_rows.view(D, -1).tolist():
        per_dev.append(meas.launch_ms + sum(max(meas.w_time_ms, meas.slope_ms * m) for m in d_rows if m > 0))
    return per_dev


def all_expert_rows(T, E, G, k_g, skew, seed=5):
    """Rows per expert of bench_ep's `measure` section: T tokens, MoGE routing, skewed logits of `seed`."""
    return metrics.expert_load(route_ids(metrics.skewed_logits(T, E, skew=skew, seed=seed), G, k_g), E)


def simulate_point(meas, D, T, E, G, k_g, K, skew, seeds, node_size, inter_gbs, inter_lat_ms, hbm_tbs=4.3):
    """Mean (over batches) phase times and load metrics for MoGE (G, k_g) and top-K on the same logits."""
    acc = {"moge": [], "topk": []}
    for seed in seeds:
        logits = metrics.skewed_logits(D * T, E, skew=skew, seed=seed)
        for kind in ("moge", "topk"):
            ids = route_ids(logits, G, k_g) if kind == "moge" else route_ids(logits, 1, K)
            rows, expert_rows = traffic(ids.view(D, T, -1), E, D)
            dev_load = rows.sum(0)
            t_a2a = a2a_ms(meas, rows, node_size, inter_gbs, inter_lat_ms)
            # A7: the receiver's sort by expert and its inverse, two row gathers (read + write each)
            sort_ms = [4 * n * meas.H * meas.elem_bytes / (hbm_tbs * 1e12) * 1e3 for n in dev_load.tolist()]
            exp = [e + s_ for e, s_ in zip(expert_ms(meas, expert_rows, D), sort_ms)]
            count_xchg = meas.a2a_lat_ms
            sync = meas.sync_ms if kind == "topk" else 0.0
            phases = dict(route=meas.dispatch(T), a2a=2 * t_a2a + count_xchg + sync, experts=max(exp),
                          combine=meas.combine(T))
            acc[kind].append(dict(phases=phases, step=sum(phases.values()),
                                  imbalance=metrics.imbalance_score(dev_load, D * T),
                                  straggler=dev_load.max().item() / dev_load.float().mean().item(),
                                  expert_mean=statistics.mean(exp)))
    out = {}
    for kind, runs in acc.items():
        steps = sorted(r["step"] for r in runs)
        out[kind] = dict(step=statistics.mean(steps), step_max=steps[-1],
                         phases={p: statistics.mean(r["phases"][p] for r in runs) for p in runs[0]["phases"]},
                         imbalance=statistics.mean(r["imbalance"] for r in runs),
                         straggler=statistics.mean(r["straggler"] for r in runs),
                         expert_mean=statistics.mean(r["expert_mean"] for r in runs))
    return out


# ----------------------------------------------------------------------------- report
CONFIGS = {   # D -> [(label, E, G, k_g, K)]
    2: [("Pangu G=8 k_g=1 (4 groups/dev)", 64, 8, 1, 8)],
    8: [("Pangu G=8 k_g=1 (1 group/dev)", 64, 8, 1, 8)],
    16: [("Pangu G=8 k_g=1 (1/2 group/dev)", 64, 8, 1, 8),
         ("G=16 k_g=1 (1 group/dev), K=16", 64, 16, 1, 16)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", default="bench/results/ep_h200x2.json")
    p.add_argument("--analytic", action="store_true", help="ignore measurements, use floors")
    p.add_argument("--devices", default="8,16")
    p.add_argument("--tokens", default="128,1024,4096,16384", help="tokens per device")
    p.add_argument("--skews", default="0,0.5,1,2")
    p.add_argument("--batches", type=int, default=3, help="routing batches (seeds) per point")
    p.add_argument("--node-size", type=int, default=8)
    p.add_argument("--inter-node-gbs", type=float, default=50.0)
    p.add_argument("--inter-node-lat-ms", type=float, default=0.02)
    p.add_argument("--out", default="bench/results/ep_sim")
    args = p.parse_args()

    bench = None
    if not args.analytic and os.path.exists(args.measured):
        meas, bench = Measured.from_bench_json(args.measured)
    else:
        meas = Measured.analytic()
    seeds = list(range(args.batches))
    lines = [f"MoGE vs top-k EP layer projection (forward, one layer). Inputs: {meas.source}",
             f"experts: launch {meas.launch_ms:.4f} ms, weight read {meas.w_time_ms * 1e3:.1f} us per active "
             f"expert, {meas.slope_ms * 1e6:.2f} us per 1000 rows ({6 * 5120 * 1344 / (meas.slope_ms * 1e-3) / 1e12:.0f}"
             f" TFLOP/s at the Pangu shape); all_to_all latency {meas.a2a_lat_ms:.4f} ms, "
             f"bandwidth {meas.a2a_bw_gbs:.0f} GB/s per device (off-device bytes); top-k host sync "
             f"{meas.sync_ms:.4f} ms; D=16: node size {args.node_size}, inter-node {args.inter_node_gbs} GB/s",
             f"mean over {len(seeds)} routing batches of skewed logits; times in ms; speedup = top-k step / "
             f"MoGE step; IS = (max-min device rows)/tokens; straggler = max/mean device rows", ""]
    hdr = (f"{'D':>2} {'config':<32} {'T/dev':>6} {'skew':>4} | {'MoGE step':>9} {'route':>6} {'a2a':>6} "
           f"{'experts':>7} {'comb':>6} {'IS':>5} | {'top-k step':>10} {'a2a':>6} {'experts':>7} {'IS':>5} "
           f"{'strag':>5} | {'speedup':>7}")
    results = []

    def emit(D, label, T, skew, r, note=""):
        m, t = r["moge"], r["topk"]
        lines.append(f"{D:>2} {label:<32} {T:>6} {skew:>4} | {m['step']:9.3f} {m['phases']['route']:6.3f} "
                     f"{m['phases']['a2a']:6.3f} {m['phases']['experts']:7.3f} {m['phases']['combine']:6.3f} "
                     f"{m['imbalance']:5.2f} | {t['step']:10.3f} {t['phases']['a2a']:6.3f} "
                     f"{t['phases']['experts']:7.3f} {t['imbalance']:5.2f} {t['straggler']:5.2f} | "
                     f"{t['step'] / m['step']:6.2f}x{note}")

    if meas.calibration:
        lines.append("expert model vs measured grouped_mlp of all 64 experts on one device: " + ", ".join(
            f"T={T}: {model:.3f} vs {measured:.3f} ms" for T, model, measured in meas.calibration))
        lines.append("")
    # Calibration: the model at the measuring host's D against what bench_ep measured there.
    if bench and bench.get("bench"):
        Dm = bench["measure"]["D"]
        skew_m = bench["args"]["skew"]
        lines.append(f"calibration at D={Dm} (skew {skew_m}): model vs measured EP totals")
        lines.append(hdr)
        for row in bench["bench"]:
            for label, E, G, k_g, K in CONFIGS.get(Dm, [("G=8 k_g=1", 64, 8, 1, 8)]):
                r = simulate_point(meas, Dm, row["T"], E, G, k_g, K, skew_m, [row["T"]], args.node_size,
                                   args.inter_node_gbs, args.inter_node_lat_ms)
                emit(Dm, label, row["T"], skew_m, r,
                     f"   measured: MoGE {row['moge_total']:.3f}, top-k {row['topk_total']:.3f}")
                results.append(dict(D=Dm, label=label, T=row["T"], skew=skew_m, calibration=True, **r,
                                    measured=dict(moge=row["moge_total"], topk=row["topk_total"])))
        lines.append("")

    lines.append(hdr)
    for D in [int(d) for d in args.devices.split(",")]:
        for label, E, G, k_g, K in CONFIGS[D]:
            for T in [int(t) for t in args.tokens.split(",")]:
                for skew in [float(s) for s in args.skews.split(",")]:
                    r = simulate_point(meas, D, T, E, G, k_g, K, skew, seeds, args.node_size,
                                       args.inter_node_gbs, args.inter_node_lat_ms)
                    emit(D, label, T, skew, r)
                    results.append(dict(D=D, label=label, T=T, skew=skew, **r))
    lines += ["", "Assumptions: A1-A7 in bench/simulate_ep.py's docstring (per-expert roofline, measured "
              "per-device a2a bandwidth independent of D within a node, inter-node link for D=16, no "
              "comm/compute overlap, no shared expert, top-k host sync per layer)."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(source=meas.source, results=results), f, indent=1)
    plot(results, args.out + ".png", meas.source)


def plot(results, path, source):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    pts = [r for r in results if not r.get("calibration") and r["skew"] == 1.0]
    configs = sorted({(r["D"], r["label"]) for r in pts})
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, (D, label) in zip(axes[0], configs):
        sel = sorted((r for r in pts if r["D"] == D and r["label"] == label), key=lambda r: r["T"])
        Ts = [r["T"] for r in sel]
        for kind, style in (("moge", "-o"), ("topk", "--s")):
            ax.plot(Ts, [r[kind]["step"] for r in sel], style, label=f"{kind} step")
            ax.plot(Ts, [r[kind]["phases"]["experts"] for r in sel], style, alpha=0.4,
                    label=f"{kind} experts (max device)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per device")
        ax.set_ylabel("ms per layer (forward)")
        ax.set_title(f"D={D}: {label}\nskew 1.0", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("EP projection, " + source[:110], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
