"""Timing: the device's own ceilings, CUDA-graph capture, and per-call samples that start from a cold L2.

On CUDA every sample is one call between two CUDA events, after a read of a 256 MB buffer that evicts
the L2: no timing is of inputs left in the cache by the previous call, and the host's launch work
overlaps the read. The eviction reads rather than writes (option bench_flush="write": a memset, as
`triton.testing.do_bench` does): a memset leaves the L2 full of dirty lines, which the timed call then
writes back to DRAM as it evicts them, up to 60 MB of writes inside the sample (about 14 us on an H200),
a cost of the flush, not of the op, and one the floors (bytes the op must move) do not hold. Methods
without host syncs are captured once in a CUDA graph and timed as graph replays (the device time of the op, free of launch gaps, as a serving engine runs
it); the others are timed as called. On CPU a sample is perf_counter around one (synchronous) call.

The card reaches its power limit at large T and its clocks drop, so the CLI does not time one method
after another: it runs rounds, each round times every method of the (shape, T) in a rotated order and
samples the ceilings once, and reports medians over all samples."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import options

L2_FLUSH_BYTES = 256 << 20        # > 4x the 50 MB L2 of an H100 (60 MB on an H200)


def flush_note(cuda: bool, mode: str | None = None) -> str:
    """How each sample starts, for a report's legend."""
    if not cuda:
        return "perf_counter around each call"
    mode = mode or options.current.bench_flush
    return (f"each sample after a {L2_FLUSH_BYTES >> 20} MB " +
            ("read (the L2 left clean)" if mode == "read" else "memset (the L2 left dirty)"))


