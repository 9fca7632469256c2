"""Expert-parallel MoGE layer: correctness against one device, EP layer time and the all_to_all share.

Run under torchrun, one process per device (NCCL on GPUs, gloo on CPU):

    torchrun --nproc_per_node 2 bench/bench_ep.py --out-dir $OUT                     # GPU, Pangu shape
    torchrun --nproc_per_node 8 bench/bench_ep.py --device cpu --H 64 --I 32 --tokens 16,64   # gloo

Sections (each runs only while the internal time budget lasts; the decision is taken on rank 0 and
broadcast, so all ranks run the same collectives):
  check    EP forward (MoGE static splits, and top-k dynamic splits) == one-device moge_forward on the
           gathered batch; EP backward == one-device backward (impl="reference" in fp32, and impl="moge"
           when torch.ops.moge has autograd)
  bench    per T (tokens per rank): one device alone on T and on D*T tokens (moge_forward, all experts),
           EP MoGE and EP top-k (same logits, top-K routing with dynamic splits), split into phases
           (route+permute, all_to_all out and back, local experts, combine), medians of per-iteration
           device-event timings, max over ranks; per-rank load and the paper's imbalance score
  graph    EP MoGE forward captured in a CUDA graph (possible because its splits are static) and replayed
  measure  inputs of bench/simulate_ep.py: per-expert grouped-MLP time vs rows, all_to_all time vs bytes,
           dispatch and combine time vs T (single device)

Logits are skewed (moge_kernels.metrics.skewed_logits: a per-expert popularity bias, as trained routers
have), identical for the MoGE and the top-k runs. Weights and tokens are drawn from seeded generators on
the device, identical on every rank, so each rank can also compute the one-device result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moge_kernels  # noqa: E402
from moge_kernels import metrics, parallel, reference  # noqa: E402
from moge_kernels.bench.timing import elapsed_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHASE_NAMES = ("route", "a2a_dispatch", "experts", "a2a_combine", "combine")


# ----------------------------------------------------------------------------- set-up
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--kg", type=int, default=1)
    p.add_argument("--H", type=int, default=5120)
    p.add_argument("--I", type=int, default=1344)
    p.add_argument("--dtype", default=None, help="bf16 on GPU, fp32 on CPU by default")
    p.add_argument("--tokens", default="128,1024,4096", help="tokens per rank for the bench")
    p.add_argument("--late-tokens", default="", help="tokens per rank benched after the other sections")
    p.add_argument("--check-tokens", type=int, default=512, help="tokens per rank for the check")
    p.add_argument("--skew", type=float, default=1.0, help="router popularity skew (metrics.skewed_logits)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sections", default="check,bench,graph,measure", help="measure: inputs of simulate_ep")
    p.add_argument("--time-limit", type=float, default=290.0, help="seconds; later sections are skipped")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--tag", default=None, help="file name stem, default ep_<device><D>")
    return p.parse_args()


class Run:
    """Process group, device, clock, logging; everything a section needs."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.cuda = args.device == "cuda"
        if self.cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            torch.set_num_threads(1)
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
        self.rank, self.D = dist.get_rank(), dist.get_world_size()
        self.dtype = DTYPES[args.dtype or ("bf16" if self.cuda else "fp32")]
        self.lines = []          # the report (rank 0)
        self.results = {}        # everything, as JSON (rank 0)

    def log(self, *parts):
        if self.rank == 0:
            line = " ".join(str(p) for p in parts)
            print(line, flush=True)
            self.lines.append(line)

    def elapsed(self):
        return time.monotonic() - self.t0

    def time_left(self, need_s):
        """Same answer on every rank (rank 0's clock is broadcast)."""
        flag = torch.tensor([1 if self.elapsed() + need_s < self.args.time_limit else 0],
                            device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def max_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.D).tolist()

    def gather_ints(self, values):
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.D)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]


def make_weights(run, E, H, I, seed=1):
    g = torch.Generator(device=run.device).manual_seed(seed)
    w_gate_up = torch.empty(E, 2 * I, H, dtype=run.dtype, device=run.device)
    w_down = torch.empty(E, H, I, dtype=run.dtype, device=run.device)
    for e in range(E):   # per expert: no fp32 copy of all weights at once
        w_gate_up[e] = (torch.randn(2 * I, H, generator=g, device=run.device) / H ** 0.5).to(run.dtype)
        w_down[e] = (torch.randn(H, I, generator=g, device=run.device) / I ** 0.5).to(run.dtype)
    return w_gate_up, w_down


