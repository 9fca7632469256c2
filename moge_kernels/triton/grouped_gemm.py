"""Triton grouped GEMM over expert-sorted rows: `moge::grouped_gemm` and `moge::grouped_mlp`.

Index arrays (all on the device, none read by the host):
    x               [M, Kd]     rows sorted by expert; rows of expert e are [offsets[e], offsets[e+1])
    w               [E, N, Kd]  nn.Linear layout: y[rows of e] = x[rows of e] @ w[e]^T
    expert_offsets  [E+1] int32 exclusive cumsum of rows per expert; offsets[0] = 0, offsets[E] <= M;
                                rows [offsets[E], M) belong to no expert and get zeros (zero_rows_past_experts)
    w_gate_up       [E, 2I, H]  rows [0, I) gate, rows [I, 2I) up
    w_down          [E, H, I]
    row_scale       [M] fp32    optional factor per output row (routing weights folded into the down GEMM)

Tile schedule, derived on the device so that nothing syncs with the host (CUDA graphs and
torch.compile(fullgraph=True) work): every program loads expert_offsets (a few hundred bytes, an L2 hit
after the first program), counts each expert's row tiles, cdiv(rows_e, BM), takes a cumsum of
tiles * n_tiles, and finds its own (expert, n-tile, m-tile) by searching that cumsum. Programs are
ordered expert-major, then n-tile, then m-tile, so the m-tiles that share one weight tile run side by side
(the weight tile comes from DRAM once, then from L2) and one expert's rows stay in L2 across its n-tiles.
The grid is sized to a static worst case, min(M, cdiv(M, BM) + min(E, M)) row tiles times n_tiles, and
programs past the real work return at once. Empty experts own no tile and cost nothing.

Kernel paths, chosen per launch by the config (gemm_configs.py) and the operands: the tiled kernel with
operands through cp.async pointer loads (decode and small regimes, fp32, pre-Hopper GPUs, weights whose
gate and up halves are not stacked) or through TMA descriptors (Hopper, medium regime and up; rows and
columns past a tile's expert are loaded but never stored, loads past the tensor are zero-filled), each
with "split tails": an expert's last row tile holding at most TAIL_BM rows (BM/2, or a smaller power of
two) runs a main loop of that height, a last column tile at most BN/2 wide a half-width one (the tile
shapes are chosen in one place, _grouped_gemm_kernel, and run by one _gemm_tile); and, for the plain
(down) GEMM of prefill, a persistent TMA kernel (one or more programs per SM walking the same tile
order, tile and k loops flattened into one software pipeline so the epilogue overlaps the next tile's
loads). The tiled and the persistent kernels share one TMA k loop (_tma_k_loop). Each path also reads
packed (k-block-major) weights. Launches go through launch.Kernel (Triton's per-call binding done once
per specialisation), and each launch's plan (config, grid, constexprs) is cached by shape.

grouped_mlp runs two launches of one kernel: gate_up with SwiGLU fused into the epilogue (a program holds
gate columns [n, n+BN) and the matching up columns [I+n, I+n+BN) in fp32 accumulators and writes only
h = silu(gate) * up, [M, I]; the [M, 2I] product never reaches memory), then down, optionally scaling
each output row by row_scale in fp32 before the cast. With pointer loads the gate and up tiles are two
dots into two accumulators; through TMA ("wide") one [2, BN, BK] box of the weights viewed [2E, I, K] and
one dot 2*BN wide into one accumulator, split in the epilogue: one m64n256 wgmma per k-slice instead of
two m64n128, so x's tile is read from shared memory once. From 32 rows per expert on (CUDA, 16-bit), the
experts are split in two halves on two streams, so one half's down GEMM fills the gap after the other
half's gate_up (_two_streams; MOGE_TRITON_MLP_STREAMS=0/1 forces it off/on; more, smaller expert chunks
alternating over the two streams measured slower, bench/results/experts_h100_wide.txt). Deterministic: no
atomics, one program per output tile, fixed summation order.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .. import eager_graphs, options, packing, reference
from ..registry import register_kernel
from . import DEVICES
from . import gemm_configs
from .launch import Kernel, cdiv, ensure_context, gdc_launch_dependents, gdc_wait, pow2, use_pdl

try:   # host-built TMA descriptors (Triton >= 3.4 on Hopper); absent -> pointer loads only
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _schedule(offsets_ptr, num_n_tiles, E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr):
    """Per-expert vectors of the tile schedule, [E_POW2] int32 each (lanes >= E hold zeros)."""
    experts = tl.arange(0, E_POW2)
    in_range = experts < E
    starts = tl.load(offsets_ptr + experts, mask=in_range, other=0)      # first row of each expert
    ends = tl.load(offsets_ptr + experts + 1, mask=in_range, other=0)
    m_tiles = (ends - starts + BM - 1) // BM                            # row tiles per expert
    work = m_tiles * num_n_tiles                                        # tiles per expert
    work_end = tl.cumsum(work, 0)                                       # inclusive
    return experts, starts, ends, m_tiles, work_end - work, work_end


@triton.jit
def _locate(tile, experts, starts, ends, m_tiles, work_begin, work_end, BM: tl.constexpr):
    """Tile index -> (expert, first row, end row of the expert, column-tile index); expert-major,
    then column tile, then row tile, so the row tiles sharing a weight tile are neighbours."""
    e = tl.sum((work_end <= tile).to(tl.int32), 0)                      # first expert ending after it
    mine = experts == e
    local = tile - tl.sum(tl.where(mine, work_begin, 0), 0)
    m_tiles_e = tl.maximum(tl.sum(tl.where(mine, m_tiles, 0), 0), 1)
    row0 = tl.sum(tl.where(mine, starts, 0), 0) + (local % m_tiles_e) * BM
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return e, row0, row_end, local // m_tiles_e


@triton.jit
def _zero_accumulators(BM: tl.constexpr, BN: tl.constexpr, WIDE: tl.constexpr):
    """acc [BM, BN] ([BM, 2*BN] with WIDE: gate columns, then up columns) and acc_up [BM, BN], which the
    compiler removes unless a SwiGLU tile without WIDE uses it."""
    if WIDE:
        acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    return acc, tl.zeros((BM, BN), dtype=tl.float32)


@triton.jit
def _tma_k_loop(x_desc, w_desc, row0, e, col0, W_ROWS, num_k, acc, BN: tl.constexpr, BK: tl.constexpr,
                WIDE: tl.constexpr, PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x[row0 : row0+BM] @ w[e][col0 : col0+BN]^T over all of K through TMA descriptors. WIDE
    (SwiGLU, the only SwiGLU through TMA): w_desc views the weights as [2E, I, K], one [2, BN, BK] box
    holds the gate and the up rows of the tile, and one dot 2*BN wide fills acc [BM, 2*BN] (gate
    columns, then up columns). PACKED: the weights are stored k-block-major (pack_expert_weights, block
    BK) and w_desc views them [E*K/BK*W_ROWS, BK] (with WIDE [E*K/BK*2, I, BK]): each box is one
    contiguous run of memory. Shared by the tiled and persistent kernels."""
    for kk in range(num_k):
        k = kk * BK
        a = x_desc.load([row0, k])
        # the weight slab of this k-slice: expert e's [W_ROWS, K], or with PACKED its k-block kk
        if PACKED:
            slab = e * num_k + kk
            w_k = 0
        else:
            slab = e
            w_k = k
        if WIDE:
            b = w_desc.load([2 * slab, col0, w_k]).reshape(2 * BN, BK)
        else:
            b = w_desc.load([slab * W_ROWS + col0, w_k])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gemm_tile(x_ptr, w_ptr, x_desc, w_desc, y_ptr, row_scale_ptr, bias_ptr, e, row0, row_end, col0,
               N_OUT, K, W_ROWS, stride_xm, stride_we, stride_wn, stride_wkb, stride_ym,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr,
               HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
               WIDE: tl.constexpr, PACK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One [BM, BN] output tile of expert e: rows [row0, min(row0+BM, row_end)), columns [col0, col0+BN)."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    row_ok = (row0 + offs_m) < row_end
    acc, acc_up = _zero_accumulators(BM, BN, WIDE)
    num_k = tl.cdiv(K, BK)
    if USE_TMA:
        # Rows past the expert (the next expert's) and past M (zero-filled by TMA) land in discarded
        # output rows; columns past N_OUT likewise; K past the end is zero-filled.
        # TMA coordinates are int32; E * N < 2^31 for any real layer
        acc = _tma_k_loop(x_desc, w_desc, row0, e, col0, W_ROWS, num_k, acc, BN, BK, WIDE, PACK > 0,
                          DOT_PRECISION)
    else:
        # int64 only in the per-program bases (M*Kd can pass 2^31); in-tile offsets stay int32.
        x_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + (offs_m[:, None] * stride_xm + offs_k[None, :])
        # Clamp weight rows instead of masking them: loads stay in bounds and unmasked along k (16-byte
        # vectors); the duplicated columns past N_OUT are dropped by the store mask.
        w_cols = tl.minimum(col0 + offs_n, N_OUT - 1)
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + (w_cols[:, None] * stride_wn + offs_k[None, :])
        up_shift = N_OUT * stride_wn
        for kk in range(num_k):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - kk * BK
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                if EVEN_K:
                    b_up = tl.load(w_ptrs + up_shift)
                else:
                    b_up = tl.load(w_ptrs + up_shift, mask=k_ok[None, :], other=0.0)
                acc_up = tl.dot(a, tl.trans(b_up), acc_up, input_precision=DOT_PRECISION)
            x_ptrs += BK
            if PACK > 0:   # k-block-major weights: the next k-slice may start the next block
                w_ptrs += BK + tl.where(((kk + 1) * BK) % PACK == 0, stride_wkb - PACK, 0)
            else:
                w_ptrs += BK

    _epilogue(acc, acc_up, y_ptr, row_scale_ptr, bias_ptr, e, row0, row_end, col0, N_OUT, stride_ym, BM, BN,
              SWIGLU, HAS_ROW_SCALE, HAS_BIAS, WIDE)


@triton.jit
def _epilogue(acc, acc_up, y_ptr, row_scale_ptr, bias_ptr, e, row0, row_end, col0, N_OUT, stride_ym,
              BM: tl.constexpr, BN: tl.constexpr, SWIGLU: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
              HAS_BIAS: tl.constexpr, WIDE: tl.constexpr):
    """SwiGLU (or expert e's bias row, HAS_BIAS) and row scale in fp32, cast, masked store of rows
    [row0, row_end) and columns < N_OUT. A plain store, not TMA: a tile's rows past its expert belong to
    the next expert's tile."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    row_ok = (row0 + offs_m) < row_end
    cols = col0 + offs_n
    if WIDE:
        # [BM, 2*BN] -> [BM, BN, 2]: gate and up of one column side by side, then apart
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
        out = gate * tl.sigmoid(gate) * up
    elif SWIGLU:
        out = acc * tl.sigmoid(acc) * acc_up        # silu(gate) * up, fp32
    else:
        out = acc
    if HAS_BIAS:   # bias [E, N_OUT] contiguous
        out = out + tl.load(bias_ptr + e.to(tl.int64) * N_OUT + cols, mask=cols < N_OUT, other=0.0)[None, :]
    if HAS_ROW_SCALE:
        scale = tl.load(row_scale_ptr + row0 + offs_m, mask=row_ok, other=0.0)
        out = out * scale[:, None]
    y_ptrs = y_ptr + row0.to(tl.int64) * stride_ym + (offs_m[:, None] * stride_ym + cols[None, :])
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N_OUT)[None, :])


@triton.jit
def zero_tail_tile(y_ptr, offsets_ptr, tile, M, N_OUT, num_n_tiles, stride_ym, E: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    """Zeros in tile `tile` of the rows of no expert, [offsets[E], M) of y: row tile tile // num_n_tiles,
    column tile tile % num_n_tiles. A grid sized min(M, cdiv(M, BM) + E) row tiles has a spare program
    for every such tile (the tail is one more segment of <= M rows), so the programs past the real work
    run them and no separate launch is needed."""
    rows = tl.load(offsets_ptr + E) + (tile // num_n_tiles) * BM + tl.arange(0, BM)
    cols = (tile % num_n_tiles) * BN + tl.arange(0, BN)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :],
             tl.zeros([BM, BN], dtype=y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N_OUT)[None, :])


@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_kernel(
        x_ptr,              # [M, Kd] expert-sorted rows, row stride stride_xm, unit column stride
        w_ptr,              # [E, W_ROWS, Kd] weights, unit stride along Kd
        x_desc, x_desc_tail,    # TMA descriptors of x, blocks [BM, BK] and [TAIL_BM, BK] (USE_TMA only)
        w_desc, w_desc_half,    # TMA descriptors of w viewed [E*W_ROWS, Kd], blocks [BN, BK], [BN/2, BK]
        y_ptr,              # [M, N_OUT] output (h for SwiGLU)
        offsets_ptr,        # [E+1] int32 expert_offsets
        row_scale_ptr,      # [M] fp32 (HAS_ROW_SCALE only)
        bias_ptr,           # [E, N_OUT] contiguous, x's dtype (HAS_BIAS only, not with SWIGLU)
        M, N_OUT, K, W_ROWS, num_n_tiles,
        stride_xm, stride_we, stride_wn, stride_wkb, stride_ym,
        E: tl.constexpr, E_POW2: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        SWIGLU: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        USE_TMA: tl.constexpr, TAIL_BM: tl.constexpr, SPLIT_N_TAIL: tl.constexpr,
        WIDE: tl.constexpr, PACK: tl.constexpr, DOT_PRECISION: tl.constexpr, ZERO_TAIL: tl.constexpr,
        USE_GDC: tl.constexpr, WAIT_FIRST: tl.constexpr):
    """Grid: (max_row_tiles * num_n_tiles,); see the module docstring for the schedule. ZERO_TAIL: the
    programs past the real work write zeros to the rows past offsets[E] (zero_tail_tile). USE_GDC: a
    dependent launch (programmatic dependent launch; gdc_wait is a no-op where it launched as usual), and
    the next launch may start once every program has begun (and waited, with WAIT_FIRST). WAIT_FIRST (an
    op's first launch): every input may be the launch before it's output (dispatch's or permute's), so it
    waits before reading anything; otherwise (grouped_mlp's down GEMM) it schedules its tile from
    expert_offsets (older than the op) while the launch before it finishes, then waits for that one's
    writes (x)."""
    pid = tl.program_id(0)
    if USE_GDC:
        # An op's first launch waits before it lets the next launch start: that one (the down GEMM) reads
        # expert_offsets before its own wait, so everything before this op must be done by then
        if WAIT_FIRST:
            gdc_wait()
        gdc_launch_dependents()
    experts, starts, ends, m_tiles, work_begin, work_end = _schedule(offsets_ptr, num_n_tiles, E,
                                                                     E_POW2, BM)
    total = tl.max(work_end, 0)
    if USE_GDC and not WAIT_FIRST:
        gdc_wait()
    if pid >= total:
        if ZERO_TAIL:
            zero_tail_tile(y_ptr, offsets_ptr, pid - total, M, N_OUT, num_n_tiles, stride_ym, E, BM, BN)
        return
    e, row0, row_end, pid_n = _locate(pid, experts, starts, ends, m_tiles, work_begin, work_end, BM)
    col0 = pid_n * BN
    # Split tails: an expert's last row tile holding at most TAIL_BM rows (or a last column tile at
    # most half full, SPLIT_N_TAIL) runs a main loop of that size, so its wasted MMA work shrinks
    # (prefill: ~12% of the FLOPs at T=4096). The weight tile it streams stays full size, so a tail tile
    # saves less than its row count suggests when loads, not MMAs, bound the tile.
    # Each enabled tile shape is one unrolled (constexpr) variant behind a runtime test: a tile
    # shape is a constexpr, and with TMA a smaller tile needs its own descriptor.
    fewer_rows = (row_end - row0 <= TAIL_BM) & (TAIL_BM > 0)
    fewer_cols = (N_OUT - col0 <= BN // 2) & SPLIT_N_TAIL
    shape = fewer_rows.to(tl.int32) + 2 * fewer_cols.to(tl.int32)
    for v in tl.static_range(4):                             # bit 0: TAIL_BM rows, bit 1: BN/2 columns
        if (v % 2 == 0 or TAIL_BM > 0) and (v < 2 or SPLIT_N_TAIL):
            if (TAIL_BM == 0 and not SPLIT_N_TAIL) or shape == v:   # (one shape: no test)
                _gemm_tile(x_ptr, w_ptr, x_desc_tail if v % 2 else x_desc,
                           w_desc_half if v >= 2 else w_desc, y_ptr, row_scale_ptr, bias_ptr, e, row0,
                           row_end, col0, N_OUT, K, W_ROWS, stride_xm, stride_we, stride_wn, stride_wkb,
                           stride_ym, TAIL_BM if v % 2 else BM, BN // 2 if v >= 2 else BN, BK, SWIGLU,
                           HAS_ROW_SCALE, HAS_BIAS, EVEN_K, USE_TMA, WIDE, PACK, DOT_PRECISION)


@triton.jit
def _grouped_gemm_persistent_kernel(
        x_desc,             # TMA descriptor of x [M, Kd], block [BM, BK]
        w_desc,             # TMA descriptor of w viewed [E*W_ROWS, Kd], block [BN, BK]
        y_ptr, offsets_ptr, row_scale_ptr, bias_ptr,
        N_OUT, K, W_ROWS, num_n_tiles, num_programs, stride_ym,
        E: tl.constexpr, E_POW2: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Persistent variant of the plain GEMM (the down projection of prefill): grid = (num_programs,),
    one or a few programs per SM, each walking tiles pid, pid + num_programs, ... of the same schedule.
    The tile loop and the k loop are flattened into one software pipeline, so the next tile's first TMA
    loads are in flight during this tile's epilogue (what limits the down GEMM, whose K = I = 1344 is
    only 21 k-steps). Not for SwiGLU: its accumulators leave a persistent gate_up no registers (40%
    slower on an H100, bench/results/experts_h100*.txt)."""
    pid = tl.program_id(0)
    experts, starts, ends, m_tiles, work_begin, work_end = _schedule(offsets_ptr, num_n_tiles, E,
                                                                     E_POW2, BM)
    total = tl.max(work_end, 0)
    num_k = tl.cdiv(K, BK)
    # The epilogue locates its tile again from its own counter (as Triton's persistent matmul tutorial
    # does): a value used both by the loads and by the epilogue would tie the pipeline's stages.
    tile_c = pid - num_programs
    for tile in tl.range(pid, total, num_programs, flatten=True):
        e, row0, _, pid_n = _locate(tile, experts, starts, ends, m_tiles, work_begin, work_end, BM)
        acc, acc_up = _zero_accumulators(BM, BN, False)
        acc = _tma_k_loop(x_desc, w_desc, row0, e, pid_n * BN, W_ROWS, num_k, acc, BN, BK, False, PACKED,
                          DOT_PRECISION)
        tile_c += num_programs
        e_c, row0_c, row_end_c, pid_n_c = _locate(tile_c, experts, starts, ends, m_tiles, work_begin,
                                                  work_end, BM)
        _epilogue(acc, acc_up, y_ptr, row_scale_ptr, bias_ptr, e_c, row0_c, row_end_c, pid_n_c * BN, N_OUT,
                  stride_ym, BM, BN, False, HAS_ROW_SCALE, HAS_BIAS, False)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4             # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _tma_device(device: torch.device) -> bool:
    """Hopper+ (or the interpreter), with host-built TMA descriptors in this Triton."""
    if TensorDescriptor is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return options.TRITON_INTERPRET


def _tma_aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA's 16-byte aligned bases and row strides (x [M, K], w [E, N, K] or packed)."""
    es = x.element_size()
    w_row_stride = w.stride(1)
    if w.dim() == 3 and not w.is_contiguous():
        # the descriptor's rows are _weight_view's [E*N, K]: a view where the experts merge, else a copy
        # of K-wide rows (w[:, :N, :K] of a wider tensor), whose stride is K, not w.stride(1)
        try:
            w_row_stride = w.view(-1, w.shape[2]).stride(0)
        except RuntimeError:
            w_row_stride = w.shape[2]
    return (x.stride(0) * es % 16 == 0 and w_row_stride * es % 16 == 0
            and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA needs Hopper+ (or the interpreter) and 16-byte aligned bases and row strides."""
    return _tma_device(x.device) and _tma_aligned(x, w)


_TILED_META = ("E", "E_POW2", "BM", "BN", "BK", "SWIGLU", "HAS_ROW_SCALE", "HAS_BIAS", "EVEN_K", "USE_TMA",
               "TAIL_BM", "SPLIT_N_TAIL", "WIDE", "PACK", "DOT_PRECISION", "num_warps", "num_stages", "ZERO_TAIL",
               "USE_GDC", "WAIT_FIRST", "launch_pdl")
_tiled = Kernel(_grouped_gemm_kernel, _TILED_META)
_persistent = Kernel(_grouped_gemm_persistent_kernel, ("E", "E_POW2", "BM", "BN", "BK", "HAS_ROW_SCALE",
                                                       "HAS_BIAS", "PACKED", "DOT_PRECISION", "num_warps",
                                                       "num_stages"))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything of one launch that the shapes, strides, dtype, device and config decide."""
    kernel: Kernel
    meta: tuple          # the Kernel's meta tuple
    grid: tuple
    use_tma: bool
    wide: bool
    pack: int
    block_m: int
    block_n: int
    block_k: int
    tail_bm: int
    split_n: bool
    n_out: int
    num_n_tiles: int
    num_programs: int    # persistent kernel only
    # TMA plans: the validated descriptors of the first call, base dropped (_descriptors copies them)
    descriptor_templates: list = dataclasses.field(default_factory=list, compare=False)


_plans: dict[tuple, _Plan] = {}
MAX_PLANS = 4096


def _make_plan(x, w, expert_offsets, out, swiglu, has_row_scale, config, pack, tma_aligned,
               has_bias=False) -> _Plan:
    M, K = x.shape
    E, w_rows = w.shape[:2]
    n_out = w_rows // 2 if swiglu else w_rows
    if config is None:
        config = choose_config(x, w, expert_offsets, out, swiglu)
    if pack:
        config = _fit_to_pack(config, pack, swiglu, x)
    BM, BN, BK = config.block_m, config.block_n, config.block_k
    use_tma = config.tma and tma_aligned and _tma_device(x.device)
    # SwiGLU through TMA is the wide box of a [2E, I, K] view: the gate and up halves of each expert
    # must be stacked (else the pointer loads)
    wide = swiglu and use_tma
    if wide and not (pack or w.stride(0) == w_rows * w.stride(1)):
        use_tma = wide = False
    tail_bm = config.tail_rows()
    if not 16 <= tail_bm < BM:                          # tl.dot needs >= 16 rows
        tail_bm = 0
    # only worth a second main loop when the last column tile is at most half full
    split_n = config.split_n and BN >= 32 and 0 < n_out % BN <= BN // 2
    num_n_tiles = cdiv(n_out, BN)
    max_row_tiles = min(M, cdiv(M, BM) + min(E, M))   # sum_e cdiv(rows_e, BM) <= M/BM + #non-empty
    tiles = max_row_tiles * num_n_tiles
    dot_precision = "ieee" if x.dtype == torch.float32 else "tf32"
    e_pow2 = max(2, pow2(E))
    if use_tma and config.persistent and not swiglu:
        # config.persistent programs per SM (2: a second program's loads cover one's epilogue)
        num_programs = min(tiles, int(config.persistent) * _num_sms(x.device))
        meta = (E, e_pow2, BM, BN, BK, has_row_scale, has_bias, pack > 0, dot_precision, config.num_warps,
                config.num_stages)
        return _Plan(_persistent, meta, (num_programs,), True, False, pack, BM, BN, BK, 0, False, n_out,
                     num_n_tiles, num_programs)
    meta = (E, e_pow2, BM, BN, BK, swiglu, has_row_scale, has_bias, K % BK == 0, use_tma, tail_bm, split_n,
            wide, pack, dot_precision, config.num_warps, config.num_stages)     # + ZERO_TAIL, given per launch
    return _Plan(_tiled, meta, (tiles,), use_tma, wide, pack, BM, BN, BK, tail_bm, split_n, n_out,
                 num_n_tiles, 0)


def _descriptors(plan: _Plan, x, w):
    """(x_desc, x_desc_tail, w_desc, w_desc_half) of a TMA plan. They hold data pointers, so they are
    made per call; but the plan fixes every shape and stride in them, so the first call's
    TensorDescriptor.from_tensor (validation included: ~3 us each) is kept as a template and later calls
    copy it with this call's tensors as bases (16-byte aligned: the plan key's _tma_aligned)."""
    w_view = _weight_view(plan, x, w)
    bases = (x, x, w_view, w_view)
    templates = plan.descriptor_templates
    if not templates:
        BN, BK = plan.block_n, plan.block_k
        box = [2] if plan.wide else []
        descriptors = (TensorDescriptor.from_tensor(x, [plan.block_m, BK]),
                       TensorDescriptor.from_tensor(x, [plan.tail_bm, BK]) if plan.tail_bm else None,
                       TensorDescriptor.from_tensor(w_view, box + [BN, BK]),
                       TensorDescriptor.from_tensor(w_view, box + [BN // 2, BK]) if plan.split_n else None)
        if all(d is None or hasattr(d, "__dict__") for d in descriptors):   # else: from_tensor every call
            templates.extend(None if d is None else _template(d) for d in descriptors)
        x_desc, x_desc_tail, w_desc, w_desc_half = descriptors
        return x_desc, x_desc_tail or x_desc, w_desc, w_desc_half or w_desc
    x_desc, x_desc_tail, w_desc, w_desc_half = (
        None if fields is None else _copy_descriptor(fields, base) for fields, base in zip(templates, bases))
    return x_desc, x_desc_tail or x_desc, w_desc, w_desc_half or w_desc


def _template(desc: "TensorDescriptor") -> dict:
    """A descriptor's fields but its base: what later descriptors of the same shape, strides, dtype and
    box copy (_copy_descriptor)."""
    return {**vars(desc), "base": None}


def _copy_descriptor(fields: dict, base) -> "TensorDescriptor":
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(fields)
    desc.base = base
    return desc


# Templates of cached_descriptor, by (shape, strides, dtype, box); the GEMM plans above keep their own.
_descriptor_templates: dict[tuple, dict] = {}


def cached_descriptor(t: torch.Tensor, box: list) -> "TensorDescriptor":
    """TensorDescriptor.from_tensor(t, box) for a 16-byte aligned t: the first one of each shape,
    strides, dtype and box is made (and validated) once, later ones copy it with t as base."""
    key = (t.shape, t.stride(), t.dtype, tuple(box))
    fields = _descriptor_templates.get(key)
    if fields is not None:
        return _copy_descriptor(fields, t)
    desc = TensorDescriptor.from_tensor(t, box)
    if hasattr(desc, "__dict__"):          # else: from_tensor every call
        if len(_descriptor_templates) >= 4096:
            _descriptor_templates.clear()
        _descriptor_templates[key] = _template(desc)
    return desc


def _weight_view(plan: _Plan, x, w):
    """The weights as the TMA descriptors view them (a view: no copy)."""
    E, w_rows = w.shape[:2]
    K = x.shape[1]
    pack = plan.pack
    if pack:
        # storage order [E, K/B, W_ROWS, B]: a box of BN rows x B is one contiguous run; rows past the
        # last column tile are the next block's (discarded) or, with WIDE, zero-filled
        blocks = E * (K // pack)
        phys = w.permute(0, 2, 1, 3)
        return phys.view(2 * blocks, plan.n_out, pack) if plan.wide else phys.view(blocks * w_rows, pack)
    if plan.wide:
        # rows past I in the last column tile are zero-filled, not the next half's rows
        return w.as_strided((2 * E, plan.n_out, K), (plan.n_out * w.stride(1), w.stride(1), 1))
    return w.view(E * w_rows, K) if w.is_contiguous() else w.reshape(E * w_rows, K)


def launch_grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                        out: torch.Tensor, swiglu: bool, row_scale=None,
                        config: gemm_configs.GemmConfig | None = None, zero_tail: bool = False,
                        bias=None, chained: bool = False) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]^T (+ bias[e]) (or silu(gate) * up of it when swiglu). No host
    sync. zero_tail: also zeros in out's rows past expert_offsets[E] (rows of no expert).

    x [M, Kd] (unit column stride), w [E, W_ROWS, Kd] (unit stride along Kd) or packed
    [E, W_ROWS, Kd/B, B] (packing.pack_expert_weights), out [M, N_OUT] contiguous, expert_offsets [E+1]
    int32 contiguous, row_scale [M] fp32 contiguous or None, bias [E, N_OUT] contiguous or None (not with
    swiglu). Programmatic dependent launch where launch.use_pdl (the tiled kernel; the persistent one
    launches as usual): the launch may start while the one before it on this stream finishes, and waits
    for it before reading any input (an op's first launch: its inputs may be the previous op's outputs),
    or with chained, where x alone is that launch's output and expert_offsets, w, row_scale and bias are
    older (grouped_mlp's down GEMM), before reading x."""
    M, K = x.shape
    E, w_rows = w.shape[:2]
    if M == 0 or w_rows < (2 if swiglu else 1):
        return out
    pack = packing.pack_block(w) if w.dim() == 4 else 0
    # a k-blocked view without k-block-major storage, or blocks no k-slice fits (tl.dot needs a power of
    # two >= 16): a copy in the [E, N, K] layout
    if w.dim() == 4 and (pack < 16 or pack & (pack - 1)):
        w, pack = packing.unpack(w), 0
    tma_aligned = _tma_aligned(x, w)
    has_row_scale, has_bias = row_scale is not None, bias is not None
    key = (M, K, w.shape, w.stride(), x.stride(0), x.dtype, x.device, swiglu, has_row_scale, has_bias, config,
           tma_aligned, gemm_configs.options_key())
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(x, w, expert_offsets, out, swiglu, has_row_scale, config, pack, tma_aligned, has_bias)
        if not gemm_configs.autotune_enabled():    # a tuned choice may still change (capture, first call)
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    scale = row_scale if has_row_scale else out       # placeholders where absent: never read
    bias = bias if has_bias else out
    if plan.use_tma:
        if x.is_cuda:
            ensure_context(x.device)
        x_desc, x_desc_tail, w_desc, w_desc_half = _descriptors(plan, x, w)
    else:
        x_desc = x_desc_tail = x      # placeholders, never read when USE_TMA is off
        w_desc = w_desc_half = w
    if plan.kernel is _persistent:      # launches as usual, even where chained
        _persistent.launch(plan.grid, (x_desc, w_desc, out, expert_offsets, scale, bias, plan.n_out, K, w_rows,
                                       plan.num_n_tiles, plan.num_programs, out.stride(0)), plan.meta)
        return zero_rows_past_experts(out, expert_offsets) if zero_tail else out
    pdl = use_pdl(x.device)
    _tiled.launch(plan.grid, (
        x, w, x_desc, x_desc_tail, w_desc, w_desc_half, out, expert_offsets, scale, bias,
        M, plan.n_out, K, w_rows, plan.num_n_tiles,
        x.stride(0), w.stride(0), w.stride(1), w.stride(2) if pack else 0, out.stride(0)),
        plan.meta + (zero_tail, pdl, not chained, pdl))
    return out


def _fit_to_pack(config, pack, swiglu, x):
    """Packed weights: a k-slice must not straddle two blocks (BK divides the block); a TMA box is
    exactly one block. A halved slice gets twice the stages (the same bytes in flight) before the
    shared-memory fit."""
    bk = pack if config.tma else min(config.block_k, pack)
    while pack % bk:
        bk //= 2
    if bk == config.block_k:
        return config
    stages = config.num_stages * max(1, config.block_k // bk)
    cfg = dataclasses.replace(config, block_k=bk, num_stages=min(stages, 8))
    return gemm_configs.trim_stages(cfg, swiglu, x.element_size(), gemm_configs.device_smem(x.device))


# ----------------------------------------------------------------------------- config choice
_tuned: dict[tuple, gemm_configs.GemmConfig] = {}


@functools.lru_cache(maxsize=4096)
def _table_config(M, E, swiglu, dtype, device, options_key):
    return gemm_configs.table_config(M, E, swiglu, dtype, device)


def choose_config(x, w, expert_offsets, out, swiglu) -> gemm_configs.GemmConfig:
    """Committed table (gemm_configs); with MOGE_TRITON_AUTOTUNE=1, the fastest candidate of the key,
    timed once per key outside CUDA-graph capture and outside torch.compile tracing."""
    M = x.shape[0]
    E = w.shape[0]
    cfg = _table_config(M, E, swiglu, x.dtype, x.device, gemm_configs.options_key())
    if (x.device.type != "cuda" or not gemm_configs.autotune_enabled()
            or gemm_configs.forced_config() is not None):
        return cfg
    key = (pow2(M), E, tuple(w.shape[1:]), x.dtype, swiglu, x.device.index)
    if torch.cuda.is_current_stream_capturing():    # no timing here; a key tuned eagerly keeps its config
        return _tuned.get(key, cfg)
    if key not in _tuned:
        scratch = torch.empty_like(out)
        timings = []
        for cand in gemm_configs.candidates(M, E, swiglu, x.dtype, x.device):
            try:
                ms = triton.testing.do_bench(
                    lambda: launch_grouped_gemm(x, w, expert_offsets, scratch, swiglu, config=cand),
                    warmup=5, rep=20)
            except Exception:   # noqa: BLE001  a candidate that fails to compile or launch is skipped
                continue
            timings.append((ms, cand))
        _tuned[key] = min(timings, key=lambda t: t[0])[1] if timings else cfg
    return _tuned[key]


# ----------------------------------------------------------------------------- rows of no expert
@triton.jit(do_not_specialize=["M", "N"])
def _zero_tail_kernel(y_ptr, offsets_ptr, M, N, stride_ym, E: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (P, cdiv(N, BLOCK_N)): rows [offsets[E], M) of y get zeros, P programs striding over them."""
    start = tl.load(offsets_ptr + E)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty)
    for r0 in range(start + tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], zeros,
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


def zero_rows_past_experts(y: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """Zeros in rows [expert_offsets[E], M) of y [M, N] (unit column stride), the rows of no expert
    (grouped_permute's dropped slots), for outputs whose kernel cannot do it in its spare programs
    (zero_tail_tile): the persistent GEMM, torch._grouped_mm. The bound is device data: no host sync,
    one small launch that returns at once when every row belongs to an expert."""
    M, N = y.shape
    if M == 0 or N == 0:
        return y
    block_n = min(pow2(N), 1024)
    block_m = max(1, 4096 // block_n)
    programs = min(cdiv(M, block_m), 4 if y.device.type != "cuda" else 2 * _num_sms(y.device))
    _zero_tail.launch((programs, cdiv(N, block_n)), (y, expert_offsets, M, N, y.stride(0)),
                      (expert_offsets.shape[0] - 1, block_m, block_n, 4))
    return y


_zero_tail = Kernel(_zero_tail_kernel, ("E", "BLOCK_M", "BLOCK_N", "num_warps"))


# ----------------------------------------------------------------------------- op implementations
def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the reduction dimension only."""
    return t if t.stride(-1) == 1 else t.contiguous()


def grouped_gemm(x, w, expert_offsets, bias=None):
    """Registered as triton's moge::grouped_gemm: [M, N]; bias [E, N] added in the epilogue."""
    x, w, offsets = _unit_inner(x), _unit_inner(w), expert_offsets.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = x.new_empty(x.shape[0], w.shape[1])
    if x.shape[1] == 0:
        return y.zero_() if bias is None else reference.add_expert_bias(y.zero_(), bias, offsets)
    return launch_grouped_gemm(x, w, offsets, y, swiglu=False, zero_tail=True, bias=bias)


_side: dict[int, tuple] = {}     # device index -> (side stream, fork event, join event)


def _side_stream(device: torch.device) -> tuple:
    index = gemm_configs.device_index(device)
    if index not in _side:
        _side[index] = (torch.cuda.Stream(device=index), torch.cuda.Event(), torch.cuda.Event())
    return _side[index]


def _two_streams(x: torch.Tensor, E: int, I: int) -> bool:
    """Split the experts over two streams (CUDA 16-bit inputs, >= 2 experts): one half's down GEMM then
    runs beside the other half's gate_up, filling the gap between the launches. By default in the
    regimes of gemm_configs.TWO_STREAM_REGIMES, and outside CUDA-graph capture (or in an eager_graphs
    capture) only for expert weights of at least EAGER_TWO_STREAM_MIN_WEIGHT_BYTES.
    MOGE_TRITON_MLP_STREAMS=0 / 1 turns it off / on for every size."""
    if not x.is_cuda or E < 2 or x.dtype == torch.float32:
        return False
    flag = options.current.triton_mlp_streams
    if flag is not None:
        return flag
    if gemm_configs.regime(x.shape[0], E) not in gemm_configs.TWO_STREAM_REGIMES:
        return False
    weight_bytes = 3 * E * x.shape[1] * I * x.element_size()          # gate, up and down
    # an eager_graphs capture chooses as its eager call did (the graph replays that call, kernels and all)
    return (weight_bytes >= gemm_configs.EAGER_TWO_STREAM_MIN_WEIGHT_BYTES
            or (torch.cuda.is_current_stream_capturing() and not eager_graphs.capturing))


def grouped_mlp(x, w_gate_up, w_down, expert_offsets, row_scale=None):
    """Registered as triton's moge::grouped_mlp: [M, H]. Only h = silu(gate) * up, [M, I], is stored."""
    x, w_gate_up, w_down = _unit_inner(x), _unit_inner(w_gate_up), _unit_inner(w_down)
    offsets = expert_offsets if expert_offsets.is_contiguous() else expert_offsets.contiguous()
    M, H = x.shape
    E = w_gate_up.shape[0]
    I = w_gate_up.shape[1] // 2
    y = x.new_empty(M, w_down.shape[1])
    if I == 0 or H == 0:
        return y.zero_()
    h = x.new_empty(M, I)                                     # [M, I] SwiGLU output, x's dtype
    if row_scale is not None and (row_scale.dtype != torch.float32 or not row_scale.is_contiguous()):
        row_scale = row_scale.to(torch.float32).contiguous()
    if not _two_streams(x, E, I):
        launch_grouped_gemm(x, w_gate_up, offsets, h, swiglu=True)
        return launch_grouped_gemm(h, w_down, offsets, y, swiglu=False, row_scale=row_scale, zero_tail=True,
                                   chained=True)
    # Experts [0, E/2) on this stream, [E/2, E) on a side stream; offsets hold absolute rows, so a slice
    # of them with the matching weight slice is the same problem on fewer experts. Configs come from the
    # whole problem's key (a half has twice the rows per expert on paper, not in its tiles). No host
    # sync, capturable: the side stream forks from and joins back into this one, whose allocations it
    # uses only between the two.
    cfg_gate_up = choose_config(x, w_gate_up, offsets, h, True)
    cfg_down = choose_config(h, w_down, offsets, y, False)
    half = E // 2
    main = torch.cuda.current_stream(x.device)
    side, fork, join = _side_stream(x.device)
    fork.record(main)
    side.wait_event(fork)
    launch_grouped_gemm(x, w_gate_up[:half], offsets[:half + 1], h, swiglu=True, config=cfg_gate_up)
    launch_grouped_gemm(h, w_down[:half], offsets[:half + 1], y, swiglu=False, row_scale=row_scale,
                        config=cfg_down, chained=True)
    with torch.cuda.stream(side):      # (one stream switch a call: the first half runs where we are)
        launch_grouped_gemm(x, w_gate_up[half:], offsets[half:], h, swiglu=True, config=cfg_gate_up)
        # the half ending at expert E also zeros the rows past offsets[E]
        launch_grouped_gemm(h, w_down[half:], offsets[half:], y, swiglu=False, row_scale=row_scale,
                            config=cfg_down, zero_tail=True, chained=True)
    join.record(side)
    main.wait_event(join)
    return y


def _variant(args, mlp: bool) -> str:
    """explain()'s variant: the committed-table (or forced) config of each GEMM, and the streams;
    with triton_autotune the tuned config may differ."""
    x, w = args[0], args[1]
    M, E, key = x.shape[0], w.shape[0], gemm_configs.options_key()
    table = gemm_configs.table_notice(x.device)
    if not mlp:
        return f"config {_table_config(M, E, False, x.dtype, x.device, key)} ({table})"
    return (f"gate_up {_table_config(M, E, True, x.dtype, x.device, key)}, "
            f"down {_table_config(M, E, False, x.dtype, x.device, key)}, "
            f"{'two streams' if _two_streams(x, E, w.shape[1] // 2) else 'one stream'} ({table})")


register_kernel("triton", "grouped_gemm", grouped_gemm, devices=DEVICES, packed_weights=True, bias=True,
                variant=lambda args: _variant(args, mlp=False))
register_kernel("triton", "grouped_mlp", grouped_mlp, devices=DEVICES, packed_weights=True,
                variant=lambda args: _variant(args, mlp=True))
