"""moge_kernels: fast Mixture of Grouped Experts (MoGE) ops for PyTorch, under `torch.ops.moge`."""
from __future__ import annotations

import importlib

from . import expert_subsets, options, reference, registry
from ._version import __version__
from .expert_subsets import compact_experts, voted_expert_mask
from .ops import (explain, grouped_combine, grouped_dispatch, grouped_gemm, grouped_mlp, grouped_permute,
                  moge_forward, swiglu)
from .fp8 import (QuantizedActivations, QuantizedExpertWeights, grouped_dispatch_fp8, grouped_permute_fp8,
                  quantize_expert_weights)
from .packing import pack_expert_weights
from .options import get_options, set_options, use_options
from .registry import backends, get_backend, resolve, set_backend, use_backend


def _load_backend(backend: str, module: str) -> None:
    """Import a backend module (it registers its kernels); record why when it cannot load."""
    try:
        importlib.import_module(module, __name__)
    except ImportError as err:
        registry.mark_unavailable(backend, str(err))
    except Exception as err:  # a broken optional backend must not break `import moge_kernels`
        registry.mark_unavailable(backend, f"{module} failed to import: {type(err).__name__}: {err}")


_load_backend("cpu", "._cpu")
_load_backend("cuda", "._cuda")
_load_backend("triton", ".triton")
_load_backend("grouped_mm", "._grouped_mm")
_load_backend("ascend", ".ascend")
registry.select_from_env()

from . import autograd, layer, metrics, parallel  # noqa: E402  (autograd: every op's backward)
from .layer import MoGELayer  # noqa: E402

__all__ = [
    "__version__", "grouped_dispatch", "grouped_permute", "grouped_gemm", "grouped_mlp", "grouped_combine",
    "moge_forward", "pack_expert_weights", "swiglu", "explain",
    "backends", "set_backend", "get_backend", "use_backend", "resolve", "reference", "registry",
    "options", "set_options", "use_options", "get_options",
    "MoGELayer", "autograd", "layer", "metrics", "parallel",
    "expert_subsets", "voted_expert_mask", "compact_experts",
    "quantize_expert_weights", "QuantizedExpertWeights", "QuantizedActivations", "grouped_permute_fp8",
    "grouped_dispatch_fp8",
]
