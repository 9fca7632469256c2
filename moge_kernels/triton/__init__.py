"""The `triton` backend: one module per kernel family; each registers the ops it implements.

On CUDA tensors always; on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter, used by CI)."""
import importlib

import triton  # noqa: F401  missing Triton marks the backend unavailable (moge_kernels/__init__.py)

from .. import options

DEVICES = ("cuda", "cpu") if options.TRITON_INTERPRET else ("cuda",)
KERNEL_MODULES = ("dispatch", "permute", "combine", "grouped_gemm", "backward", "fp8_gemm")

for _name in KERNEL_MODULES:
    try:
        importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{_name}":   # only a module not written yet is skipped silently
            raise
