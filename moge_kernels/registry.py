"""Backend registry: which implementation runs each `moge` op call, and why.

Every op has one schema (`moge_kernels/ops.py`) and, per device type, one registered kernel that checks
the arguments and asks `select` here which backend kernel runs them. Backends:

    triton      Triton kernels; the fast path on CUDA (on CPU tensors only under TRITON_INTERPRET=1)
    grouped_mm  torch._grouped_mm (CUTLASS) for the backward GEMMs on sm90/sm100, bf16, 16-byte rows
    cuda        C++/CUDA kernels from the `moge_kernels._cuda_C` extension
    cpu         C++ kernels from the `moge_kernels._C` extension (at::parallel_for)
    ascend      torch_npu / CANN operators on Ascend NPUs
    reference   eager PyTorch (`moge_kernels.reference`), every device and dtype

A backend module registers each kernel with what it supports: the device types, the dtypes of the op's
first tensor argument (default fp32/fp16/bf16; the checks allow float64 in the other float arguments
only when the first one is float64, so this one dtype decides), and optionally `supports(args) -> bool`
for what only the arguments tell (grouped_mm's alignment and architecture rules; a dispatch kernel's
score functions). A call runs the first kernel, in backend order, whose devices and dtype match and
whose predicate (if any) holds. Order: the selected backend (`set_backend(name)`, `use_backend(name)`,
MOGE_BACKEND) first, then AUTO_ORDER for the device; "reference" last, so every call has a kernel
(float64 on CUDA tensors runs there: no GPU backend has float64 kernels). `bwd_gemm="triton"`
(moge_kernels.options, MOGE_BWD_GEMM) takes grouped_mm out of the order.

Per call: one dict lookup of the candidate list of (op, device type, dtype), cached until a kernel is
registered or the selection changes; predicates run only for kernels that have one (the backward GEMMs
and dispatch). `explain(op, *args)` (moge_kernels.ops) says which backend and variant serve a call;
`backends()` reports what is available and, if not, why.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch

from . import options

BACKENDS = ("triton", "grouped_mm", "cuda", "cpu", "ascend", "reference")
# Every op name a backend may implement; `ops.define_op` adds each op it defines.
OPS: list[str] = []
# Per device type, best first. "reference" last everywhere: the surface is complete on every device.
AUTO_ORDER = {
    "cuda": ("grouped_mm", "triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
    "npu": ("ascend", "reference"),
}
# What a kernel takes as its first tensor argument's dtype unless it registers other dtypes.
DEFAULT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


class Kernel(NamedTuple):
    backend: str
    fn: Callable                          # fn(*op_args), arguments already checked
    devices: frozenset                    # device types; "*" = every device
    dtypes: Optional[frozenset]           # dtypes of the first tensor argument; None = every dtype
    supports: Optional[Callable]          # supports(args) -> bool, or None: every call that matches
    packed_weights: bool                  # takes packed expert weights (moge_kernels.packing) as they are
    variant: Optional[Callable]           # variant(args) -> str for explain(), or None
    bias: bool                            # grouped_gemm: takes the bias (else ops adds it after the kernel)

    def matches(self, device_type: str, dtype) -> bool:
        return ("*" in self.devices or device_type in self.devices) and \
            (self.dtypes is None or dtype is None or dtype in self.dtypes)


_kernels: dict[tuple[str, str], Kernel] = {}            # (backend, op) -> its kernel
_unavailable: dict[str, str] = {}                        # backend -> why it is off
_selected = "auto"
_candidates: dict[tuple, tuple[Kernel, ...]] = {}        # (op, device type, dtype) -> order; cache


def declare_op(op: str) -> None:
    if op not in OPS:
        OPS.append(op)


def register_kernel(backend: str, op: str, fn: Callable, devices: tuple[str, ...],
                    packed_weights: bool = False, dtypes=DEFAULT_DTYPES,
                    supports: Optional[Callable] = None, variant: Optional[Callable] = None,
                    bias: bool = False) -> None:
    """Called by a backend module at import: `fn` takes the op's arguments positionally, already checked.

    devices: device types ("*": all). dtypes: dtypes of the first tensor argument (None: all).
    supports(args): whether this kernel runs these arguments (evaluated per call: keep it cheap).
    packed_weights: `fn` takes expert weights packed k-block-major (moge_kernels.packing) as they are;
    other kernels get them unpacked to [E, N, K]. variant(args): which variant runs, for explain().
    bias (grouped_gemm only): `fn` takes the op's bias argument; other kernels are called without it and
    the bias is added to their output (reference.add_expert_bias)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    _kernels[(backend, op)] = Kernel(backend, fn, frozenset(devices),
                                     None if dtypes is None else frozenset(dtypes), supports,
                                     packed_weights, variant, bias)
    _unavailable.pop(backend, None)
    _candidates.clear()


