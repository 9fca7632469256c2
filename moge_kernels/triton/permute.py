"""Triton `moge::grouped_permute`: stable permutation of the hidden rows by expert ids a router gave.

Index tensors passed between the kernels (T tokens, K slots per token, E experts, NB = cdiv(T, COUNT_BLOCK_T)
count blocks; bucket E holds the dropped slots, id -1):

    topk_ids        [T, K]     int32/int64, any strides (input)
    slot_rank       [T, K]     int32 scratch: rank of (t, k) among the slots of its count block that go to
                               the same bucket, in (token, slot) order
    block_base      [NB, E+1]  int32 scratch: first, per-bucket counts of each count block; after the scan
                               kernel (when it runs), the rows of bucket e that blocks before b fill
    block_prefix    [NB, E+1]  int32 scratch (scan kernel only): the rows of block b in buckets < e, so that
                               expert_offsets[e] is the sum of column e over the blocks
    expert_offsets  [E+1]      int32 exclusive cumsum of rows per expert (output); offsets[E] = kept slots
    row_index       [T, K]     int32 expert_offsets[bucket] + block_base[t // COUNT_BLOCK_T, bucket]
                               + slot_rank[t, k] (output)

Decode sizes (T * pow2(K) <= ONE_PASS_MAX_SLOTS) take one launch, _one_pass_kernel: each of its programs
(one per H block) sorts all the slots' (bucket, slot) keys itself, a few hundred at most, and a slot's
row is its place in that order. Larger calls take three launches (current
stream, no host synchronisation; on sm_90+ the second and third with programmatic dependent launch,
launch.use_pdl: each starts while the one before it finishes):

    1. _rank_kernel, one program per count block: its COUNT_BLOCK_T x pow2(K) slots sorted by bucket in
       one tl.sort, each slot's rank from a segmented count along the sorted keys, the per-bucket counts
       from tl.histogram (and their exclusive cumsum, block_prefix, when the scan kernel runs). The work
       per slot grows as log^2 of the block's slots, not with E. Small blocks skip the sort
       (RANK_IN_COPY_MAX_COMPARES): the copy programs rank their slots instead.
    2. _scan_kernel, one program per SCAN_COLS buckets, one load of its columns: block_base (a running
       sum down each column) and expert_offsets (each column's sum of block_prefix). No program waits for
       another (skipped for NB <= FUSED_SCAN_MAX_BLOCKS blocks or a table of at most FUSED_SCAN_MAX_COUNTS
       counts, where every copy program redoes this scan from the counts, as dispatch.py does).
    3. _copy_kernel, one program per (token block, H block): every index of its BLOCK_T x K slots loaded
       at once (with RANK_IN_COPY, each slot's rank counted from its count block's ids, before the wait
       for the counts), then row_index and the K copies of each hidden row (read once, written from
       registers); a dropped slot's row is written with zeros.

Same order as the reference (moge_kernels.reference.permute): bucket, then token, then slot, so a token
may send two slots to one expert. Ids outside [-1, E) (only possible without MOGE_VALIDATE on a GPU, since
the checks reject them on CPU) are treated as dropped, so no write ever leaves the output.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import options
from ..registry import register_kernel
from . import DEVICES
from .launch import Kernel, cdiv, gdc_launch_dependents, gdc_wait, pow2, use_pdl

_INTERPRET = options.TRITON_INTERPRET

# A count block holds at least MIN_BLOCK_SLOTS slots (COUNT_BLOCK_T * pow2(K)): fewer make a program's sort
# no cheaper, only the scan longer; and at most MAX_BLOCK_SLOTS, one sort's keys in registers.
MIN_BLOCK_SLOTS = 128
MAX_BLOCK_SLOTS = 8192
# Up to this many slots (T * pow2(K)) a call is one launch: every program sorts all the slots.
ONE_PASS_MAX_SLOTS = 128
# Elements a one-pass program copies ([slots, BLOCK_H]).
ONE_PASS_TILE_ELEMS = 8192
# Up to this many count blocks the copy programs scan the counts themselves (no scan launch).
FUSED_SCAN_MAX_BLOCKS = 16
# Past decode, so do they where the count table (NB x (E+1)) has at most FUSED_SCAN_MAX_COUNTS entries:
# few experts (Mixtral, gpt-oss) at T >= 1024, where a scan launch costs more than every copy program
# reading the table from L2 (H200, bench/results/permute_tiles_h200_4cd60f9.txt: gpt-oss-20b T=4096 1.32x
# the floor against 1.40x, Mixtral 1.28x against 1.32x). To fit it a block may double, up to
# FUSED_SCAN_MAX_BLOCK_SLOTS slots and while FUSED_SCAN_MIN_GROWN_BLOCKS rank programs remain: fewer
# programs slowed the rank launch more than the scan launch cost (Pangu T=1024: 1.40x as 32 fused blocks,
# 1.33-1.35x as 64 with the scan launch).
FUSED_SCAN_MAX_COUNTS = 4096
FUSED_SCAN_MAX_BLOCK_SLOTS = 512
FUSED_SCAN_MIN_GROWN_BLOCKS = 64
# Past that, at most this many count blocks: the scan is one program reading NB x (E+1) counts once, so
# more blocks shorten each rank program's sort but lengthen the scan (H200,
# bench/results/permute_variants_h200_05caac9.txt: 128 against 256 blocks, Qwen3-30B T=4096 1.44x the
# floor against 1.52x, no shape slower).
MAX_COUNT_BLOCKS = 128
# Up to this many id compares a copy program (BLOCK_T * K_PAD slots against the count block's slots), the
# copy programs rank their slots themselves (RANK_IN_COPY, before they wait for the counts) and the rank
# launch only counts (H200, bench/results/permute_rank_h200_12dbf43.txt: Mixtral T=1024 1.83x the floor
# against 2.04x, T=4096 1.22x against 1.25x; 8192 compares, Qwen3-30B and Pangu at K=8, were slower, and
# so were 2048, gpt-oss-20b T=4096 with 2-token copy tiles: 1.31x against 1.26x with the sort,
# bench/results/permute_tiles_h200_5eefb7c.txt).
RANK_IN_COPY_MAX_COMPARES = 1024
# Buckets per scan program, and the most count blocks one load of its tile takes
# ([SCAN_TILE_ELEMS // SCAN_COLS, SCAN_COLS] counts and as many prefixes).
SCAN_COLS = 16
SCAN_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------------------- launch 1
@triton.jit
def _slot_bucket(ids, ok, E: tl.constexpr):
    """The bucket a slot sorts into: its expert, E for a dropped slot (id -1, or outside [-1, E): only
    possible without MOGE_VALIDATE on a GPU), E + 1 for padding (ok False), which sorts last."""
    return tl.where(ok, tl.where((ids >= 0) & (ids < E), ids, E), E + 1).to(tl.int32)


@triton.jit
def _same_bucket_count(bucket_a, count_a, bucket_b, count_b):
    """Combine of a segmented count over bucket-sorted slots (equal buckets are contiguous)."""
    return bucket_b, tl.where(bucket_a == bucket_b, count_a + count_b, count_b)


@triton.jit(do_not_specialize=["T"])
def _rank_kernel(
    ids_ptr,             # [T, K] int32/int64, strides (stride_it, stride_ik)
    slot_rank_ptr,       # [T, K] int32 out
    block_base_ptr,      # [NB, E+1] int32 out: per-block bucket counts (column E: the dropped slots)
    block_prefix_ptr,    # [NB, E+1] int32 out if PREFIX: per-block exclusive cumsum of those counts
    T, stride_it, stride_ik,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, NUM_BINS: tl.constexpr,
    PREFIX: tl.constexpr, RANKS: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (NB,): program b ranks the BLOCK_T*K_PAD slots of tokens [b*BLOCK_T, (b+1)*BLOCK_T) in one
    sort: key = bucket * S + flat slot (buckets: the expert, E for a dropped slot, E+1 for padding, which
    sorts last), so the sorted keys hold each bucket's slots contiguous and in (token, slot) order; a
    segmented count along them is each slot's rank, stored back at the slot it came from. The counts are a
    histogram over NUM_BINS >= E+2 bins. Work per slot: log^2 of the block's slots, whatever E.
    Without RANKS, the counts alone (the copy programs rank their slots themselves: RANK_IN_COPY)."""
    if USE_GDC:   # the next launch (scan or copy) may start now; it waits for this one before reading
        gdc_launch_dependents()
    S: tl.constexpr = BLOCK_T * K_PAD
    pid = tl.program_id(0)
    i = tl.arange(0, S)                               # flat slot of the block, (token, slot) order
    t = pid * BLOCK_T + i // K_PAD
    k = i % K_PAD
    ok = (k < K) & (t < T)
    ids = tl.load(ids_ptr + t.to(tl.int64) * stride_it + k * stride_ik, mask=ok, other=-1)
    bucket = _slot_bucket(ids, ok, E)
    if RANKS:
        keys = tl.sort(bucket * S + i)
        bucket_sorted = keys // S
        slot = keys % S
        _, count = tl.associative_scan((bucket_sorted, tl.full([S], 1, tl.int32)), 0, _same_bucket_count)
        t_sorted = pid * BLOCK_T + slot // K_PAD
        tl.store(slot_rank_ptr + t_sorted * K + slot % K_PAD, count - 1, mask=bucket_sorted <= E)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.histogram(bucket, NUM_BINS)
    tl.store(block_base_ptr + pid * (E + 1) + bins, counts, mask=bins <= E)
    if PREFIX:
        tl.store(block_prefix_ptr + pid * (E + 1) + bins, tl.cumsum(counts, axis=0) - counts, mask=bins <= E)


