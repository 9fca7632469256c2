"""Triton FP8 (e4m3, w8a8) grouped GEMMs: `moge::grouped_gemm_fp8` and `moge::grouped_mlp_fp8`.

Formats and the exact quantization rule: moge_kernels/fp8.py. Tensors:
    x          [M, K]   expert-sorted activations (float), or e4m3 with x_scale [M, KB] fp32
    w          [E, N, K] e4m3 (nn.Linear layout), w_scale [E, P, NB, KB] fp32 (P = 2: gate, up)
    expert_offsets [E+1] int32; rows of expert e are [offsets[e], offsets[e+1])

One kernel, tile schedule from grouped_gemm.py (_schedule / _locate: derived on the device from
expert_offsets, no host sync, graph-capturable, empty experts cost nothing; spare programs of the plain
GEMM zero the rows past expert_offsets[E], zero_tail_tile). A tile is one or two column sub-tiles of at
most 128 columns, each with its own fp32 accumulator: gate_up always two (the gate rows and the up rows
of the same output columns), the plain GEMM two when its config is 256 wide. Per k-slice of BK = 128
(one scale block) a [BM, BK] x tile and a [BN, BK] weight tile per sub-tile in e4m3 go through tl.dot
(wgmma FP8 on Hopper). Block scales, kept off the tensor cores' critical path:
  - a sub-tile lies in one 128-row weight block, so its weight scale is one scalar per k-step; the x
    scales of the tile's rows are one [BM] vector, contiguous because activation scales are stored
    k-major (new_scales). Both are loaded a k-step ahead.
  - each k-step's dot starts from zero and is added to the fp32 accumulator times its scales
    (acc += dot * x_scale[row] * w_scale): the tensor cores' FP8 accumulation, less precise than fp32,
    then spans one 128-k block only. Chaining the dots through one rescaled accumulator would save the
    second tile, but measured 1.5e-2 from the reference on the H200 (4.7e-3 this way;
    bench/results/fp8_sweep_h200_fb3354e.txt), above the 1e-2 bound.
The per-channel format scales once in the epilogue; its dots promote to fp32 every 128 k
(max_num_imprecise_acc = BK), as the block path does, or with options.fp8_fast_accum (opt-in) chain
through the accumulator in the tensor cores' FP8 accumulation precision over all of K (CUTLASS's
FastAccum: 1-10% faster on the H200, 1.6e-2 from the reference at the mlp level instead of 5e-3).
Partial blocks are masked loads (zeros): Pangu's I = 1344 is 10 full k-slices and a half one in the down
GEMM, and a half column tile of gate and of up in gate_up; nothing is padded.

Operands come through pointer loads (masked), or with the config's `tma` (Hopper; e4m3 x, rows of 16-byte
multiples) through TMA descriptors built on the host: x [M, K] in [BM, 128] boxes, w viewed [E*W_ROWS, K]
in [BN, 128] boxes, zero-filled past the tensor; rows of the next expert and weight rows past N_OUT are
loaded but never stored. The weight tile stays K-major ([BN, BK], fed as tl.dot(a, tl.trans(b))), the
layout FP8 wgmma needs for both operands. Swapped tiles (the config's `swap`, decode sizes) compute
tl.dot(b, tl.trans(a)) [BN, BM] instead, both operands still K-major: the weight rows fill the wgmma's
64-row M side and the tile's 16 x rows its N side, not 16 real rows in a 64-row M side.

Where x is quantized (fp8.py's rule; both paths give the same values):
  QUANT_X    in the GEMM's load: a bf16 x tile is quantized in registers per 1x128 group (block format).
             Every column tile of a row recomputes it; taken with 16-row gate_up tiles that are not
             swapped (the interpreter's decode config; on the H200 the swapped 16-row TMA tiles after the
             row kernel are faster, gemm_configs.FP8_H200_TABLE).
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

import torch
import triton
import triton.language as tl

from .. import fp8, options
from ..registry import register_kernel
from . import DEVICES
from . import gemm_configs
from triton.runtime import driver

from . import launch
from .grouped_gemm import (TensorDescriptor, _copy_descriptor, _locate, _schedule, _tma_ok, cached_descriptor,
                           zero_tail_tile)
from .launch import (_INTERPRET, Kernel, _hooks_idle, cdiv, ensure_context, gdc_launch_dependents, gdc_wait, pow2,
                     use_pdl)

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
def _scales(amax, BM: tl.constexpr):
    """(scale, 1 / scale) [BM] of rows whose largest |value| is amax [BM]: fp8.py's rule."""
    amax = tl.maximum(amax, 1e-12)
    return (tl.math.div_rn(amax, tl.full([BM], 448.0, tl.float32)),
            tl.math.div_rn(tl.full([BM], 448.0, tl.float32), amax))


@triton.jit
def _to_e4m3(v, inv, EXPLICIT_ROUND: tl.constexpr):
    """v [BM, G] fp32 times its rows' 1 / scale, saturated and rounded to e4m3."""
    q = tl.clamp(v * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if EXPLICIT_ROUND:
        q = _round_e4m3(q)
    return q.to(tl.float8e4nv)


@triton.jit
def _row_amax(x_ptr, rows64, row_ok, stride, K, BM: tl.constexpr, G: tl.constexpr):
    """Largest |value| [BM] of whole rows of x [*, K] (ONE_GROUP: one scale per row), in chunks of G."""
    offs = tl.arange(0, G)
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, G):
        ok = row_ok[:, None] & (k0 + offs < K)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride + (k0 + offs)[None, :], mask=ok, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 1))
    return amax


@triton.jit
def _quantize_tile(v, BM: tl.constexpr, EXPLICIT_ROUND: tl.constexpr):
    """v [BM, G] fp32 (zeros outside the tensor) -> (e4m3 [BM, G], scale [BM]): fp8.py's rule."""
    scale, inv = _scales(tl.max(tl.abs(v), 1), BM)
    return _to_e4m3(v, inv, EXPLICIT_ROUND), scale