class Timer:
    def __init__(self, device: torch.device, flush: str | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.mode = flush or options.current.bench_flush
        if self.mode not in options.BENCH_FLUSH_MODES:
            raise ValueError(f"Timer: flush must be one of {options.BENCH_FLUSH_MODES}, got {self.mode!r}")
        self.flush = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda else None
        self._sink = torch.zeros((), dtype=torch.int64, device=device) if self.cuda else None

    def describe(self) -> str:
        return flush_note(self.cuda, self.mode)

    def evict(self) -> None:
        """Evict the L2 (the cold-cache state of a sample)."""
        if self.mode == "read":
            torch.sum(self.flush, dim=0, dtype=torch.int64, out=self._sink)
        else:
            self.flush.zero_()

    def samples(self, fn: Callable, n: int) -> list[float]:
        """n per-call times of fn(), in milliseconds."""
        if not self.cuda:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            self.evict()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def estimate(self, fn: Callable) -> float:
        return min(self.samples(fn, 2))


def elapsed_ms(fn: Callable, inner: int = 1, cuda: bool = True) -> float:
    """Milliseconds per call of fn(), over `inner` back-to-back calls: between two CUDA events when
    `cuda`, else perf_counter around the (synchronous) calls."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) * 1e3 / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def median_ms(fn: Callable, min_calls: int = 5, min_seconds: float = 0.0, max_calls: int = 200,
              cuda: bool = True) -> float:
    """Median of single-call times of fn() (already warmed up; elapsed_ms of one call each, so no call
    overlaps the next): at least min_calls calls and min_seconds of wall time, at most max_calls."""
    times, start = [], time.perf_counter()
    while len(times) < max_calls:
        times.append(elapsed_ms(fn, 1, cuda))
        if len(times) >= min_calls and time.perf_counter() - start >= min_seconds:
            break
    return statistics.median(times)


def warm_up(fn: Callable, device: torch.device | None = None):
    """Two calls of fn off the default stream, as graph capture wants (compiles Triton kernels, creates
    library handles), then a device sync."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)


def capture_graph(fn: Callable, device: torch.device | None = None, warm: bool = True) -> Callable:
    """fn() captured once in a CUDA graph (after `warm_up` unless warm=False) and replayed once; returns
    the graph's replay. Raises where fn cannot be captured (a host sync inside, say)."""
    if warm:
        warm_up(fn, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    graph.replay()
    torch.cuda.synchronize(device)
    return graph.replay


def prepare(fn: Callable, device: torch.device, capture: bool) -> tuple[Callable, str, str]:
    """(callable to time, mode 'graph' or 'eager', note). Warms fn up (compiles Triton kernels, creates
    library handles) and, on CUDA when `capture`, captures one call in a CUDA graph; a method that
    cannot be captured (a host sync inside, say) is timed as called and the note says why."""
    if device.type != "cuda":
        fn()
        return fn, "eager", ""
    warm_up(fn, device)
    if not capture:
        return fn, "eager", ""
    try:
        return capture_graph(fn, device, warm=False), "graph", ""
    except Exception as err:  # noqa: BLE001  not capturable: time it as called
        torch.cuda.synchronize(device)
        return fn, "eager", f"graph capture failed ({type(err).__name__}: {str(err).splitlines()[0][:100]})"


# ------------------------------------------------------------------------------------ ceilings
@dataclass
class Ceilings:
    """The device's copy bandwidth (bytes read + written) and dense matmul rate, sampled during the run."""
    device: torch.device
    dtype: torch.dtype
    copy_ms: list = field(default_factory=list)
    matmul_ms: list = field(default_factory=list)

    def __post_init__(self):
        gpu = self.device.type == "cuda"
        n_bytes = (1 << 30) if gpu else (64 << 20)       # far larger than any cache
        self.src = torch.empty(n_bytes // 2, dtype=torch.float16, device=self.device)
        self.src.normal_() if gpu else self.src.fill_(1.0)   # a CPU's normal_ is slow; a copy cares not
        self.dst = torch.empty_like(self.src)
        self.copy_bytes = 2 * n_bytes                     # read + write
        n = 8192 if gpu else 768                          # 8192^3: a cuBLAS GEMM near peak on Hopper
        self.a = torch.randn(n, n, device=self.device).to(self.dtype)
        self.b = torch.randn(n, n, device=self.device).to(self.dtype)
        self.c = torch.empty(n, n, device=self.device, dtype=self.dtype)
        self.matmul_flops = 2 * n ** 3
        self._copy = lambda: self.dst.copy_(self.src)
        self._matmul = lambda: torch.mm(self.a, self.b, out=self.c)
        self._copy()
        self._matmul()

    def sample(self, repeats: int = 1, inner: int = 3):
        """`repeats` samples of each ceiling, each the mean of `inner` back-to-back calls."""
        cuda = self.device.type == "cuda"
        for _ in range(repeats):
            self.copy_ms.append(elapsed_ms(self._copy, inner, cuda))
            self.matmul_ms.append(elapsed_ms(self._matmul, inner, cuda))

    def rates(self, since: int = 0) -> tuple[float, float]:
        """(copy GB/s, matmul TFLOP/s): medians of the samples from index `since` on (0: all of them)."""
        return (self.copy_bytes / statistics.median(self.copy_ms[since:]) / 1e6,
                self.matmul_flops / statistics.median(self.matmul_ms[since:]) / 1e9)

    @property
    def bandwidth_gbs(self) -> float:
        return self.rates()[0]

    @property
    def matmul_tflops(self) -> float:
        return self.rates()[1]

    def as_dict(self) -> dict:
        return dict(bandwidth_gbs=self.bandwidth_gbs, matmul_tflops=self.matmul_tflops,
                    copy_bytes=self.copy_bytes, matmul_flops=self.matmul_flops,
                    copy_ms_samples=self.copy_ms, matmul_ms_samples=self.matmul_ms)

    def release(self):
        del self.src, self.dst, self.a, self.b, self.c


def measure_ceilings(device="cuda", dtype: torch.dtype = torch.bfloat16,
                     repeats: int = 20) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, dense `dtype` matmul rate in FLOP/s): medians of
    `repeats` samples of `Ceilings`, whose buffers are freed before it returns."""
    ceil = Ceilings(torch.device(device), dtype)
    ceil.sample(repeats)
    bandwidth_gbs, matmul_tflops = ceil.rates()
    ceil.release()
    if ceil.device.type == "cuda":
        torch.cuda.empty_cache()
    return bandwidth_gbs * 1e9, matmul_tflops * 1e12
