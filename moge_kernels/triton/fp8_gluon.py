"""Gluon (Triton's explicit-layout dialect) FP8 block-scaled grouped GEMM for Hopper: the large-M path of
triton's moge::grouped_mlp_fp8 (block format, 128x128 weight blocks, 1x128 activation groups).

Why a second kernel beside fp8_gemm._fp8_gemm_kernel: with block scales every 128-k step's tensor-core
partial sum must be scaled (x_scale[row] * w_scale) before it joins the fp32 accumulator, and plain
Triton (3.6, 3.9) waits for each FP8 wgmma right after issuing it when its result feeds such an FMA, so
the tensor cores idle during the FMAs unless another CTA fills the gap. Here each step's wgmma is issued
asynchronously and the previous step's partial sum is scaled and added while it runs
(warpgroup_mma_wait(num_outstanding=1)): two partial sums in flight, as DeepGEMM does in CUDA. TMA loads
run STAGES - 1 steps ahead through an mbarrier ring.

Tensors (as fp8_gemm.py):
    x          [M, K] e4m3 expert-sorted rows, x_scale [M, KB] fp32 (k-major: one [BM] vector a step)
    w          [E, W_ROWS, K] e4m3 viewed [E*W_ROWS, K] by its TMA descriptor, w_scale [E, P, NB, KB] fp32
    expert_offsets [E+1] int32
A tile is BM rows of one expert and WN accumulator columns fed by one wgmma a k-substep:
    SWIGLU   WN = 2*BN: weight rows [col0, col0+BN) (gate) and [I+col0, I+col0+BN) (up) land in the two
             halves of one [WN, BK] shared-memory stage; the epilogue writes h = silu(gate) * up [BM, BN]
             in the output dtype (the row kernel quantizes it for the down GEMM)
    plain    WN = BN <= 128 consecutive weight rows of one 128-row scale block; the epilogue scales rows
             by row_scale and writes the output dtype
Rows of the next expert and weight rows past the tile's part are loaded but never stored; TMA zero-fills
past the tensors. Programs past the real work zero the rows past expert_offsets[E] (ZERO_TAIL), as the
Triton kernels do. Deterministic: no atomics. Runs on sm_90 only (not under the interpreter).
"""
from __future__ import annotations

import torch

try:   # Gluon is experimental: a Triton without it (or with another API) leaves this path off
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

from .launch import cdiv, pow2

BK = 128          # one scale block of K a k-step
_BK = gl.constexpr(BK) if AVAILABLE else BK