@triton.jit
def _round_to(v, ROUND: tl.constexpr):
    """v fp32 rounded through the activation dtype (0 fp32, 1 fp16, 2 bf16)."""
    if ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                          BM: tl.constexpr, G: tl.constexpr, ONE_GROUP: tl.constexpr,
                          EXPLICIT_ROUND: tl.constexpr, USE_GDC: tl.constexpr):
    """Grid (cdiv(M, BM), KB): rows [pid0*BM, +BM), group pid1 of G columns; ONE_GROUP: the whole row
    (one scale per token), walked in chunks of G twice (amax, then quantize)."""
    if USE_GDC:   # x may be the output of the launch before it; then the GEMM after it may launch
        gdc_wait()  # (before that one reads expert_offsets and scales ahead of its own wait)
        gdc_launch_dependents()
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, G)
    if ONE_GROUP:
        scale, inv = _scales(_row_amax(x_ptr, rows64, row_ok, stride_xm, K, BM, G), BM)
        for k0 in range(0, K, G):
            ok = row_ok[:, None] & (k0 + offs < K)[None, :]
            v = tl.load(x_ptr + rows64[:, None] * stride_xm + (k0 + offs)[None, :], mask=ok, other=0.0)
            tl.store(q_ptr + rows64[:, None] * stride_qm + (k0 + offs)[None, :],
                     _to_e4m3(v.to(tl.float32), inv, EXPLICIT_ROUND), mask=ok)
        tl.store(s_ptr + rows64 * stride_sm, scale, mask=row_ok)
    else:
        cols = tl.program_id(1) * G + offs
        ok = row_ok[:, None] & (cols < K)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
        q, scale = _quantize_tile(v.to(tl.float32), BM, EXPLICIT_ROUND)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=ok)
        tl.store(s_ptr + rows64 * stride_sm + tl.program_id(1) * stride_sk, scale, mask=row_ok)


@triton.jit
def _scatter_rows(q_ptr, s_ptr, q, scale, row_index_ptr, tok, t_ok, cols, col_ok, kept_end, group,
                  stride_qm, stride_sm, stride_sk, K: tl.constexpr, BT: tl.constexpr):
    """Writes the quantized rows q [BT, G] (columns cols) and their scales [BT] (column group `group`)
    to the K rows row_index[tok, k] of each token; rows >= kept_end (dropped slots) get a quantized zero
    row: q = 0 and the scale of an all-zero group."""
    zero_scale = tl.math.div_rn(tl.full([BT], 1e-12, tl.float32), tl.full([BT], 448.0, tl.float32))
    for k in tl.static_range(K):
        dest = tl.load(row_index_ptr + tok.to(tl.int64) * K + k, mask=t_ok, other=0)
        kept = dest < kept_end
        dest64 = dest.to(tl.int64)
        if q is not None:
            tl.store(q_ptr + dest64[:, None] * stride_qm + cols[None, :],
                     tl.where(kept[:, None], q, tl.zeros_like(q)), mask=t_ok[:, None] & col_ok[None, :])
        if scale is not None:
            tl.store(s_ptr + dest64 * stride_sm + group * stride_sk, tl.where(kept, scale, zero_scale),
                     mask=t_ok)


