"""The `cuda` backend: C++/CUDA kernels of the `moge_kernels._cuda_C` extension (csrc/cuda/).

Built only where setup.py found a CUDA toolkit and a CUDA build of torch."""
import importlib.util

import torch

from . import _C  # noqa: F401  defines the moge_C schemas the CUDA kernels register against
from .registry import OPS, register_kernel

if importlib.util.find_spec(f"{__package__}._cuda_C") is None:
    raise ImportError("moge_kernels._cuda_C was not built (no CUDA toolkit or a CPU-only torch at "
                      "install time, or MOGE_BUILD_CUDA=0)")
from . import _cuda_C  # noqa: E402,F401

for _op in OPS:
    if hasattr(torch.ops.moge_C, _op) and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"moge_C::{_op}", "CUDA"):
        register_kernel("cuda", _op, getattr(torch.ops.moge_C, _op), devices=("cuda",))


def wgmma_built() -> bool:
    """Whether the extension holds the Hopper wgmma grouped GEMM (built with 9.0a in TORCH_CUDA_ARCH_LIST);
    on an sm_90 device it then runs every bf16/fp16 grouped GEMM of >= 64 rows per expert on average."""
    import ctypes
    return bool(ctypes.CDLL(_cuda_C.__file__).moge_cuda_wgmma_built())
