"""`python -m moge_kernels.bench` / `moge-bench`: self-check every available backend against the reference
on the Pangu Pro MoE shape, then time every op and the whole layer against eager PyTorch and the floor.

The floor is measured, not quoted: the same run times a large device copy (bytes read + written per
second) and a large dense matmul (FLOP/s), and each op's floor is max(bytes / bandwidth, FLOPs / rate).
On CUDA, times are medians of CUDA-event timings (triton.testing.do_bench); on CPU, medians of
perf_counter around a synchronous call. Without a GPU the timing shapes are scaled down (CPU C++ backend
vs eager); the self-check still runs the full Pangu width.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import assert_error_within, make_routing_inputs

PANGU = dict(name="pangu", H=5120, I=1344, E=64, G=8, k_g=1)
SHAPES = {
    "pangu": PANGU,
    "qwen_like": dict(name="qwen_like", H=2048, I=768, E=128, G=8, k_g=1),
    "pangu_tp8": dict(PANGU, name="pangu_tp8", I=336),
    "cpu_small": dict(name="cpu_small", H=512, I=128, E=64, G=8, k_g=1),
}
GPU_TOKENS = (1, 16, 128, 1024, 4096, 16384)
CPU_TOKENS = (1, 16, 128, 1024)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ timing
def time_ms(fn, device, warmup=3, repeats=20) -> float:
    """Median milliseconds of fn() on `device`."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


@dataclass
class Ceilings:
    bandwidth_gbs: float      # device copy, bytes read + written
    matmul_tflops: float      # dense matmul in the benchmark dtype


def measure_ceilings(device, dtype) -> Ceilings:
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_ms = time_ms(lambda: a @ b, device)
    return Ceilings(bandwidth_gbs=2 * n_bytes / copy_ms / 1e6, matmul_tflops=2 * n ** 3 / mm_ms / 1e9)


# ------------------------------------------------------------------------------------ problem
@dataclass
class Problem:
    shape: dict
    T: int
    dtype: torch.dtype
    device: torch.device
    tensors: dict = field(default_factory=dict)

    @property
    def K(self):
        return self.shape["G"] * self.shape["k_g"]


def make_problem(shape, T, dtype, device, seed=0) -> Problem:
    H, I, E = shape["H"], shape["I"], shape["E"]
    hidden, logits = make_routing_inputs(T, E, H, dtype, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    # Built on the device and in place: the Pangu weights are 2.6 GB in bf16.
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device=device).normal_(0, H ** -0.5, generator=gen)
    w_down = torch.empty(E, H, I, dtype=dtype, device=device).normal_(0, I ** -0.5, generator=gen)
    p = Problem(shape, T, dtype, device)
    p.tensors = dict(hidden=hidden, logits=logits, w_gate_up=w_gate_up, w_down=w_down)
    permuted, weights, _, offsets, row_index = R.grouped_dispatch(hidden, logits, shape["G"], shape["k_g"])
    p.tensors.update(permuted=permuted, weights=weights, offsets=offsets, row_index=row_index,
                     expert_out=torch.randn_like(permuted))
    return p


def op_calls(p: Problem, ops):
    """{op: callable} running the op through `ops` (moge_kernels or moge_kernels.reference)."""
    t, G, k_g = p.tensors, p.shape["G"], p.shape["k_g"]
    return {
        "dispatch": lambda: ops.grouped_dispatch(t["hidden"], t["logits"], G, k_g),
        "mlp": lambda: ops.grouped_mlp(t["permuted"], t["w_gate_up"], t["w_down"], t["offsets"]),
        "combine": lambda: ops.grouped_combine(t["expert_out"], t["weights"], t["row_index"]),
        "layer": lambda: ops.moge_forward(t["hidden"], t["logits"], t["w_gate_up"], t["w_down"], G, k_g),
    }


def floor_ms(p: Problem, op: str, ceil: Ceilings) -> float:
    H, I, E = p.shape["H"], p.shape["I"], p.shape["E"]
    es = torch.finfo(p.dtype).bits // 8
    T, K = p.T, p.K
    bw = ceil.bandwidth_gbs * 1e6      # bytes per ms
    rate = ceil.matmul_tflops * 1e9    # FLOPs per ms
    dispatch_bytes = T * H * es + T * K * H * es + T * E * p.tensors["logits"].element_size()
    combine_bytes = T * K * H * es + T * H * es
    active_experts = int((p.tensors["offsets"].diff() > 0).sum())
    mlp = max(6 * T * K * H * I / rate, active_experts * 3 * H * I * es / bw)
    floors = {"dispatch": dispatch_bytes / bw, "combine": combine_bytes / bw, "mlp": mlp}
    floors["layer"] = sum(floors.values())
    return floors[op]


# ------------------------------------------------------------------------------------ self-check
def exact_mlp(p: Problem) -> torch.Tensor:
    """grouped_mlp in float64, one active expert at a time (the whole weight stack in fp64 is 10 GB)."""
    t = p.tensors
    x, bounds = t["permuted"], t["offsets"].tolist()
    y = torch.zeros(x.shape[0], t["w_down"].shape[1], dtype=torch.float64, device=x.device)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            h = R.swiglu(x[lo:hi].double() @ t["w_gate_up"][e].double().t())
            y[lo:hi] = h @ t["w_down"][e].double().t()
    return y