@triton.jit
def _permute_fp8_kernel(x_ptr, row_index_ptr, offsets_ptr, q_ptr, s_ptr, T, H, E, stride_xt, stride_qm,
                        stride_sm, stride_sk, K: tl.constexpr, BT: tl.constexpr, G: tl.constexpr,
                        ONE_GROUP: tl.constexpr, EXPLICIT_ROUND: tl.constexpr):
    """moge::permute_fp8. Grid (cdiv(T, BT), KB): tokens [pid0*BT, +BT), column group pid1 of G columns
    (ONE_GROUP: the whole row, walked twice: amax, then quantize and write). Each hidden row is read once
    (twice with ONE_GROUP) and quantized once for its K copies (quantization is per row: every copy of a
    token is the same e4m3 row)."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = tok < T
    tok64 = tok.to(tl.int64)
    offs = tl.arange(0, G)
    kept_end = tl.load(offsets_ptr + E)          # rows >= expert_offsets[E]: dropped slots
    if ONE_GROUP:
        scale, inv = _scales(_row_amax(x_ptr, tok64, t_ok, stride_xt, H, BT, G), BT)
        for k0 in range(0, H, G):
            cols = k0 + offs
            ok = t_ok[:, None] & (cols < H)[None, :]
            v = tl.load(x_ptr + tok64[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0)
            q = _to_e4m3(v.to(tl.float32), inv, EXPLICIT_ROUND)
            _scatter_rows(q_ptr, s_ptr, q, None, row_index_ptr, tok, t_ok, cols,
                          cols < H, kept_end, 0, stride_qm, stride_sm, stride_sk, K, BT)
        _scatter_rows(q_ptr, s_ptr, None, scale, row_index_ptr, tok, t_ok, offs, offs < 0, kept_end, 0,
                      stride_qm, stride_sm, stride_sk, K, BT)
    else:
        cols = tl.program_id(1) * G + offs
        ok = t_ok[:, None] & (cols < H)[None, :]
        v = tl.load(x_ptr + tok64[:, None] * stride_xt + cols[None, :], mask=ok, other=0.0)
        q, scale = _quantize_tile(v.to(tl.float32), BT, EXPLICIT_ROUND)
        _scatter_rows(q_ptr, s_ptr, q, scale, row_index_ptr, tok, t_ok, cols, cols < H, kept_end,
                      tl.program_id(1), stride_qm, stride_sm, stride_sk, K, BT)


@triton.jit
def _scale_row(r, PART_ROWS, NB, BLOCK_N: tl.constexpr):
    """Row of w_scale[e] viewed [P*NB, KB] that holds weight row r: its projection, then its block."""
    return (r // PART_ROWS) * NB + (r % PART_ROWS) // BLOCK_N


@triton.jit
def _col_scales(ws_ptr, kb, r0, W_ROWS, KB, PART_ROWS, NB, BN: tl.constexpr, BLOCK_N: tl.constexpr,
                SCALAR_COLS: tl.constexpr):
    """Weight scales of k-block kb for a sub-tile of weight rows [r0, r0 + BN): one scalar when the
    sub-tile lies in one BLOCK_N block (SCALAR_COLS), else [BN] (rows past W_ROWS: 1, never stored)."""
    if SCALAR_COLS:
        return tl.load(ws_ptr + _scale_row(r0, PART_ROWS, NB, BLOCK_N) * KB + kb, mask=r0 < W_ROWS,
                       other=1.0)
    else:
        r = r0 + tl.arange(0, BN)
        return tl.load(ws_ptr + _scale_row(r, PART_ROWS, NB, BLOCK_N) * KB + kb, mask=r < W_ROWS,
                       other=1.0)


@triton.jit
def _outer(sa, sc, SCALAR_COLS: tl.constexpr, SWAP_AB: tl.constexpr):
    """Block scale of each accumulator element, sa [BM] x sc (scalar or [BN]): a row vector [BM, 1]
    when sc is one scalar (one multiply per element where it is applied), else [BM, BN]; with SWAP_AB
    the accumulator is [BN, BM] and so is the scale ([1, BM] for one scalar)."""
    if SWAP_AB:
        if SCALAR_COLS:
            return (sa * sc)[None, :]
        else:
            return sc[:, None] * sa[None, :]
    else:
        if SCALAR_COLS:
            return (sa * sc)[:, None]
        else:
            return sa[:, None] * sc[None, :]


@triton.jit
def _fp8_dot(a, b, acc, PER_K: tl.constexpr, FAST_ACC: tl.constexpr, BK: tl.constexpr,
             SWAP_AB: tl.constexpr):
    """One k-step's product of the x tile a [BM, BK] and a weight sub-tile b [BN, BK], both e4m3 and
    k-contiguous (FP8 wgmma takes both operands k-major): a @ b^T [BM, BN], or with SWAP_AB b @ a^T
    [BN, BM], the weight rows on the MMA's M side (64 or 128 rows an instruction) and the few rows of x on
    its N side (16 an instruction): at decode, where an expert has a row or two, the 64-row M side of a
    wgmma would be mostly padding. PER_K: the product alone (zero start), scaled and added by the caller;
    else accumulated into acc, promoted to fp32 every BK unless FAST_ACC."""
    if SWAP_AB:
        lhs = b
        rhs = tl.trans(a)
    else:
        lhs = a
        rhs = tl.trans(b)
    if PER_K:
        return tl.dot(lhs, rhs)
    elif FAST_ACC:   # one chain of wgmmas over all of K: none waits for the one before it
        return tl.dot(lhs, rhs, acc)
    else:
        return tl.dot(lhs, rhs, acc, max_num_imprecise_acc=BK)


@triton.jit
def _fp8_gemm_kernel(
        x_ptr, x_scale_ptr,      # x [M, K] e4m3 + x_scale [M, KB] fp32 (any strides), or float x with QUANT_X
        w_ptr, w_scale_ptr,      # w [E, W_ROWS, K] e4m3; w_scale [E, P, NB, KB] fp32, contiguous
        x_desc, w_desc,          # USE_TMA: descriptors of x [M, K] (box [BM, BK]), w as [E*W_ROWS, K] ([BN, BK])
        y_ptr, y_scale_ptr,      # out [M, N_OUT] (e4m3 + [M, N_OUT/BN] scales, any strides, with QUANT_OUT)
        offsets_ptr, row_scale_ptr,
        M, N_OUT, K, KB, NB, PART_ROWS, W_ROWS, num_n_tiles, sub_shift,
        stride_xm, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wse, stride_ym, stride_ysm,
        stride_ysk,
        E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_K: tl.constexpr, SWIGLU: tl.constexpr,
        TWO: tl.constexpr, SCALAR_COLS: tl.constexpr, QUANT_X: tl.constexpr,
        QUANT_OUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, ROUND: tl.constexpr,
        EXPLICIT_ROUND: tl.constexpr, USE_TMA: tl.constexpr, ZERO_TAIL: tl.constexpr,
        TILE_N: tl.constexpr, FAST_ACC: tl.constexpr, SWAP_AB: tl.constexpr, USE_GDC: tl.constexpr,
        WAIT_FIRST: tl.constexpr):
    """Grid: (max_row_tiles * num_n_tiles,); see the module docstring. A tile is sub-tile 0 (weight rows
    [col0, col0+BN)) and, with TWO, sub-tile 1 (rows sub_shift further: SwiGLU's up rows, or the next BN
    columns of a plain GEMM), each with its own accumulator. ZERO_TAIL: the programs past the real work
    write zeros to the rows past offsets[E] (grouped_gemm.zero_tail_tile). WAIT_FIRST (the op's first
    launch): every input may be the launch before it's output, so it waits before reading anything."""
    pid = tl.program_id(0)
    if USE_GDC:   # the launch after this one may start now; it waits for this one before reading
        if WAIT_FIRST:   # first: that launch reads expert_offsets ahead of its own wait
            gdc_wait()
        gdc_launch_dependents()
    # Later launches of the op: expert_offsets and the weights are older than the op's chain of launches,
    # read before gdc_wait, while the launch before this one finishes
    experts, starts, ends, m_tiles, work_begin, work_end = _schedule(offsets_ptr, num_n_tiles, E,
                                                                     E_POW2, BM)
    total = tl.max(work_end, 0)
    if pid >= total:
        if USE_GDC and not WAIT_FIRST:
            gdc_wait()
        if ZERO_TAIL:
            zero_tail_tile(y_ptr, offsets_ptr, pid - total, M, N_OUT, num_n_tiles, stride_ym, E, BM, TILE_N)
        return
    e, row0, row_end, pid_n = _locate(pid, experts, starts, ends, m_tiles, work_begin, work_end, BM)
    col0 = pid_n * TILE_N
    r1 = col0 + sub_shift                      # first weight row of sub-tile 1
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = row0 + offs_m
    row_ok = rows < row_end
    rows64 = rows.to(tl.int64)
    # weight rows of the pointer loads (the epilogue computes its column masks after the k loop: values
    # live across the loop would take the accumulators' registers)
    w_ok0 = (col0 + offs_n) < N_OUT
    if SWIGLU:
        w_ok1 = w_ok0
    else:
        w_ok1 = (r1 + offs_n) < N_OUT
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :]
    w_base = w_ptr + e.to(tl.int64) * stride_we
    w_ptrs0 = w_base + ((col0 + offs_n)[:, None] * stride_wn + offs_k[None, :])
    w_ptrs1 = w_base + ((r1 + offs_n)[:, None] * stride_wn + offs_k[None, :])
    ws_ptr = w_scale_ptr + e.to(tl.int64) * stride_wse
    xs_ptrs = x_scale_ptr + rows64 * stride_xsm
    xs_ok = rows < M                           # rows of the next expert have real scales too
    if SWAP_AB:   # [BN, BM] until after the k loop
        acc0 = tl.zeros((BN, BM), dtype=tl.float32)
        acc1 = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc0 = tl.zeros((BM, BN), dtype=tl.float32)
        acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    num_k = tl.cdiv(K, BK)
    w_row0 = e * W_ROWS + col0                 # TMA: sub-tile 0's first row in the [E*W_ROWS, K] view
    # The block scales of k-step 0, then each step prefetches the next step's: [BM] x scales (a
    # coalesced vector with k-major scale storage) and one weight scale per sub-tile (SCALAR_COLS)
    sc0 = _col_scales(ws_ptr, 0, col0, W_ROWS, KB, PART_ROWS, NB, BN, BLOCK_N, SCALAR_COLS)
    sc1 = _col_scales(ws_ptr, 0, r1, W_ROWS, KB, PART_ROWS, NB, BN, BLOCK_N, SCALAR_COLS)
    if USE_GDC and not WAIT_FIRST:   # x and its scales may be the output of the launch before this one
        gdc_wait()
    if PER_K and not QUANT_X:
        sa = tl.load(xs_ptrs, mask=xs_ok, other=1.0)
    else:
        sa = tl.full([BM], 1.0, tl.float32)
    for kk in range(num_k):
        k_ok = offs_k < K - kk * BK
        if PER_K:
            # next step's scales (the last step reloads its own: always in bounds)
            kb_next = (tl.minimum(kk + 1, num_k - 1) * BK) // BLOCK_K
            if not QUANT_X:
                sa_next = tl.load(xs_ptrs + kb_next * stride_xsk, mask=xs_ok, other=1.0)
            sc0_next = _col_scales(ws_ptr, kb_next, col0, W_ROWS, KB, PART_ROWS, NB, BN, BLOCK_N,
                                   SCALAR_COLS)
            if TWO:
                sc1_next = _col_scales(ws_ptr, kb_next, r1, W_ROWS, KB, PART_ROWS, NB, BN, BLOCK_N,
                                       SCALAR_COLS)
        if USE_TMA:
            # Rows past M and columns past K are zero-filled; rows of the next expert (x) and weight
            # rows past N_OUT are loaded but their outputs are never stored. No pointer tensors.
            a = x_desc.load([row0, kk * BK])
            b0 = w_desc.load([w_row0, kk * BK])
            if TWO:
                b1 = w_desc.load([w_row0 + sub_shift, kk * BK])
        else:
            if QUANT_X:
                xf = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a, sa = _quantize_tile(xf, BM, EXPLICIT_ROUND)
            else:
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b0 = tl.load(w_ptrs0, mask=w_ok0[:, None] & k_ok[None, :], other=0.0)
            if TWO:
                b1 = tl.load(w_ptrs1, mask=w_ok1[:, None] & k_ok[None, :], other=0.0)
        if PER_K:
            acc0 += _fp8_dot(a, b0, acc0, PER_K, FAST_ACC, BK, SWAP_AB) * _outer(sa, sc0, SCALAR_COLS,
                                                                                 SWAP_AB)
            if TWO:
                acc1 += _fp8_dot(a, b1, acc1, PER_K, FAST_ACC, BK, SWAP_AB) * _outer(sa, sc1, SCALAR_COLS,
                                                                                     SWAP_AB)
            if not QUANT_X:
                sa = sa_next
            sc0 = sc0_next
            if TWO:
                sc1 = sc1_next
        else:
            acc0 = _fp8_dot(a, b0, acc0, PER_K, FAST_ACC, BK, SWAP_AB)
            if TWO:
                acc1 = _fp8_dot(a, b1, acc1, PER_K, FAST_ACC, BK, SWAP_AB)
        x_ptrs += BK
        w_ptrs0 += BK
        w_ptrs1 += BK
    if SWAP_AB:
        acc0 = tl.trans(acc0)
        acc1 = tl.trans(acc1)
    if not PER_K:   # per-channel weights, per-token activations: one scale each, applied once
        sa = tl.load(xs_ptrs, mask=xs_ok, other=0.0)
        acc0 = acc0 * (sa[:, None] * _col_scales(ws_ptr, 0, col0, W_ROWS, KB, PART_ROWS, NB, BN, BLOCK_N,
                                                 False)[None, :])
        if TWO:
            acc1 = acc1 * (sa[:, None] * _col_scales(ws_ptr, 0, r1, W_ROWS, KB, PART_ROWS, NB, BN,
                                                     BLOCK_N, False)[None, :])
    row_ok = (row0 + offs_m) < row_end
    ok0 = (col0 + offs_n) < N_OUT
    if SWIGLU:
        out = _round_to(acc0 * tl.sigmoid(acc0) * acc1, ROUND)    # h as the bf16 path stores it
        y_ptrs = y_ptr + rows64[:, None] * stride_ym + (col0 + offs_n)[None, :]
        mask = row_ok[:, None] & ok0[None, :]
        if QUANT_OUT:   # this tile's BN columns are one scale group of the down GEMM's activations
            q, s = _quantize_tile(tl.where(ok0[None, :], out, 0.0), BM, EXPLICIT_ROUND)
            tl.store(y_ptrs, q, mask=mask)
            tl.store(y_scale_ptr + rows64 * stride_ysm + pid_n * stride_ysk, s, mask=row_ok)
        else:
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_ROW_SCALE:
            rs = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
            acc0 = acc0 * rs
            acc1 = acc1 * rs
        y_ptrs = y_ptr + rows64[:, None] * stride_ym + (col0 + offs_n)[None, :]
        tl.store(y_ptrs, acc0.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & ok0[None, :])
        if TWO:
            ok1 = (r1 + offs_n) < N_OUT
            tl.store(y_ptrs + BN, acc1.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & ok1[None, :])


