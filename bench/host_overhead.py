"""Host cost of the Triton ops: eager (as called, no CUDA graph) against CUDA-graph replay, and where the
host time goes.

On the GPU (the device run of issue "Fast without CUDA graphs"):

    python bench/host_overhead.py                       # Pangu and Qwen3-30B, T = 1, 1024, 4096
    python bench/host_overhead.py --shapes pangu,qwen3_30b,mixtral_8x7b --tokens 1,16,1024,4096

prints, per (shape, T, op) with op in dispatch, permute (grouped_permute of the same ids), mlp, "mlp 1str"
(the mlp with triton_mlp_streams off, where the two-stream split applies), combine, layer (moge_forward),
MoGELayer (its forward under inference_mode, router GEMM included), the `torch._grouped_mm` pipeline's mlp
and layer (bench/baselines.py) and, on sm_89+, "mlp fp8" (grouped_mlp with the same experts' fp8_block
weights; --fp8 all adds "mlp fp8c", fp8_channel weights, and "MoGELayer fp8", the layer after
quantize_("fp8_block")): the eager time (`triton.testing.do_bench` of plain calls, L2 flushed before each,
as in the issue's table), the graph-replay time (`do_bench_cudagraph`), their difference, a call's share of
back-to-back calls without a flush (what a loop of plain calls sees), the host time
of one call (perf_counter around the call, the GPU idle before it: what the host spends before the
kernels can run), the same with eager_direct=False (every op through torch.ops' dispatcher, the path
before the eager direct calls), and the Triton launches per call that did not come from a cached handle
(0 in a steady state); then, with --profile, a torch.profiler table of CPU time per function and the
top of a cProfile of 200 calls of each op at T = 1 (the FP8 mlp included) and of the mlp at the largest T.
Qwen3-30B routes as plain top-8 (G=1, k_g=8), Mixtral-8x7B as top-2 (G=1, k_g=2).

Without a GPU (`--simulate`, here or in CI): the public ops, the layer and the Triton launchers on CPU
tensors, as on the GPU up to the compiled launcher, which is replaced by a no-op (a stand-in driver
answers device, stream and target; the compile step returns a stand-in handle; the triton backend runs
CPU tensors with the H200 config tables, bf16 and FP8, and TMA descriptors): the Python host time per
call (CPU time of the thread, min over repeats) and the function calls per call, before any CUDA work,
direct and through torch.ops, and the Triton launches a call that did not come from a cached handle.
Rows: the bf16 ops (dispatch, permute, mlp, combine) and layer, then FP8 experts: "mlp fp8" / "mlp fp8c"
(grouped_mlp with fp8_block / fp8_channel weights), "permute fp8" (grouped_permute_fp8), "dispatch fp8"
(grouped_dispatch_fp8) and "MoGELayer fp8" (the layer after quantize_("fp8_block")). Run it on two checkouts to compare them;
--ops picks rows.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {   # the expert shapes of the issue; routing with groups where the model has them
    "pangu": dict(H=5120, I=1344, E=64, G=8, k_g=1),            # Pangu Pro MoE, 8 groups of 8
    "qwen3_30b": dict(H=2048, I=768, E=128, G=1, k_g=8),        # Qwen3-30B-A3B, plain top-8
    "mixtral_8x7b": dict(H=4096, I=14336, E=8, G=1, k_g=2),     # Mixtral-8x7B, plain top-2
}


# ------------------------------------------------------------------------------------ simulate (CPU)
LAUNCHES = None     # a list: the stand-in launcher appends the arguments of every launch (tests)


def _install_stand_ins():
    """Triton's JITFunction.run as on a GPU, up to the compiled launcher, which does nothing."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class _Compiled:
        function, packed_metadata = 1, None

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            if LAUNCHES is not None:
                LAUNCHES.append(args)

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _Compiled()
        self.device_caches[device][0][key] = kernel
        return kernel

    driver.set_active(_Driver())
    JITFunction._do_compile = _do_compile
    return triton