# ----------------------------------------------------------------------------------------- launch 2
@triton.jit(do_not_specialize=["num_blocks"])
def _scan_kernel(
    block_base_ptr,      # [NB, E+1] int32 in: per-block counts; out (in place): rows before each block
    block_prefix_ptr,    # [NB, E+1] int32 in: per-block exclusive cumsum of the counts over buckets
    expert_offsets_ptr,  # [E+1] int32 out
    num_blocks,
    E: tl.constexpr, CHUNK_B: tl.constexpr, COLS: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (cdiv(E+1, COLS),): program j owns buckets [j*COLS, (j+1)*COLS). Each block's first row within
    bucket e is the running sum of column e over the blocks before it; expert_offsets[e], the rows of
    every bucket < e, is the sum of column e of block_prefix. No program depends on another (a
    one-program scan walks all NB x (E+1) counts serially); up to CHUNK_B blocks, one load."""
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()                                    # the rank kernel's counts
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_ok = cols <= E
    base = tl.zeros([COLS], tl.int32)
    offsets = tl.zeros([COLS], tl.int32)
    for b0 in range(0, num_blocks, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        mask = (b < num_blocks)[:, None] & col_ok[None, :]
        offs = b[:, None] * (E + 1) + cols[None, :]
        counts = tl.load(block_base_ptr + offs, mask=mask, other=0)
        offsets += tl.sum(tl.load(block_prefix_ptr + offs, mask=mask, other=0), axis=0)
        # read before write, same program, same addresses: in place is safe
        tl.store(block_base_ptr + offs, base[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        base += tl.sum(counts, axis=0)
    tl.store(expert_offsets_ptr + cols, offsets, mask=col_ok)


# ----------------------------------------------------------------------------------------- launch 3
@triton.jit
def copy_program(H, BLOCK_H: tl.constexpr, H_FAST: tl.constexpr):
    """(token block, H block) of a copy program (this kernel's and dispatch.py's): grid (NT, NH), or with
    H_FAST (NT * NH,), the H blocks of a token block on consecutive programs (copy_grid)."""
    if H_FAST:
        num_h = tl.maximum(tl.cdiv(H, BLOCK_H), 1)
        return tl.program_id(0) // num_h, tl.program_id(0) % num_h
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit(do_not_specialize=["T", "num_blocks"])
def _copy_kernel(
    hidden_ptr,          # [T, H] row stride stride_ht, unit column stride
    ids_ptr,             # [T, K] int32/int64, strides (stride_it, stride_ik)
    slot_rank_ptr,       # [T, K] int32 (not read with RANK_IN_COPY)
    block_base_ptr,      # [NB, E+1] int32: rows before each block after the scan kernel; FUSED_SCAN: counts
    expert_offsets_ptr,  # [E+1] int32: in after the scan kernel; FUSED_SCAN: out (by program (0, 0))
    row_index_ptr,       # [T, K] int32 out
    permuted_ptr,        # [T*K, H] out, contiguous
    T, H, stride_ht, stride_it, stride_ik, num_blocks,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NB_PAD: tl.constexpr,
    FUSED_SCAN: tl.constexpr, COUNT_BLOCK_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    H_FAST: tl.constexpr, RANK_IN_COPY: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid copy_grid(T, H, BLOCK_T, BLOCK_H, H_FAST). FUSED_SCAN needs BLOCK_T <= COUNT_BLOCK_T (powers
    of two). RANK_IN_COPY (also BLOCK_T <= COUNT_BLOCK_T): each slot's rank within its count block is
    counted here, from the block's ids (the caller's: before gdc_wait, while the rank kernel counts),
    instead of loaded from slot_rank.

    Every index load of the program's BLOCK_T x K slots is issued with the hidden tile's, before the
    first store: the K stores then run back to back from registers (a load after a store to another
    pointer cannot be hoisted above it, so loading per slot would chain 2K round trips)."""
    if USE_GDC:   # the next op's first launch may start now (it waits for this one before reading)
        gdc_launch_dependents()
    pid_t, pid_h = copy_program(H, BLOCK_H, H_FAST)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = t_ok[:, None] & (h < H)[None, :]
    # int64 addresses: T*K*H passes 2^31 elements at prefill sizes.
    rows = tl.load(hidden_ptr + t.to(tl.int64)[:, None] * stride_ht + h[None, :], mask=mask,
                   eviction_policy="evict_first")   # read once: keep L2 for the K writes
    t2 = t[:, None]                                   # [BLOCK_T, 1]
    k2 = tl.arange(0, K_PAD)[None, :]                 # [1, K_PAD]
    ok2 = (t2 < T) & (k2 < K)
    ids = tl.load(ids_ptr + t2.to(tl.int64) * stride_it + k2 * stride_ik, mask=ok2, other=-1)
    kept = (ids >= 0) & (ids < E)                     # ids outside [-1, E) count as dropped
    bucket = tl.where(kept, ids, E).to(tl.int32)      # [BLOCK_T, K_PAD]
    if RANK_IN_COPY:
        # the earlier slots (token, then slot order) of this count block that go to the same bucket
        S: tl.constexpr = COUNT_BLOCK_T * K_PAD
        block_t0 = (pid_t * BLOCK_T // COUNT_BLOCK_T) * COUNT_BLOCK_T
        j = tl.arange(0, S)
        tj = block_t0 + j // K_PAD
        kj = j % K_PAD
        ok_j = (tj < T) & (kj < K)
        ids_j = tl.load(ids_ptr + tj.to(tl.int64) * stride_it + kj * stride_ik, mask=ok_j, other=-1)
        bucket_j = _slot_bucket(ids_j, ok_j, E)                                       # [S]
        mine = (t2 - block_t0) * K_PAD + k2                                          # [BLOCK_T, K_PAD]
        same = (j[None, None, :] < mine[:, :, None]) & (bucket_j[None, None, :] == bucket[:, :, None])
        row = tl.sum(same.to(tl.int32), axis=2)
    if USE_GDC:   # hidden and ids are the caller's (older than the chain); ranks and counts are not
        gdc_wait()
    if not RANK_IN_COPY:
        row = tl.load(slot_rank_ptr + t2 * K + k2, mask=ok2, other=0)
    if FUSED_SCAN:   # the scan kernel's work for this program's block, E expert columns as there
        b2 = tl.arange(0, NB_PAD)[:, None]
        e1 = tl.arange(0, E_PAD)
        e2 = e1[None, :]
        counts = tl.load(block_base_ptr + b2 * (E + 1) + e2, mask=(b2 < num_blocks) & (e2 < E), other=0)
        totals = tl.sum(counts, axis=0)                                  # [E_PAD]
        offsets = tl.cumsum(totals, axis=0) - totals
        num_kept = tl.sum(totals, axis=0)
        if pid_t == 0:
            if pid_h == 0:
                tl.store(expert_offsets_ptr + e1, offsets, mask=e1 < E)
                tl.store(expert_offsets_ptr + E, num_kept)
        my_block = (pid_t * BLOCK_T) // COUNT_BLOCK_T
        before = tl.sum(tl.where(b2 < my_block, counts, 0), axis=0)     # [E_PAD] kept rows of earlier blocks
        dropped_base = num_kept + my_block * (COUNT_BLOCK_T * K) - tl.sum(before, axis=0)
        base = offsets + before
        e3 = e1[None, None, :]
        row += tl.where(kept, tl.sum(tl.where(bucket[:, :, None] == e3, base[None, None, :], 0), axis=2),
                        dropped_base)
    else:
        # two independent gathers (a few KB, from L2): the block's first row within the bucket, the bucket's
        row += tl.load(block_base_ptr + (t2 // COUNT_BLOCK_T) * (E + 1) + bucket, mask=ok2, other=0) + \
            tl.load(expert_offsets_ptr + bucket, mask=ok2, other=0)
    if pid_h == 0:
        tl.store(row_index_ptr + t2 * K + k2, row, mask=ok2)
    code = tl.where(kept, row, -1 - row)              # a dropped slot's row as -1 - row: written with zeros
    for k in tl.static_range(K):
        code_k = tl.sum(tl.where(k2 == k, code, 0), axis=1)              # [BLOCK_T] column k, from registers
        row_k = tl.where(code_k >= 0, code_k, -1 - code_k)
        vals = tl.where((code_k >= 0)[:, None], rows, tl.zeros_like(rows))
        tl.store(permuted_ptr + row_k.to(tl.int64)[:, None] * H + h[None, :], vals, mask=mask)


# ----------------------------------------------------------------------------------------- one pass
@triton.jit(do_not_specialize=["T"])
def _one_pass_kernel(
    hidden_ptr,          # [T, H] row stride stride_ht, unit column stride
    ids_ptr,             # [T, K] int32/int64, strides (stride_it, stride_ik)
    expert_offsets_ptr,  # [E+1] int32 out (program 0)
    row_index_ptr,       # [T, K] int32 out (program 0)
    permuted_ptr,        # [T*K, H] out, contiguous
    T, H, stride_ht, stride_it, stride_ik,
    E: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, S: tl.constexpr, NUM_BINS: tl.constexpr,
    BLOCK_H: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Grid (cdiv(H, BLOCK_H),), S = pow2(T * K_PAD) <= ONE_PASS_MAX_SLOTS: the whole permute of a
    decode step. Every program sorts all the slots' keys, bucket * S + (t * K_PAD + k) (bucket: the
    expert, E for a dropped slot, E + 1 for padding, which sorts last): sorted position p is the row of
    the slot its key names, so the program copies in that order, each row from its token's hidden row
    (a dropped slot's row with zeros). Program 0 also writes row_index and expert_offsets (the exclusive
    cumsum of the bucket counts). USE_GDC: the next op's first launch may start now (it waits for this
    one before reading anything)."""
    if USE_GDC:
        gdc_launch_dependents()
    pid_h = tl.program_id(0)
    i = tl.arange(0, S)                               # flat slot, (token, slot) order
    ti = i // K_PAD
    ki = i % K_PAD
    ok = (ti < T) & (ki < K)
    ids = tl.load(ids_ptr + ti.to(tl.int64) * stride_it + ki * stride_ik, mask=ok, other=-1)
    bucket = _slot_bucket(ids, ok, E)
    keys = tl.sort(bucket * S + i)                    # position p holds the slot of row p
    bucket_sorted = keys // S
    slot = keys % S
    tok = slot // K_PAD
    real = bucket_sorted <= E
    if pid_h == 0:
        p = tl.arange(0, S)
        tl.store(row_index_ptr + tok * K + slot % K_PAD, p, mask=real)
        counts = tl.histogram(bucket, NUM_BINS)
        bins = tl.arange(0, NUM_BINS)
        tl.store(expert_offsets_ptr + bins, tl.cumsum(counts, axis=0) - counts, mask=bins <= E)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = (h < H)[None, :]
    kept = (bucket_sorted < E)[:, None]
    vals = tl.load(hidden_ptr + tok.to(tl.int64)[:, None] * stride_ht + h[None, :], mask=kept & h_ok,
                   other=0.0)
    tl.store(permuted_ptr + tl.arange(0, S).to(tl.int64)[:, None] * H + h[None, :], vals,
             mask=real[:, None] & h_ok)


# ----------------------------------------------------------------------------------------- launcher
# Launched through cached compiled handles (launch.Kernel): the three launches cost little host time.
# USE_GDC and launch_pdl (launch.use_pdl) go together: the scan and the copy start while the kernel
# before them finishes; the rank kernel, the first of the chain, launches as usual (its inputs may still
# be in the making).
_rank = Kernel(_rank_kernel, ("E", "K", "K_PAD", "BLOCK_T", "NUM_BINS", "PREFIX", "RANKS", "USE_GDC",
                              "num_warps"))
_scan = Kernel(_scan_kernel, ("E", "CHUNK_B", "COLS", "USE_GDC", "num_warps", "launch_pdl"))
_copy = Kernel(_copy_kernel, ("E", "K", "K_PAD", "E_PAD", "NB_PAD", "FUSED_SCAN", "COUNT_BLOCK_T", "BLOCK_T",
                              "BLOCK_H", "H_FAST", "RANK_IN_COPY", "USE_GDC", "num_warps", "launch_pdl"))
_one_pass = Kernel(_one_pass_kernel, ("E", "K", "K_PAD", "S", "NUM_BINS", "BLOCK_H", "USE_GDC", "num_warps"))


def copy_config(T: int, H: int, override: tuple = None):
    """(BLOCK_T, BLOCK_H, num_warps, H_FAST) of the copy (this one's and dispatch.py's), or the caller's
    override (BLOCK_T, BLOCK_H, num_warps[, H_FAST]) with H_FAST False where left out."""
    if override is not None:
        block_t, block_h, num_warps, *h_fast = override
        return block_t, block_h, num_warps, bool(h_fast and h_fast[0])
    block_h = min(pow2(H), 1024)   # one 16-byte vector a thread per token at 4 warps (16-bit)
    # Decode: one token a program (T*H/BLOCK_H programs); prefill: 4 tokens a program put 4 loads and
    # 4*K stores in flight per thread behind one round of index loads. Where H is no multiple of BLOCK_H
    # (a partly masked last H block), 2 tokens at the same 4 warps (H200, same run,
    # bench/results/permute_tiles_h200_5eefb7c.txt: gpt-oss-20b, H=2880, T=4096 1.26x the floor against 1.31x;
    # Qwen3-30B and Mixtral, whose H are multiples, were slower so, Pangu the same)
    block_t = 1 if T < 1024 else 4 if H % block_h == 0 else 2
    if _INTERPRET:   # the interpreter pays per program and per op, not per element: few, big programs
        block_t = 16
    num_warps = max(1, min(4, block_t * block_h // 256))
    # H_FAST: a token block's rows read and written whole by consecutive programs (H200, same run:
    # gpt-oss-20b T=16384 1.18x the floor against 1.26x, every shape from T=4096 on as fast or faster)
    return block_t, block_h, num_warps, True


def copy_grid(T: int, H: int, block_t: int, block_h: int, h_fast: bool) -> tuple:
    """The copy's grid (copy_program): at least one H block, whose programs write row_index."""
    grid = (cdiv(T, block_t), max(1, cdiv(H, block_h)))
    return (grid[0] * grid[1],) if h_fast else grid


def _count_config(T: int, K: int, E: int, max_blocks: int = None, max_slots: int = None,
                  fused_counts: int = None) -> int:
    """COUNT_BLOCK_T: tokens per rank program (a power of two). max_blocks / max_slots / fused_counts
    override MAX_COUNT_BLOCKS / MAX_BLOCK_SLOTS / FUSED_SCAN_MAX_COUNTS (tuning; 0: no fused scan past
    decode)."""
    min_block_t = max(1, MIN_BLOCK_SLOTS // pow2(K))
    if T <= FUSED_SCAN_MAX_BLOCKS * min_block_t:   # decode: up to 16 blocks, scanned by the copy programs
        return pow2(cdiv(T, FUSED_SCAN_MAX_BLOCKS))
    block_t = min_block_t
    while not _table_fits(cdiv(T, block_t), E, fused_counts) and \
            block_t * pow2(K) < FUSED_SCAN_MAX_BLOCK_SLOTS and cdiv(T, 2 * block_t) >= FUSED_SCAN_MIN_GROWN_BLOCKS:
        block_t *= 2
    if FUSED_SCAN_MAX_BLOCKS < cdiv(T, block_t) and _table_fits(cdiv(T, block_t), E, fused_counts):
        return block_t                             # a table the copy programs scan
    max_block_t = max(min_block_t, (max_slots or MAX_BLOCK_SLOTS) // pow2(K))
    return min(max_block_t, max(min_block_t, pow2(cdiv(T, max_blocks or MAX_COUNT_BLOCKS))))


def _table_fits(num_blocks: int, E: int, fused_counts: int = None) -> bool:
    """Whether an NB x (E+1) count table is small enough for every copy program to scan it
    (FUSED_SCAN_MAX_COUNTS, or fused_counts where given)."""
    return num_blocks * (E + 1) <= (FUSED_SCAN_MAX_COUNTS if fused_counts is None else fused_counts)


def _fused_scan(num_blocks: int, E: int, fused_counts: int = None) -> bool:
    """Whether the copy programs scan the NB x (E+1) count table themselves (no scan launch)."""
    return num_blocks <= FUSED_SCAN_MAX_BLOCKS or _table_fits(num_blocks, E, fused_counts)


@functools.lru_cache(maxsize=4096)
def _one_pass_plan(T, K, E, H, pdl):
    """(meta, grid) of the one-pass launch, or None where the call is too large for it."""
    k_pad = pow2(K)
    slots = pow2(T * k_pad)
    if slots > ONE_PASS_MAX_SLOTS:
        return None
    block_h = min(pow2(H), 1024, max(16, ONE_PASS_TILE_ELEMS // slots))
    return (E, K, k_pad, slots, pow2(E + 2), block_h, pdl, 4), (max(1, cdiv(H, block_h)),)


@functools.lru_cache(maxsize=4096)
def _plan(T, K, E, H, count_block_t, copy_tile, pdl, fused_counts=None, rank_in_copy=None):
    """The launches of one call, a pure function of the shapes and choices: (number of count blocks,
    whether the copy ranks the slots, rank meta, scan meta or None (the copy programs scan), scan grid,
    copy meta, copy grid)."""
    e_pad, k_pad = pow2(E), pow2(K)
    count_block_t = count_block_t or _count_config(T, K, E, fused_counts=fused_counts)
    num_blocks = cdiv(T, count_block_t)
    fused_scan = _fused_scan(num_blocks, E, fused_counts)
    block_slots = count_block_t * k_pad
    block_t, block_h, num_warps, h_fast = copy_config(T, H, copy_tile)
    if rank_in_copy is None:
        rank_in_copy = min(block_t, count_block_t) * k_pad * block_slots <= RANK_IN_COPY_MAX_COMPARES
    if fused_scan or rank_in_copy:
        block_t = min(block_t, count_block_t)
    rank_meta = (E, K, k_pad, count_block_t, pow2(E + 2), not fused_scan, not rank_in_copy, pdl,
                 4 if block_slots <= 512 else 8)
    scan_cols = min(SCAN_COLS, pow2(E + 1))
    chunk_b = min(pow2(num_blocks), max(1, SCAN_TILE_ELEMS // scan_cols))
    scan_meta = None if fused_scan else (E, chunk_b, scan_cols, pdl, 4, pdl)
    scan_grid = (cdiv(E + 1, scan_cols),)
    copy_meta = (E, K, k_pad, e_pad, pow2(num_blocks), fused_scan, count_block_t, block_t, block_h,
                 h_fast, bool(rank_in_copy), pdl, num_warps, pdl)
    return (num_blocks, bool(rank_in_copy), rank_meta, scan_meta, scan_grid, copy_meta,
            copy_grid(T, H, block_t, block_h, h_fast))


def grouped_permute(hidden, topk_ids, num_experts, *, count_block_t=None, copy_config=None, pdl=None,
                    fused_counts=None, rank_in_copy=None):
    """Triton kernel of `moge::grouped_permute` (arguments already checked by moge_kernels.checks).

    count_block_t (tokens per rank program, a power of two) / copy_config=(BLOCK_T, BLOCK_H, num_warps[, H_FAST])
    override the tile choice (and take the rank/copy launches at any size), pdl=True / False the
    programmatic dependent launch (default launch.use_pdl), fused_counts FUSED_SCAN_MAX_COUNTS,
    rank_in_copy=True / False where the slots are ranked (default: RANK_IN_COPY_MAX_COMPARES) (tests, tuning)."""
    T, K = topk_ids.shape
    H = hidden.shape[1]
    E = num_experts
    device = hidden.device
    permuted = torch.empty(T * K, H, dtype=hidden.dtype, device=device)     # [T*K, H]
    row_index = torch.empty(T, K, dtype=torch.int32, device=device)         # [T, K] int32
    if T == 0 or K == 0:   # a shape (not data) branch: nothing to permute
        return permuted, torch.zeros(E + 1, dtype=torch.int32, device=device), row_index
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    sit, sik = topk_ids.stride()
    pdl = use_pdl(device) if pdl is None else bool(pdl)
    one_pass = None if count_block_t or copy_config else _one_pass_plan(T, K, E, H, pdl)
    if one_pass is not None:
        expert_offsets = torch.empty(E + 1, dtype=torch.int32, device=device)  # [E+1] int32
        _one_pass.launch(one_pass[1], (hidden, topk_ids, expert_offsets, row_index, permuted, T, H,
                                       hidden.stride(0), sit, sik), one_pass[0])
        return permuted, expert_offsets, row_index
    num_blocks, rank_in_copy, rank_meta, scan_meta, scan_grid, copy_meta, grid = _plan(
        T, K, E, H, count_block_t, copy_config, pdl, fused_counts, rank_in_copy)
    expert_offsets = torch.empty(E + 1, dtype=torch.int32, device=device)  # [E+1] int32
    table = num_blocks * (E + 1)
    ranks = 0 if rank_in_copy else T * K                                     # slot_rank's entries
    scratch = torch.empty(ranks + (table if scan_meta is None else 2 * table), dtype=torch.int32,
                          device=device)
    block_base = scratch[ranks:ranks + table]                                # [NB, E+1] int32
    slot_rank = scratch[:ranks] if ranks else block_base                     # [T, K] int32
    block_prefix = scratch[ranks + table:] if scan_meta is not None else block_base   # [NB, E+1] int32
    _rank.launch((num_blocks,), (topk_ids, slot_rank, block_base, block_prefix, T, sit, sik), rank_meta)
    if scan_meta is not None:
        _scan.launch(scan_grid, (block_base, block_prefix, expert_offsets, num_blocks), scan_meta)
    _copy.launch(grid, (hidden, topk_ids, slot_rank, block_base, expert_offsets, row_index, permuted,
                        T, H, hidden.stride(0), sit, sik, num_blocks), copy_meta)
    return permuted, expert_offsets, row_index


def _registered(hidden, topk_ids, num_experts):
    return grouped_permute(hidden, topk_ids, num_experts)


register_kernel("triton", "grouped_permute", _registered, devices=DEVICES)