# Cached launches (launch.Kernel: Triton's per-call argument binding done once per specialisation)
# USE_GDC and launch_pdl (launch.use_pdl): every launch may start while the one before it finishes
# (programmatic dependent launch), waiting (gdc_wait) before it reads what that one wrote: the op's
# first launch before it reads anything (its inputs may be the previous op's outputs), a later one after
# it has scheduled its tile from what is older than the op.
_quantize_rows = Kernel(_quantize_rows_kernel, ("BM", "G", "ONE_GROUP", "EXPLICIT_ROUND", "USE_GDC", "num_warps",
                                                "launch_pdl"))
_permute = Kernel(_permute_fp8_kernel, ("K", "BT", "G", "ONE_GROUP", "EXPLICIT_ROUND", "num_warps"))
_gemm = Kernel(_fp8_gemm_kernel, (
    "E", "E_POW2", "BM", "BN", "BK", "BLOCK_N", "BLOCK_K", "PER_K", "SWIGLU", "TWO", "SCALAR_COLS", "QUANT_X",
    "QUANT_OUT", "HAS_ROW_SCALE", "ROUND", "EXPLICIT_ROUND", "USE_TMA", "ZERO_TAIL", "TILE_N", "FAST_ACC",
    "SWAP_AB", "USE_GDC", "WAIT_FIRST", "num_warps", "num_stages", "maxnreg", "launch_pdl"))