def _simulated_gpu_path():
    """The GPU's Python path on CPU tensors: the stand-in driver (above), every triton kernel registered
    for CPU tensors too and selected, the H200 config table and TMA descriptors as on the card, and no
    value checks (on a GPU they run only with MOGE_VALIDATE=1). Two-stream grouped_mlp (CUDA streams)
    is the one GPU branch this cannot run."""
    _install_stand_ins()
    import functools
    import torch
    import moge_kernels as mk
    from moge_kernels import checks, registry
    from moge_kernels.triton import gemm_configs, grouped_gemm

    for (backend, op), kernel in list(registry._kernels.items()):
        if backend == "triton":
            registry._kernels[(backend, op)] = kernel._replace(devices=kernel.devices | {"cpu"})
    registry._candidates.clear()
    mk.set_backend("triton")
    checks._should_check_values = lambda t: False

    @functools.lru_cache(maxsize=None)
    def table_config(M, E, swiglu, dtype, device, options_key):
        cfg = gemm_configs.H200_TABLE[(gemm_configs.regime(M, E), swiglu)]
        return gemm_configs.fit(cfg, swiglu, dtype)

    grouped_gemm._table_config = table_config
    grouped_gemm._tma_device = lambda device: True
    grouped_gemm._num_sms = lambda device: 132
    # FP8: the H200 table (as fp8_table_config looks it up on the card) and compiled-launch constexprs
    # and options (no interpreter rounding, the configs' register caps)
    from moge_kernels.triton import fp8_gemm

    def fp8_table_config(M, E, gemm, device, channel=False):
        tables = gemm_configs.FP8_CHANNEL_TABLES if channel else gemm_configs.FP8_TABLES
        return tables["H200"][(gemm_configs.regime(M, E), gemm)]

    gemm_configs.fp8_table_config = fp8_table_config
    fp8_gemm._interpreted = lambda t: False
    return torch, mk


def _simulated_calls(torch, mk, T):
    """{name: (fn, its triton launcher or None)} at T tokens: Pangu's routing (E=64, G=8, top-1 per
    group), small widths (the host path depends on the shapes only through config choice)."""
    from moge_kernels import reference as R
    from moge_kernels.triton import combine, dispatch, fp8_gemm, grouped_gemm, permute

    torch.manual_seed(0)
    H, I, E, G, dtype = 128, 64, 64, 8, torch.bfloat16
    hidden = torch.randn(T, H).to(dtype)
    logits = torch.randn(T, E)
    w_gate_up = (torch.randn(E, 2 * I, H) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I) * I ** -0.5).to(dtype)
    permuted, weights, topk_ids, offsets, row_index = R.grouped_dispatch(hidden, logits, G)
    expert_out = torch.randn_like(permuted)
    layer = mk.MoGELayer(H, I, E, G, 1, dtype=dtype).eval()
    # FP8 experts (Hopper inference): both weight formats, the FP8 dispatch / permute (e4m3 rows), the
    # FP8 layer (its dispatch writes e4m3 rows, its shared expert none here)
    fp8_w = {fmt: (mk.quantize_expert_weights(w_gate_up, fmt, parts=2), mk.quantize_expert_weights(w_down, fmt))
             for fmt in ("fp8_block", "fp8_channel")}
    layer_fp8 = mk.MoGELayer(H, I, E, G, 1, dtype=dtype).eval().quantize_("fp8_block")
    fp8_calls = {}
    for name, fmt in (("mlp fp8", "fp8_block"), ("mlp fp8c", "fp8_channel")):
        gu, dn = fp8_w[fmt]
        fp8_calls[name] = (
            lambda gu=gu, dn=dn: mk.grouped_mlp(permuted, gu, dn, offsets),
            lambda gu=gu, dn=dn: fp8_gemm.grouped_mlp_fp8(permuted, gu.weight, gu.scale, dn.weight, dn.scale,
                                                          offsets, None, gu.block_n, gu.block_k))
    fp8_calls["permute fp8"] = (lambda: mk.grouped_permute_fp8(hidden, topk_ids, E),
                                lambda: fp8_gemm.permute_fp8(hidden, row_index, offsets))
    fp8_calls["dispatch fp8"] = (lambda: mk.grouped_dispatch_fp8(hidden, logits, G), None)
    fp8_calls["MoGELayer fp8"] = (lambda: layer_fp8(hidden), None)
    return {
        "dispatch": (lambda: mk.grouped_dispatch(hidden, logits, G),
                     lambda: dispatch.grouped_dispatch(hidden, logits, G)),
        "permute": (lambda: mk.grouped_permute(hidden, topk_ids, E),
                    lambda: permute.grouped_permute(hidden, topk_ids, E)),
        "mlp": (lambda: mk.grouped_mlp(permuted, w_gate_up, w_down, offsets),
                lambda: grouped_gemm.grouped_mlp(permuted, w_gate_up, w_down, offsets)),
        "combine": (lambda: mk.grouped_combine(expert_out, weights, row_index),
                    lambda: combine.grouped_combine(expert_out, weights, row_index)),
        "layer": (lambda: mk.moge_forward(hidden, logits, w_gate_up, w_down, G), None),
        "MoGELayer": (lambda: layer(hidden), None),
        **fp8_calls,
    }


