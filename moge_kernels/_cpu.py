"""The `cpu` backend: C++ kernels of the `moge_kernels._C` extension (csrc/cpu/)."""
import torch

from . import _C  # noqa: F401  loading the library runs its TORCH_LIBRARY(moge_C) registrations
from .registry import OPS, register_kernel

# A library built from older sources (score_func as a str) would misread the int every kernel now gets.
if str(torch.ops.moge_C.grouped_dispatch.default._schema.arguments[6].type) != "int":
    raise ImportError("moge_kernels._C was built from older sources (grouped_dispatch takes score_func as "
                      "a str): rebuild it (python3 setup.py build_ext --inplace)")

for _op in OPS:
    if hasattr(torch.ops.moge_C, _op):   # the C++ library implements a subset of the registry's ops
        register_kernel("cpu", _op, getattr(torch.ops.moge_C, _op), devices=("cpu",))