Fp8Config = gemm_configs.Fp8Config
_forced: dict[str, Fp8Config] = {}   # bench/bench_fp8.py --sweep, tests: "gate_up" / "down" -> config


def choose_config(M: int, E: int, gemm: str, device: torch.device, block_k: int) -> Fp8Config:
    """A forced config (the sweep), else the committed table of the weight format (gemm_configs)."""
    channel = block_k == 0 and options.current.fp8_fast_accum
    return _forced.get(gemm) or gemm_configs.fp8_table_config(M, E, gemm, device, channel)


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"     # the triton backend runs CPU tensors only under the interpreter


def quantize_rows(x: torch.Tensor, group: int, q=None, s=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (e4m3 [M, K], fp32 scales [M, ceil(K/group)] or [M, 1] for group 0, k-major),
    written to q and s where given (else allocated). A dependent launch where launch.use_pdl: it waits
    for the launch before it before reading x."""
    M, K = x.shape
    if q is None:
        q = torch.empty(M, K, dtype=fp8.E4M3, device=x.device)
        s = fp8.new_scales(x, M, K, group)
    kb = s.shape[1]
    if M == 0 or K == 0:
        return q, s.fill_(fp8.MIN_SCALE)
    G = 128 if group == 0 else group
    BM = 32
    pdl = use_pdl(x.device)
    _quantize_rows.launch((cdiv(M, BM), kb), (x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0), s.stride(1)),
                          (BM, G, group == 0, _interpreted(x), pdl, 4, pdl))
    return q, s


def permute_fp8(hidden, row_index, expert_offsets, group=128):
    """Registered as triton's moge::permute_fp8: (x_q [M, H] e4m3, x_scale [M, KB] fp32, k-major)."""
    T, K = row_index.shape
    M, H = T * K, hidden.shape[1]
    q = torch.empty(M, H, dtype=fp8.E4M3, device=hidden.device)
    s = fp8.new_scales(hidden, M, H, group)
    if M == 0 or H == 0:
        return q, s.fill_(fp8.MIN_SCALE)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    row_index = row_index.contiguous()
    kb = s.shape[1]
    G = 128 if group == 0 else group
    BT = max(1, 4096 // G)        # 4096 elements a program: 32 tokens of a 128-column group
    _permute.launch((cdiv(T, BT), 1 if group == 0 else kb), (
        hidden, row_index, expert_offsets, q, s, T, H, expert_offsets.shape[0] - 1, hidden.stride(0),
        q.stride(0), s.stride(0), s.stride(1)), (K, BT, G, group == 0, _interpreted(hidden), 4))
    return q, s


def launch_fp8_gemm(x, x_scale, w, w_scale, expert_offsets, out, out_scale, block_n, block_k, cfg, *,
                    swiglu, quant_x, quant_out, round_dtype, row_scale=None, zero_tail=False, chained=False):
    """out[rows of e] = x[rows of e] @ dequant(w[e])^T (SwiGLU of it with swiglu); zero_tail: zeros in
    out's rows past expert_offsets[E]; chained: not its op's first launch (the row kernel or gate_up ran
    before it in this op), so it reads expert_offsets before waiting for that launch. No host sync."""
    M, K = x.shape
    E, w_rows = w.shape[:2]
    n_out = w_rows // 2 if swiglu else w_rows
    if M == 0 or n_out == 0:
        return out
    BK = 128 if block_k == 0 else min(block_k, 128)
    per_k = block_k != 0
    BM = cfg.block_m
    two = swiglu or cfg.block_n > 128
    BN = cfg.block_n // 2 if two and not swiglu else cfg.block_n
    sub_shift = n_out if swiglu else BN
    tile_n = BN * 2 if two and not swiglu else BN
    if quant_x and not (per_k and BK == block_k):
        raise AssertionError("quantize-in-load needs one scale group per k-slice")
    if quant_out and not (per_k and BN == block_k):
        raise AssertionError("epilogue quantization needs one scale group per column tile")
    NB, KB = w_scale.shape[2], w_scale.shape[3]
    part_rows = w_rows // w_scale.shape[1]
    # one weight scale per sub-tile and k-step when a sub-tile lies in one block of one projection
    # (SwiGLU's gate sub-tile may run past I into up rows: columns never stored)
    scalar_cols = per_k and block_n % BN == 0 and (swiglu or part_rows % BN == 0)
    num_n_tiles = cdiv(n_out, tile_n)
    max_row_tiles = min(M, cdiv(M, BM) + min(E, M))
    has_row_scale = row_scale is not None
    # TMA: e4m3 x (not quantized in the load), 16-byte aligned rows (K % 16 == 0), Hopper or the
    # interpreter; a box row is BK = 128 bytes, one 128-byte swizzle line
    use_tma = cfg.tma and not quant_x and x.dtype == fp8.E4M3 and w.is_contiguous() and _tma_ok(x, w)
    if use_tma:
        if x.is_cuda:
            ensure_context(x.device)
        x_desc = cached_descriptor(x, [BM, BK])
        w_desc = cached_descriptor(w.view(E * w_rows, K), [BN, BK])
    else:
        x_desc, w_desc = x, w          # placeholders, never read
    xs = x_scale if x_scale is not None else x
    os_ = out_scale if out_scale is not None else out
    pdl = use_pdl(x.device)
    _gemm.launch((max_row_tiles * num_n_tiles,), (
        x, xs, w, w_scale, x_desc, w_desc, out, os_, expert_offsets, row_scale if has_row_scale else out,
        M, n_out, K, KB, NB, part_rows, w_rows, num_n_tiles, sub_shift,
        x.stride(0), xs.stride(0) if x_scale is not None else 0,
        xs.stride(1) if x_scale is not None else 0, w.stride(0), w.stride(1), w_scale.stride(0),
        out.stride(0), os_.stride(0) if out_scale is not None else 0,
        os_.stride(1) if out_scale is not None else 0), (
        E, max(2, pow2(E)), BM, BN, BK, block_n, max(block_k, 1), per_k, swiglu, two, scalar_cols, quant_x,
        quant_out, has_row_scale, ROUND_CODES[round_dtype], _interpreted(x), use_tma, zero_tail and not swiglu,
        tile_n, not per_k and options.current.fp8_fast_accum, cfg.swap, pdl, not chained, cfg.num_warps,
        cfg.num_stages, launch_cap(cfg, x), pdl))
    return out


def launch_cap(cfg: Fp8Config, x: torch.Tensor):
    """The config's register cap (launch option maxnreg) for a compiled launch, else None."""
    return cfg.maxnreg if cfg.maxnreg and not _interpreted(x) else None


def _prepare(x, w, w_scale, name, block_k):
    fp8.check_fp8_device(name, x.device)
    if block_k and not (block_k % 128 == 0 or (32 <= block_k <= 128 and block_k & (block_k - 1) == 0)):
        raise ValueError(f"{name}: the triton fp8 kernels take block_k = 0 (per channel), a multiple of "
                         f"128, or a power of two in [32, 128], got block_k={block_k}; use the reference "
                         f"backend for other blocks")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, w.contiguous(), w_scale.contiguous()


def _quantizes_in_load(cfg: Fp8Config, block_k: int) -> bool:
    """Whether x (bf16) is quantized in the GEMM's own load (QUANT_X) rather than by the row kernel first:
    16-row tiles that are not swapped, one 128-column scale group a k-slice."""
    return block_k == 128 and cfg.block_m <= 16 and not cfg.swap


def grouped_gemm_fp8(x, w, w_scale, expert_offsets, block_n=128, block_k=128):
    """Registered as triton's moge::grouped_gemm_fp8: [M, N] in x's dtype."""
    x, w, w_scale = _prepare(x, w, w_scale, "w", block_k)
    offsets = expert_offsets.contiguous()
    M, E = x.shape[0], w.shape[0]
    y = x.new_empty(M, w.shape[1])
    if x.shape[1] == 0:
        return y.zero_()
    cfg = choose_config(M, E, "down", x.device, block_k)
    fuse = _quantizes_in_load(cfg, block_k)
    xq, xs = (x, None) if fuse else quantize_rows(x, block_k)
    return launch_fp8_gemm(xq, xs, w, w_scale, offsets, y, None, block_n, block_k, cfg, swiglu=False,
                           quant_x=fuse, quant_out=False, round_dtype=x.dtype, zero_tail=True, chained=not fuse)


def grouped_mlp_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale=None,
                    block_n=128, block_k=128, x_scale=None, out_dtype=None):
    """Registered as triton's moge::grouped_mlp_fp8: [M, H] in x's dtype (out_dtype for e4m3 x with its
    x_scale, quantized already: fp8.quantize_activations' rule, e.g. by permute_fp8). A repeated call
    replays the launches of its plan (_MlpPlan) where one is cached."""
    tensors = (x, x_scale, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale)
    ptrs = [0 if t is None else t.data_ptr() for t in tensors]
    key = _plan_key(tensors, ptrs, block_n, block_k, out_dtype)
    plan = _mlp_plans.get(key)
    if plan is not None and plan is not _UNPLANNED and plan.ready():
        return plan.replay(tensors, ptrs)
    dtype = x.dtype if x_scale is None else out_dtype
    y = torch.empty(x.shape[0], w_down.shape[1], dtype=dtype, device=x.device)
    if plan is _UNPLANNED or not REPLAY or key is None:
        return _mlp_launches(tensors, y, block_n, block_k, dtype)
    with launch.recording() as launches:
        _mlp_launches(tensors, y, block_n, block_k, dtype)
    plan = _MlpPlan.make(launches, tensors, ptrs, y)
    if plan is not None or _all_fast(launches):      # not replayable however it runs: never record again
        if len(_mlp_plans) >= MAX_PLANS:
            _mlp_plans.clear()
        _mlp_plans[key] = plan if plan is not None else _UNPLANNED
    return y


def _mlp_launches(tensors, y, block_n, block_k, dtype):
    """grouped_mlp_fp8's work into y [M, H]: checks, config choice and the launches; its intermediates
    (x and h in e4m3 with their scales, h in the output dtype) are views of one scratch allocation."""
    x, x_scale, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale = tensors
    x, w_gate_up, w_gate_up_scale = _prepare(x, w_gate_up, w_gate_up_scale, "w_gate_up", block_k)
    w_down, w_down_scale = w_down.contiguous(), w_down_scale.contiguous()
    offsets = expert_offsets.contiguous()
    M, H = x.shape
    E, I = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if I == 0 or H == 0:
        return y.zero_()
    if row_scale is not None:
        row_scale = row_scale.to(torch.float32).contiguous()
    cfg_gu = choose_config(M, E, "gate_up", x.device, block_k)
    cfg_dn = choose_config(M, E, "down", x.device, block_k)
    common = dict(round_dtype=dtype)
    down = dict(swiglu=False, quant_out=False, row_scale=row_scale, zero_tail=True, **common)
    if _quantizes_in_load(cfg_gu, block_k):
        # decode (16-row gate_up tiles): x (unless quantized already) and h quantized in the GEMMs'
        # loads, h in the output dtype between them
        (h,) = _scratch(x, [(dtype, M, I)])
        launch_fp8_gemm(x, x_scale, w_gate_up, w_gate_up_scale, offsets, h, None, block_n, block_k, cfg_gu,
                        swiglu=True, quant_x=x_scale is None, quant_out=False, **common)
        return launch_fp8_gemm(h, None, w_down, w_down_scale, offsets, y, None, block_n, block_k, cfg_dn,
                               quant_x=True, chained=True, **down)
    # h quantized in the gate_up epilogue where one column tile of 128 is one scale group; else (per-token
    # scales, block_k = 0, other groups, the H200 table's 64-column tiles) h in the output dtype, then the
    # row kernel
    epilogue = block_k == 128 and cfg_gu.block_n == 128
    parts = [] if x_scale is not None else [(fp8.E4M3, M, H), (torch.float32, M, H, block_k)]
    parts += [] if epilogue else [(dtype, M, I)]
    parts += [(fp8.E4M3, M, I), (torch.float32, M, I, 128 if epilogue else block_k)]
    buffers = _scratch(x, parts)
    if x_scale is None:
        xq, xs = quantize_rows(x, block_k, buffers.pop(0), buffers.pop(0))
    else:
        xq, xs = x, x_scale
    quantized_here = x_scale is None       # then gate_up follows the row kernel
    if epilogue:
        hq, hs = buffers
        launch_fp8_gemm(xq, xs, w_gate_up, w_gate_up_scale, offsets, hq, hs, block_n, block_k, cfg_gu,
                        swiglu=True, quant_x=False, quant_out=True, chained=quantized_here, **common)
    else:
        h, hq, hs = buffers
        launch_fp8_gemm(xq, xs, w_gate_up, w_gate_up_scale, offsets, h, None, block_n, block_k, cfg_gu,
                        swiglu=True, quant_x=False, quant_out=False, chained=quantized_here, **common)
        quantize_rows(h, block_k, hq, hs)
    return launch_fp8_gemm(hq, hs, w_down, w_down_scale, offsets, y, None, block_n, block_k, cfg_dn,
                           quant_x=False, chained=True, **down)


SCRATCH_ALIGN = 128     # bytes; TMA bases need 16 (and Triton specialises pointers on 16-byte alignment)


def _scratch(like: torch.Tensor, parts) -> list:
    """Views of one new allocation on like's device: (dtype, M, K) -> [M, K] row-major; (torch.float32,
    M, K, group) -> activation scales [M, ceil(K/group)] stored k-major, as fp8.new_scales makes them.
    One allocation instead of one per buffer: each costs microseconds of host time."""
    shapes, offsets, total = [], [], 0
    for part in parts:
        dtype, M, K = part[:3]
        if len(part) == 4:
            kb = 1 if part[3] == 0 else -(-K // part[3])
            shapes.append((dtype, (kb, M), True))
            n = kb * M
        else:
            shapes.append((dtype, (M, K), False))
            n = M * K
        offsets.append(total)
        total += -(-n * dtype.itemsize // SCRATCH_ALIGN) * SCRATCH_ALIGN
    buf = torch.empty(total, dtype=torch.uint8, device=like.device)
    views = []
    for (dtype, shape, k_major), off in zip(shapes, offsets):
        n = shape[0] * shape[1]
        v = buf[off:off + n * dtype.itemsize].view(dtype).view(shape)
        views.append(v.t() if k_major else v)
    return views


# ----------------------------------------------------------------------------- replayed mlp calls
# An FP8 mlp call is 3-4 launches whose every argument but the data pointers follows from the shapes,
# strides, dtypes, alignments and device of its tensors, its blocks and the forced configs. The first call
# of such a key runs _mlp_launches (checks, configs, allocations, Kernel.launch) and records its launches;
# later calls allocate y and the scratch buffer and call the recorded launchers with this call's pointers:
# the same kernels, grids and arguments (a launch's tensor arguments map to one of the call's tensors, y
# or the scratch buffer at a fixed offset), without the per-launch argument binding. Calls whose first
# run made a tensor of its own (a copy to contiguous, row_scale converted to fp32), or whose tensors
# share a data pointer, are never replayed.
REPLAY = True            # False: every call through _mlp_launches (tests compare the two)
MAX_PLANS = 4096
_mlp_plans: dict = {}
_UNPLANNED = object()    # a key whose calls are not replayable


def _plan_key(tensors, ptrs, block_n, block_k, out_dtype):
    """Everything that decides an mlp call's launches but its data pointers, or None (no plan: degenerate
    sizes, the interpreter)."""
    x = tensors[0]
    if _INTERPRET or x.shape[0] == 0 or x.shape[1] == 0:
        return None
    # the current device too: the recorded launchers are that device's (Kernel.launch keys on it)
    key = [block_n, block_k, out_dtype, x.device, _forced.get("gate_up"), _forced.get("down"),
           torch._C._cuda_getDevice() if x.is_cuda else None, options.current.fp8_fast_accum,
           options.current.triton_pdl]
    for t, ptr in zip(tensors, ptrs):
        if t is None:
            key.append(None)
        else:
            key += (t.shape, t.stride(), t.dtype, ptr & 15)
    return tuple(key)


def _all_fast(launches) -> bool:
    """Whether the recorded launches went through cached handles (else their handles may come later)."""
    return _hooks_idle() and all(kernel.fast for kernel, _, _, _ in launches)


class _MlpPlan:
    """The recorded launches of one mlp key: per launch its kernel, launcher and constant arguments, the
    positions of its tensor arguments (source, byte offset) and of its TMA descriptors (source, byte
    offset, the descriptor's fields, its base's dtype, shape and strides)."""

    def __init__(self, kernels, steps, scratch_bytes, y_shape, y_dtype, tma_context):
        self.kernels, self.steps = kernels, steps
        self.scratch_bytes, self.y_shape, self.y_dtype = scratch_bytes, y_shape, y_dtype
        self.tma_context = tma_context     # a CUDA TMA launch: ensure_context before it

    def ready(self) -> bool:
        return REPLAY and _hooks_idle() and all(k.fast for k in self.kernels)

    @classmethod
    def make(cls, launches, tensors, ptrs, y):
        """The plan of a recorded call, or None where it cannot be replayed."""
        if not launches or not _all_fast(launches):
            return None
        sources = [p for p in ptrs] + [y.data_ptr()]          # then the scratch buffer, found below
        live = [p for p, t in zip(sources, list(tensors) + [y]) if t is not None and p]
        if len(set(live)) != len(live):
            return None                                       # two tensors share a pointer
        scratch = _scratch_range(launches, set(live))
        if scratch is False:
            return None
        base, end = scratch if scratch else (0, 0)
        n_src = len(sources)

        def locate(ptr):
            if ptr in sources:
                return sources.index(ptr), 0
            if base <= ptr < end:
                return n_src, ptr - base
            return None

        steps = []
        for kernel, grid, args, meta in launches:
            entry = kernel.entry(args, meta)
            if entry is None:
                return None
            run, function, packed, constexprs = entry
            consts = list(args)
            slots, descs = [], []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    where = locate(a.data_ptr())
                    if where is None:
                        return None
                    slots.append((i,) + where)
                    consts[i] = None
                elif TensorDescriptor is not None and isinstance(a, TensorDescriptor):
                    b = a.base
                    where = locate(b.data_ptr())
                    if where is None or not hasattr(a, "__dict__"):
                        return None
                    descs.append((i,) + where + ({**vars(a), "base": None}, b.dtype, tuple(b.shape),
                                                 tuple(b.stride())))
                    consts[i] = None
            n = len(grid)
            grid3 = (grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
            steps.append((run, function, packed, grid3, consts, tuple(slots), tuple(descs), constexprs))
        tma_context = y.is_cuda and any(step[6] for step in steps)
        return cls(tuple({k: None for k, _, _, _ in launches}), steps, end - base, tuple(y.shape), y.dtype,
                   tma_context)

    def replay(self, tensors, ptrs):
        x = tensors[0]
        device = x.device
        y = torch.empty(self.y_shape, dtype=self.y_dtype, device=device)
        srcs = list(ptrs)
        srcs.append(y.data_ptr())
        scratch = None
        if self.scratch_bytes:
            scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=device)
            srcs.append(scratch.data_ptr())
        if self.tma_context:
            ensure_context(device)
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        for run, function, packed, grid, consts, slots, descs, constexprs in self.steps:
            args = list(consts)
            for i, src, off in slots:
                args[i] = srcs[src] + off
            for i, src, off, fields, dtype, shape, strides in descs:
                args[i] = _copy_descriptor(fields, _descriptor_base(tensors, y, scratch, src, off, dtype,
                                                                    shape, strides))
            run(grid[0], grid[1], grid[2], stream, function, packed, None, None, None, *args, *constexprs)
        return y


def _scratch_range(launches, known):
    """(first, end) data pointers of the scratch buffer a recorded call launched with (tensor arguments
    at no known pointer: views of one allocation), () for none, False where they are not one buffer's."""
    owners = {}
    for _, _, args, _ in launches:
        for a in args:
            t = a.base if TensorDescriptor is not None and isinstance(a, TensorDescriptor) else a
            if isinstance(t, torch.Tensor) and t.data_ptr() not in known:
                storage = t.untyped_storage()
                owners[storage.data_ptr()] = storage.nbytes()
    if not owners:
        return ()
    if len(owners) != 1:
        return False
    (first, nbytes), = owners.items()
    return first, first + nbytes


def _descriptor_base(tensors, y, scratch, src, off, dtype, shape, strides):
    """The tensor a replayed TMA descriptor points at: the recorded base's view of this call's tensor."""
    if src < len(tensors):
        t = tensors[src]
    elif src == len(tensors):
        t = y
    else:
        t = scratch
    if t.dtype != dtype:
        t = t.view(dtype)
        off //= dtype.itemsize
    else:
        off //= t.element_size()
    return t.as_strided(shape, strides, t.storage_offset() + off)


register_kernel("triton", "grouped_gemm_fp8", grouped_gemm_fp8, devices=DEVICES)
# grouped_mlp_fp8 also takes e4m3 x (with x_scale: permute_fp8's rows)
register_kernel("triton", "grouped_mlp_fp8", grouped_mlp_fp8, devices=DEVICES,
                dtypes=(torch.float32, torch.float16, torch.bfloat16, fp8.E4M3))
register_kernel("triton", "permute_fp8", permute_fp8, devices=DEVICES)