def _per_call_us(fn, repeats, inner):
    """CPU time of this thread per call (time.thread_time: a shared machine's other load is not counted)."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(inner):
            fn()
        samples.append((time.thread_time() - start) / inner * 1e6)
    return min(samples), statistics.median(samples)


def _python_calls(fn, n=20):
    """Python function calls (cProfile's count, C functions included) per call of fn."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    return sum(s[1] for s in pstats.Stats(prof).stats.values()) / n


def simulated_steady_state(names, tokens, warmup=3, calls=5) -> dict:
    """{(T, op): Triton launches per call that did not come from a cached handle, after `warmup` calls}
    under the simulation (0 in a steady state). Installs the stand-ins: run it in a process of its own."""
    torch, mk = _simulated_gpu_path()
    result = {}
    for T in tokens:
        table = _simulated_calls(torch, mk, T)
        for name in names:
            public = table[name][0]
            with torch.no_grad():
                for _ in range(warmup):
                    public()
                before = _slow_launches()
                for _ in range(calls):
                    public()
            result[(T, name)] = (_slow_launches() - before) / calls
    return result


def simulate(args):
    torch, mk = _simulated_gpu_path()
    tokens = [int(t) for t in args.tokens.split(",")]
    wanted = None if args.ops is None else [o.strip() for o in args.ops.split(",")]
    direct = "eager_direct" in mk.get_options()
    print("CPU SIMULATION of the GPU host path (bench/host_overhead.py --simulate): CPU tensors, bf16, "
          "triton backend with launches replaced by no-ops, H200 configs; CPU us per call (min and median "
          f"of {args.repeats} x {args.inner} calls) and Python calls per call (cProfile), under "
          "torch.no_grad(). 'public': the mk.* call; 'torch.ops': the same with eager_direct=False (every "
          "call through the dispatcher); 'launcher': the triton function alone; 'slow': Triton launches "
          "a call not from a cached handle (0 in a steady state). fp8 = fp8_block weights, fp8c = "
          "fp8_channel.")
    print(f"{'T':>5} {'op':<13} {'public min':>10} {'median':>8} {'calls':>6} {'torch.ops min':>13} "
          f"{'calls':>6} {'launcher min':>12} {'calls':>6} {'slow':>5}")
    for T in tokens:
        for name, (public, launcher) in _simulated_calls(torch, mk, T).items():
            if wanted is not None and name not in wanted:
                continue
            with torch.no_grad():
                lo, med = _per_call_us(public, args.repeats, args.inner)
                slow = _slow_launches()
                row = f"{T:>5} {name:<13} {lo:>10.1f} {med:>8.1f} {_python_calls(public):>6.0f}"
                slow = (_slow_launches() - slow) / 21      # _python_calls: 21 calls
                if direct:
                    with mk.use_options(eager_direct=False):
                        row += f" {_per_call_us(public, args.repeats, args.inner)[0]:>13.1f}" \
                               f" {_python_calls(public):>6.0f}"
                else:
                    row += f" {'':>13} {'':>6}"
                if launcher is not None:
                    row += f" {_per_call_us(launcher, args.repeats, args.inner)[0]:>12.1f}" \
                           f" {_python_calls(launcher):>6.0f}"
                else:
                    row += f" {'':>12} {'':>6}"
                print(row + f" {slow:>5.2f}", flush=True)
                if args.profile and T == tokens[0]:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.inner):
                        public()
                    prof.disable()
                    out = io.StringIO()
                    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
                    print(out.getvalue())
    return 0


