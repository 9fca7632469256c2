"""Triton `moge::grouped_dispatch`: fused grouped top-k routing + stable permutation of the hidden rows.

Index tensors passed between the kernels (T tokens, E experts in G groups of S = E/G, k_g picks per group,
K = G*k_g slots per token, NB = cdiv(T, ROUTE_BLOCK_T) routing blocks):

    topk_ids        [T, K]   int32  global expert id of slot (t, k), group-major (output)
    topk_weights    [T, K]   fp32   routing weight of slot (t, k) (output)
    slot_rank       [T, K]   int32  scratch: rank of (t, k) among the rows that the tokens of its routing
                                    block send to the same expert (tokens ascending)
    block_base      [NB, E]  int32  scratch: first, per-expert counts of each routing block; after the scan
                                    kernel (when it runs), the permuted row of the first row that block b
                                    sends to expert e
    expert_offsets  [E+1]    int32  exclusive cumsum of rows per expert (output)
    row_index       [T, K]   int32  row of the permuted tensor that slot (t, k) lands on (output):
                                    block_base[t // ROUTE_BLOCK_T, topk_ids[t, k]] + slot_rank[t, k]

Launches (all on the current stream, only allocation between them, no host synchronisation; on sm_90+
the second and third with programmatic dependent launch, launch.use_pdl):

    1. _route_kernel, one program per routing block: softmax/sigmoid over E in fp32, top-k_g per group,
       renormalise, expert_scale; writes topk_ids/topk_weights, slot_rank and the block's per-expert counts.
    2. _scan_kernel, one program per group: turns the counts into expert_offsets and block_base.
    3. _permute_kernel, one program per (token block, H block): row_index, and the copy of each hidden row
       to its K permuted rows (each hidden row is read once and written K times).

Decode (all T tokens in one routing tile of at most FUSED_ROUTE_MAX_ELEMS scores, T <= 8 at E = 64) is
one launch instead: _route_permute_kernel, whose every copy program routes all T tokens itself (the
tile is a few hundred scores) and so knows every row's place.

Why three: a row's position depends on the routing of every earlier token, so some grid-wide step must
follow all the routing (a dependency between programs of one launch needs a grid-wide barrier or
spin-waiting on other programs, and Triton promises neither co-residency nor scheduling order). With few
routing blocks (NB <= FUSED_SCAN_MAX_BLOCKS: T <= 512 at E = 64, the decode regime where each launch's
latency is the cost) every permute program redoes the scan itself from the NB x E counts (a few KB from
L2, overlapped with its hidden-row load) and launch 2 is skipped: two launches. With many blocks that
re-reading would grow as T^2, so the scan gets its own launch.

The MoGE structure does the group-level part of the scan for free: group g always owns the permuted rows
[g*T*k_g, (g+1)*T*k_g), so each group's offsets start at a base known without looking at any data, the
groups are scanned independently (one program each), and only the split among a group's S experts is
data-dependent.

Order inside an expert is stable (ascending token; a token never sends two slots to one expert), so every
output equals the eager reference (`moge_kernels.reference.grouped_dispatch`) bit for bit, except
topk_weights, which can differ from PyTorch's softmax by rounding (reduction order of the denominator).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import options
from ..ops import supports_score_funcs
from ..reference import ScoreFunc
from ..registry import register_kernel
from . import DEVICES
from .launch import Kernel, cdiv, gdc_launch_dependents, gdc_wait, pow2, use_pdl
from .permute import copy_config, copy_grid, copy_program

try:  # accurate expf (the one PyTorch's CUDA softmax uses); Triton's tl.exp is ex2.approx on fp32
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older Triton
    libdevice = None

_INTERPRET = options.TRITON_INTERPRET

# Routing tiles are [ROUTE_BLOCK_T, G_PAD, S_PAD] fp32, at most this many elements (32 tokens at E = 64):
# a routing program's latency grows with its tile (H100: 32 tokens ~3.5 us, 128 tokens ~9 us), and 32
# tokens a program fill the 132 SMs from T = 4096 on while the scan over blocks stays a few microseconds.
ROUTE_BLOCK_ELEMS = 2048
# Up to this many routing blocks the permute programs scan the counts themselves (no scan launch). Small T
# is split into this many blocks (of >= 1 token) so that routing is spread over as many programs.
FUSED_SCAN_MAX_BLOCKS = 16
# Up to this many elements in the routing tile of all T tokens, [pow2(T), G_PAD, S_PAD] (T <= 8 at
# E = 64), one launch routes and permutes (_route_permute_kernel): every copy program routes all the
# tokens itself. Decode pays per launch (a few us of GPU time, ~10 us of host time each).
FUSED_ROUTE_MAX_ELEMS = 512
# Scan tile [SCAN_CHUNK_B blocks, S_PAD experts].
SCAN_TILE_ELEMS = 4096
# reference.ScoreFunc values, as constants the kernel can compare its SCORE_FUNC argument with
_SOFTMAX = tl.constexpr(int(ScoreFunc.SOFTMAX))
_SIGMOID = tl.constexpr(int(ScoreFunc.SIGMOID))


# ----------------------------------------------------------------------------------------- routing
@triton.jit
def _route_tile(logits_ptr, scale_ptr, mask_ptr, use_mask, t3, T, stride_lt, stride_le,
                E: tl.constexpr, S: tl.constexpr, G: tl.constexpr, K_G: tl.constexpr,
                G_PAD: tl.constexpr, S_PAD: tl.constexpr, KG_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                SCORE_FUNC: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
                PRECISE: tl.constexpr):
    """Routing of tokens t3 ([BLOCK_T, 1, 1]): softmax/sigmoid over E in fp32, top-k_g per group
    (among the kept experts of the expert_mask at mask_ptr when use_mask != 0), renormalise, expert_scale.
    Returns expert_id and pick_w ([BLOCK_T, G_PAD, KG_PAD]: global id and
    weight of pick j of group g), pick_s (its expert within the group), taken ([BLOCK_T, G_PAD, S_PAD]:
    1 where a real token picked expert s of group g) and slot_ok (the real picks)."""
    g3 = tl.arange(0, G_PAD)[None, :, None]                          # [1, G_PAD, 1] group
    s3 = tl.arange(0, S_PAD)[None, None, :]                          # [1, 1, S_PAD] expert within group
    j3 = tl.arange(0, KG_PAD)[None, None, :]                         # [1, 1, KG_PAD] pick within group
    tok_ok = t3 < T
    expert_ok = (g3 < G) & (s3 < S)

    x = tl.load(logits_ptr + t3.to(tl.int64) * stride_lt + (g3 * S + s3) * stride_le,
                mask=tok_ok & expert_ok, other=0.0).to(tl.float32)
    # The mask is data and its use a runtime flag, never a specialisation: a call without a mask runs the
    # same binary as one with every expert kept (its load predicated off), so the two agree bit for bit
    # (two compilations may order the float sums below differently). Loaded beside the logits, so the
    # two loads' latencies overlap.
    mask_on = (s3 * 0 + use_mask) != 0                                                       # [1, 1, S_PAD]
    kept = tl.load(mask_ptr + g3 * S + s3, mask=expert_ok & mask_on, other=1) != 0       # [1, G_PAD, S_PAD]
    x = tl.where(expert_ok, x, float("-inf"))   # padding experts score 0; padding tokens stay finite
    # Same formula as PyTorch's softmax (exp(x - max) / sum); with PRECISE also the same exp and an
    # IEEE division, so scores (and thus near-tie rankings) match the eager reference on CUDA.
    if SCORE_FUNC == _SOFTMAX:
        row_max = tl.max(tl.max(x, axis=2), axis=1)[:, None, None]
        if PRECISE:
            p = libdevice.exp(x - row_max)
        else:
            p = tl.exp(x - row_max)
        p = tl.where(expert_ok, p, 0.0)
        denom = tl.sum(tl.sum(p, axis=2), axis=1)[:, None, None]
        scores = tl.math.div_rn(p, denom)
    elif SCORE_FUNC == _SIGMOID:
        if PRECISE:
            e_neg = libdevice.exp(-x)
        else:
            e_neg = tl.exp(-x)
        scores = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + e_neg)
    else:
        tl.static_assert(False, "grouped_dispatch (triton backend): no branch for this score_func "
                                "(a reference.ScoreFunc value)")
    # NaN ranks below every number (reference.route); the pick still carries its NaN weight.
    key = tl.where(scores == scores, scores, float("-inf"))
    kept_count = tl.sum(tl.where(expert_ok & kept, 1, 0), axis=2)[:, :, None]             # [1, G_PAD, 1]

    # Top-k_g per group by k_g rounds of arg-max; ties (NaN ties too) go to the lower expert index.
    taken = tl.zeros([BLOCK_T, G_PAD, S_PAD], dtype=tl.int32)
    pick_s = tl.zeros([BLOCK_T, G_PAD, KG_PAD], dtype=tl.int32)      # expert within group of pick j
    pick_w = tl.zeros([BLOCK_T, G_PAD, KG_PAD], dtype=tl.float32)
    for j in tl.static_range(K_G):
        # Kept experts first (the j picks so far are kept while kept_count > j); a group's masked ones
        # only once it has no kept one left (fewer than k_g kept, which the checks reject): every id
        # stays a distinct expert of its group.
        cand = expert_ok & (taken == 0) & (kept | (kept_count <= j))
        cand_key = tl.where(cand, key, float("-inf"))
        best = tl.max(cand_key, axis=2)[:, :, None]
        best_s = tl.min(tl.where(cand & (cand_key == best), s3, S_PAD), axis=2)[:, :, None]
        is_pick = s3 == best_s
        taken = tl.where(is_pick, 1, taken)
        pick_s = tl.where(j3 == j, best_s, pick_s)
        pick_w = tl.where(j3 == j, tl.sum(tl.where(is_pick, scores, 0.0), axis=2)[:, :, None], pick_w)

    slot_ok = tok_ok & (g3 < G) & (j3 < K_G)
    expert_id = g3 * S + pick_s                                      # [BT, G_PAD, KG_PAD] global id
    if RENORMALIZE:
        total = tl.sum(tl.sum(tl.where(slot_ok, pick_w, 0.0), axis=2), axis=1)[:, None, None]
        total = tl.where(tok_ok, total, 1.0)
        pick_w = tl.math.div_rn(pick_w, total)
    if HAS_SCALE:
        pick_w = pick_w * tl.load(scale_ptr + expert_id, mask=slot_ok, other=1.0).to(tl.float32)
    return expert_id, pick_w, pick_s, tl.where(tok_ok, taken, 0), slot_ok


@triton.jit
def _at_picks(table, pick_s, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, S_PAD: tl.constexpr,
              K_G: tl.constexpr, KG_PAD: tl.constexpr):
    """table [BLOCK_T, G_PAD, S_PAD] read at each pick: [BLOCK_T, G_PAD, KG_PAD]."""
    s3 = tl.arange(0, S_PAD)[None, None, :]
    j3 = tl.arange(0, KG_PAD)[None, None, :]
    out = tl.zeros([BLOCK_T, G_PAD, KG_PAD], dtype=tl.int32)
    for j in tl.static_range(K_G):
        s_j = tl.sum(tl.where(j3 == j, pick_s, 0), axis=2)[:, :, None]
        out = tl.where(j3 == j, tl.sum(tl.where(s3 == s_j, table, 0), axis=2)[:, :, None], out)
    return out


# ----------------------------------------------------------------------------------------- launch 1
@triton.jit(do_not_specialize=["T", "use_mask"])
def _route_kernel(
    logits_ptr,          # [T, E] fp32/bf16/fp16 router logits, strides (stride_lt, stride_le)
    scale_ptr,           # [E] expert_scale, any float dtype; read only if HAS_SCALE
    mask_ptr,            # [E] uint8 expert_mask (1 = may be chosen); read only if use_mask != 0
    topk_ids_ptr,        # [T, K] int32 out
    topk_weights_ptr,    # [T, K] fp32 out
    slot_rank_ptr,       # [T, K] int32 out
    block_base_ptr,      # [NB, E] int32 out: per-block expert counts
    T, stride_lt, stride_le, use_mask,
    E: tl.constexpr, S: tl.constexpr, G: tl.constexpr, K_G: tl.constexpr, K: tl.constexpr,
    G_PAD: tl.constexpr, S_PAD: tl.constexpr, KG_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, SCORE_FUNC: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISE: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (NB,): program b routes tokens [b*BLOCK_T, (b+1)*BLOCK_T)."""
    if USE_GDC:   # the next launch (scan or permute) may start now; it waits for this one before reading
        gdc_launch_dependents()
    pid = tl.program_id(0)
    t3 = (pid * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]     # [BT, 1, 1] token
    g3 = tl.arange(0, G_PAD)[None, :, None]
    j3 = tl.arange(0, KG_PAD)[None, None, :]
    expert_id, pick_w, pick_s, taken, slot_ok = _route_tile(
        logits_ptr, scale_ptr, mask_ptr, use_mask, t3, T, stride_lt, stride_le, E, S, G, K_G, G_PAD, S_PAD,
        KG_PAD, BLOCK_T, SCORE_FUNC, RENORMALIZE, HAS_SCALE, PRECISE)
    slot = t3 * K + g3 * K_G + j3                                    # column g*k_g + j: group-major
    tl.store(topk_ids_ptr + slot, expert_id, mask=slot_ok)
    tl.store(topk_weights_ptr + slot, pick_w, mask=slot_ok)
    # Rank of each pick among this block's picks of the same expert (earlier tokens first).
    earlier = tl.cumsum(taken, axis=0) - taken                       # [BT, G_PAD, S_PAD]
    rank = _at_picks(earlier, pick_s, BLOCK_T, G_PAD, S_PAD, K_G, KG_PAD)
    tl.store(slot_rank_ptr + slot, rank, mask=slot_ok)

    counts = tl.sum(taken, axis=0)                                   # [G_PAD, S_PAD] rows per expert
    g2 = tl.arange(0, G_PAD)[:, None]
    s2 = tl.arange(0, S_PAD)[None, :]
    tl.store(block_base_ptr + pid * E + g2 * S + s2, counts, mask=(g2 < G) & (s2 < S))