def make_tokens(run, total_tokens, E, H, seed, skew):
    g = torch.Generator(device=run.device).manual_seed(seed)
    hidden = torch.randn(total_tokens, H, generator=g, device=run.device).to(run.dtype)
    logits = metrics.skewed_logits(total_tokens, E, skew=skew, seed=seed).to(run.device)
    return hidden, logits


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- timing
class PhaseClock:
    """phase_hook for ep_*_forward: a device event (or host clock on CPU) at every phase boundary."""

    def __init__(self, cuda):
        self.cuda, self.marks = cuda, []

    def __call__(self, name):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations_ms(self):
        out = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def time_phased(run, fn, iters, warmup):
    """fn(phase_hook) -> medians per phase and of the total, max over ranks (ms)."""
    for _ in range(warmup):
        fn(None)
    samples = []
    for _ in range(iters):
        dist.barrier()
        run.sync()
        clock = PhaseClock(run.cuda)
        fn(clock)
        run.sync()
        samples.append(clock.durations_ms())
    med = [statistics.median(s[p] for s in samples) for p in PHASE_NAMES]
    tot = statistics.median(sum(s.values()) for s in samples)
    # Phases: mean over ranks (a rank that waits in one exchange waits less in the next, so per-phase
    # maxima do not add up); total: the slowest rank's.
    mean = run.mean_over_ranks(med)
    return dict(zip(PHASE_NAMES, mean)), run.max_over_ranks([tot])[0]


def time_plain(run, fn, iters, warmup):
    """Median ms of fn() on this rank alone."""
    for _ in range(warmup):
        fn()
    run.sync()
    return statistics.median(elapsed_ms(fn, cuda=run.cuda) for _ in range(iters))


# ----------------------------------------------------------------------------- sections
def section_check(run):
    a = run.args
    E, G, kg, H, I, D, r = a.E, a.G, a.kg, a.H, a.I, run.D, run.rank
    T = a.check_tokens
    ok = True
    w_gate_up, w_down = make_weights(run, E, H, I, seed=101)
    hidden, logits = make_tokens(run, D * T, E, H, seed=102, skew=a.skew)
    mine = slice(r * T, (r + 1) * T)
    wg, wd = parallel.shard_experts(w_gate_up, w_down, r, D)
    single = moge_kernels.moge_forward(hidden, logits, w_gate_up, w_down, G, kg)
    ep, info = parallel.ep_moge_forward(hidden[mine], logits[mine], wg, wd, G, kg, return_info=True)
    rows = T * kg * G // D
    static_ok = (info["send_splits"] == (rows,) * D and info["recv_splits"] == (rows,) * D
                 and info["recv_expert_counts"].sum(1).tolist() == [rows] * D)
    err_ep = run.max_over_ranks([rel_err(ep, single[mine])])[0]
    # context: how far the one-device low-precision result itself is from an fp32 eager reference
    exact = reference.moge_forward(hidden[:T].float(), logits[:T], w_gate_up.float(), w_down.float(), G, kg)
    err_single = rel_err(single[:T], exact)
    static_all = all(x[0] for x in run.gather_ints([int(static_ok)]))
    good = err_ep <= 1e-2 and static_all and torch.isfinite(ep).all().item()
    ok &= good
    run.log(f"check moge fwd   T/rank={T} D={D} {run.dtype}: rel err EP vs one device {err_ep:.2e} "
            f"(one device vs fp32 eager: {err_single:.2e}); static splits {rows}/rank: {static_all} "
            f"-> {'PASS' if good else 'FAIL'}")
    run.results["check_moge_fwd"] = dict(rel_err=err_ep, single_vs_fp32=err_single, static=static_all)

    K = G * kg
    single_tk = moge_kernels.moge_forward(hidden, logits, w_gate_up, w_down, 1, K)
    ep_tk, info_tk = parallel.ep_topk_forward(hidden[mine], logits[mine], wg, wd, K, return_info=True)
    err_tk = run.max_over_ranks([rel_err(ep_tk, single_tk[mine])])[0]
    good = err_tk <= 1e-2
    ok &= good
    run.log(f"check top-{K} fwd  T/rank={T}: rel err EP vs one device {err_tk:.2e}; rows received per rank "
            f"{[sum(x) for x in run.gather_ints(list(info_tk['recv_splits']))]} -> {'PASS' if good else 'FAIL'}")
    run.results["check_topk_fwd"] = dict(rel_err=err_tk)
    del single, single_tk, exact
    return ok


