"""`python -m moge_kernels.bench` / `moge-bench`: self-check and time every moge op and the whole layer.

For each shape (Pangu Pro MoE H=5120 I=1344 E=64 G=8 k_g=1; qwen_like E=128 H=2048 I=768; pangu_tp8
I=336; small ones on CPU) and each T, every available backend (triton, cuda, cpu, ...) is timed per op
(dispatch, mlp, combine; gemm on request) and for the whole forward layer, beside three baselines built
from public PyTorch: the eager reference (moge_kernels.reference), a torch._grouped_mm pipeline and a
per-expert eager loop. First every timed method is checked against the reference (Pangu width, small T).
The same run measures the device's copy bandwidth and dense matmul rate; each row gets ms, TFLOP/s,
GB/s, speed-up over eager and over the _grouped_mm pipeline, and (on a GPU) the fraction of the physical
floor max(FLOPs / matmul rate, fewest bytes / bandwidth). --out DIR writes results.json (every row, the device,
torch/triton versions, git commit) and PNG plots. Without a GPU it times the C++ CPU backend against
eager PyTorch on small shapes, after the self-check at the full Pangu width.

    python -m moge_kernels.bench                         # GPU: 3 shapes x T in {1..16384}; CPU: small
    python -m moge_kernels.bench --quick --out results   # Pangu only, T in {1, 128, 4096}
    python -m moge_kernels.bench --shapes pangu --tokens 4096 --ops mlp,gemm --baselines grouped_mm
    python -m moge_kernels.bench --plot-only results/results.json
"""
from .cli import main, parse_args, time_sweep  # noqa: F401
from .methods import Method, available_backends, available_baselines, build_methods  # noqa: F401
from .problems import SHAPES, Problem, WeightCache, make_problem, work  # noqa: F401

__all__ = ["main", "parse_args", "time_sweep", "Method", "available_backends", "available_baselines",
           "build_methods", "SHAPES", "Problem", "WeightCache", "make_problem", "work"]
