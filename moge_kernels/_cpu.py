"""The `cpu` backend: C++ kernels of the `moge_kernels._C` extension (csrc/cpu/)."""
import torch

from . import _C  # noqa: F401  loading the library runs its TORCH_LIBRARY(moge_C) registrations
from .registry import OPS, register_kernel

for _op in OPS:
    if hasattr(torch.ops.moge_C, _op):   # the C++ library implements a subset of the registry's ops
        register_kernel("cpu", _op, getattr(torch.ops.moge_C, _op), devices=("cpu",))
