"""What is timed: for each op of a problem, one no-argument callable per method.

Methods: every moge backend available on the device (`triton`, `cuda`, `cpu`, `ascend`), each called
through the public `moge_kernels` API with that backend selected; `triton_packed`, the triton backend on
expert weights packed for serving (moge_kernels.packing; CUDA, mlp and layer, where 64 divides H and I);
and the baselines `eager` (the eager reference, `moge_kernels.reference`), `grouped_mm` and `loop`
(moge_kernels/bench/baselines.py). The
self-check, the CLI's timing table and the pytest-benchmark tests in bench/ all build their callables
here, so what is checked is what is timed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import moge_kernels as mk

from .. import packing
from .. import reference as R
from . import baselines as B
from .problems import OP_NAMES, Problem

BASELINES = ("eager", "grouped_mm", "loop")
PACKED = "triton_packed"        # the triton backend on packed expert weights
# Triton on CPU tensors runs through its interpreter (TRITON_INTERPRET=1): a correctness tool, not a
# speed, so it is timed on CPU only when asked for by name.
_CPU_OPT_IN = ("triton",)


@dataclass
class Method:
    name: str            # backend name or baseline name
    op: str              # dispatch / gemm / mlp / combine / layer
    fn: Callable         # fn() -> the op's output
    capturable: bool     # no host sync inside: may be captured in a CUDA graph
    kind: str            # "backend" or "baseline"
    served_by: str = ""  # for a backend: which backend serves each moge op of the row (fallbacks show)


def available_backends(device: torch.device, requested=None) -> list[str]:
    """Backends that have a kernel for `device` (the reference excluded: it is the `eager` baseline; so is
    the grouped_mm backend, which has only the backward GEMMs: the `grouped_mm` baseline times it)."""
    timed_ops = {name for names in OP_NAMES.values() for name in names}
    out = []
    for backend, info in mk.backends().items():
        if backend == "reference" or not info["available"] or not timed_ops & set(info["ops"]):
            continue
        if device.type not in info["devices"] and "*" not in info["devices"]:
            continue
        if requested is None and device.type == "cpu" and backend in _CPU_OPT_IN:
            continue
        if requested is not None and backend not in requested:
            continue
        out.append(backend)
    return out


def available_baselines(device: torch.device, dtype, requested=None) -> tuple[list[str], dict]:
    """(baselines that run here, {baseline: why not} for the others)."""
    out, skipped = [], {}
    for name in BASELINES:
        if requested is not None and name not in requested:
            continue
        why = B.grouped_mm_support(device.type, device.index, dtype) if name == "grouped_mm" else None
        if why:
            skipped[name] = why
        else:
            out.append(name)
    return out, skipped


def served_by(backend: str, op: str, device_type: str) -> dict:
    """{moge op: backend that serves it} when `backend` is selected (a backend without a kernel for an
    op falls back to the auto order, see moge_kernels/registry.py)."""
    with mk.use_backend(backend):
        return {name: mk.resolve(name, device_type)[0] for name in OP_NAMES[op]}


def _selected(backend: str, call: Callable) -> Callable:
    def run():
        with mk.use_backend(backend):
            return call()
    return run


def _api(module) -> dict:
    return dict(dispatch=module.grouped_dispatch, permute=module.grouped_permute, gemm=module.grouped_gemm,
                mlp=module.grouped_mlp,
                combine=module.grouped_combine, layer=module.moge_forward)


# method -> ({op: function with the op's signature}, capturable)
_BASELINE_FNS = {
    "eager": (_api(R), False),
    "grouped_mm": (dict(dispatch=B.torch_dispatch, permute=B.torch_permute, gemm=B.grouped_mm_gemm, mlp=B.grouped_mm_mlp,
                        combine=B.torch_combine, layer=B.torch_layer), True),
    "loop": (dict(mlp=B.loop_mlp), False),
}


def _bind(p: Problem, op: str, fn: Callable, weights=None) -> Callable:
    """fn applied to problem p's inputs of `op` (expert weights `weights` instead of p's when given), as
    a no-argument callable."""
    t, G, k_g = p.tensors, p.shape["G"], p.shape["k_g"]
    w_gate_up, w_down = weights or (t["w_gate_up"], t["w_down"])
    args = {
        "dispatch": (t["hidden"], t["logits"], G, k_g),
        "permute": (t["hidden"], t["topk_ids"], p.shape["E"]),
        "gemm": (t["permuted"], w_gate_up, t["offsets"]),
        "mlp": (t["permuted"], w_gate_up, w_down, t["offsets"]),
        "combine": (t["expert_out"], t["weights"], t["row_index"]),
        "layer": (t["hidden"], t["logits"], w_gate_up, w_down, G, k_g),
    }[op]
    return lambda: fn(*args)


def _packed_weights(p: Problem):
    """p's expert weights packed (made once per problem), or None where the block does not divide H, I."""
    t = p.tensors
    if "packed_weights" not in t:
        fits = p.shape["H"] % packing.BLOCK == 0 and p.shape["I"] % packing.BLOCK == 0
        t["packed_weights"] = (packing.pack_expert_weights(t["w_gate_up"]),
                               packing.pack_expert_weights(t["w_down"])) if fits else None
    return t["packed_weights"]


def build_methods(p: Problem, ops, backends, baselines) -> list[Method]:
    """Every (op, method) pair to run on problem p, ops outermost."""
    moge_api = _api(mk)
    methods = []
    for op in ops:
        for b in backends:
            serving = served_by(b, op, p.device.type)
            if b not in serving.values():
                continue                      # this backend has no kernel for the op: nothing to time
            label = "" if set(serving.values()) == {b} else \
                " ".join(f"{name.replace('grouped_', '')}={s}" for name, s in serving.items())
            methods.append(Method(b, op, _selected(b, _bind(p, op, moge_api[op])), capturable=True,
                                  kind="backend", served_by=label))
        if "triton" in backends and op in ("mlp", "layer") and p.device.type == "cuda" \
                and _packed_weights(p) is not None:
            packed_call = _bind(p, op, moge_api[op], _packed_weights(p))
            methods.append(Method(PACKED, op, _selected("triton", packed_call), capturable=True,
                                  kind="backend", served_by="packed weights"))
        for name in baselines:
            fns, capturable = _BASELINE_FNS[name]
            if op in fns:
                methods.append(Method(name, op, _bind(p, op, fns[op]), capturable, kind="baseline"))
    return methods


def reference_call(p: Problem, op: str):
    """The eager reference's output of `op` on problem p."""
    return _bind(p, op, _BASELINE_FNS["eager"][0][op])()
