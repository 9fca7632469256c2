"""The MoE experts of real transformers models at their real widths: experts_implementation "moge"
(moge_kernels.integrations.transformers) against transformers' own "grouped_mm", "batched_mm", "eager"
(and "sonicmoe" / "deepgemm" where they load), bf16 on one GPU.

    python3 bench/bench_transformers.py                       # the whole sweep, < 5 minutes on an H200
    python3 bench/bench_transformers.py --modes fwd --budget-s 150        # the sweep in two calls:
    python3 bench/bench_transformers.py --modes fwd_bwd --budget-s 150    #   forward, then fwd+bwd
    python3 bench/bench_transformers.py --models qwen3 --tokens 1,4096 --modes fwd
    python3 bench/bench_transformers.py --smoke               # CPU, tiny widths: the code path only (CI)

Each experts module is built from the model's own transformers class (Qwen3MoeExperts, MixtralExperts,
GptOssExperts) and a config with the real widths, random weights; it is called as the model's MoE block
calls it, `experts(hidden [T, H], top_k_index [T, K] int64, top_k_weights [T, K] bf16)`, with ids from a
random softmax router. Only `config._experts_implementation` changes between rows, so every
implementation sees the same module, weights and routing. "moge_graphs" is "moge" with the option
eager_graphs (forward, eager, T <= 16: the experts step replayed from a CUDA graph per shape).

    model            H     I      E    top-k   experts module
    qwen3            2048  768    128  8       Qwen3-30B-A3B  (concatenated gate/up, SwiGLU)
    mixtral          4096  14336  8    2       Mixtral-8x7B   (concatenated gate/up, SwiGLU)
    gpt-oss          2880  2880   32   4       gpt-oss-20b    (transposed, interleaved, biases, clamped SwiGLU)

Timing: "eager" = the plain call as a transformers user makes it (torch.no_grad() for fwd; fwd+bwd =
call + backward of a fixed output gradient into the hidden states, routing weights and expert weights);
"graph" = the same captured once into a CUDA graph and replayed. Each sample is CUDA events around
INNER_CALLS back-to-back calls (as a model's layers follow each other: where the host is slower than the
GPU the sample is the host's time per call, without a sync's wake-up per call); medians over at least 5
samples / 0.15 s, after warm-up, L2 not flushed. Rows an
implementation cannot run say why: batched_mm materialises one weight matrix per (token, slot) and is
skipped where that passes MAX_BATCHED_GB; eager (a Python loop with a host sync per expert) runs to
T=4096 and cannot be captured; an implementation that fails to load says so.
Output: one markdown table per mode (rows: model, T, timing), ready to quote; ratio column
grouped_mm / moge (> 1: moge faster). --smoke runs the same code on CPU at tiny widths (fp32, eager
calls timed with the host clock): it checks the script, not the speed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout

MODELS = {
    #          H     I      E    K
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
    "gpt-oss": (2880, 2880, 32, 4),
}
SMOKE_MODELS = {   # --smoke: the same modules at tiny widths
    "qwen3": (32, 16, 8, 2),
    "mixtral": (32, 48, 4, 2),
    "gpt-oss": (32, 32, 4, 2),
}
TOKENS = (1, 128, 1024, 4096, 16384)
SMOKE_TOKENS = (1, 7)
# moge_graphs: "moge" with the option eager_graphs (forward, eager calls of at most EAGER_GRAPHS_T tokens)
IMPLS = ("moge", "moge_graphs", "grouped_mm", "batched_mm", "eager", "sonicmoe", "deepgemm")
EAGER_GRAPHS_T = 16
MODES = ("fwd", "fwd+bwd")
MODE_ALIASES = {"fwd_bwd": "fwd+bwd", "fwdbwd": "fwd+bwd"}   # '+' is awkward in some shells and file names
MAX_BATCHED_GB = 16.0       # batched_mm's gathered weights, [T*K, 2I, H] + [T*K, H, I] (x2 with grads)
MAX_EAGER_T = 4096
MIN_CALLS, MIN_SECONDS = 5, 0.15
INNER_CALLS = 10            # back-to-back calls per timed sample


def build_experts(model: str, device, dtype, models=MODELS):
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    H, I, E, K = models[model]
    if model == "qwen3":
        config = tf.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
        cls = Qwen3MoeExperts
    elif model == "mixtral":
        config = tf.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        cls = MixtralExperts
    else:
        config = tf.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        cls = GptOssExperts
    with torch.device(device):
        module = cls(config).to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = H if ("gate_up" in name or "up_proj" in name) else I
            p.normal_(0, 0.02 if name.endswith("_bias") else fan_in ** -0.5)
    return module


def routing(T, H, E, K, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    logits = torch.randn(T, E, device=device, dtype=torch.float32, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    return hidden, ids, weights       # ids int64, as transformers' routers return them


def skip_reason(impl, model, T, mode, capture, models=MODELS):
    H, I, E, K = models[model]
    if impl == "batched_mm":
        gb = T * K * 3 * H * I * 2 / 1e9 * (2 if mode == "fwd+bwd" else 1)
        if gb > MAX_BATCHED_GB:
            return f"gathers {gb:.0f} GB of weights"
    if impl == "moge_graphs" and (capture or mode != "fwd" or T > EAGER_GRAPHS_T):
        return f"the option eager_graphs: forward eager calls of at most {EAGER_GRAPHS_T} tokens"
    if impl == "eager":
        if capture:
            return "host sync per expert: not capturable"
        if T > MAX_EAGER_T:
            return f"T > {MAX_EAGER_T}: Python loop, skipped for time"
    return None


def make_call(module, impl, hidden, ids, weights, mode):
    """A zero-argument callable doing one call of `mode` (hidden/weights/params keep their grads)."""
    module.config._experts_implementation = "moge" if impl == "moge_graphs" else impl
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return module(hidden, ids, weights)
        return call
    x = hidden.detach().requires_grad_()
    w = weights.detach().requires_grad_()
    grad_out = torch.randn_like(hidden)

    def call():
        module(x, ids, w).backward(grad_out)
    return call


def time_eager(call, min_calls=MIN_CALLS, min_seconds=MIN_SECONDS, inner=INNER_CALLS):
    """ms per call: the median over samples of `inner` back-to-back calls each (events around the run),
    at least min_calls samples and min_seconds."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    call()
    if cuda:
        torch.cuda.synchronize()
    from moge_kernels.bench.timing import elapsed_ms
    samples, start = [], time.perf_counter()
    while len(samples) < min_calls or time.perf_counter() - start < min_seconds:
        samples.append(elapsed_ms(call, inner, cuda))   # CPU (--smoke): the host clock
        if len(samples) >= 200:
            break
    return statistics.median(samples)