def supported(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, cfg=None, parts: int = 1,
              swiglu: bool = True) -> bool:
    """Whether this kernel can run the GEMM: Hopper, e4m3 x with 16-byte aligned rows, the 128x128 block
    format, contiguous weights; with cfg, its tile: 16 rows a warp, and a plain GEMM's column tiles
    inside one projection (one weight scale a tile)."""
    if not (AVAILABLE and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
            and x.dtype == torch.float8_e4m3fn and block_n == 128 and block_k == 128
            and x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0
            and w.is_contiguous() and w.shape[-1] % 16 == 0 and w.data_ptr() % 16 == 0):
        return False
    return cfg is None or (cfg.block_m == 16 * cfg.num_warps and cfg.block_n <= 128
                           and (swiglu or (w.shape[1] // parts) % cfg.block_n == 0))


if AVAILABLE:
    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _locate_tile(offsets_ptr, pid, num_n_tiles, E: gl.constexpr, E_POW2: gl.constexpr, BM: gl.constexpr,
                     num_warps: gl.constexpr):
        """(expert, first row, end row of the expert, column tile, number of real tiles) of program pid;
        tiles are expert-major, then column tile, then row tile (grouped_gemm._schedule / _locate)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])   # the Triton kernels' default
        experts = gl.arange(0, E_POW2, layout=layout)
        in_range = experts < E
        starts = gl.load(offsets_ptr + experts, mask=in_range, other=0)
        ends = gl.load(offsets_ptr + experts + 1, mask=in_range, other=0)
        m_tiles = (ends - starts + BM - 1) // BM
        work = m_tiles * num_n_tiles
        work_end = gl.associative_scan(work, 0, _add)
        total = gl.max(work_end, 0)
        e = gl.sum((work_end <= pid).to(gl.int32), 0)
        mine = experts == e
        local = pid - gl.sum(gl.where(mine, work_end - work, 0), 0)
        m_tiles_e = gl.maximum(gl.sum(gl.where(mine, m_tiles, 0), 0), 1)
        row0 = gl.sum(gl.where(mine, starts, 0), 0) + (local % m_tiles_e) * BM
        row_end = gl.sum(gl.where(mine, ends, 0), 0)
        return e, row0, row_end, local // m_tiles_e, total

    @gluon.jit
    def _zero_tail(y_ptr, offsets_ptr, tile, M, N_OUT, num_n_tiles, stride_ym, E: gl.constexpr,
                   BM: gl.constexpr, BN: gl.constexpr, num_warps: gl.constexpr):
        """Zeros in tile `tile` of the rows past offsets[E] (grouped_gemm.zero_tail_tile)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows = gl.load(offsets_ptr + E) + (tile // num_n_tiles) * BM + gl.arange(
            0, BM, layout=gl.SliceLayout(1, layout))
        cols = (tile % num_n_tiles) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        gl.store(y_ptr + rows.to(gl.int64)[:, None] * stride_ym + cols[None, :],
                 gl.zeros([BM, BN], y_ptr.dtype.element_ty, layout),
                 mask=(rows < M)[:, None] & (cols < N_OUT)[None, :])

    @gluon.jit
    def _issue_loads(x_desc, w_desc, bars, a_bufs, b_bufs, step, row0, w_row0, sub_shift,
                     STAGES: gl.constexpr, BN: gl.constexpr, SWIGLU: gl.constexpr):
        """TMA loads of k-step `step` into its ring stage: the x box and one (plain) or two (gate, up)
        weight boxes, all counted by the stage's barrier."""
        s = step % STAGES
        bar = bars.index(s)
        k = step * _BK
        if SWIGLU:
            mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [row0, k], bar, a_bufs.index(s))
            b = b_bufs.index(s)
            tma.async_copy_global_to_shared(w_desc, [w_row0, k], bar, b.slice(0, BN))
            tma.async_copy_global_to_shared(w_desc, [w_row0 + sub_shift, k], bar, b.slice(BN, BN))
        else:
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [row0, k], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [w_row0, k], bar, b_bufs.index(s))

    @gluon.jit
    def _load_scales(xs_ptrs, xs_ok, stride_xsk, ws_ptr, srow0, srow1, KB, kk, SWIGLU: gl.constexpr):
        """Block scales of k-step kk, loaded when its wgmma is issued and used a step later (the loads'
        latency off the critical path): x_scale of the tile's rows [BM] and the weight scale of each
        part (gate, up; the plain GEMM's one)."""
        sa = gl.load(xs_ptrs + kk * stride_xsk, mask=xs_ok, other=1.0)
        s0 = gl.load(ws_ptr + srow0 * KB + kk)
        if SWIGLU:
            s1 = gl.load(ws_ptr + srow1 * KB + kk)
        else:
            s1 = s0
        return sa, s0, s1

    @gluon.jit
    def _add_scaled(acc, part, sa, s0, s1, cols, BN: gl.constexpr, SWIGLU: gl.constexpr):
        """acc + part times its block scale (x_scale [BM, 1] times gate / up halves, or one scalar)."""
        if SWIGLU:
            return acc + part * (sa[:, None] * gl.where(cols < BN, s0, s1)[None, :])
        else:
            return acc + part * (sa * s0)[:, None]

    @gluon.jit
    def _mma_step(x_desc, w_desc, bars, a_bufs, b_bufs, step, num_k, row0, w_row0, sub_shift, registers,
                  STAGES: gl.constexpr, BN: gl.constexpr, SWIGLU: gl.constexpr):
        """Waits for k-step `step`'s stage and issues its wgmma (async) into `registers` (their values are
        not read: use_acc=False)."""
        s = step % STAGES
        mbarrier.wait(bars.index(s), (step // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), registers, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _refill(x_desc, w_desc, bars, a_bufs, b_bufs, step, num_k, row0, w_row0, sub_shift, STAGES: gl.constexpr,
                BN: gl.constexpr, SWIGLU: gl.constexpr):
        """After step - 1's wgmma finished, its stage takes the loads of step + STAGES - 1 (steps up to
        step + STAGES - 2 are loaded already)."""
        if step + STAGES - 1 < num_k:
            _issue_loads(x_desc, w_desc, bars, a_bufs, b_bufs, step + STAGES - 1, row0, w_row0, sub_shift,
                         STAGES, BN, SWIGLU)

    @gluon.jit
    def _fp8_gemm_gluon_kernel(
            x_desc, w_desc,              # x [M, K] (box [BM, BK]), w as [E*W_ROWS, K] (box [BN, BK])
            x_scale_ptr, w_scale_ptr,    # [M, KB] fp32 (any strides), [E, P, NB, KB] fp32 contiguous
            y_ptr, offsets_ptr, row_scale_ptr,
            M, N_OUT, K, KB, NB, PART_ROWS, W_ROWS, num_n_tiles, sub_shift,
            stride_xsm, stride_xsk, stride_wse, stride_ym,
            E: gl.constexpr, E_POW2: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
            SWIGLU: gl.constexpr, HAS_ROW_SCALE: gl.constexpr, ROUND: gl.constexpr,
            ZERO_TAIL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Grid: (max_row_tiles * num_n_tiles,); see the module docstring."""
        WN: gl.constexpr = 2 * BN if SWIGLU else BN
        pid = gl.program_id(0)
        e, row0, row_end, pid_n, total = _locate_tile(offsets_ptr, pid, num_n_tiles, E, E_POW2, BM, num_warps)
        if pid >= total:
            if ZERO_TAIL:
                _zero_tail(y_ptr, offsets_ptr, pid - total, M, N_OUT, num_n_tiles, stride_ym, E, BM, BN,
                           num_warps)
            return
        col0 = pid_n * BN
        w_row0 = e * W_ROWS + col0
        # one wgmma instruction spans the tile's WN columns; the warps split its rows (16 a warp)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, WN, 32])
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
        cols = gl.arange(0, WN, layout=gl.SliceLayout(0, acc_layout))
        xs_ptrs = x_scale_ptr + rows.to(gl.int64) * stride_xsm
        xs_ok = rows < M                   # rows of the next expert have real scales too
        ws_ptr = w_scale_ptr + e.to(gl.int64) * stride_wse
        # rows of w_scale[e] viewed [P*NB, KB] of the tile's weight rows (each part lies in one block)
        srow0 = (col0 // PART_ROWS) * NB + (col0 % PART_ROWS) // 128
        r1 = col0 + sub_shift
        srow1 = (r1 // PART_ROWS) * NB + (r1 % PART_ROWS) // 128

        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, _BK], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, WN, _BK], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        num_k = gl.cdiv(K, _BK)
        for i in gl.static_range(STAGES):             # the ring full: steps 0 .. STAGES - 1
            if i < num_k:
                _issue_loads(x_desc, w_desc, bars, a_bufs, b_bufs, i, row0, w_row0, sub_shift, STAGES, BN, SWIGLU)

        # Two partial-sum register sets with fixed roles (a loop that rotated them would make ptxas copy
        # in-flight accumulators and serialize the wgmmas): a step's wgmma writes one set while the
        # previous step's partial sum in the other is scaled into acc. Steps 0, then pairs (odd step into
        # part_b, even step into part_a), then the odd one left over.
        acc = gl.zeros([BM, WN], gl.float32, acc_layout)
        part_b = gl.zeros([BM, WN], gl.float32, acc_layout)
        mbarrier.wait(bars.index(0), 0)
        part_a = warpgroup_mma(a_bufs.index(0), b_bufs.index(0).permute((1, 0)), acc, use_acc=False,
                               is_async=True)
        sa_a, s0_a, s1_a = _load_scales(xs_ptrs, xs_ok, stride_xsk, ws_ptr, srow0, srow1, KB, 0, SWIGLU)
        for kk in range(1, num_k - 1, 2):
            part_b = _mma_step(x_desc, w_desc, bars, a_bufs, b_bufs, kk, num_k, row0, w_row0, sub_shift, part_b,
                               STAGES, BN, SWIGLU)
            sa_b, s0_b, s1_b = _load_scales(xs_ptrs, xs_ok, stride_xsk, ws_ptr, srow0, srow1, KB, kk, SWIGLU)
            done_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
            acc = _add_scaled(acc, done_a, sa_a, s0_a, s1_a, cols, BN, SWIGLU)
            _refill(x_desc, w_desc, bars, a_bufs, b_bufs, kk, num_k, row0, w_row0, sub_shift, STAGES, BN, SWIGLU)
            part_a = _mma_step(x_desc, w_desc, bars, a_bufs, b_bufs, kk + 1, num_k, row0, w_row0, sub_shift,
                               done_a, STAGES, BN, SWIGLU)
            sa_a, s0_a, s1_a = _load_scales(xs_ptrs, xs_ok, stride_xsk, ws_ptr, srow0, srow1, KB, kk + 1, SWIGLU)
            part_b = warpgroup_mma_wait(num_outstanding=1, deps=(part_b,))
            acc = _add_scaled(acc, part_b, sa_b, s0_b, s1_b, cols, BN, SWIGLU)
            _refill(x_desc, w_desc, bars, a_bufs, b_bufs, kk + 1, num_k, row0, w_row0, sub_shift, STAGES, BN,
                    SWIGLU)
        if num_k % 2 == 0:      # step num_k - 1 (odd) into part_b
            last = _mma_step(x_desc, w_desc, bars, a_bufs, b_bufs, num_k - 1, num_k, row0, w_row0, sub_shift,
                             part_b, STAGES, BN, SWIGLU)
            sa_b, s0_b, s1_b = _load_scales(xs_ptrs, xs_ok, stride_xsk, ws_ptr, srow0, srow1, KB, num_k - 1,
                                            SWIGLU)
            done_a = warpgroup_mma_wait(num_outstanding=1, deps=(part_a,))
            acc = _add_scaled(acc, done_a, sa_a, s0_a, s1_a, cols, BN, SWIGLU)
            last = warpgroup_mma_wait(num_outstanding=0, deps=(last,))
            acc = _add_scaled(acc, last, sa_b, s0_b, s1_b, cols, BN, SWIGLU)
        else:
            last = warpgroup_mma_wait(num_outstanding=0, deps=(part_a,))
            acc = _add_scaled(acc, last, sa_a, s0_a, s1_a, cols, BN, SWIGLU)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        out_rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
        out_cols = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
        if SWIGLU:
            gate, up = gl.split(gl.permute(gl.reshape(acc, [BM, 2, BN]), (0, 2, 1)))
            out = gate * (1.0 / (1.0 + gl.exp(-gate))) * up
            if ROUND == 1:
                out = out.to(gl.float16).to(gl.float32)
            elif ROUND == 2:
                out = out.to(gl.bfloat16).to(gl.float32)
            out = gl.convert_layout(out, out_layout)
        else:
            out = gl.convert_layout(acc, out_layout)
            if HAS_ROW_SCALE:
                out = out * gl.load(row_scale_ptr + out_rows, mask=out_rows < row_end, other=0.0)[:, None]
        mask = (out_rows < row_end)[:, None] & (out_cols < N_OUT)[None, :]
        gl.store(y_ptr + out_rows.to(gl.int64)[:, None] * stride_ym + out_cols[None, :],
                 out.to(y_ptr.dtype.element_ty), mask=mask)


def _layout(block: list):
    return gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)


def launch(x, x_scale, w, w_scale, expert_offsets, out, cfg, *, swiglu, round_code, row_scale=None,
           zero_tail=False):
    """out[rows of e] = x[rows of e] @ dequant(w[e])^T (SwiGLU of it with swiglu) through
    _fp8_gemm_gluon_kernel; cfg.block_n: gate and up columns (swiglu) or the tile width (<= 128)."""
    M, K = x.shape
    E, w_rows = w.shape[:2]
    n_out = w_rows // 2 if swiglu else w_rows
    if M == 0 or n_out == 0:
        return out
    BM, BN = cfg.block_m, cfg.block_n
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK], _layout([BM, BK]))
    w_view = w.view(E * w_rows, K)
    w_desc = TensorDescriptor(w_view, [E * w_rows, K], [K, 1], [BN, BK], _layout([BN, BK]))
    num_n_tiles = cdiv(n_out, BN)
    max_row_tiles = min(M, cdiv(M, BM) + min(E, M))
    NB, KB = w_scale.shape[2], w_scale.shape[3]
    has_row_scale = row_scale is not None
    _fp8_gemm_gluon_kernel[(max_row_tiles * num_n_tiles,)](
        x_desc, w_desc, x_scale, w_scale, out, expert_offsets, row_scale if has_row_scale else out,
        M, n_out, K, KB, NB, w_rows // w_scale.shape[1], w_rows, num_n_tiles, n_out if swiglu else 0,
        x_scale.stride(0), x_scale.stride(1), w_scale.stride(0), out.stride(0),
        E, max(2, pow2(E)), BM, BN, swiglu, has_row_scale, round_code, zero_tail and not swiglu,
        cfg.num_stages, num_warps=cfg.num_warps)
    return out