# ------------------------------------------------------------------------------------ GPU
def _fp8_pipelines(fp8_rows, permuted, offsets, hidden, w_gate_up, w_down, module):
    """The FP8 rows of _pipelines (sm_89+): "mlp fp8" (fp8_block weights of the same experts), with
    fp8_rows "all" also "mlp fp8c" (fp8_channel) and "MoGELayer fp8" (quantize_("fp8_block"))."""
    import copy
    import torch
    import moge_kernels as mk
    if fp8_rows == "none" or torch.cuda.get_device_capability() < (8, 9):
        return {}
    calls = {}
    formats = (("mlp fp8", "fp8_block"),) + ((("mlp fp8c", "fp8_channel"),) if fp8_rows == "all" else ())
    for name, fmt in formats:
        gu, dn = mk.quantize_expert_weights(w_gate_up, fmt, parts=2), mk.quantize_expert_weights(w_down, fmt)
        calls[name] = lambda gu=gu, dn=dn: mk.grouped_mlp(permuted, gu, dn, offsets)
    if fp8_rows == "all":
        layer = copy.deepcopy(module).quantize_("fp8_block")

        def layer_fp8():
            with torch.inference_mode():
                return layer(hidden)
        calls["MoGELayer fp8"] = layer_fp8
    return calls