def time_graph(call):
    from moge_kernels.bench.timing import capture_graph   # warm-up off the default stream, then capture
    return time_eager(capture_graph(call))


def check_against(module, hidden, ids, weights, ref_impl="grouped_mm"):
    """max |moge - ref| / max |ref| of one forward."""
    with torch.no_grad():
        module.config._experts_implementation = "moge"
        got = module(hidden, ids, weights).float()
        module.config._experts_implementation = ref_impl
        want = module(hidden, ids, weights).float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def profile_host(models, T, shapes, device, dtype):
    """--profile: for each model, the host time per moge / grouped_mm forward in a back-to-back loop, then
    the top of a cProfile of 200 moge calls and torch.profiler's CPU table of 50 (eager_graphs off)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile
    for model in models:
        H, I, E, K = shapes[model]
        module = build_experts(model, device, dtype, shapes)
        hidden, ids, weights = routing(T, H, E, K, device, dtype)
        for impl in ("moge", "grouped_mm"):
            call = make_call(module, impl, hidden, ids, weights, "fwd")
            for _ in range(20):
                call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                call()
            host_us = (time.perf_counter() - start) / 200 * 1e6
            print(f"{model} T={T} {impl}: host {host_us:.1f} us per call (200 back-to-back calls)", flush=True)
        call = make_call(module, "moge", hidden, ids, weights, "fwd")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            call()
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(30)
        print(f"=== cProfile, {model} T={T} moge forward, 200 calls ===\n{out.getvalue()}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                call()
        print(f"=== torch.profiler, {model} T={T} moge forward, 50 calls (CPU time) ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


def _names(parser, flag, value, known, aliases=None):
    """The comma list of --flag, each name checked against `known` (one-line error naming the flag)."""
    names = [(aliases or {}).get(n, n) for n in value.split(",") if n]
    for n in names:
        if n not in known:
            parser.error(f"{flag}: unknown {n!r} (known: {', '.join(known)})")
    return names


def markdown_tables(results, models, tokens, modes, timings, impls):
    """One markdown table per mode: a row per (model, T, timing), a column per implementation, and
    grouped_mm / moge."""
    out = []
    for mode in modes:
        out.append(f"\n{mode} (ms, median; eager = plain calls, graph = CUDA-graph replays)\n")
        out.append("| model | T | timing | " + " | ".join(impls) + " | grouped_mm / moge |")
        out.append("|---|---:|---|" + "---:|" * (len(impls) + 1))
        for model in models:
            for T in tokens:
                for timing in timings:
                    row = [results.get((model, T, mode, timing, i)) for i in impls]
                    cells = [f"{v:.3f}" if v is not None else "-" for v in row]
                    moge = results.get((model, T, mode, timing, "moge"))
                    gmm = results.get((model, T, mode, timing, "grouped_mm"))
                    ratio = f"{gmm / moge:.2f}x" if moge and gmm else "-"
                    out.append(f"| {model} | {T} | {timing} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tokens", default=None, help=f"default {','.join(map(str, TOKENS))} "
                                                  f"(--smoke: {','.join(map(str, SMOKE_TOKENS))})")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd (or fwd_bwd)")
    p.add_argument("--no-graph", action="store_true", help="eager calls only")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip what is left (and say so) once this many seconds have passed")
    p.add_argument("--profile", action="store_true",
                   help="instead of the sweep: where the host time of a moge forward goes (cProfile of "
                        "200 eager calls, then torch.profiler's CPU table) for each model at the first T")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny widths, fp32, eager calls: checks the script, not the speed")
    args = p.parse_args(argv)
    models = _names(p, "--models", args.models, list(MODELS))
    impls = _names(p, "--impls", args.impls, list(IMPLS))
    modes = _names(p, "--modes", args.modes, list(MODES) + list(MODE_ALIASES), MODE_ALIASES)
    try:
        tokens = [int(t) for t in (args.tokens or ",".join(map(str, SMOKE_TOKENS if args.smoke else TOKENS)))
                  .split(",")]
    except ValueError:
        p.error(f"--tokens: a comma list of integers, got {args.tokens!r}")
    if args.budget_s <= 0:
        p.error(f"--budget-s: must be positive, got {args.budget_s}")
    if args.smoke:
        shapes, device, dtype, timings = SMOKE_MODELS, torch.device("cpu"), torch.float32, ["eager"]
        min_calls, min_seconds = 2, 0.0
    else:
        if not torch.cuda.is_available():
            print("bench_transformers: needs a CUDA device (--smoke runs the code path on CPU)", file=sys.stderr)
            return 2
        shapes, device, dtype = MODELS, torch.device("cuda"), torch.bfloat16
        timings = ["eager"] if args.no_graph else ["eager", "graph"]
        min_calls, min_seconds = MIN_CALLS, MIN_SECONDS
    import transformers

    import moge_kernels
    import moge_kernels.integrations.transformers  # noqa: F401  registers "moge"
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--smoke: tiny widths)"
    print(f"device: {name}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"moge_kernels backend {moge_kernels.get_backend()}  {str(dtype).split('.')[-1]}, ms (median)")
    if args.profile:
        return profile_host(models, tokens[0], shapes, device, dtype)
    unavailable, skipped, results = {}, [], {}
    for model in models:
        H, I, E, K = shapes[model]
        module = build_experts(model, device, dtype, shapes)
        for T in tokens:
            hidden, ids, weights = routing(T, H, E, K, device, dtype)
            err = check_against(module, hidden, ids, weights)
            print(f"  {model} T={T}: moge vs grouped_mm forward, max rel err {err:.2e}", flush=True)
            for mode in modes:
                for timing in timings:
                    for impl in impls:
                        if impl in unavailable:
                            continue
                        why = skip_reason(impl, model, T, mode, timing == "graph", shapes)
                        if why is None and time.perf_counter() - t_start > args.budget_s:
                            why = f"time budget of {args.budget_s:.0f} s spent"
                        if why:
                            skipped.append(f"{model} T={T} {mode} {timing} {impl}: {why}")
                            continue
                        try:
                            moge_kernels.set_options(eager_graphs=EAGER_GRAPHS_T if impl == "moge_graphs" else 0)
                            call = make_call(module, impl, hidden, ids, weights, mode)
                            ms = time_graph(call) if timing == "graph" else \
                                time_eager(call, min_calls, min_seconds)
                        except Exception as err:  # noqa: BLE001  report and go on
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
                            if impl in ("sonicmoe", "deepgemm"):
                                unavailable[impl] = msg
                            else:
                                skipped.append(f"{model} T={T} {mode} {timing} {impl}: failed, {msg}")
                            continue
                        finally:
                            module.zero_grad(set_to_none=True)
                        results[(model, T, mode, timing, impl)] = ms
            del hidden, ids, weights
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()

    moge_kernels.set_options(eager_graphs=0)
    print(markdown_tables(results, models, tokens, modes, timings, [i for i in impls if i not in unavailable]))
    if unavailable:
        print("\nnot available: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    if skipped:
        print("\nskipped (-):")
        for line in skipped:
            print("  " + line)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
