"""Triton FP8 (e4m3, w8a8) grouped GEMMs: `moge::grouped_gemm_fp8` and `moge::grouped_mlp_fp8`.

Formats and the exact quantization rule: moge_kernels/fp8.py. Tensors:
    x          [M, K]   expert-sorted activations (float), or e4m3 with x_scale [M, KB] fp32
    w          [E, N, K] e4m3 (nn.Linear layout), w_scale [E, P, NB, KB] fp32 (P = 2: gate, up)
    expert_offsets [E+1] int32; rows of expert e are [offsets[e], offsets[e+1])

One kernel, tile schedule from grouped_gemm.py (_schedule / _locate: derived on the device from
expert_offsets, no host sync, graph-capturable, empty experts cost nothing). Per k-slice of BK = 128
(one scale block): a [BM, BK] x tile and a [BN, BK] weight tile in e4m3 go through tl.dot (wgmma FP8 on
Hopper, fp32 result), which is scaled by x_scale[row, kb] * w_scale[col block, kb] and added to the fp32
accumulator (block format); the per-channel format accumulates plain dots and scales once in the
epilogue. Partial blocks are masked loads (zeros): Pangu's I = 1344 is 10 full k-slices and a half one in
the down GEMM, and a half column tile of gate and of up in gate_up; nothing is padded.

Operands come through pointer loads (masked), or with the config's `tma` (Hopper; e4m3 x, rows of 16-byte
multiples) through TMA descriptors built on the host as in grouped_gemm.py: x [M, K] in [BM, 128] boxes,
w viewed [E*W_ROWS, K] in [BN, 128] boxes, zero-filled past the tensor; rows of the next expert and weight
rows past a projection are loaded but never stored (their scales load as 0). Both keep the weight tile
K-major ([BN, BK], fed as tl.dot(a, tl.trans(b))), the layout FP8 wgmma needs for both operands.

Where x is quantized (fp8.py's rule; both paths give the same values):
  QUANT_X    in the GEMM's load: a bf16 x tile is quantized in registers per 1x128 group (block format).
             Every column tile of a row recomputes it, so it pays where weights dominate (decode sizes).
  otherwise  a row-quantization kernel writes x in e4m3 + scales first (_quantize_rows_kernel).
The gate_up epilogue computes h = silu(gate) * up in fp32, rounds it to x's dtype (fp8.py) and either
  QUANT_OUT  quantizes it per row over its BN = 128 columns (one scale group) and writes e4m3 + scales
             for the down GEMM (block format, larger sizes), or
  writes h in x's dtype; the down GEMM then quantizes it in its load (QUANT_X, decode sizes) or the row
             kernel does (per-channel format: one scale per token needs the whole row).
The down GEMM writes x's dtype, with row_scale in fp32. Deterministic: no atomics.

The interpreter's fp32 -> e4m3 cast rounds wrongly (e.g. 127.8 -> 64, NaN -> 384; Triton 3.9), so under
TRITON_INTERPRET the kernels round to e4m3 in fp32 first (_round_e4m3; exact values cast correctly).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import fp8
from ..registry import register_kernel
from . import DEVICES
from .grouped_gemm import TensorDescriptor, _locate, _schedule, _tma_ok

ROUND_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_e4m3(v):
    """Round fp32 values in [-448, 448] to the nearest e4m3 value (ties to even), in fp32."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576      # keep 3 mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (a + 16384.0) - 16384.0                           # multiples of 2^-9 below 2^-6
    r = tl.where(a >= 0.015625, normal, subnormal)
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_tile(v, BM: tl.constexpr, EXPLICIT_ROUND: tl.constexpr):
    """v [BM, G] fp32 (zeros outside the tensor) -> (e4m3 [BM, G], scale [BM]): fp8.py's rule."""
    amax = tl.maximum(tl.max(tl.abs(v), 1), 1e-12)
    scale = tl.math.div_rn(amax, tl.full([BM], 448.0, tl.float32))
    inv = tl.math.div_rn(tl.full([BM], 448.0, tl.float32), amax)
    q = tl.clamp(v * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if EXPLICIT_ROUND:
        q = _round_e4m3(q)
    return q.to(tl.float8e4nv), scale


@triton.jit
def _round_to(v, ROUND: tl.constexpr):
    """v fp32 rounded through the activation dtype (0 fp32, 1 fp16, 2 bf16)."""
    if ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                          BM: tl.constexpr, G: tl.constexpr, ONE_GROUP: tl.constexpr,
                          EXPLICIT_ROUND: tl.constexpr):
    """Grid (cdiv(M, BM), KB): rows [pid0*BM, +BM), group pid1 of G columns; ONE_GROUP: the whole row
    (one scale per token), walked in chunks of G twice (amax, then quantize)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, G)
    if ONE_GROUP:
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, G):
            ok = row_ok[:, None] & (k0 + offs < K)[None, :]
            v = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + offs)[None, :], mask=ok, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 1))
        amax = tl.maximum(amax, 1e-12)
        scale = tl.math.div_rn(amax, tl.full([BM], 448.0, tl.float32))
        inv = tl.math.div_rn(tl.full([BM], 448.0, tl.float32), amax)
        for k0 in range(0, K, G):
            ok = row_ok[:, None] & (k0 + offs < K)[None, :]
            v = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + offs)[None, :], mask=ok, other=0.0)
            q = tl.clamp(v.to(tl.float32) * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
            if EXPLICIT_ROUND:
                q = _round_e4m3(q)
            tl.store(q_ptr + rows64[:, None] * stride_qm + (k0 + offs)[None, :], q.to(tl.float8e4nv),
                     mask=ok)
        tl.store(s_ptr + rows64 * stride_sm, scale, mask=row_ok)
    else:
        cols = tl.program_id(1) * G + offs
        ok = row_ok[:, None] & (cols < K)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        q, scale = _quantize_tile(v.to(tl.float32), BM, EXPLICIT_ROUND)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=ok)
        tl.store(s_ptr + rows64 * stride_sm + tl.program_id(1), scale, mask=row_ok)


@triton.jit
def _fp8_gemm_kernel(
        x_ptr, x_scale_ptr,      # x [M, K] e4m3 + [M, KB] fp32 scales, or float x with QUANT_X
        w_ptr, w_scale_ptr,      # w [E, W_ROWS, K] e4m3; w_scale [E, P, NB, KB] fp32, contiguous
        x_desc, w_desc,          # USE_TMA: descriptors of x [M, K] (box [BM, BK]), w as [E*W_ROWS, K] ([BN, BK])
        y_ptr, y_scale_ptr,      # out [M, N_OUT] (e4m3 + [M, N_OUT/BN] scales with QUANT_OUT)
        offsets_ptr, row_scale_ptr,
        N_OUT, K, KB, NB, PART_ROWS, W_ROWS, num_n_tiles, up_scale_shift,
        stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_ym, stride_ysm,
        E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_K: tl.constexpr, SWIGLU: tl.constexpr,
        QUANT_X: tl.constexpr, QUANT_OUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
        ROUND: tl.constexpr, EXPLICIT_ROUND: tl.constexpr, USE_TMA: tl.constexpr):
    """Grid: (max_row_tiles * num_n_tiles,); see the module docstring."""
    pid = tl.program_id(0)
    experts, starts, ends, m_tiles, work_begin, work_end = _schedule(offsets_ptr, num_n_tiles, E,
                                                                     E_POW2, BM)
    if pid >= tl.max(work_end, 0):
        return
    e, row0, row_end, pid_n = _locate(pid, experts, starts, ends, m_tiles, work_begin, work_end, BM)
    col0 = pid_n * BN
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = row0 + offs_m
    row_ok = rows < row_end
    cols = col0 + offs_n
    col_ok = cols < N_OUT
    rows64 = rows.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + (cols[:, None] * stride_wn + offs_k[None, :])
    up_shift = N_OUT * stride_wn
    # scale row of each output column: its projection (PART_ROWS rows each), then its block of BLOCK_N
    # rows in it; SwiGLU's up columns are up_scale_shift further on
    scale_rows = (cols // PART_ROWS) * NB + (cols % PART_ROWS) // BLOCK_N
    ws_ptrs = w_scale_ptr + e.to(tl.int64) * stride_wse + scale_rows * KB
    xs_ptrs = x_scale_ptr + rows64 * stride_xsm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    num_k = tl.cdiv(K, BK)
    w_row0 = e * W_ROWS + col0          # TMA: this tile's first weight row in the [E*W_ROWS, K] view
    for kk in range(num_k):
        k_ok = offs_k < K - kk * BK
        kb = (kk * BK) // BLOCK_K
        if USE_TMA:
            # Rows past M and columns past K are zero-filled; rows of the next expert (x) and weight
            # rows past this projection's N_OUT are loaded but their outputs are never stored, and
            # their scales load as 0. No pointer tensors: what frees registers for 128-row tiles.
            a = x_desc.load([row0, kk * BK])
            if PER_K:
                sa = tl.load(xs_ptrs + kb, mask=row_ok, other=0.0)
            b = w_desc.load([w_row0, kk * BK])
        else:
            if QUANT_X:
                xf = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a, sa = _quantize_tile(xf, BM, EXPLICIT_ROUND)
            else:
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if PER_K:
                    sa = tl.load(xs_ptrs + kb, mask=row_ok, other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if PER_K:
            sb = tl.load(ws_ptrs + kb, mask=col_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        else:
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BK)
        if SWIGLU:
            if USE_TMA:
                b_up = w_desc.load([w_row0 + N_OUT, kk * BK])
            else:
                b_up = tl.load(w_ptrs + up_shift, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if PER_K:
                sb_up = tl.load(ws_ptrs + up_scale_shift + kb, mask=col_ok, other=0.0)
                acc_up += tl.dot(a, tl.trans(b_up)) * (sa[:, None] * sb_up[None, :])
            else:
                acc_up = tl.dot(a, tl.trans(b_up), acc_up, max_num_imprecise_acc=BK)
        x_ptrs += BK
        w_ptrs += BK
    if not PER_K:   # per-channel weights, per-token activations: one scale each, applied once
        sa = tl.load(xs_ptrs, mask=row_ok, other=0.0)
        acc = acc * (sa[:, None] * tl.load(ws_ptrs, mask=col_ok, other=0.0)[None, :])
        if SWIGLU:
            acc_up = acc_up * (sa[:, None] * tl.load(ws_ptrs + up_scale_shift, mask=col_ok, other=0.0)[None, :])

    out = acc
    if SWIGLU:
        out = _round_to(acc * tl.sigmoid(acc) * acc_up, ROUND)    # h as the bf16 path stores it
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if QUANT_OUT:   # this tile's BN columns are one scale group of the down GEMM's activations
        q, s = _quantize_tile(tl.where(col_ok[None, :], out, 0.0), BM, EXPLICIT_ROUND)
        tl.store(y_ptrs, q, mask=mask)
        tl.store(y_scale_ptr + rows64 * stride_ysm + pid_n, s, mask=row_ok)
    else:
        if HAS_ROW_SCALE:
            out = out * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False      # e4m3 operands through TMA descriptors (Hopper; falls back to pointer loads)


def choose_config(M: int, E: int, swiglu: bool) -> Fp8Config:
    """By rows per expert. From an H200 sweep of the pointer-load kernel (Pangu shape, one config for both
    GEMMs): 16x64 (the decode path) is best up to ~2 rows per expert (T = 16), 64x128 with 4 warps and
    4 stages from ~16 rows on (T = 128 ... 16384); 128x128 pointer tiles were 4x slower (their [BM, BK]
    and [BN, BK] pointer tensors take the registers the scaled accumulators need). Past the decode
    sizes the same 64x128 tile goes through TMA (no pointer tensors, no masks): not yet timed on a
    device; bench/bench_fp8.py --sweep times it against the pointer tile and 128-row TMA tiles."""
    rows = M / max(E, 1)
    if rows <= 8:
        return Fp8Config(16, 64, 4, 4)
    return Fp8Config(64, 128, 4, 4, tma=True)


_forced: dict[str, Fp8Config] = {}   # bench/bench_fp8.py --sweep: "gate_up" / "down" -> config


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"     # the triton backend runs CPU tensors only under the interpreter


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)] or [M, 1] for group 0)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=fp8.E4M3, device=x.device)
    kb = 1 if group == 0 else triton.cdiv(K, group)
    s = torch.empty(M, kb, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s.fill_(1e-12 / fp8.E4M3_MAX)
    G = 128 if group == 0 else group
    BM = 32
    _quantize_rows_kernel[(triton.cdiv(M, BM), kb)](
        x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0), BM=BM, G=G, ONE_GROUP=group == 0,
        EXPLICIT_ROUND=_interpreted(x), num_warps=4)
    return q, s


def launch_fp8_gemm(x, x_scale, w, w_scale, expert_offsets, out, out_scale, block_n, block_k, *,
                    swiglu, quant_x, quant_out, round_dtype, row_scale=None, block_m=None, bn=None,
                    num_warps=None, num_stages=None, tma=False):
    """out[rows of e] = x[rows of e] @ dequant(w[e])^T (SwiGLU of it with swiglu). No host sync."""
    M, K = x.shape
    E, w_rows = w.shape[:2]
    n_out = w_rows // 2 if swiglu else w_rows
    if M == 0 or n_out == 0:
        return out
    BK = 128 if block_k == 0 else min(block_k, 128)
    per_k = block_k != 0
    BM, BN = block_m, bn
    if quant_x and not (per_k and BK == block_k):
        raise AssertionError("quantize-in-load needs one scale group per k-slice")
    if quant_out and not (per_k and BN == block_k):
        raise AssertionError("epilogue quantization needs one scale group per column tile")
    NB, KB = w_scale.shape[2], w_scale.shape[3]
    # up rows' scales: the second projection (P = 2), or I / block_n block rows on (P = 1, aligned)
    up_shift = (NB * KB if w_scale.shape[1] == 2 else (n_out // block_n) * KB) if swiglu else 0
    num_n_tiles = triton.cdiv(n_out, BN)
    max_row_tiles = min(M, triton.cdiv(M, BM) + min(E, M))
    has_row_scale = row_scale is not None
    # TMA: e4m3 x (not quantized in the load), 16-byte aligned rows (K % 16 == 0), Hopper or the
    # interpreter; a box row is BK = 128 bytes, one 128-byte swizzle line
    use_tma = tma and not quant_x and x.dtype == fp8.E4M3 and w.is_contiguous() and _tma_ok(x, w)
    if use_tma:
        x_desc = TensorDescriptor.from_tensor(x, [BM, BK])
        w_desc = TensorDescriptor.from_tensor(w.view(E * w_rows, K), [BN, BK])
    else:
        x_desc, w_desc = x, w          # placeholders, never read
    _fp8_gemm_kernel[(max_row_tiles * num_n_tiles,)](
        x, x_scale if x_scale is not None else x, w, w_scale, x_desc, w_desc, out,
        out_scale if out_scale is not None else out, expert_offsets,
        row_scale if has_row_scale else out,
        n_out, K, KB, NB, w_rows // w_scale.shape[1], w_rows, num_n_tiles, up_shift,
        x.stride(0), x_scale.stride(0) if x_scale is not None else 0, w.stride(0), w.stride(1),
        w_scale.stride(0), out.stride(0), out_scale.stride(0) if out_scale is not None else 0,
        E=E, E_POW2=max(2, triton.next_power_of_2(E)), BM=BM, BN=BN, BK=BK,
        BLOCK_N=block_n, BLOCK_K=max(block_k, 1), PER_K=per_k, SWIGLU=swiglu, QUANT_X=quant_x,
        QUANT_OUT=quant_out, HAS_ROW_SCALE=has_row_scale, ROUND=ROUND_CODES[round_dtype],
        EXPLICIT_ROUND=_interpreted(x), USE_TMA=use_tma, num_warps=num_warps, num_stages=num_stages)
    return out


def _prepare(x, w, w_scale, name, block_k):
    fp8.check_fp8_device(name, x.device)
    if block_k and not (block_k % 128 == 0 or (32 <= block_k <= 128 and block_k & (block_k - 1) == 0)):
        raise ValueError(f"{name}: the triton fp8 kernels take block_k = 0 (per channel), a multiple of "
                         f"128, or a power of two in [32, 128], got block_k={block_k}; use the reference "
                         f"backend for other blocks")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, w.contiguous(), w_scale.contiguous()


def _tile(cfg: Fp8Config, **override) -> dict:
    """launch_fp8_gemm's tile arguments from a config."""
    return {**dict(block_m=cfg.block_m, bn=cfg.block_n, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages, tma=cfg.tma), **override}