def section_check_backward(run):
    """Gradients through the exchange: impl="reference" (fp32, small) and impl="moge" (when autograd)."""
    a = run.args
    E, G, kg, D, r = a.E, a.G, a.kg, run.D, run.rank
    H, I, T = min(a.H, 256), min(a.I, 128), min(a.check_tokens, 64)
    impls = [("reference", torch.float32)]
    if parallel.ops_have_autograd():
        impls.append(("moge", run.dtype))
    ok = True
    for impl, dtype in impls:
        g = torch.Generator(device=run.device).manual_seed(7)
        hidden = torch.randn(D * T, H, generator=g, device=run.device).to(dtype)
        logits = metrics.skewed_logits(D * T, E, skew=a.skew, seed=8).to(run.device)
        w_gate_up = (torch.randn(E, 2 * I, H, generator=g, device=run.device) / H ** 0.5).to(dtype)
        w_down = (torch.randn(E, H, I, generator=g, device=run.device) / I ** 0.5).to(dtype)
        cot = torch.randn(D * T, H, generator=g, device=run.device).to(dtype)
        fwd = reference.moge_forward if impl == "reference" else moge_kernels.moge_forward
        full = [t.clone().requires_grad_() for t in (hidden, logits, w_gate_up, w_down)]
        (fwd(*full, G, kg).float() * cot.float()).sum().backward()
        El, mine = E // D, slice(r * T, (r + 1) * T)
        ep = [t.clone().requires_grad_() for t in
              (hidden[mine], logits[mine], w_gate_up[r * El:(r + 1) * El], w_down[r * El:(r + 1) * El])]
        try:
            out = parallel.ep_moge_forward(*ep, G, kg, impl=impl)
            (out.float() * cot[mine].float()).sum().backward()
            errs = [rel_err(ep[0].grad, full[0].grad[mine]), rel_err(ep[1].grad, full[1].grad[mine]),
                    rel_err(ep[2].grad, full[2].grad[r * El:(r + 1) * El]),
                    rel_err(ep[3].grad, full[3].grad[r * El:(r + 1) * El])]
        except Exception as err:   # noqa: BLE001  report, keep the other sections
            errs = [float("inf")] * 4
            run.log(f"check bwd {impl}: {type(err).__name__}: {str(err)[:300]}")
        errs = run.max_over_ranks(errs)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        good = max(errs) <= tol
        ok &= good
        run.log(f"check bwd impl={impl} {dtype} E={E} H={H} I={I} T/rank={T}: rel err of grads (hidden, "
                f"logits, w_gate_up, w_down) EP vs one device {', '.join(f'{e:.1e}' for e in errs)} "
                f"-> {'PASS' if good else 'FAIL'}")
        run.results[f"check_bwd_{impl}"] = errs
    return ok


