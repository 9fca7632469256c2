"""The `ascend` backend: the moge ops on Huawei Ascend NPUs (device type "npu"), through torch_npu and CANN.

torch_npu registers the NPU as PyTorch's PrivateUse1 dispatch key renamed to "npu"; once it is imported,
`torch.ops.moge.*` get an "npu" kernel that routes through the backend registry like cpu and cuda do.
Each op is served by one of:

    python  moge_kernels/ascend/adapter.py: torch_npu's fused MoE operators (the default)
    cpp     moge_kernels._ascend_C (csrc/ascend/): the same aclnn operators called from C++, built by
            setup.py where a CANN toolkit was found; used for an op whose operators the installed
            torch_npu lacks, or for every op it implements with option ascend_impl="cpp"
            (MOGE_ASCEND_IMPL=cpp)

An op neither can serve falls back to the reference on the NPU. Importing this package without
torch_npu raises ImportError, and moge_kernels marks the backend unavailable with the reason.
"""
import importlib
import importlib.util

if importlib.util.find_spec("torch_npu") is None:   # find_spec does not import: fast on every machine
    raise ImportError("torch_npu is not installed")
try:
    import torch_npu  # noqa: E402
except Exception as err:   # installed but unusable, e.g. the CANN libraries are not on the loader path
    raise ImportError(f"torch_npu is installed but failed to import ({type(err).__name__}: {err}); "
                      "install the CANN toolkit and source its set_env.sh") from err

import torch  # noqa: E402

from .. import ops, options, registry  # noqa: E402
from ..reference import ScoreFunc  # noqa: E402
from . import adapter  # noqa: E402

DEVICES = ("npu",)


def _cpp_ops() -> set:
    """Ops moge_kernels._ascend_C registered for the NPU (PrivateUse1); empty if it was not built."""
    package = __name__.rpartition(".")[0]   # moge_kernels
    if importlib.util.find_spec(f"{package}._ascend_C") is None:
        return set()
    importlib.import_module("._C", package)          # defines the moge_C schemas
    importlib.import_module("._ascend_C", package)   # registers their PrivateUse1 kernels
    return {op for op in adapter.REQUIRED_OPERATORS
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"moge_C::{op}", "PrivateUse1")}


adapter.bind(torch_npu)
# After `import torch_npu`: "npu" only names PrivateUse1 from then on. Once per process: a second import
# of this package (after a first one raised below) must not register the same kernels again.
if not torch._C._dispatch_has_kernel_for_dispatch_key("moge::grouped_dispatch", "PrivateUse1"):
    ops.register_device_type("npu")
_CPP_OPS = _cpp_ops()


def _register(prefer: str) -> None:
    """Register each op's implementation for option ascend_impl = `prefer` (again when it changes)."""
    global PLAN
    PLAN = adapter.plan(torch_npu, _CPP_OPS, prefer=prefer)
    for op, impl in PLAN.items():
        if impl == "python":
            registry.register_kernel("ascend", op, adapter.OPS[op], devices=DEVICES, bias=op == "grouped_gemm")
        elif impl == "cpp":   # csrc/ascend/ascend_ops.cpp's route() has the softmax and sigmoid branches
            supports = (ops.supports_score_funcs(ScoreFunc.SOFTMAX, ScoreFunc.SIGMOID)
                        if op == "grouped_dispatch" else None)
            registry.register_kernel("ascend", op, getattr(torch.ops.moge_C, op), devices=DEVICES,
                                     supports=supports)


_register(options.current.ascend_impl)

if not any(PLAN.values()):
    _missing = sorted({name for op in adapter.REQUIRED_OPERATORS
                       for name in adapter.missing_operators(torch_npu, op)})
    raise ImportError(f"torch_npu {getattr(torch_npu, '__version__', '?')} lacks {', '.join(_missing)} and "
                      "moge_kernels._ascend_C was not built (no CANN toolkit at install time)")
options.on_change("ascend_impl", _register)