def kernel(backend: str, op: str) -> Optional[Kernel]:
    return _kernels.get((backend, op))


def mark_unavailable(backend: str, why: str) -> None:
    if not any(b == backend for b, _ in _kernels):
        _unavailable[backend] = why


def _order(device_type: str) -> tuple[str, ...]:
    order = AUTO_ORDER.get(device_type, ("reference",))
    if _selected != "auto":
        order = (_selected,) + order
    if options.current.bwd_gemm == "triton":
        order = tuple(b for b in order if b != "grouped_mm")
    return order


def candidates(op: str, device_type: str, dtype) -> tuple[Kernel, ...]:
    """The kernels a call of `op` on (device_type, dtype) tries, in order; it ends at the first one
    without a predicate (always reached: the reference has none). dtype None: any dtype."""
    key = (op, device_type, dtype)
    found = _candidates.get(key)
    if found is None:
        found, seen = [], set()
        for backend in _order(device_type) + ("reference",):
            k = _kernels.get((backend, op))
            if k is None or backend in seen or not k.matches(device_type, dtype):
                continue
            seen.add(backend)
            found.append(k)
            if k.supports is None:
                break
        found = _candidates[key] = tuple(found)
    return found


def select(op: str, args) -> Kernel:
    """The kernel that runs `op` on these (checked) arguments: the hot path of every op call."""
    first = args[0]
    for k in _candidates.get((op, first.device.type, first.dtype)) or \
            candidates(op, first.device.type, first.dtype):
        if k.supports is None or k.supports(args):
            return k
    raise AssertionError(f"no kernel for {op}")   # unreachable: the reference takes every call


def fallback(op: str, args, failed: str) -> Kernel:
    """The kernel that would run these arguments without backend `failed` (a kernel refusing a call its
    predicate accepted falls through to the next one, for that call only)."""
    first = args[0]
    for k in candidates(op, first.device.type, first.dtype) + (_kernels[("reference", op)],):
        if k.backend != failed and (k.supports is None or k.supports(args)):
            return k
    raise AssertionError(f"no kernel for {op}")


def resolve(op: str, *args) -> tuple[str, Callable]:
    """(backend name, kernel) that `torch.ops.moge.<op>` runs for these arguments (positional, as the
    kernels get them: see ops.explain for the user-facing form). `resolve(op, device_type)` answers for
    the device alone, any dtype, assuming every predicate holds (grouped_mm for the backward GEMMs on
    CUDA, although a fp16 or misaligned call runs on triton): pass the arguments for the exact answer."""
    if len(args) == 1 and isinstance(args[0], str):
        k = candidates(op, args[0], None)[0]
        return k.backend, k.fn
    k = select(op, args)
    return k.backend, k.fn


def set_backend(name: str) -> None:
    """Select a backend for every op it implements ("auto" restores the default order)."""
    global _selected
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name != "auto" and not any(b == name for b, _ in _kernels):
        raise RuntimeError(f"backend {name!r} is not available: {_unavailable.get(name, 'not built')}")
    _selected = name
    _candidates.clear()


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
        devices = set().union(*(_kernels[(backend, op)].devices for op in ops))
        report[backend] = {
            "available": bool(ops),
            "reason": "" if ops else _unavailable.get(backend, "not built"),
            "ops": ops,
            "devices": sorted(devices),
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


options.on_change("bwd_gemm", lambda _: _candidates.clear())
