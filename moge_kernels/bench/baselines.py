"""Baselines built from public PyTorch only, timed beside the moge backends.

`grouped_mm`: the layer as a PyTorch user would write it today without custom kernels and without host
syncs (so it can be captured in a CUDA graph): softmax + per-group topk + stable sort for the dispatch,
`torch._grouped_mm` for the two expert GEMMs with an eager SwiGLU between them, and a gather + batched
matmul for the combine. `torch._grouped_mm(a [M,K], b [G,K,N], offs [G] int32)` multiplies rows
[offs[g-1], offs[g]) of `a` by `b[g]`: offs are the cumulative row ends, i.e. expert_offsets[1:]. On CUDA
it needs bf16 operands and an sm90 (Hopper) or newer GPU (torch 2.8 to 2.13); torch 2.13 also runs it on
CPU. `grouped_mm_support` probes it once per (device, dtype) and says why not when it cannot run.

`loop`: the per-expert eager loop of most model code (one gate_up matmul, SwiGLU and down matmul per
active expert; the expert bounds are read on the host, so it syncs and cannot be graph-captured).

The eager specification itself (`moge_kernels.reference`) is the third baseline, "eager"."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..reference import router_scores

_grouped_mm = getattr(torch, "_grouped_mm", None)


# ------------------------------------------------------------------------------------ grouped_mm pipeline
def torch_dispatch(hidden, router_logits, num_groups, topk_per_group=1):
    """Grouped top-k + stable permute in vectorised PyTorch: the moge dispatch outputs, no host sync."""
    T, E = router_logits.shape
    G, k_g = num_groups, topk_per_group
    S, K = E // G, G * k_g
    scores = router_scores(router_logits.float(), "softmax")
    topk_weights, idx = scores.view(T, G, S).topk(k_g, dim=-1)          # [T, G, k_g]
    group_base = torch.arange(0, E, S, device=hidden.device).view(1, G, 1)
    topk_ids = (idx + group_base).view(T, K)
    sorted_ids, order = torch.sort(topk_ids.view(-1), stable=True)      # order[r] = t*K + k
    permuted = hidden.index_select(0, order // K)
    # searchsorted over the sorted ids instead of bincount: bincount on CUDA reads its max on the host
    bounds = torch.arange(E + 1, device=hidden.device)
    expert_offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    row_index = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, device=hidden.device))
    return (permuted, topk_weights.view(T, K), topk_ids.to(torch.int32), expert_offsets,
            row_index.view(T, K).to(torch.int32))


def torch_permute(hidden, topk_ids, num_experts):
    """grouped_permute in vectorised PyTorch (a stable sort, a gather, a scatter; -1 ids last, zero rows):
    how a transformers experts module permutes today. No host sync."""
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1)
    keys = torch.where(flat < 0, num_experts, flat)
    sorted_keys, order = torch.sort(keys, stable=True)                  # order[r] = t*K + k
    permuted = hidden.index_select(0, order // K) * (sorted_keys < num_experts).unsqueeze(1).to(hidden.dtype)
    bounds = torch.arange(num_experts + 1, device=hidden.device)
    expert_offsets = torch.searchsorted(sorted_keys, bounds.to(sorted_keys.dtype), out_int32=True)
    row_index = torch.empty_like(order).scatter_(0, order, torch.arange(T * K, device=hidden.device))
    return permuted, expert_offsets, row_index.view(T, K).to(torch.int32)


def grouped_mm_mlp(x, w_gate_up, w_down, expert_offsets):
    """SwiGLU expert MLP on torch._grouped_mm: gate_up GEMM, eager silu(gate) * up, down GEMM."""
    ends = expert_offsets[1:]                                           # [E] int32 cumulative row ends
    gate_up = _grouped_mm(x, w_gate_up.transpose(-2, -1), offs=ends)   # [M, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=ends)


def grouped_mm_gemm(x, w, expert_offsets):
    return _grouped_mm(x, w.transpose(-2, -1), offs=expert_offsets[1:])


def torch_combine(expert_out, topk_weights, row_index):
    """out[t] = sum_k w[t,k] expert_out[row_index[t,k]]: one gather, one batched [1,K]x[K,H] matmul
    (weights rounded to the activation dtype, fp32 accumulation inside the matmul)."""
    T, K = row_index.shape
    gathered = expert_out.index_select(0, row_index.reshape(-1).long()).view(T, K, -1)
    return torch.bmm(topk_weights.to(expert_out.dtype).unsqueeze(1), gathered).squeeze(1)


def torch_layer(hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group=1):
    permuted, topk_weights, _, expert_offsets, row_index = torch_dispatch(hidden, router_logits,
                                                                          num_groups, topk_per_group)
    return torch_combine(grouped_mm_mlp(permuted, w_gate_up, w_down, expert_offsets), topk_weights,
                         row_index)


@functools.lru_cache(maxsize=None)
def grouped_mm_support(device_type: str, device_index, dtype: torch.dtype):
    """None when torch._grouped_mm runs (and is right) on this device and dtype, else why not."""
    if _grouped_mm is None:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    device = torch.device(device_type) if device_index is None else torch.device(device_type, device_index)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            return f"torch._grouped_mm needs sm90+, this GPU is sm{major}{minor}"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(40, 32, generator=gen, device=device).to(dtype)
        w = torch.randn(4, 16, 32, generator=gen, device=device).to(dtype)
        offsets = torch.tensor([0, 8, 8, 24, 40], dtype=torch.int32, device=device)   # one empty expert
        y = grouped_mm_gemm(x, w, offsets).float()
        exact = torch.cat([x[lo:hi].double() @ w[e].double().t() for e, (lo, hi) in
                           enumerate(zip(offsets.tolist()[:-1], offsets.tolist()[1:]))]).float()
        err = ((y - exact).norm() / exact.norm()).item()
        if not err < 2e-2:
            return f"torch._grouped_mm gave a wrong result here (relative error {err:.2e})"
    except Exception as err:  # noqa: BLE001  any failure means: no such baseline on this device
        return f"torch._grouped_mm fails for {dtype} on {device.type}: {type(err).__name__}: " \
               f"{str(err).splitlines()[0][:120]}"
    return None


# ------------------------------------------------------------------------------------ per-expert loop
def loop_mlp(x, w_gate_up, w_down, expert_offsets):
    """The per-expert eager loop: silu(x_e Wg^T) * (x_e Wu^T) Wd^T for each active expert e."""
    bounds = expert_offsets.tolist()                     # host sync, as in most model code
    y = x.new_empty(x.shape[0], w_down.shape[1])
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            gate, up = (x[lo:hi] @ w_gate_up[e].t()).chunk(2, dim=-1)
            y[lo:hi] = (F.silu(gate) * up) @ w_down[e].t()
    return y