def section_bench(run, tokens_list):
    a = run.args
    E, G, kg, H, I, D, r = a.E, a.G, a.kg, a.H, a.I, run.D, run.rank
    K = G * kg
    w_gate_up, w_down = make_weights(run, E, H, I, seed=1)
    wg, wd = parallel.shard_experts(w_gate_up, w_down, r, D)
    rows_out = []
    for T in tokens_list:
        if not run.time_left(20 + T / 1024 * 6):
            run.log(f"bench T/rank={T}: skipped (time budget)")
            continue
        hidden, logits = make_tokens(run, D * T, E, H, seed=T, skew=a.skew)
        mine = slice(r * T, (r + 1) * T)
        h, lg = hidden[mine].contiguous(), logits[mine].contiguous()
        iters = a.iters if T <= 4096 else max(5, a.iters // 4)
        one_T = time_plain(run, lambda: moge_kernels.moge_forward(h, lg, w_gate_up, w_down, G, kg),
                           iters, a.warmup)
        one_DT = time_plain(run, lambda: moge_kernels.moge_forward(hidden, logits, w_gate_up, w_down, G, kg),
                            iters, a.warmup)
        one_T, one_DT = run.max_over_ranks([one_T, one_DT])
        moge_ph, moge_tot = time_phased(
            run, lambda hook: parallel.ep_moge_forward(h, lg, wg, wd, G, kg, validate=False, phase_hook=hook),
            iters, a.warmup)
        topk_ph, topk_tot = time_phased(
            run, lambda hook: parallel.ep_topk_forward(h, lg, wg, wd, K, phase_hook=hook), iters, a.warmup)
        # loads: rows each rank's experts receive, for both routings of the same logits
        _, info_m = parallel.ep_moge_forward(h, lg, wg, wd, G, kg, validate=False, return_info=True)
        _, info_t = parallel.ep_topk_forward(h, lg, wg, wd, K, return_info=True)
        load_m = [x[0] for x in run.gather_ints([sum(info_m["recv_splits"])])]
        load_t = [x[0] for x in run.gather_ints([sum(info_t["recv_splits"])])]
        stats = metrics.compare_routing(logits, G, kg, D)
        assert stats["moge"].device_load.tolist() == load_m, (stats["moge"].device_load, load_m)
        assert stats["topk"].device_load.tolist() == load_t, (stats["topk"].device_load, load_t)
        row = dict(T=T, one_T=one_T, one_DT=one_DT, moge=moge_ph, moge_total=moge_tot, topk=topk_ph,
                   topk_total=topk_tot, load_moge=load_m, load_topk=load_t,
                   is_moge=stats["moge"].imbalance_score, is_topk=stats["topk"].imbalance_score,
                   straggler_topk=stats["topk"].max_over_mean)
        rows_out.append(row)
        run.log(f"bench T/rank={T}: one device T {one_T:.3f} ms, D*T {one_DT:.3f} ms; EP moge {moge_tot:.3f} ms "
                f"{ {k: round(v, 3) for k, v in moge_ph.items()} }; EP top-{K} {topk_tot:.3f} ms "
                f"{ {k: round(v, 3) for k, v in topk_ph.items()} }; loads moge {load_m} top-k {load_t}")
        del hidden, logits, h, lg
    run.results["bench"] = rows_out
    return rows_out


def section_graph(run, T):
    """Capture the MoGE EP forward (static splits, validate=False: no host work) in a CUDA graph."""
    a = run.args
    E, G, kg, H, I, D, r = a.E, a.G, a.kg, a.H, a.I, run.D, run.rank
    w_gate_up, w_down = make_weights(run, E, H, I, seed=1)
    wg, wd = parallel.shard_experts(w_gate_up, w_down, r, D)
    hidden, logits = make_tokens(run, D * T, E, H, seed=T, skew=a.skew)
    mine = slice(r * T, (r + 1) * T)
    h, lg = hidden[mine].contiguous(), logits[mine].contiguous()
    fn = lambda: parallel.ep_moge_forward(h, lg, wg, wd, G, kg, validate=False)   # noqa: E731
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager = fn()
        torch.cuda.current_stream().wait_stream(side)
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = fn()
        graph.replay()
        run.sync()
        same = torch.equal(static_out, eager)
        ms = time_plain(run, graph.replay, a.iters, 2)
        eager_ms = time_plain(run, fn, a.iters, 2)
        ms, eager_ms = run.max_over_ranks([ms, eager_ms])
        run.log(f"graph T/rank={T}: EP moge forward captured in a CUDA graph; replay {ms:.3f} ms vs eager "
                f"{eager_ms:.3f} ms (rank max, no barrier); replay output == eager: {same}")
        run.results["graph"] = dict(T=T, replay_ms=ms, eager_ms=eager_ms, same=same)
    except Exception as err:   # noqa: BLE001
        run.log(f"graph T/rank={T}: capture failed: {type(err).__name__}: {str(err)[:300]}")
        run.results["graph"] = dict(T=T, error=f"{type(err).__name__}: {err}")


def section_measure(run):
    """Inputs of bench/simulate_ep.py (rank 0 writes them)."""
    a = run.args
    E, G, kg, H, I, D = a.E, a.G, a.kg, a.H, a.I, run.D
    K = G * kg
    out = dict(H=H, I=I, E=E, G=G, k_g=kg, dtype=str(run.dtype), D=D)
    # all_to_all time vs bytes per rank (equal splits)
    elem = torch.tensor([], dtype=run.dtype).element_size()
    a2a = []
    for rows in (8, 64, 256, 1024, 4096, 16384, 65536):
        x = torch.randn(rows * D, H, device=run.device).to(run.dtype)
        buf = torch.empty_like(x)

        def step(x=x, buf=buf):
            dist.all_to_all_single(buf, x)
        for _ in range(3):
            step()
        dist.barrier()
        run.sync()
        ms = run.max_over_ranks([time_plain(run, step, a.iters, 2)])[0]
        a2a.append(dict(bytes_per_rank=x.numel() * elem, ms=ms))
    out["all_to_all"] = a2a
    # per-expert grouped-MLP time vs rows: one expert's weights (a [1, ...] slice, so the kernel's config
    # table sees m rows per expert), a different expert each call so that weights come from HBM, not L2
    w_gate_up, w_down = make_weights(run, E, H, I, seed=3)
    per_expert = []
    for m in (0, 1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768):
        x = torch.randn(m, H, device=run.device).to(run.dtype)
        offs = torch.tensor([0, m], dtype=torch.int32, device=run.device)
        it = iter(range(10 ** 9))

        def one_expert(x=x, offs=offs, it=it):
            e = next(it) % E
            return moge_kernels.grouped_mlp(x, w_gate_up[e:e + 1], w_down[e:e + 1], offs)
        ms = time_plain(run, one_expert, a.iters, 3)
        per_expert.append(dict(rows=m, ms=ms))
    out["expert_mlp"] = per_expert
    # the whole grouped MLP of a device holding E experts with MoGE-routed rows, for calibration
    # dispatch and combine time vs T on one device
    disp_comb = []
    for T in (128, 1024, 4096, 16384):
        hidden, logits = make_tokens(run, T, E, H, seed=5, skew=a.skew)
        d_ms = time_plain(run, lambda: moge_kernels.grouped_dispatch(hidden, logits, G, kg), a.iters, 3)
        permuted, wts, _, offsets, row_index = moge_kernels.grouped_dispatch(hidden, logits, G, kg)
        c_ms = time_plain(run, lambda: moge_kernels.grouped_combine(permuted, wts, row_index), a.iters, 3)
        mlp_ms = time_plain(run, lambda: moge_kernels.grouped_mlp(permuted, w_gate_up, w_down, offsets),
                            max(3, a.iters // 2), 2)
        disp_comb.append(dict(T=T, K=K, dispatch_ms=d_ms, combine_ms=c_ms, grouped_mlp_all_experts_ms=mlp_ms))
        del hidden, logits, permuted
    out["dispatch_combine"] = disp_comb
    run.results["measure"] = out
    run.log(f"measure: all_to_all {[(m['bytes_per_rank'], round(m['ms'], 4)) for m in a2a]}")
    run.log(f"measure: expert mlp {[(m['rows'], round(m['ms'], 4)) for m in per_expert]}")
    run.log(f"measure: dispatch/combine/mlp {[(m['T'], round(m['dispatch_ms'], 4), round(m['combine_ms'], 4), round(m['grouped_mlp_all_experts_ms'], 3)) for m in disp_comb]}")
    return out


# ----------------------------------------------------------------------------- report
def format_table(run, rows, header):
    a = run.args
    K = a.G * a.kg
    lines = list(header)
    lines.append("")
    lines.append(f"{'T/rank':>6} | {'1dev T':>8} {'1dev D*T':>9} | {'EP MoGE':>8} {'route':>6} {'a2a':>6} "
                 f"{'experts':>8} {'combine':>7} {'a2a%':>5} | {f'EP top-{K}':>9} {'route':>6} {'a2a':>6} "
                 f"{'experts':>8} {'combine':>7} {'a2a%':>5} | {'rows/rank MoGE':>16} {'rows/rank top-k':>18} "
                 f"{'IS moge':>7} {'IS topk':>7}")
    for row in rows:
        def phases(ph, tot):
            a2a = ph["a2a_dispatch"] + ph["a2a_combine"]
            return (f"{tot:8.3f} {ph['route']:6.3f} {a2a:6.3f} {ph['experts']:8.3f} {ph['combine']:7.3f} "
                    f"{100 * a2a / sum(ph.values()):4.0f}%")
        lines.append(f"{row['T']:>6} | {row['one_T']:8.3f} {row['one_DT']:9.3f} | "
                     f"{phases(row['moge'], row['moge_total'])} | {phases(row['topk'], row['topk_total']):>9} | "
                     f"{str(row['load_moge']):>16} {str(row['load_topk']):>18} {row['is_moge']:7.3f} "
                     f"{row['is_topk']:7.3f}")
    lines.append("")
    lines.append("times in ms: medians of per-iteration device-event timings; EP totals: the slowest rank, "
                 "phases: mean over ranks, a2a% = a2a / sum of phases; 1dev (max over ranks) = one device "
                 "running moge_forward with all E experts on T (its own) or D*T (the whole batch) tokens; "
                 "a2a = both all_to_alls (rows out + per-expert counts, rows back), top-k's includes its "
                 "host sync for the dynamic splits; experts = receiver-side sort by expert + grouped_mlp + "
                 "unsort; IS = (max - min device rows) / tokens (Pangu Pro MoE eq. 3), on the whole batch")
    return lines


def main():
    args = parse_args()
    run = Run(args)
    sections = set(args.sections.split(","))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    late_tokens = [int(t) for t in args.late_tokens.split(",") if t]
    dev_name = torch.cuda.get_device_name(run.device) if run.cuda else "cpu"
    commit = os.environ.get("EP_COMMIT", "")      # set when running from an exported snapshot (no .git)
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
    backends = {op: moge_kernels.resolve(op, run.device.type)[0]
                for op in ("grouped_dispatch", "grouped_mlp", "grouped_combine")}
    header = [f"EP MoGE bench: D={run.D} x {dev_name}, {dist.get_backend()}, torch {torch.__version__}, "
              f"commit {commit}, backends {backends}",
              f"E={args.E} G={args.G} k_g={args.kg} (K={args.G * args.kg}) H={args.H} I={args.I} {run.dtype}, "
              f"skewed logits (skew={args.skew}); NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}"]
    for line in header:
        run.log(line)
    run.results.update(header=header, args=vars(args))
    ok = True

    def guarded(name, fn, *fn_args):
        """A section that raises is reported and the run goes on (a failing kernel fails the same way on
        every rank, so the ranks stay in step)."""
        try:
            return fn(*fn_args)
        except Exception as err:   # noqa: BLE001
            run.log(f"{name}: FAILED with {type(err).__name__}: {str(err)[:400]}")
            run.results[f"{name}_error"] = f"{type(err).__name__}: {err}"
            return None

    if "check" in sections and run.time_left(60):
        ok &= bool(guarded("check", section_check, run))
    rows = (guarded("bench", section_bench, run, tokens) or []) if "bench" in sections else []
    if "measure" in sections and run.time_left(60):
        guarded("measure", section_measure, run)
    if "graph" in sections and run.cuda and run.time_left(40):
        guarded("graph", section_graph, run, 1024 if 1024 in tokens else tokens[0])
    if "bench" in sections and late_tokens:     # large T last: the budget goes to the sections above first
        rows += guarded("bench", section_bench, run, late_tokens) or []
        run.results["bench"] = rows
    if "check" in sections and run.time_left(45):
        ok &= bool(guarded("check_backward", section_check_backward, run))
    table = format_table(run, rows, header)
    extra = [l for l in run.lines if l.startswith(("check", "graph", "measure:")) or "FAILED" in l or "skipped" in l]
    table += [""] + extra
    if run.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        tag = args.tag or f"ep_{'h200' if 'H200' in dev_name else run.device.type}x{run.D}"
        with open(os.path.join(args.out_dir, f"{tag}.txt"), "w") as f:
            f.write("\n".join(table) + "\n")
        with open(os.path.join(args.out_dir, f"{tag}.json"), "w") as f:
            json.dump(run.results, f, indent=1, default=str)
        print("\n".join(["", "=" * 40] + table), flush=True)
        print(f"[{run.elapsed():.0f}s] {'ALL CHECKS PASS' if ok else 'SOME CHECK FAILED'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
