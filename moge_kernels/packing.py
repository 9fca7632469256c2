"""Packed expert weights: an inference layout that the Triton grouped GEMM streams faster.

The expert GEMMs read each weight tile as boxes of BLOCK columns (k) by many rows (n). In the nn.Linear
layout [E, N, K] such a box is N pieces of BLOCK*2 bytes, K*2 bytes apart; packed, the same values are
stored k-block-major, [E, K/BLOCK, N, BLOCK], and a box is one contiguous run. Measured on an H100
(bench/results/experts_h100_packed.txt, experts_h100.txt): 256-row boxes of 64 bf16 stream at 2734 GB/s
row-major and at 2823-3064 GB/s packed (two runs); the Pangu expert MLP (Triton, bf16, two streams)
takes 7% less time at T=1024 (1.050 -> 0.977 ms), 2% less at T=16 and 128, the same at T=1, and 0-2%
more at T>=4096, where the GEMMs are bound by MMA and L2 rather than DRAM: pack for decode-heavy serving.

A packed tensor is the 4-d view [E, N, K/BLOCK, BLOCK] of that storage, so its values are the
original's, `w.unflatten(2, (K // BLOCK, BLOCK))`: every op accepts it where it takes expert weights
(w, w_gate_up, w_down); backends without a packed kernel (all but triton) flatten it back to [E, N, K],
a copy per call, and so does triton for a block that is not a power of two >= 16. Pack once when the model is loaded (MoGELayer.pack_weights_()). Gradients flow: the
backward unpacks the weights (a copy) and returns the weight gradients in the packed shape.
"""
from __future__ import annotations

import torch

BLOCK = 64   # one 128-byte TMA box row of 16-bit elements: the Triton kernels' k-slice


def pack_expert_weights(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """[E, N, K] expert weights -> the packed [E, N, K/block, block] view (new storage, same values)."""
    if w.dim() != 3:
        raise ValueError(f"pack_expert_weights: w must be [E, N, K], got shape {tuple(w.shape)}")
    E, N, K = w.shape
    if block <= 0 or K % block:
        raise ValueError(f"pack_expert_weights: K = {K} must be a multiple of block = {block}")
    storage = w.detach().reshape(E, N, K // block, block).permute(0, 2, 1, 3).contiguous()
    return storage.permute(0, 2, 1, 3)


def pack_block(w: torch.Tensor) -> int:
    """The block of packed weights (k-block-major storage), 0 for anything else."""
    if w.dim() != 4:
        return 0
    E, N, KB, B = w.shape
    packed_strides = (KB * N * B, B, N * B, 1)
    if all(size == 1 or st == want for size, st, want in zip(w.shape, w.stride(), packed_strides)):
        return B
    return 0


def unpack(w: torch.Tensor) -> torch.Tensor:
    """Expert weights of either layout -> [E, N, K] (a copy when packed)."""
    return w.flatten(2) if w.dim() == 4 else w