# ------------------------------------------------------------------------------ launch 1 + 3, small T
@triton.jit(do_not_specialize=["T", "use_mask"])
def _route_permute_kernel(
    logits_ptr,          # [T, E] router logits, strides (stride_lt, stride_le)
    scale_ptr,           # [E] expert_scale; read only if HAS_SCALE
    mask_ptr,            # [E] uint8 expert_mask; read only if use_mask != 0
    hidden_ptr,          # [T, H] row stride stride_ht, unit column stride
    topk_ids_ptr,        # [T, K] int32 out
    topk_weights_ptr,    # [T, K] fp32 out
    expert_offsets_ptr,  # [E+1] int32 out
    row_index_ptr,       # [T, K] int32 out
    permuted_ptr,        # [T*K, H] out, contiguous
    T, H, stride_lt, stride_le, stride_ht, use_mask,
    E: tl.constexpr, S: tl.constexpr, G: tl.constexpr, K_G: tl.constexpr, K: tl.constexpr,
    G_PAD: tl.constexpr, S_PAD: tl.constexpr, KG_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, SCORE_FUNC: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (cdiv(H, BLOCK_H),), all T <= BLOCK_T tokens in one routing tile: every program routes them
    all (a tile of a few hundred scores), so each knows every row's place, and copies its columns of
    them; program 0 writes the index outputs. One launch instead of two for decode. USE_GDC: the next
    op's first launch may start now (it waits for this one before reading anything)."""
    if USE_GDC:
        gdc_launch_dependents()
    pid_h = tl.program_id(0)
    t3 = tl.arange(0, BLOCK_T)[:, None, None]
    g3 = tl.arange(0, G_PAD)[None, :, None]
    j3 = tl.arange(0, KG_PAD)[None, None, :]
    expert_id, pick_w, pick_s, taken, slot_ok = _route_tile(
        logits_ptr, scale_ptr, mask_ptr, use_mask, t3, T, stride_lt, stride_le, E, S, G, K_G, G_PAD, S_PAD,
        KG_PAD, BLOCK_T, SCORE_FUNC, RENORMALIZE, HAS_SCALE, PRECISE)
    counts = tl.sum(taken, axis=0)                                   # [G_PAD, S_PAD]
    g2 = tl.arange(0, G_PAD)[:, None]
    s2 = tl.arange(0, S_PAD)[None, :]
    # Group g owns rows [g*T*k_g, (g+1)*T*k_g): only the split among its experts needs the counts.
    offsets = g2 * (T * K_G) + tl.cumsum(counts, axis=1) - counts
    earlier = tl.cumsum(taken, axis=0) - taken                       # [BT, G_PAD, S_PAD]
    row = _at_picks(earlier + offsets[None, :, :], pick_s, BLOCK_T, G_PAD, S_PAD, K_G, KG_PAD)
    if pid_h == 0:
        slot = t3 * K + g3 * K_G + j3
        tl.store(topk_ids_ptr + slot, expert_id, mask=slot_ok)
        tl.store(topk_weights_ptr + slot, pick_w, mask=slot_ok)
        tl.store(row_index_ptr + slot, row, mask=slot_ok)
        tl.store(expert_offsets_ptr + g2 * S + s2, offsets, mask=(g2 < G) & (s2 < S))
        tl.store(expert_offsets_ptr + E, T * K)

    t = tl.arange(0, BLOCK_T)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (t < T)[:, None] & (h < H)[None, :]
    rows = tl.load(hidden_ptr + t.to(tl.int64)[:, None] * stride_ht + h[None, :], mask=mask,
                   eviction_policy="evict_first")
    for k in tl.static_range(K):
        row_k = tl.sum(tl.sum(tl.where((g3 == k // K_G) & (j3 == k % K_G), row, 0), axis=2), axis=1)
        tl.store(permuted_ptr + row_k.to(tl.int64)[:, None] * H + h[None, :], rows, mask=mask)


# ----------------------------------------------------------------------------------------- launch 2
# The two passes of a scan over routing blocks, shared with triton/permute.py: block_base is
# [num_blocks, ROW] int32, per-block counts in, per-block first rows out (in place), for the columns
# `cols` (int32 vector, `col_ok` its mask).
@triton.jit
def _column_totals(block_base_ptr, cols, col_ok, num_blocks, ROW: tl.constexpr, CHUNK_B: tl.constexpr):
    """Sum of each column over all blocks."""
    total = tl.zeros_like(cols)
    for b0 in range(0, num_blocks, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        mask = (b < num_blocks)[:, None] & col_ok[None, :]
        total += tl.sum(tl.load(block_base_ptr + b[:, None] * ROW + cols[None, :], mask=mask, other=0), axis=0)
    return total


@triton.jit
def _store_block_bases(block_base_ptr, base, cols, col_ok, num_blocks, ROW: tl.constexpr,
                       CHUNK_B: tl.constexpr):
    """Replace each block's counts by its first row: base (each column's first row) plus the counts of
    the blocks before it. Returns base plus every block's counts (from base 0: the column totals)."""
    for b0 in range(0, num_blocks, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        mask = (b < num_blocks)[:, None] & col_ok[None, :]
        ptrs = block_base_ptr + b[:, None] * ROW + cols[None, :]
        counts = tl.load(ptrs, mask=mask, other=0)
        # Read before write, same program, same addresses: in place is safe.
        tl.store(ptrs, base[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        base += tl.sum(counts, axis=0)
    return base


@triton.jit(do_not_specialize=["T", "num_blocks"])
def _scan_kernel(
    block_base_ptr,      # [NB, E] int32 in: per-block counts; out (in place): per-block base rows
    expert_offsets_ptr,  # [E+1] int32 out
    T, num_blocks,
    E: tl.constexpr, S: tl.constexpr, G: tl.constexpr, K_G: tl.constexpr,
    S_PAD: tl.constexpr, CHUNK_B: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (G,): program g scans the S experts of group g over all routing blocks (two passes)."""
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()                                    # the routing kernel's counts
    g = tl.program_id(0)
    s = tl.arange(0, S_PAD)
    s_ok = s < S
    cols = g * S + s
    total = _column_totals(block_base_ptr, cols, s_ok, num_blocks, E, CHUNK_B)
    # Group g owns rows [g*T*k_g, (g+1)*T*k_g): its base needs no cross-group scan.
    base = g * T * K_G + tl.cumsum(total, axis=0) - total
    tl.store(expert_offsets_ptr + cols, base, mask=s_ok)
    if g == G - 1:
        tl.store(expert_offsets_ptr + E, T * K_G * G)
    _store_block_bases(block_base_ptr, base, cols, s_ok, num_blocks, E, CHUNK_B)


# ----------------------------------------------------------------------------------------- launch 3
@triton.jit(do_not_specialize=["T", "num_blocks"])
def _permute_kernel(
    hidden_ptr,          # [T, H] row stride stride_ht, unit column stride
    topk_ids_ptr,        # [T, K] int32
    slot_rank_ptr,       # [T, K] int32
    block_base_ptr,      # [NB, E] int32: base rows after the scan kernel; FUSED_SCAN: the counts
    expert_offsets_ptr,  # [E+1] int32 out, written only if FUSED_SCAN (by program (0, 0))
    row_index_ptr,       # [T, K] int32 out
    permuted_ptr,        # [T*K, H] out, contiguous
    T, H, stride_ht, num_blocks,
    E: tl.constexpr, S: tl.constexpr, G: tl.constexpr, K_G: tl.constexpr, K: tl.constexpr,
    G_PAD: tl.constexpr, S_PAD: tl.constexpr, NB_PAD: tl.constexpr, FUSED_SCAN: tl.constexpr,
    ROUTE_BLOCK_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, H_FAST: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Grid permute.copy_grid(T, H, BLOCK_T, BLOCK_H, H_FAST): tokens [pid_t*BLOCK_T, +BLOCK_T), columns of
    block pid_h.

    FUSED_SCAN needs BLOCK_T <= ROUTE_BLOCK_T (both powers of two): a program's tokens share one block."""
    if USE_GDC:   # the next op's first launch may start now (it waits for this one before reading)
        gdc_launch_dependents()
    pid_t, pid_h = copy_program(H, BLOCK_H, H_FAST)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = t_ok[:, None] & (h < H)[None, :]
    # int64 addresses: T*K*H passes 2^31 elements (T = 65536, K = 8, H = 5120).
    rows = tl.load(hidden_ptr + t.to(tl.int64)[:, None] * stride_ht + h[None, :], mask=mask,
                   eviction_policy="evict_first")   # read once: keep L2 for the K writes
    if USE_GDC:   # hidden is the caller's (older than the chain); ids, ranks and counts are not
        gdc_wait()
    if FUSED_SCAN:
        # The scan kernel's work for this program's routing block, from all blocks' counts.
        b3 = tl.arange(0, NB_PAD)[:, None, None]
        g3 = tl.arange(0, G_PAD)[None, :, None]
        s3 = tl.arange(0, S_PAD)[None, None, :]
        counts = tl.load(block_base_ptr + b3 * E + g3 * S + s3,
                         mask=(b3 < num_blocks) & (g3 < G) & (s3 < S), other=0)   # [NB_PAD, G_PAD, S_PAD]
        totals = tl.sum(counts, axis=0)                                         # [G_PAD, S_PAD]
        g2 = tl.arange(0, G_PAD)[:, None]
        s2 = tl.arange(0, S_PAD)[None, :]
        # Group g owns rows [g*T*k_g, (g+1)*T*k_g): only the split among its experts needs the counts.
        offsets = g2 * (T * K_G) + tl.cumsum(totals, axis=1) - totals
        if pid_t == 0:
            if pid_h == 0:
                tl.store(expert_offsets_ptr + g2 * S + s2, offsets, mask=(g2 < G) & (s2 < S))
                tl.store(expert_offsets_ptr + E, T * K)
        my_block = (pid_t * BLOCK_T) // ROUTE_BLOCK_T
        base = offsets + tl.sum(tl.where(b3 < my_block, counts, 0), axis=0)    # [G_PAD, S_PAD]
        # global id of each tile entry; padding entries (s >= S) would alias the next group's ids
        expert_of = tl.where((g2 < G) & (s2 < S), g2 * S + s2, -1)[None, :, :]   # [1, G_PAD, S_PAD]
    else:
        block = t // ROUTE_BLOCK_T
    for k in tl.static_range(K):
        expert = tl.load(topk_ids_ptr + t * K + k, mask=t_ok, other=0)
        if FUSED_SCAN:
            row = tl.sum(tl.sum(tl.where(expert_of == expert[:, None, None], base[None, :, :], 0), axis=2), axis=1)
        else:
            row = tl.load(block_base_ptr + block * E + expert, mask=t_ok, other=0)
        row += tl.load(slot_rank_ptr + t * K + k, mask=t_ok, other=0)
        if pid_h == 0:
            tl.store(row_index_ptr + t * K + k, row, mask=t_ok)
        tl.store(permuted_ptr + row.to(tl.int64)[:, None] * H + h[None, :], rows, mask=mask)


# ----------------------------------------------------------------------------------------- launcher
_ROUTE_META = ("E", "S", "G", "K_G", "K", "G_PAD", "S_PAD", "KG_PAD", "BLOCK_T", "SCORE_FUNC", "RENORMALIZE",
               "HAS_SCALE", "PRECISE", "num_warps")
# USE_GDC and launch_pdl (launch.use_pdl) go together, as in permute.py: the scan and the permute start
# while the kernel before them finishes; the routing kernel, first of the chain, launches as usual.
_route = Kernel(_route_kernel, _ROUTE_META + ("USE_GDC",))
_route_permute = Kernel(_route_permute_kernel, _ROUTE_META + ("BLOCK_H", "USE_GDC"))
_scan = Kernel(_scan_kernel, ("E", "S", "G", "K_G", "S_PAD", "CHUNK_B", "USE_GDC", "num_warps", "launch_pdl"))
_permute = Kernel(_permute_kernel, ("E", "S", "G", "K_G", "K", "G_PAD", "S_PAD", "NB_PAD", "FUSED_SCAN",
                                    "ROUTE_BLOCK_T", "BLOCK_T", "BLOCK_H", "H_FAST", "USE_GDC", "num_warps",
                                    "launch_pdl"))


@functools.lru_cache(maxsize=4096)
def _plan(T, E, H, G, k_g, score_func, renormalize, has_scale, route_block_t, copy_tile, fused, pdl):
    """The launches of one call: (route_permute meta, grid) for the one-launch path, else (route meta,
    num_blocks, scan meta or None, permute meta, permute grid). Pure function of the shapes and flags."""
    S, K = E // G, G * k_g
    g_pad, s_pad, kg_pad = pow2(G), pow2(S), pow2(k_g)
    precise = not _INTERPRET and libdevice is not None
    if fused is None:
        fused = route_block_t is None and copy_tile is None and \
            pow2(T) * g_pad * s_pad <= FUSED_ROUTE_MAX_ELEMS
    if fused:
        block_t = pow2(T)
        # about 1024 elements a program (one 16-byte vector a thread at 4 warps), at least 128 columns
        block_h = min(pow2(H), 1024) if _INTERPRET else min(pow2(H), max(128, 1024 // block_t))
        num_warps = max(1, min(4, block_t * block_h // 256))
        meta = (E, S, G, k_g, K, g_pad, s_pad, kg_pad, block_t, score_func, renormalize, has_scale, precise,
                num_warps, block_h, pdl)
        return meta, (max(1, cdiv(H, block_h)),)
    if route_block_t is None:
        route_block_t = max(1, ROUTE_BLOCK_ELEMS // (g_pad * s_pad))
        if not _INTERPRET:   # (the interpreter pays per program: there, few big blocks)
            route_block_t = min(route_block_t, pow2(cdiv(T, FUSED_SCAN_MAX_BLOCKS)))
    num_blocks = cdiv(T, route_block_t)
    fused_scan = num_blocks <= FUSED_SCAN_MAX_BLOCKS
    route_meta = (E, S, G, k_g, K, g_pad, s_pad, kg_pad, route_block_t, score_func, renormalize, has_scale,
                  precise, 8 if route_block_t * g_pad * s_pad >= 8192 else 4, pdl)
    scan_meta = None if fused_scan else \
        (E, S, G, k_g, s_pad, min(pow2(num_blocks), max(1, SCAN_TILE_ELEMS // s_pad)), pdl, 4, pdl)
    block_t, block_h, num_warps, h_fast = copy_config(T, H, copy_tile)
    if fused_scan:
        block_t = min(block_t, route_block_t)
    permute_meta = (E, S, G, k_g, K, g_pad, s_pad, pow2(num_blocks), fused_scan, route_block_t, block_t,
                    block_h, h_fast, pdl, num_warps, pdl)
    return route_meta, num_blocks, scan_meta, permute_meta, copy_grid(T, H, block_t, block_h, h_fast)


def grouped_dispatch(hidden, router_logits, num_groups, topk_per_group=1, expert_scale=None,
                     renormalize=False, score_func=ScoreFunc.SOFTMAX, expert_mask=None, *,
                     route_block_t=None, copy_config=None, fused=None, pdl=None):
    """Triton kernel of `moge::grouped_dispatch` (arguments already checked by moge_kernels.checks;
    score_func is a reference.ScoreFunc value).

    route_block_t / copy_config=(BLOCK_T, BLOCK_H, num_warps[, H_FAST]) override the tile choice, fused=False /
    True the one-launch path of small T, pdl=True / False the programmatic dependent launch of the
    three-launch path (default launch.use_pdl) (tests, tuning)."""
    T, E = router_logits.shape
    H = hidden.shape[1]
    K = num_groups * topk_per_group
    device = hidden.device
    permuted = torch.empty(T * K, H, dtype=hidden.dtype, device=device)     # [T*K, H]
    topk_weights = torch.empty(T, K, dtype=torch.float32, device=device)    # [T, K] fp32
    topk_ids = torch.empty(T, K, dtype=torch.int32, device=device)          # [T, K] int32
    row_index = torch.empty(T, K, dtype=torch.int32, device=device)         # [T, K] int32
    if T == 0:   # a shape (not data) branch: nothing to route
        return permuted, topk_weights, topk_ids, torch.zeros(E + 1, dtype=torch.int32, device=device), \
            row_index
    expert_offsets = torch.empty(E + 1, dtype=torch.int32, device=device)  # [E+1] int32

    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    has_scale = expert_scale is not None
    if has_scale and not expert_scale.is_contiguous():
        expert_scale = expert_scale.contiguous()
    plan = _plan(T, E, H, num_groups, topk_per_group, int(score_func), bool(renormalize), has_scale,
                 route_block_t, copy_config, fused, use_pdl(device) if pdl is None else bool(pdl))
    scale = expert_scale if has_scale else router_logits
    # The mask's bytes as uint8 (a view, no copy). Absent, any aligned uint8 tensor: the kernel never reads
    # it, and a uint8 pointer aligned like a mask's picks the same compiled kernel as a mask does.
    use_mask = int(expert_mask is not None)
    if use_mask:
        mask = expert_mask.contiguous().view(torch.uint8)
        if mask.data_ptr() % 16:
            mask = mask.clone()
    else:
        mask = topk_ids.view(torch.uint8)
    if len(plan) == 2:
        meta, grid = plan
        _route_permute.launch(grid, (
            router_logits, scale, mask, hidden, topk_ids, topk_weights, expert_offsets, row_index, permuted,
            T, H, router_logits.stride(0), router_logits.stride(1), hidden.stride(0), use_mask), meta)
        return permuted, topk_weights, topk_ids, expert_offsets, row_index

    route_meta, num_blocks, scan_meta, permute_meta, grid = plan
    scratch = torch.empty(T * K + num_blocks * E, dtype=torch.int32, device=device)
    slot_rank = scratch[:T * K]                                              # [T, K] int32
    block_base = scratch[T * K:]                                             # [NB, E] int32
    _route.launch((num_blocks,), (router_logits, scale, mask, topk_ids, topk_weights, slot_rank,
                                  block_base, T, router_logits.stride(0), router_logits.stride(1), use_mask),
                  route_meta)
    if scan_meta is not None:
        _scan.launch((num_groups,), (block_base, expert_offsets, T, num_blocks), scan_meta)
    _permute.launch(grid, (hidden, topk_ids, slot_rank, block_base, expert_offsets, row_index, permuted,
                           T, H, hidden.stride(0), num_blocks), permute_meta)
    return permuted, topk_weights, topk_ids, expert_offsets, row_index


def _registered(hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
                expert_mask=None):
    return grouped_dispatch(hidden, router_logits, num_groups, topk_per_group, expert_scale,
                            renormalize, score_func, expert_mask)


register_kernel("triton", "grouped_dispatch", _registered, devices=DEVICES,
                supports=supports_score_funcs(ScoreFunc.SOFTMAX, ScoreFunc.SIGMOID))   # _route_kernel's
