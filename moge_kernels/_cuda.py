"""The `cuda` backend: C++/CUDA kernels of the `moge_kernels._cuda_C` extension (csrc/cuda/).

Built only where setup.py found a CUDA toolkit and a CUDA build of torch."""
import importlib.util

import torch

from . import _C  # noqa: F401  defines the moge_C schemas the CUDA kernels register against
from . import options
from .ops import supports_score_funcs
from .reference import ScoreFunc
from .registry import OPS, register_kernel

# The score functions csrc/cuda/dispatch.cu has a branch for; dispatch with another runs on the next backend.
SCORE_FUNCS = (ScoreFunc.SOFTMAX, ScoreFunc.SIGMOID)

if importlib.util.find_spec(f"{__package__}._cuda_C") is None:
    raise ImportError("moge_kernels._cuda_C was not built (no CUDA toolkit or a CPU-only torch at "
                      "install time, or MOGE_BUILD_CUDA=0)")
from . import _cuda_C  # noqa: E402,F401

for _op in OPS:
    if hasattr(torch.ops.moge_C, _op) and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"moge_C::{_op}", "CUDA"):
        register_kernel("cuda", _op, getattr(torch.ops.moge_C, _op), devices=("cuda",),
                        supports=supports_score_funcs(*SCORE_FUNCS) if _op == "grouped_dispatch" else None)


def gemm_tile_args(tile: str) -> tuple[int, int]:
    """cuda_gemm_tile (options.CUDA_GEMM_TILES) as moge_cuda_set_gemm_tile's (variant, width): variant 0
    wgmma where it runs else "big", 1 "big" (csrc/cuda/kernels.h's BigVariant); width 0 (by I), 96 or 128."""
    if tile == "big":
        return 1, 0
    width = tile.removeprefix("wgmma") if tile != "auto" else ""
    return 0, int(width) if width else 0


def _set_gemm_tile(tile: str) -> None:
    import ctypes
    if ctypes.CDLL(_cuda_C.__file__).moge_cuda_set_gemm_tile(*gemm_tile_args(tile)) != 0:
        raise RuntimeError(f"moge_kernels._cuda_C rejected cuda_gemm_tile={tile!r}")


_set_gemm_tile(options.current.cuda_gemm_tile)
options.on_change("cuda_gemm_tile", _set_gemm_tile)


def wgmma_built() -> bool:
    """Whether the extension holds the Hopper wgmma grouped GEMM (built with 9.0a in TORCH_CUDA_ARCH_LIST);
    on an sm_90 device it then runs every bf16/fp16 grouped GEMM of >= 64 rows per expert on average."""
    import ctypes
    return bool(ctypes.CDLL(_cuda_C.__file__).moge_cuda_wgmma_built())
