"""The MoE experts of real transformers models at their real widths: experts_implementation "moge"
(moge_kernels.integrations.transformers) against transformers' own "grouped_mm", "batched_mm", "eager"
(and "sonicmoe" / "deepgemm" where they load), bf16 on one GPU.

    python3 bench/bench_transformers.py                       # the whole sweep, < 5 minutes on an H200
    python3 bench/bench_transformers.py --models qwen3 --tokens 1,4096 --modes fwd

Each experts module is built from the model's own transformers class (Qwen3MoeExperts, MixtralExperts,
GptOssExperts) and a config with the real widths, random weights; it is called as the model's MoE block
calls it, `experts(hidden [T, H], top_k_index [T, K] int64, top_k_weights [T, K] bf16)`, with ids from a
random softmax router. Only `config._experts_implementation` changes between rows, so every
implementation sees the same module, weights and routing.

    model            H     I      E    top-k   experts module
    qwen3            2048  768    128  8       Qwen3-30B-A3B  (concatenated gate/up, SwiGLU)
    mixtral          4096  14336  8    2       Mixtral-8x7B   (concatenated gate/up, SwiGLU)
    gpt-oss          2880  2880   32   4       gpt-oss-20b    (transposed, interleaved, biases, clamped SwiGLU)

Timing: "eager" = the plain call as a transformers user makes it (torch.no_grad() for fwd; fwd+bwd =
call + backward of a fixed output gradient into the hidden states, routing weights and expert weights),
timed per call with CUDA events; "graph" = the same captured once into a CUDA graph and replayed. Medians
over at least 5 calls / 0.15 s, after warm-up, L2 not flushed (back-to-back calls, as in a model). Rows an
implementation cannot run say why: batched_mm materialises one weight matrix per (token, slot) and is
skipped where that passes MAX_BATCHED_GB; eager (a Python loop with a host sync per expert) runs to
T=4096 and cannot be captured; an implementation that fails to load says so.
Ratios: grouped_mm / moge (> 1: moge faster), for each mode and timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

MODELS = {
    #          H     I      E    K
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
    "gpt-oss": (2880, 2880, 32, 4),
}
TOKENS = (1, 128, 1024, 4096, 16384)
IMPLS = ("moge", "grouped_mm", "batched_mm", "eager", "sonicmoe", "deepgemm")
MODES = ("fwd", "fwd+bwd")
MAX_BATCHED_GB = 16.0       # batched_mm's gathered weights, [T*K, 2I, H] + [T*K, H, I] (x2 with grads)
MAX_EAGER_T = 4096
MIN_CALLS, MIN_SECONDS = 5, 0.15


def build_experts(model: str, device, dtype):
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    H, I, E, K = MODELS[model]
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


def skip_reason(impl, model, T, mode, capture):
    H, I, E, K = MODELS[model]
    if impl == "batched_mm":
        gb = T * K * 3 * H * I * 2 / 1e9 * (2 if mode == "fwd+bwd" else 1)
        if gb > MAX_BATCHED_GB:
            return f"gathers {gb:.0f} GB of weights"
    if impl == "eager":
        if capture:
            return "host sync per expert: not capturable"
        if T > MAX_EAGER_T:
            return f"T > {MAX_EAGER_T}: Python loop, skipped for time"
    return None


def make_call(module, impl, hidden, ids, weights, mode):
    """A zero-argument callable doing one call of `mode` (hidden/weights/params keep their grads)."""
    module.config._experts_implementation = impl
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


def time_eager(call):
    call()
    torch.cuda.synchronize()
    times, start_all = [], time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - start_all < MIN_SECONDS:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if len(times) >= 200:
            break
    return statistics.median(times)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-graph", action="store_true", help="eager calls only")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip what is left (and say so) once this many seconds have passed")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transformers: needs a CUDA device", file=sys.stderr)
        return 2
    import transformers

    import moge_kernels
    import moge_kernels.integrations.transformers  # noqa: F401  registers "moge"
    device, dtype = torch.device("cuda"), torch.bfloat16
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    impls = args.impls.split(",")
    modes = args.modes.split(",")
    timings = ["eager"] if args.no_graph else ["eager", "graph"]
    t_start = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers "
          f"{transformers.__version__}  moge_kernels backend {moge_kernels.get_backend()}  bf16, ms (median)")
    unavailable, skipped, results = {}, [], {}
    for model in models:
        H, I, E, K = MODELS[model]
        module = build_experts(model, device, dtype)
        for T in tokens:
            hidden, ids, weights = routing(T, H, E, K, device, dtype)
            err = check_against(module, hidden, ids, weights)
            print(f"  {model} T={T}: moge vs grouped_mm forward, max rel err {err:.2e}", flush=True)
            for mode in modes:
                for timing in timings:
                    for impl in impls:
                        if impl in unavailable:
                            continue
                        why = skip_reason(impl, model, T, mode, timing == "graph")
                        if why is None and time.perf_counter() - t_start > args.budget_s:
                            why = f"time budget of {args.budget_s:.0f} s spent"
                        if why:
                            skipped.append(f"{model} T={T} {mode} {timing} {impl}: {why}")
                            continue
                        try:
                            call = make_call(module, impl, hidden, ids, weights, mode)
                            ms = (time_graph if timing == "graph" else time_eager)(call)
                        except Exception as err:  # noqa: BLE001  report and go on
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
        torch.cuda.empty_cache()

    shown = [i for i in impls if i not in unavailable]
    for mode in modes:
        for timing in timings:
            print(f"\n{mode}, {timing} {'calls' if timing == 'eager' else 'replays'}")
            head = f"| model | T | " + " | ".join(shown) + " | grouped_mm / moge |"
            print(head)
            print("|" + "---|" * (len(shown) + 3))
            for model in models:
                for T in tokens:
                    row = [results.get((model, T, mode, timing, i)) for i in shown]
                    cells = [f"{v:.3f}" if v is not None else "-" for v in row]
                    moge = results.get((model, T, mode, timing, "moge"))
                    gmm = results.get((model, T, mode, timing, "grouped_mm"))
                    ratio = f"{gmm / moge:.2f}x" if moge and gmm else "-"
                    print(f"| {model} | {T} | " + " | ".join(cells) + f" | {ratio} |")
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
