"""The `grouped_mm` backend: the backward GEMMs (grouped_gemm_dgrad, grouped_gemm_wgrad) on
`torch._grouped_mm` (CUTLASS), which takes both layouts without a transposed copy.

It runs a call only where CUTLASS's grouped path does (`supports`): a CUDA device of compute capability 9
or 10 (sm90/sm100), bf16 operands (the registry's dtype capability), and 16-byte rows: N and Kd multiples
of 8 and 16-byte aligned bases (a non-contiguous operand is copied, which aligns it). Elsewhere the next
backend (triton, then cuda, then the reference) runs. bwd_gemm="triton" (moge_kernels.options,
MOGE_BWD_GEMM) takes this backend out of the order. Should torch._grouped_mm still refuse a call (a
layout rule not foreseen here), that call runs on the next backend, with a warning; outside CUDA-graph
capture only (there the error is the capture's).
"""
import warnings

import torch

from . import registry

if not hasattr(torch, "_grouped_mm"):
    raise ImportError(f"torch {torch.__version__} has no torch._grouped_mm")

OPS = ("grouped_gemm_dgrad", "grouped_gemm_wgrad")
_arch_ok: dict[int, bool] = {}     # device index -> sm90/sm100: read once per device, not per call
refused = 0                         # calls torch._grouped_mm refused (run on the next backend instead)


def arch_supported(major: int) -> bool:
    return major in (9, 10)


def _device_ok(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _arch_ok.get(index)
    if ok is None:
        ok = _arch_ok[index] = arch_supported(torch.cuda.get_device_capability(index)[0])
    return ok


def _aligned(t: torch.Tensor) -> bool:
    return not t.is_contiguous() or t.data_ptr() % 16 == 0


def supports(args) -> bool:
    """(grad_y [M, N], w [E, N, Kd] or x [M, Kd], expert_offsets), bf16 on CUDA: 16-byte rows and bases,
    sm90/sm100."""
    grad_y, other, _ = args
    return grad_y.shape[1] % 8 == 0 and other.shape[-1] % 8 == 0 and _aligned(grad_y) and \
        _aligned(other) and _device_ok(grad_y.device)


def grouped_mm_dgrad(grad_y, w, expert_offsets):
    """grad_x = rows of e of grad_y @ w[e] through torch._grouped_mm (2D x 3D, w row-major)."""
    if grad_y.shape[0] == 0:
        return grad_y.new_empty(0, w.shape[2])
    return torch._grouped_mm(grad_y.contiguous(), w.contiguous(), offs=expert_offsets.contiguous()[1:])


def grouped_mm_wgrad(grad_y, x, expert_offsets):
    """grad_w[e] = grad_y_e^T x_e through torch._grouped_mm (2D x 2D, ragged reduction dimension)."""
    if grad_y.shape[0] == 0:     # a zero-length reduction has no valid stride for _grouped_mm
        return x.new_zeros(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])
    return torch._grouped_mm(grad_y.contiguous().t(), x.contiguous(), offs=expert_offsets.contiguous()[1:])


try:   # loaded after the triton backend (moge_kernels/__init__.py)
    from .triton.grouped_gemm import zero_rows_past_experts
except ImportError:   # no Triton: a masked fill over the whole tensor (no host sync either)
    def zero_rows_past_experts(y, expert_offsets):
        rows = torch.arange(y.shape[0], device=y.device)
        return y.masked_fill_((rows >= expert_offsets[-1])[:, None], 0)


def _guarded(op, gemm):
    def fn(*args):
        global refused
        try:
            out = gemm(*args)
        except RuntimeError as err:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            refused += 1
            nxt = registry.fallback(op, args, "grouped_mm")
            warnings.warn(f"torch._grouped_mm refused {op} ({err}); this call runs on {nxt.backend}",
                          stacklevel=2)
            return nxt.fn(*args)
        return zero_rows_past_experts(out, args[2]) if op == "grouped_gemm_dgrad" else out
    fn.__name__ = gemm.__name__
    return fn


for _op, _gemm in zip(OPS, (grouped_mm_dgrad, grouped_mm_wgrad)):
    registry.register_kernel("grouped_mm", _op, _guarded(_op, _gemm), devices=("cuda",),
                             dtypes=(torch.bfloat16,), supports=supports,
                             variant=lambda args: "torch._grouped_mm (CUTLASS)")
