"""Triton kernels of the backward primitives (ops.py defines the ops, reference.py their math, autograd.py
uses them); this module registers them as the triton backend's.

Index arrays (device tensors, never read by the host):
    expert_offsets  [E+1] int32  exclusive cumsum of rows per expert; rows of expert e are
                                 [offsets[e], offsets[e+1]) of every [M, *] tensor below
    row_index       [T, K] int32 permuted row that (token t, slot k) was copied to by grouped_dispatch;
                                 a permutation of [0, T*K)

Kernels, one launcher each:
    grouped_gemm_dgrad   grad_x[rows of e] = grad_y[rows of e] @ w[e]        ([M,N] x [N,Kd] -> [M,Kd])
    grouped_gemm_wgrad   grad_w[e] = grad_y[rows of e]^T @ x[rows of e]      ([N,M_e] x [M_e,Kd] -> [N,Kd])
    swiglu / swiglu_backward   elementwise over [M, 2I] gate_up (gate columns first)
    grouped_combine_backward   one program per token: scatter w[t,k] * grad_out[t] to its K permuted rows
                               and reduce <grad_out[t], expert_out[row]> for grad_topk_weights

The two GEMMs take the place of `grouped_gemm` on a transposed weight (which would first copy the whole
weight tensor: 1.7 GB for Pangu's w_gate_up) and of a per-expert loop (a host sync per expert). On Hopper,
bf16, `torch._grouped_mm` (CUTLASS) serves both layouts directly and runs instead where its alignment
rules hold (the grouped_mm backend, moge_kernels/_grouped_mm.py; bwd_gemm="triton" in moge_kernels.options
keeps these kernels). Everything is deterministic:
each output element is written by one program with a fixed summation order, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import options
from ..registry import register_kernel
from . import DEVICES
from .grouped_gemm import zero_tail_tile
from .launch import cdiv, pow2

_INTERPRET = options.TRITON_INTERPRET


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: the reference multiplies in full fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- dgrad (grouped NN GEMM)
@triton.jit
def _row_tile_of(pid, offsets_ptr, num_col_tiles, E: tl.constexpr, E_POW2: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """pid -> (number of real programs, expert, first row, end row of the expert, column tile).

    Programs run expert by expert, column tile by column tile, row tile by row tile: the row tiles of an
    expert that share one weight tile are neighbours, so that tile comes from DRAM once."""
    experts = tl.arange(0, E_POW2)
    real = experts < E
    lo = tl.load(offsets_ptr + experts, mask=real, other=0)                # [E_POW2] int32
    hi = tl.load(offsets_ptr + experts + 1, mask=real, other=0)
    row_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    programs = row_tiles * num_col_tiles
    programs_end = tl.cumsum(programs, 0)                                   # inclusive
    total = tl.sum(programs, 0)
    e = tl.sum((programs_end <= pid).to(tl.int32), 0)
    mine = experts == e
    local = pid - tl.sum(tl.where(mine, programs_end - programs, 0), 0)
    tiles_e = tl.maximum(tl.sum(tl.where(mine, row_tiles, 0), 0), 1)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (local % tiles_e) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return total, e, row0, row_end, local // tiles_e


@triton.jit(do_not_specialize=["M"])
def _dgrad_kernel(
        dy_ptr,             # [M, N] grad_y, row stride stride_dym, unit column stride
        w_ptr,              # [E, N, Kd] weights (nn.Linear layout), strides (stride_we, stride_wn, 1)
        dx_ptr,             # [M, Kd] grad_x, contiguous
        offsets_ptr,        # [E+1] int32 expert_offsets
        M, N, KD, num_col_tiles, stride_dym, stride_we, stride_wn,
        E: tl.constexpr, E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid: (max_row_tiles * num_col_tiles,); programs past the real tiles write zeros to the rows of
    no expert, past offsets[E] (zero_tail_tile), and return."""
    pid = tl.program_id(0)
    total, e, row0, row_end, col_tile = _row_tile_of(pid, offsets_ptr, num_col_tiles, E, E_POW2,
                                                     BLOCK_M)
    if pid >= total:
        zero_tail_tile(dx_ptr, offsets_ptr, pid - total, M, KD, num_col_tiles, KD, E, BLOCK_M, BLOCK_K)
        return
    rows = tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    red = tl.arange(0, BLOCK_N)
    row_ok = row0 + rows < row_end
    col_ok = cols < KD
    # int64 in the per-program bases only: M*N and E*N*Kd pass 2^31 at Pangu sizes.
    dy_ptrs = dy_ptr + row0.to(tl.int64) * stride_dym + (rows[:, None] * stride_dym + red[None, :])
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + (red[:, None] * stride_wn + cols[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        red_ok = red < N - n0
        a = tl.load(dy_ptrs, mask=row_ok[:, None] & red_ok[None, :], other=0.0)     # [BM, BN]
        b = tl.load(w_ptrs, mask=red_ok[:, None] & col_ok[None, :], other=0.0)      # [BN, BK]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    out_ptrs = dx_ptr + row0.to(tl.int64) * KD + (rows[:, None] * KD + cols[None, :])
    tl.store(out_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _gemm_blocks(dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages)."""
    if device.type != "cuda":   # interpreter: cost is per program and per op, so few mid-size tiles
        return 32, 32, 32, 4, 1
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: halve the reduction slice
        return 64, 64, 32, 4, 3
    # 128x128 output tiles (two m64 wgmma rows), 64-deep slices, 3 stages: 96 KB of shared memory.
    return 128, 128, 64, 8, 3


def grouped_gemm_dgrad(grad_y: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor):
    """grad_x [M, Kd]: rows of expert e of grad_y [M, N] times w[e] [N, Kd]. No host sync."""
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    offsets = expert_offsets.contiguous()
    M, N = grad_y.shape
    E, _, KD = w.shape
    grad_x = grad_y.new_empty(M, KD)
    if M == 0 or KD == 0:
        return grad_x
    if N == 0:
        return grad_x.zero_()
    BM, BK, BN, warps, stages = _gemm_blocks(grad_y.dtype, grad_y.device)
    num_col_tiles = cdiv(KD, BK)
    max_row_tiles = min(M, cdiv(M, BM) + min(E, M))    # sum_e cdiv(rows_e, BM) <= M/BM + #non-empty
    _dgrad_kernel[(max_row_tiles * num_col_tiles,)](
        grad_y, w, grad_x, offsets, M, N, KD, num_col_tiles, grad_y.stride(0), w.stride(0), w.stride(1),
        E=E, E_POW2=max(2, pow2(E)), BLOCK_M=BM, BLOCK_K=BK, BLOCK_N=BN,
        DOT_PRECISION=_dot_precision(grad_y.dtype), num_warps=warps, num_stages=stages)
    return grad_x


# ----------------------------------------------------------------------------- wgrad (grouped TN GEMM)
@triton.jit
def _wgrad_kernel(
        dy_ptr,             # [M, N] grad_y, row stride stride_dym, unit column stride
        x_ptr,              # [M, Kd] layer input, row stride stride_xm, unit column stride
        dw_ptr,             # [E, N, Kd] grad_w, contiguous
        offsets_ptr,        # [E+1] int32 expert_offsets
        N, KD, num_n_tiles, num_k_tiles, stride_dym, stride_xm,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Grid: (E * num_n_tiles * num_k_tiles,): one [BLOCK_N, BLOCK_K] tile of one expert's grad_w per
    program, reducing over that expert's rows (an empty expert stores zeros)."""
    pid = tl.program_id(0)
    tiles = num_n_tiles * num_k_tiles
    e = pid // tiles
    local = pid % tiles
    # n fastest: neighbouring programs share the x columns of one k tile (an L2 hit after the first).
    n_tile = local % num_n_tiles
    k_tile = local // num_n_tiles
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ns = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    ms = tl.arange(0, BLOCK_M)
    n_ok = ns < N
    k_ok = ks < KD
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for step in range(0, tl.cdiv(hi - lo, BLOCK_M)):
        m0 = lo + step * BLOCK_M
        m_ok = ms < hi - m0
        base = m0.to(tl.int64)
        # grad_y loaded transposed ([BN, BM]) so the product is a plain NN dot.
        a = tl.load(dy_ptr + base * stride_dym + (ms[None, :] * stride_dym + ns[:, None]),
                    mask=m_ok[None, :] & n_ok[:, None], other=0.0)
        b = tl.load(x_ptr + base * stride_xm + (ms[:, None] * stride_xm + ks[None, :]),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out = dw_ptr + e.to(tl.int64) * N * KD + (ns[:, None] * KD + ks[None, :])
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def grouped_gemm_wgrad(grad_y: torch.Tensor, x: torch.Tensor, expert_offsets: torch.Tensor):
    """grad_w [E, N, Kd] = grad_y[rows of e]^T @ x[rows of e], fp32 accumulation, x's dtype."""
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    offsets = expert_offsets.contiguous()
    M, N = grad_y.shape
    KD = x.shape[1]
    E = offsets.shape[0] - 1
    if M == 0 or E == 0 or N == 0 or KD == 0:
        return x.new_zeros(E, N, KD)
    grad_w = x.new_empty(E, N, KD)
    BM, BOUT, BRED, warps, stages = _gemm_blocks(x.dtype, x.device)
    BN, BK = BM, BOUT          # output tile [BN, BK]; BRED rows of the expert per step
    num_n, num_k = cdiv(N, BN), cdiv(KD, BK)
    _wgrad_kernel[(E * num_n * num_k,)](
        grad_y, x, grad_w, offsets, N, KD, num_n, num_k, grad_y.stride(0), x.stride(0),
        BLOCK_N=BN, BLOCK_K=BK, BLOCK_M=BRED, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=warps, num_stages=stages)
    return grad_w


# ----------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_kernel(gate_up_ptr, h_ptr, M, I,
                   BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(I, BLOCK_I)). gate_up [M, 2I] contiguous -> h [M, I] contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    src = gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + I, mask=mask, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_backward_kernel(
        grad_h_ptr,         # [M, I] gradient w.r.t. the (unscaled) SwiGLU output, contiguous
        gate_up_ptr,        # [M, 2I] contiguous, gate columns first
        row_scale_ptr,      # [M] fp32 (HAS_SCALE)
        grad_gate_up_ptr,   # [M, 2I] out
        h_ptr,              # [M, I] out (NEED_H): swiglu(gate_up) rounded, times row_scale
        grad_scale_ptr,     # [M] fp32 out (NEED_SCALE_GRAD): sum_i grad_h * rounded h
        M, I,
        HAS_SCALE: tl.constexpr, NEED_H: tl.constexpr, NEED_SCALE_GRAD: tl.constexpr,
        NEED_ROUNDED_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M),): a program owns whole rows, so the row reduction for grad_row_scale
    needs no second pass and no atomics."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = row_ok[:, None] & (cols < I)[None, :]
        gu = gate_up_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu + I, mask=mask, other=0.0).to(tl.float32)
        grad_h = tl.load(grad_h_ptr + rows64[:, None] * I + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        g = grad_h
        if HAS_SCALE:
            g = grad_h * scale[:, None]
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        grad_gate = g * up * (sig + silu * (1.0 - sig))
        grad_up = g * silu
        dst = grad_gate_up_ptr + rows64[:, None] * (2 * I) + cols[None, :]
        tl.store(dst, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + I, grad_up.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
        if NEED_ROUNDED_H:   # NEED_H or NEED_SCALE_GRAD
            # the forward rounds h before the down GEMM; both uses below see that rounded value
            h = (silu * up).to(h_ptr.dtype.element_ty).to(tl.float32)
            if NEED_SCALE_GRAD:
                dot += tl.sum(grad_h * h, axis=1)
            if NEED_H:
                if HAS_SCALE:
                    h = h * scale[:, None]
                tl.store(h_ptr + rows64[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty),
                         mask=mask)
    if NEED_SCALE_GRAD:
        tl.store(grad_scale_ptr + rows, dot, mask=row_ok)


def _elementwise_blocks(I: int, device: torch.device):
    """(BLOCK_M, BLOCK_I, num_warps)."""
    if device.type != "cuda":
        return 16, min(pow2(max(I, 1)), 128), 4
    # 4 rows x up to 512 columns: 16-byte vectors per thread for 16-bit dtypes, 2K elements a program.
    return 4, min(pow2(max(I, 1)), 512), 4


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """h [M, I] = silu(gate) * up in fp32, rounded to gate_up's dtype."""
    gate_up = gate_up.contiguous()
    M, two_i = gate_up.shape
    I = two_i // 2
    h = gate_up.new_empty(M, I)
    if M == 0 or I == 0:
        return h
    BM, BI, warps = _elementwise_blocks(I, gate_up.device)
    _swiglu_kernel[(cdiv(M, BM), cdiv(I, BI))](gate_up, h, M, I, BLOCK_M=BM, BLOCK_I=BI,
                                                  num_warps=warps)
    return h


def swiglu_backward(grad_h, gate_up, row_scale=None, need_h=False):
    """(grad_gate_up [M, 2I], h [M, I] or [0, I], grad_row_scale [M] fp32 or [0])."""
    gate_up = gate_up.contiguous()
    grad_h = grad_h.contiguous()
    M, two_i = gate_up.shape
    I = two_i // 2
    has_scale = row_scale is not None
    grad_gate_up = gate_up.new_empty(M, two_i)
    h = gate_up.new_empty(M if need_h else 0, I)
    grad_scale = torch.zeros(M if has_scale else 0, dtype=torch.float32, device=gate_up.device)
    if M == 0 or I == 0:
        return grad_gate_up, h, grad_scale
    if has_scale:
        row_scale = row_scale.to(torch.float32).contiguous()
    BM, BI, warps = _elementwise_blocks(I, gate_up.device)
    _swiglu_backward_kernel[(cdiv(M, BM),)](
        grad_h, gate_up, row_scale if has_scale else grad_scale, grad_gate_up,
        h if need_h else grad_gate_up, grad_scale, M, I,
        HAS_SCALE=has_scale, NEED_H=need_h, NEED_SCALE_GRAD=has_scale,
        NEED_ROUNDED_H=need_h or has_scale, BLOCK_M=BM, BLOCK_I=BI, num_warps=warps)
    return grad_gate_up, h, grad_scale


# ----------------------------------------------------------------------------- combine backward
@triton.jit
def _combine_backward_kernel(
        grad_out_ptr,       # [T, H] contiguous
        expert_out_ptr,     # [T*K, H] contiguous (NEED_W)
        weights_ptr,        # [T, K] contiguous, any float dtype (read as fp32)
        row_index_ptr,      # [T, K] int32 contiguous
        grad_expert_out_ptr,  # [T*K, H] out, grad_out's dtype
        grad_weights_ptr,   # [T, K] fp32 out (NEED_W)
        H, K: tl.constexpr, K_POW2: tl.constexpr, NEED_W: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (T,): a program writes the K permuted rows of its token (row_index is a permutation, so
    every row has one writer) and reduces its K dot products for grad_weights, in one pass over H
    that reads grad_out[t] once and keeps the K row gathers in flight together."""
    t = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_POW2)
    slot_ok = slots < K
    rows = tl.load(row_index_ptr + t * K + slots, mask=slot_ok, other=0).to(tl.int64)   # [K_POW2]
    w = tl.load(weights_ptr + t * K + slots, mask=slot_ok, other=0.0).to(tl.float32)
    dot = tl.zeros((K_POW2, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        mask = slot_ok[:, None] & col_ok[None, :]
        g = tl.load(grad_out_ptr + t * H + cols, mask=col_ok, other=0.0).to(tl.float32)    # [BLOCK_H]
        tl.store(grad_expert_out_ptr + rows[:, None] * H + cols[None, :],
                 (w[:, None] * g[None, :]).to(grad_expert_out_ptr.dtype.element_ty), mask=mask)
        if NEED_W:
            eo = tl.load(expert_out_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)    # each row is read once
            dot += g[None, :] * eo
    if NEED_W:
        tl.store(grad_weights_ptr + t * K + slots, tl.sum(dot, 1), mask=slot_ok)


def grouped_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    """(grad_expert_out [T*K, H] in grad_out's dtype, grad_topk_weights [T, K] or [0, K])."""
    T, K = row_index.shape
    H = grad_out.shape[1]
    grad_out = grad_out.contiguous()
    grad_expert_out = grad_out.new_empty(T * K, H)
    grad_w = torch.empty(T if need_weights_grad else 0, K, dtype=torch.float32, device=grad_out.device)
    if T == 0 or K == 0:
        return grad_expert_out, grad_w.to(topk_weights.dtype)
    if H == 0:
        return grad_expert_out, grad_w.zero_().to(topk_weights.dtype)
    k_pow2 = pow2(K)
    # K_POW2 x 512 fp32 accumulator = 32 registers a thread at K=8 and 4 warps; 512 bf16 columns give
    # each thread one 8-byte vector per gathered row, all K rows in flight at once.
    block_h = min(pow2(H), max(16, 4096 // k_pow2) if grad_out.is_cuda else 256)
    _combine_backward_kernel[(T,)](
        grad_out, expert_out.contiguous() if need_weights_grad else grad_out,
        topk_weights.contiguous(), row_index.contiguous(), grad_expert_out, grad_w, H,
        K=K, K_POW2=k_pow2, NEED_W=need_weights_grad, BLOCK_H=block_h, num_warps=4)
    return grad_expert_out, grad_w.to(topk_weights.dtype)


# ----------------------------------------------------------------------------- registration
register_kernel("triton", "grouped_gemm_dgrad", grouped_gemm_dgrad, devices=DEVICES)
register_kernel("triton", "grouped_gemm_wgrad", grouped_gemm_wgrad, devices=DEVICES)
register_kernel("triton", "swiglu", swiglu, devices=DEVICES)
register_kernel("triton", "swiglu_backward", swiglu_backward, devices=DEVICES)
register_kernel("triton", "grouped_combine_backward", grouped_combine_backward, devices=DEVICES)