def _pipelines(shape, T, dtype, fp8_rows="none"):
    import torch
    import moge_kernels as mk
    from moge_kernels import reference as R
    from moge_kernels.bench import baselines as B
    from moge_kernels.triton import gemm_configs, grouped_gemm

    H, I, E, G, k_g = (shape[k] for k in ("H", "I", "E", "G", "k_g"))
    gen = torch.Generator(device="cuda").manual_seed(T)
    hidden = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=gen) * 2
    w_gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device="cuda", generator=gen) * I ** -0.5).to(dtype)
    permuted, weights, topk_ids, offsets, row_index = R.grouped_dispatch(hidden, logits, G, k_g)
    expert_out = torch.randn_like(permuted)
    module = mk.MoGELayer(H, I, E, G, k_g, device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        module.w_gate_up.copy_(w_gate_up)
        module.w_down.copy_(w_down)

    def one_stream_mlp():
        with mk.use_options(triton_mlp_streams=False):
            return mk.grouped_mlp(permuted, w_gate_up, w_down, offsets)

    def layer_module():
        with torch.inference_mode():
            return module(hidden)

    calls = {
        "dispatch": lambda: mk.grouped_dispatch(hidden, logits, G, k_g),
        "permute": lambda: mk.grouped_permute(hidden, topk_ids, E),   # the router's ids given
        "mlp": lambda: mk.grouped_mlp(permuted, w_gate_up, w_down, offsets),
        "mlp 1str": one_stream_mlp,          # the mlp without its two-stream split, where it has one
        "combine": lambda: mk.grouped_combine(expert_out, weights, row_index),
        "layer": lambda: mk.moge_forward(hidden, logits, w_gate_up, w_down, G, k_g),
        "MoGELayer": layer_module,           # router GEMM included, inference_mode
        "gmm mlp": lambda: B.grouped_mm_mlp(permuted, w_gate_up, w_down, offsets),
        "gmm layer": lambda: B.torch_layer(hidden, logits, w_gate_up, w_down, G, k_g),
        **_fp8_pipelines(fp8_rows, permuted, offsets, hidden, w_gate_up, w_down, module),
    }
    if gemm_configs.regime(permuted.shape[0], E) not in gemm_configs.TWO_STREAM_REGIMES:
        del calls["mlp 1str"]                # no regime with a two-stream split
    return calls


def _slow_launches() -> int:
    """Launches of the package's Triton kernels through kernel[grid](...) so far (launch.Kernel): in a
    steady state none, every launch from the cached handle."""
    from moge_kernels.triton import combine, dispatch, fp8_gemm, grouped_gemm, launch, permute
    return sum(k.slow_launches for m in (combine, dispatch, fp8_gemm, grouped_gemm, permute)
               for k in vars(m).values() if isinstance(k, launch.Kernel))


def _host_us(fn, n=50):
    """Host time of one call with the GPU idle (synchronised before and after each call)."""
    import torch
    samples = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _loop_ms(fn, calls, repeats=3):
    """(GPU ms, host ms) per call of `calls` back-to-back calls (no flush, no sync inside the loop):
    events around the loop and perf_counter around its launches, medians of `repeats` loops."""
    import torch
    loops, hosts = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        hosts.append((time.perf_counter() - t0) / calls * 1e3)
        end.record()
        torch.cuda.synchronize()
        loops.append(start.elapsed_time(end) / calls)
    return statistics.median(loops), statistics.median(hosts)


def gpu(args):
    import torch
    import triton
    import triton.testing as tt
    import moge_kernels as mk

    mk.set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    shapes = [s.strip() for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"backend {args.backend} | {dtype}; ms per call, medians of do_bench (eager) and "
          f"do_bench_cudagraph (graph); host us = one call's host time, GPU idle")
    print("'host us ops': the same with eager_direct=False (every op through torch.ops' dispatcher, as "
          "before the direct path); 'slow/call': Triton launches not from a cached handle per call")
    print("'loop ms': a call's share of back-to-back calls without a flush (events around the loop: what a "
          "decode loop of plain calls sees, host time included where the GPU waits for it)")
    print(f"{'shape':<13} {'T':>5} {'op':<13} {'eager ms':>9} {'graph ms':>9} {'eager-graph':>11} "
          f"{'loop ms':>9} {'host us':>8} {'host us ops':>11} {'slow/call':>9}")
    overhead = {}
    for name in shapes:
        shape = SHAPES[name]
        for T in tokens:
            calls = _pipelines(shape, T, dtype, args.fp8)
            for op, fn in calls.items():
                fn()
                torch.cuda.synchronize()
                eager = tt.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
                graph = None
                try:
                    graph = tt.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
                except Exception as err:  # noqa: BLE001  report it, keep the eager figure
                    print(f"    {op}: no graph ({type(err).__name__}: {str(err)[:80]})")
                ms_per_call = graph if graph is not None else eager
                loop, _ = _loop_ms(fn, max(5, min(200, int(args.rep_ms / max(ms_per_call, 1e-3)))))
                slow = _slow_launches()
                host = _host_us(fn)
                slow = (_slow_launches() - slow) / 50
                with mk.use_options(eager_direct=False):
                    fn()
                    host_ops = _host_us(fn)
                diff = eager - graph if graph is not None else float("nan")
                if T == 1:
                    overhead[(name, op)] = diff
                print(f"{name:<13} {T:>5} {op:<13} {eager:>9.4f} "
                      f"{graph if graph is not None else float('nan'):>9.4f} {diff:>11.4f} {loop:>9.4f} "
                      f"{host:>8.1f} {host_ops:>11.1f} {slow:>9.2f}", flush=True)
            del calls
            torch.cuda.empty_cache()
    if overhead:
        print("\noverhead at T=1 (eager - graph, us): " +
              "; ".join(f"{s} {op} {1e3 * v:.1f}" for (s, op), v in overhead.items()))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        # T = 1 for each op, and the mlp at the largest T (its host time grew with T at e85f27b)
        cases = [(name, 1, op) for name in shapes for op in ("dispatch", "mlp", "combine", "layer", "mlp fp8")]
        cases += [(name, max(tokens), "mlp") for name in shapes if max(tokens) > 1]
        for name, T, op in cases:
            fn = _pipelines(SHAPES[name], T, dtype, args.fp8).get(op)
            if fn is None:             # no FP8 rows here
                continue
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
            print(f"\n=== torch.profiler, {name} T={T} {op}, 50 calls (CPU time) ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(15)
            print(f"=== cProfile, {name} T={T} {op}, 200 calls ===")
            print(out.getvalue())
    return 0


def gaps(args):
    """Where eager time goes at small T: for each op, do_bench with the L2 flush (the issue's figure),
    back-to-back calls without a flush (events around 200 calls: what a decode loop sees), the host time
    per call in that loop, the graph replay, and the GPU kernels of flushed eager calls (torch.profiler,
    CUDA activity: how long each kernel runs cold); "layer graphs" is the layer with the option
    eager_graphs on (its graph-replay column is the plain layer's: under a capture the option stays out)."""
    import torch
    import triton.testing as tt
    import moge_kernels as mk
    from torch.profiler import ProfilerActivity, profile

    mk.set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    flush = torch.empty(64 * 2 ** 20, dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name()} | {dtype}; ms: do_bench (L2 flushed), loop (200 calls back to "
          "back, no flush), host (perf_counter per call in that loop), graph (do_bench_cudagraph)")
    for name in [s.strip() for s in args.shapes.split(",")]:
        for T in [int(t) for t in args.tokens.split(",")]:
            calls = _pipelines(SHAPES[name], T, dtype)
            for op in ("dispatch", "mlp", "combine", "layer", "layer graphs"):
                # "layer graphs": moge_forward with the option eager_graphs (replays of a graph per signature)
                mk.set_options(eager_graphs=16 if op == "layer graphs" else 0)
                fn = calls["layer" if op == "layer graphs" else op]
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                eager = tt.do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
                graph = tt.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
                loop, host = _loop_ms(fn, 200, repeats=5)
                print(f"{name:<10} T={T:<5} {op:<9} do_bench {eager:.4f}  loop {loop:.4f}"
                      f"  host {host:.4f}  graph {graph:.4f}", flush=True)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        flush.zero_()
                        fn()
                    torch.cuda.synchronize()
                rows = [(e.key, e.device_time_total / e.count, e.count) for e in prof.key_averages()
                        if e.device_time_total > 0 and "fill" not in e.key.lower()]
                for key, us, count in sorted(rows, key=lambda r: -r[1])[:6]:
                    print(f"      cold kernel {us:8.1f} us x{count / 20:.0f}  {key[:90]}")
            mk.set_options(eager_graphs=0)
            del calls
            torch.cuda.empty_cache()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true", help="no GPU: host time of the launchers, no-op launches")
    ap.add_argument("--shapes", default="pangu,qwen3_30b")
    ap.add_argument("--tokens", default="1,1024,4096")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench rep (ms) per measurement")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--gaps", action="store_true", help="GPU: eager time split into host, loop, cold kernels")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--fp8", choices=("none", "mlp", "all"), default="mlp",
                    help="GPU: FP8 rows (sm_89+): mlp = 'mlp fp8' (fp8_block weights); all = also 'mlp fp8c' "
                         "(fp8_channel) and 'MoGELayer fp8'")
    ap.add_argument("--ops", default=None, help="--simulate: only these rows (e.g. 'mlp,mlp fp8')")
    args = ap.parse_args(argv)
    return simulate(args) if args.simulate else gaps(args) if args.gaps else gpu(args)


if __name__ == "__main__":
    sys.exit(main())
