"""The `cpu` backend: C++ kernels of the `moge_kernels._C` extension (csrc/cpu/)."""
import torch

from . import _C  # noqa: F401  loading the library runs its TORCH_LIBRARY(moge_C) registrations
from .ops import supports_score_funcs
from .reference import ScoreFunc
from .registry import OPS, register_kernel

# The score functions csrc/cpu/dispatch.cpp has a branch for; dispatch with another runs on the reference.
SCORE_FUNCS = (ScoreFunc.SOFTMAX, ScoreFunc.SIGMOID)

# A library built from older sources (score_func as a str, no expert_mask) would misread the arguments
# every kernel now gets.
_dispatch_args = torch.ops.moge_C.grouped_dispatch.default._schema.arguments
if str(_dispatch_args[6].type) != "int" or [a.name for a in _dispatch_args[7:]] != ["expert_mask"]:
    raise ImportError("moge_kernels._C was built from older sources (grouped_dispatch without an int "
                      "score_func and an expert_mask): rebuild it (python3 setup.py build_ext --inplace)")

for _op in OPS:
    if hasattr(torch.ops.moge_C, _op):   # the C++ library implements a subset of the registry's ops
        register_kernel("cpu", _op, getattr(torch.ops.moge_C, _op), devices=("cpu",),
                        supports=supports_score_funcs(*SCORE_FUNCS) if _op == "grouped_dispatch" else None)