def _block_path_fuses_x(M: int, E: int, block_k: int) -> bool:
    """Quantize x in the GEMM's load (decode sizes) rather than in a row kernel first."""
    return block_k == 128 and choose_config(M, E, True).block_m <= 16


def grouped_gemm_fp8(x, w, w_scale, expert_offsets, block_n=128, block_k=128):
    """Registered as triton's moge::grouped_gemm_fp8: [M, N] in x's dtype."""
    x, w, w_scale = _prepare(x, w, w_scale, "w", block_k)
    offsets = expert_offsets.contiguous()
    M, E = x.shape[0], w.shape[0]
    y = x.new_empty(M, w.shape[1])
    if x.shape[1] == 0:
        return y.zero_()
    cfg = _forced.get("down") or choose_config(M, E, False)
    fuse = _block_path_fuses_x(M, E, block_k)
    xq, xs = (x, None) if fuse else quantize_rows(x, block_k)
    return launch_fp8_gemm(xq, xs, w, w_scale, offsets, y, None, block_n, block_k, swiglu=False,
                           quant_x=fuse, quant_out=False, round_dtype=x.dtype, **_tile(cfg))


def grouped_mlp_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale=None,
                    block_n=128, block_k=128):
    """Registered as triton's moge::grouped_mlp_fp8: [M, H] in x's dtype."""
    x, w_gate_up, w_gate_up_scale = _prepare(x, w_gate_up, w_gate_up_scale, "w_gate_up", block_k)
    w_down, w_down_scale = w_down.contiguous(), w_down_scale.contiguous()
    offsets = expert_offsets.contiguous()
    M, H = x.shape
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    y = x.new_empty(M, H)
    if I == 0 or H == 0:
        return y.zero_()
    if row_scale is not None:
        row_scale = row_scale.to(torch.float32).contiguous()
    cfg_gu = _forced.get("gate_up") or choose_config(M, E, True)
    cfg_dn = _forced.get("down") or choose_config(M, E, False)
    common = dict(round_dtype=x.dtype)
    if block_k == 128 and cfg_gu.block_m <= 16:
        # decode: x and h quantized in the GEMMs' loads, h in x's dtype between them
        h = x.new_empty(M, I)
        launch_fp8_gemm(x, None, w_gate_up, w_gate_up_scale, offsets, h, None, block_n, block_k,
                        swiglu=True, quant_x=True, quant_out=False, **_tile(cfg_gu), **common)
        return launch_fp8_gemm(h, None, w_down, w_down_scale, offsets, y, None, block_n, block_k,
                               swiglu=False, quant_x=True, quant_out=False, row_scale=row_scale,
                               **_tile(cfg_dn), **common)
    xq, xs = quantize_rows(x, block_k)
    if block_k == 128:
        # h quantized in the gate_up epilogue: one column tile of 128 = one scale group
        hq = torch.empty(M, I, dtype=fp8.E4M3, device=x.device)
        hs = torch.empty(M, triton.cdiv(I, 128), dtype=torch.float32, device=x.device)
        launch_fp8_gemm(xq, xs, w_gate_up, w_gate_up_scale, offsets, hq, hs, block_n, block_k,
                        swiglu=True, quant_x=False, quant_out=True, **_tile(cfg_gu, bn=128), **common)
    else:
        # per-token scales (block_k = 0) or other groups: h in x's dtype, then the row kernel
        h = x.new_empty(M, I)
        launch_fp8_gemm(xq, xs, w_gate_up, w_gate_up_scale, offsets, h, None, block_n, block_k,
                        swiglu=True, quant_x=False, quant_out=False, **_tile(cfg_gu), **common)
        hq, hs = quantize_rows(h, block_k)
    return launch_fp8_gemm(hq, hs, w_down, w_down_scale, offsets, y, None, block_n, block_k,
                           swiglu=False, quant_x=False, quant_out=False, row_scale=row_scale,
                           **_tile(cfg_dn), **common)


register_kernel("triton", "grouped_gemm_fp8", grouped_gemm_fp8, devices=DEVICES)
register_kernel("triton", "grouped_mlp_fp8", grouped_mlp_fp8, devices=DEVICES)
