"""Backend registry: which implementation runs each `moge` op on each device.

Every op has one schema (`moge_kernels/ops.py`) and, per device type, one registered kernel that looks
the implementation up here at call time. Backends:

    triton     Triton kernels; the fast path on CUDA (on CPU tensors only under TRITON_INTERPRET=1)
    cuda       C++/CUDA kernels from the `moge_kernels._cuda_C` extension
    cpu        C++ kernels from the `moge_kernels._C` extension (at::parallel_for)
    ascend     torch_npu / CANN operators on Ascend NPUs
    reference  eager PyTorch (`moge_kernels.reference`), every device

Selection: `set_backend(name)`, the `use_backend(name)` context manager, or the env var MOGE_BACKEND.
"auto" (the default) takes, per device, the first backend in AUTO_ORDER that implements the op. A named
backend is used for every (op, device) it implements; anything it does not implement falls back to auto,
so MOGE_BACKEND=triton still runs CPU tensors on the C++ CPU kernels. `resolve(op, device_type)` tells
which one a call will take; `backends()` reports what is available and, if not, why.
"""
from __future__ import annotations

import contextlib
from typing import Callable

BACKENDS = ("triton", "cuda", "cpu", "ascend", "reference")
# Every op name a backend may implement; `ops.define_op` adds each op it defines (the four forward ops,
# then autograd.py's backward primitives), so a backend module never lists them itself.
OPS: list[str] = []
# Per device type, best first. "reference" last everywhere: the surface is complete on every device.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
    "npu": ("ascend", "reference"),
}

_kernels: dict[tuple[str, str], Callable] = {}          # (backend, op) -> fn(*op_args)
_devices: dict[str, set[str]] = {"reference": {"*"}}     # backend -> device types it runs on
_unavailable: dict[str, str] = {}                        # backend -> why it is off
_takes_packed: set[tuple[str, str]] = set()              # (backend, op) whose fn takes packed weights
_selected = "auto"
_resolved: dict[tuple[str, str], tuple[str, Callable]] = {}   # resolve()'s cache; cleared on any change


def declare_op(op: str) -> None:
    if op not in OPS:
        OPS.append(op)


def register_kernel(backend: str, op: str, fn: Callable, devices: tuple[str, ...],
                    packed_weights: bool = False) -> None:
    """Called by a backend module at import: `fn` takes the op's arguments positionally, already checked.
    packed_weights: `fn` takes expert weights packed k-block-major (moge_kernels.packing) as they are;
    other kernels get them unpacked to [E, N, K]."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    _kernels[(backend, op)] = fn
    if packed_weights:
        _takes_packed.add((backend, op))
    else:
        _takes_packed.discard((backend, op))
    _resolved.clear()
    _devices.setdefault(backend, set()).update(devices)
    _unavailable.pop(backend, None)


def takes_packed(backend: str, op: str) -> bool:
    return (backend, op) in _takes_packed


def mark_unavailable(backend: str, why: str) -> None:
    if not any(b == backend for b, _ in _kernels):
        _unavailable[backend] = why


def _runs_on(backend: str, device_type: str) -> bool:
    devices = _devices.get(backend, set())
    return "*" in devices or device_type in devices


def resolve(op: str, device_type: str) -> tuple[str, Callable]:
    """(backend name, kernel) that `torch.ops.moge.<op>` uses for tensors on `device_type` right now."""
    # Cached: this runs on every op call, and decode-sized calls are bound by host time.
    key = (op, device_type)
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolved[key] = _resolve_uncached(op, device_type)
    return hit


def _resolve_uncached(op: str, device_type: str) -> tuple[str, Callable]:
    order = AUTO_ORDER.get(device_type, ("reference",))
    if _selected != "auto":
        order = (_selected,) + order
    for backend in order:
        fn = _kernels.get((backend, op))
        if fn is not None and _runs_on(backend, device_type):
            return backend, fn
    return "reference", _kernels[("reference", op)]


def set_backend(name: str) -> None:
    """Select a backend for every op it implements ("auto" restores the default order)."""
    global _selected
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name != "auto" and not any(b == name for b, _ in _kernels):
        raise RuntimeError(f"backend {name!r} is not available: {_unavailable.get(name, 'not built')}")
    _selected = name
    _resolved.clear()


def get_backend() -> str:
    return _selected


@contextlib.contextmanager
def use_backend(name: str):
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backends() -> dict[str, dict]:
    """{backend: {"available", "reason", "ops", "devices"}} for every known backend."""
    report = {}
    for backend in BACKENDS:
        ops = [op for op in OPS if (backend, op) in _kernels]
        report[backend] = {
            "available": bool(ops),
            "reason": "" if ops else _unavailable.get(backend, "not built"),
            "ops": ops,
            "devices": sorted(_devices.get(backend, ())),
        }
    return report


def select_from_env() -> None:
    from .options import initial_backend
    name = initial_backend()
    try:
        set_backend(name)
    except RuntimeError as err:   # an env var naming a missing backend must not break `import`
        import warnings
        warnings.warn(f"MOGE_BACKEND={name}: {err}; using 'auto'", stacklevel=3)
