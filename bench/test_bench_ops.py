"""pytest-benchmark timings of every moge op and the whole layer, per backend and baseline.

    python -m pytest bench/ --benchmark-only                     # GPU: Pangu shape, T in {1, 128, 4096}
    MOGE_BENCH_SHAPE=qwen_like MOGE_BENCH_TOKENS=1,16384 python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-json=out.json            # machine-readable

Each benchmark calls the op and then torch.cuda.synchronize(), so pytest-benchmark's wall clock spans
the device work (launch overhead included, as an eager caller sees it). The callables are the ones the
`moge-bench` CLI self-checks and times (moge_kernels/bench/methods.py); the CLI is the place for the
full report (CUDA-graph replays, cold L2, interleaved rounds, floors, plots). Without a GPU these run
the tiny shape at T=16 only, so they take seconds. They live in bench/, outside the CI test path.
"""
import os

import pytest
import torch

from moge_kernels.bench.methods import (_BASELINE_FNS, available_backends, available_baselines,
                                        build_methods, served_by)
from moge_kernels.bench.problems import DEFAULT_OPS, SHAPES, WeightCache, make_problem, work

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if GPU else torch.device("cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
SHAPE = SHAPES[os.environ.get("MOGE_BENCH_SHAPE", "pangu" if GPU else "tiny")]
TOKENS = [int(t) for t in os.environ.get("MOGE_BENCH_TOKENS", "1,128,4096" if GPU else "16").split(",")]
ROUNDS = 20 if GPU else 5

_weights = WeightCache(DTYPE, DEVICE)
_problems = {}


def _cases():
    backends = available_backends(DEVICE)
    baselines, _ = available_baselines(DEVICE, DTYPE)
    for op in DEFAULT_OPS:
        for b in backends:
            if b in served_by(b, op, DEVICE.type).values():
                yield op, b
        for name in baselines:
            if op in _BASELINE_FNS[name][0]:
                yield op, name


CASES = list(_cases())


def _problem(T):
    if T not in _problems:
        _problems.clear()           # one T at a time: the Pangu problem at T=16384 is several GB
        _problems[T] = make_problem(SHAPE, T, DTYPE, DEVICE, weights=_weights.get(SHAPE), seed=T)
    return _problems[T]


@pytest.mark.parametrize("T", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("op,method", CASES, ids=[f"{op}-{m}" for op, m in CASES])
def test_bench(benchmark, T, op, method):
    p = _problem(T)
    is_backend = method not in _BASELINE_FNS
    found = [m for m in build_methods(p, [op], [method] if is_backend else [],
                                      [] if is_backend else [method]) if m.name == method]
    if not found:
        pytest.skip(f"{method} has no {op} here")
    fn = found[0].fn

    def run():
        out = fn()
        if GPU:
            torch.cuda.synchronize(DEVICE)
        return out

    flops, nbytes = work(p, op)
    benchmark.group = f"{SHAPE['name']} T={T} {op}"
    benchmark.extra_info.update(shape=SHAPE["name"], T=T, op=op, method=method, flops=flops, bytes=nbytes,
                                served_by=found[0].served_by)
    benchmark.pedantic(run, warmup_rounds=2, rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)       # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        benchmark.extra_info.update(gbs=nbytes / median_s / 1e9, tflops=flops / median_s / 1e12)