def self_check(device, dtype, tokens=(1, 7, 64)) -> list[dict]:
    """Every available backend on `device` against the reference, Pangu width, small T."""
    rows = []
    shape = PANGU
    for T in tokens:
        p = make_problem(shape, T, dtype, device, seed=T)
        with mk.use_backend("reference"):
            ref = {op: fn() for op, fn in op_calls(p, mk).items()}
        exact = {"mlp": exact_mlp(p)}
        for backend, info in mk.backends().items():
            if not info["available"] or backend == "reference" or device.type not in info["devices"]:
                continue
            with mk.use_backend(backend):
                ok, detail = True, "matches the reference"
                try:
                    for op, fn in op_calls(p, mk).items():
                        if mk.resolve(_OP_NAMES.get(op, "grouped_mlp"), device.type)[0] != backend:
                            continue
                        out = fn()
                        if op == "dispatch":
                            for a, b in zip(out[2:], ref[op][2:]):
                                assert torch.equal(a, b), "ids/offsets/row_index differ"
                            assert torch.equal(out[0], ref[op][0]), "permuted rows differ"
                            torch.testing.assert_close(out[1], ref[op][1], rtol=1e-5, atol=1e-6)
                        elif op == "mlp":
                            assert_error_within(out, ref[op], exact[op], what="grouped_mlp")
                        elif op == "combine":
                            torch.testing.assert_close(out, ref[op], rtol=2e-2, atol=2e-2)
                except AssertionError as err:
                    ok, detail = False, str(err).splitlines()[0]
            rows.append(dict(T=T, backend=backend, ok=ok, detail=detail))
    return rows


_OP_NAMES = {"dispatch": "grouped_dispatch", "mlp": "grouped_mlp", "combine": "grouped_combine",
             "layer": "grouped_mlp"}


# ------------------------------------------------------------------------------------ timing table
def time_table(device, dtype, shapes, tokens, ceil: Ceilings) -> list[dict]:
    rows = []
    backends = [b for b, info in mk.backends().items()
                if info["available"] and b != "reference" and device.type in info["devices"]]
    for shape in shapes:
        for T in tokens:
            p = make_problem(shape, T, dtype, device, seed=T)
            log(f"  timing {shape['name']} T={T}")
            eager = {op: time_ms(fn, device) for op, fn in op_calls(p, R).items()}
            for backend in backends:
                with mk.use_backend(backend):
                    for op, fn in op_calls(p, mk).items():
                        ms = time_ms(fn, device)
                        floor = floor_ms(p, op, ceil)
                        rows.append(dict(shape=shape["name"], T=T, op=op, backend=backend, ms=ms,
                                         eager_ms=eager[op], floor_ms=floor, speedup=eager[op] / ms,
                                         of_floor=ms / floor))
    return rows


def print_table(rows, out=sys.stdout):
    header = f"{'shape':<10} {'T':>6} {'op':<9} {'backend':<8} {'ms':>9} {'eager ms':>9} " \
             f"{'floor ms':>9} {'x eager':>8} {'x floor':>8}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r['shape']:<10} {r['T']:>6} {r['op']:<9} {r['backend']:<8} {r['ms']:>9.4f} "
              f"{r['eager_ms']:>9.4f} {r['floor_ms']:>9.4f} {r['speedup']:>7.2f}x {r['of_floor']:>7.2f}x",
              file=out)


def environment(device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=__file__.rsplit("/", 2)[0]).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(device=name, torch=torch.__version__, triton=triton_version, commit=commit,
                threads=torch.get_num_threads())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--tokens", default=None, help="comma list of T")
    parser.add_argument("--skip-self-check", action="store_true")
    parser.add_argument("--json", default=None, help="write all rows and the environment here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    shapes = [SHAPES[s] for s in args.shapes.split(",")] if args.shapes else \
        ([SHAPES["pangu"]] if gpu else [SHAPES["cpu_small"]])
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (GPU_TOKENS if gpu else CPU_TOKENS)
    env = environment(device)
    print(f"moge_kernels bench on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']} | {dtype}")
    print("backends: " + ", ".join(f"{b}={'yes' if r['available'] else 'no'}"
                                   for b, r in mk.backends().items()))

    checks = []
    if not args.skip_self_check:
        log("self-check: every available backend vs the reference, Pangu shape (H=5120, E=64, G=8, I=1344)")
        checks = self_check(device, dtype)
        print("\nself-check (Pangu Pro MoE shape, small T):")
        for c in checks:
            print(f"  T={c['T']:<3} {c['backend']:<8} {'PASS' if c['ok'] else 'FAIL'}  {c['detail']}")

    log("measuring the device's copy bandwidth and matmul rate")
    ceil = measure_ceilings(device, dtype)
    print(f"\nceilings measured in this run: copy {ceil.bandwidth_gbs:.0f} GB/s, "
          f"matmul {ceil.matmul_tflops:.4g} TFLOP/s ({dtype})")
    rows = time_table(device, dtype, shapes, tokens, ceil)
    print("\nmedian times; 'x eager' = eager reference time / backend time (speed-up), "
          "'x floor' = backend time / floor")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, dtype=str(dtype), ceilings=asdict(ceil), self_check=checks,
                           rows=rows), f, indent=1)
    if any(not c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
