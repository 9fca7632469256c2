"""Triton `moge::grouped_combine`: weighted un-permute, out[t] = sum_k w[t,k] * expert_out[row_index[t,k]].

    expert_out    [T*K, H]  expert outputs in permuted (expert-sorted) order, row stride stride_er
    topk_weights  [T, K]    routing weights (any float dtype, read as fp32)
    row_index     [T, K]    int32 permuted row of slot (t, k) (from grouped_dispatch)
    shared_out    [T, H]    optional, added to the routed sum (the shared experts' output)
    out           [T, H]    in expert_out's dtype

One program per (token block, H block) gathers its tokens' K rows and accumulates in fp32 in slot order:
each output element is written by exactly one program, so there are no atomics and the result is
deterministic (and independent of the tiling).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import options
from ..registry import register_kernel
from . import DEVICES
from .launch import Kernel, gdc_launch_dependents, gdc_wait, pow2, use_pdl

_INTERPRET = options.TRITON_INTERPRET


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(
    expert_out_ptr,      # [T*K, H], row stride stride_er, unit column stride
    weights_ptr,         # [T, K] float, strides (stride_wt, stride_wk)
    row_index_ptr,       # [T, K] int32, strides (stride_rt, stride_rk)
    shared_ptr,          # [T, H] float, row stride stride_st; read only if HAS_SHARED
    out_ptr,             # [T, H] contiguous, expert_out's dtype
    T, H, stride_er, stride_wt, stride_wk, stride_rt, stride_rk, stride_st,
    K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)). USE_GDC: a dependent launch (programmatic dependent
    launch): it may start while the launch before it (the down GEMM) finishes and waits for it before
    reading anything; the next op's first launch may start once every program has begun."""
    if USE_GDC:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    mask = t_ok[:, None] & (h < H)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # Unrolled over K: the K gathers are independent, so all of them are in flight before the first add.
    for k in tl.static_range(K):
        row = tl.load(row_index_ptr + t * stride_rt + k * stride_rk, mask=t_ok, other=0)
        w = tl.load(weights_ptr + t * stride_wt + k * stride_wk, mask=t_ok, other=0.0).to(tl.float32)
        # int64 addresses: T*K*H passes 2^31 elements (T = 65536, K = 8, H = 5120).
        x = tl.load(expert_out_ptr + row.to(tl.int64)[:, None] * stride_er + h[None, :], mask=mask,
                    other=0.0, eviction_policy="evict_first")   # each expert row is read once
        acc += w[:, None] * x.to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t.to(tl.int64)[:, None] * stride_st + h[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_combine = Kernel(_combine_kernel, ("K", "HAS_SHARED", "BLOCK_T", "BLOCK_H", "USE_GDC", "num_warps",
                                     "launch_pdl"))


@functools.lru_cache(maxsize=4096)
def _combine_config(T: int, H: int):
    """(BLOCK_T, BLOCK_H, num_warps)."""
    # 1024 columns x 4 warps: one 16-byte vector a thread per gathered row (bf16/fp16), K of them in flight.
    block_h = min(pow2(max(H, 1)), 1024)
    # Prefill: two tokens a program doubles the loads in flight; decode: one, for more programs.
    block_t = 1 if T < 1024 else 2
    if _INTERPRET:   # the interpreter pays per program and per op, not per element: few, big programs
        block_t = 16
    num_warps = max(1, min(4, block_t * block_h // 256))
    return block_t, block_h, num_warps


def grouped_combine(expert_out, topk_weights, row_index, shared_out=None, *, config=None):
    """Triton kernel of `moge::grouped_combine` (arguments already checked by moge_kernels.checks).

    config=(BLOCK_T, BLOCK_H, num_warps) overrides the tile choice (tests, tuning)."""
    T, K = row_index.shape
    H = expert_out.shape[1]
    out = torch.empty(T, H, dtype=expert_out.dtype, device=expert_out.device)   # [T, H]
    if T == 0 or H == 0:
        return out
    if expert_out.stride(1) != 1:
        expert_out = expert_out.contiguous()
    if shared_out is not None and shared_out.stride(1) != 1:
        shared_out = shared_out.contiguous()
    has_shared = shared_out is not None
    block_t, block_h, num_warps = config or _combine_config(T, H)
    pdl = use_pdl(expert_out.device)
    _combine.launch(
        ((T + block_t - 1) // block_t, (H + block_h - 1) // block_h),
        (expert_out, topk_weights, row_index, shared_out if has_shared else expert_out, out,
         T, H, expert_out.stride(0), topk_weights.stride(0), topk_weights.stride(1),
         row_index.stride(0), row_index.stride(1), shared_out.stride(0) if has_shared else 0),
        (K, has_shared, block_t, block_h, pdl, num_warps, pdl))
    return out


def _registered(expert_out, topk_weights, row_index, shared_out):
    return grouped_combine(expert_out, topk_weights, row_index, shared_out)


register_kernel("triton", "grouped_combine", _registered, devices=DEVICES)
