"""The moge ops mapped onto torch_npu's fused MoE operators (Ascend NPUs, CANN).

    grouped_dispatch  MoGE routing in torch ops, then torch_npu.npu_moe_init_routing_v2 (permutation)
    grouped_permute   torch_npu.npu_moe_init_routing_v2 over E+1 experts (the dropped slots, id -1, as
                      expert E), then zeros in the dropped rows
    grouped_gemm      torch_npu.npu_grouped_matmul, rows grouped by expert_offsets
    grouped_mlp       npu_grouped_matmul -> torch_npu.npu_swiglu -> npu_grouped_matmul
    grouped_combine   torch_npu.npu_moe_token_unpermute (weighted un-permute)

Routing stays in torch ops on purpose: the fused `npu_moe_gating_top_k` does group-limited routing
(DeepSeek's: pick k_group groups, then top-k inside them), not MoGE's top-k_g in every group.

The index conventions this module relies on, with the documentation they come from (the op contract on
the left, torch_npu's names on the right; T tokens, K = G * k_g slots, E experts):

    topk_ids [T, K] int32            expert_idx input of npu_moe_init_routing_v2
    permuted_hidden [T*K, H]         expanded_x: row i = x[sorted_row_idx[i] // K], where sorted_row_idx is
                                     a *stable* argsort of the flattened (token-major, t*K + k) expert ids
                                     (ops-transformer moe_init_routing_v3 golden data, gen_data.py)
    row_index [T, K] int32           expanded_row_idx with row_idx_type=0: expanded_row_idx[t*K + k] = the
                                     row (t, k) landed in. row_idx_type=1 is the inverse (sorted_row_idx).
    expert_offsets [E+1] int32       [0] + cumsum(expert_token_cumsum_or_count) in count mode
                                     (expert_tokens_num_type=1: per-expert counts, int64; int32 on the
                                     aclnnMoeInitRoutingV2 path torch_npu takes for E=128, H=2048)
    group_list [E] int64             npu_grouped_matmul with group_list_type=0 (cumsum): expert_offsets[1:]
    sorted_indices [T*K] int32       npu_moe_token_unpermute: out[t] = sum_k probs[t, k] *
                                     permuted_tokens[sorted_indices[t*K + k]], i.e. row_index flattened
                                     (aclnnMoeTokenUnpermute formula; fp32 accumulation in k order, the
                                     output rounded once to permuted_tokens' dtype, kernel source)

Nothing here imports torch_npu: `bind()` hands the module over (moge_kernels/ascend/__init__.py passes
the real one; tests/test_ascend_contract.py passes torch implementations of the documented semantics),
so this file also runs on CPU. No host synchronisation: every shape is known from the inputs' shapes.
"""
from __future__ import annotations

import torch

from moge_kernels import reference
from moge_kernels.reference import router_scores   # absolute: tests load this file on its own

torch_npu = None   # the module providing the npu_* operators; set by bind()

# torch_npu operators each op needs. An op whose operators the installed torch_npu lacks is served by the
# C++ extension (csrc/ascend/) if built, else by the reference (see plan()).
REQUIRED_OPERATORS = {
    "grouped_dispatch": ("npu_moe_init_routing_v2",),
    "grouped_permute": ("npu_moe_init_routing_v2",),
    "grouped_gemm": ("npu_grouped_matmul",),
    "grouped_mlp": ("npu_grouped_matmul", "npu_swiglu"),
    "grouped_combine": ("npu_moe_token_unpermute",),
}
# npu_grouped_matmul takes at most 1024 groups in its single-tensor form (torch_npu API reference).
MAX_GMM_GROUPS = 1024


def bind(module) -> None:
    """Use `module`'s npu_* operators (torch_npu, or a stand-in with the same signatures)."""
    global torch_npu
    torch_npu = module


def missing_operators(module, op: str) -> list[str]:
    return [name for name in REQUIRED_OPERATORS[op] if not hasattr(module, name)]


def plan(module, cpp_ops, prefer: str = "python") -> dict[str, str | None]:
    """Which implementation serves each op: "python" (this file), "cpp" (moge_kernels._ascend_C) or None.

    `cpp_ops`: the ops the C++ extension registered for the NPU; `prefer`: MOGE_ASCEND_IMPL."""
    if prefer not in ("python", "cpp"):
        raise ValueError(f"MOGE_ASCEND_IMPL must be 'python' or 'cpp', got {prefer!r}")
    choice = {}
    for op in REQUIRED_OPERATORS:
        python_ok = not missing_operators(module, op)
        cpp_ok = op in cpp_ops
        if prefer == "cpp" and cpp_ok:
            choice[op] = "cpp"
        else:
            choice[op] = "python" if python_ok else ("cpp" if cpp_ok else None)
    return choice


# ----------------------------------------------------------------------------- dispatch
def route(router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
          expert_mask=None):
    """MoGE routing: (topk_weights [T, K] fp32, topk_ids [T, K] int32), ids group-major.

    A stable descending sort inside each group gives "ties -> lower expert first"; NaN scores sort as
    -inf, so every id is an expert of its group whatever the logits hold (reference.py's NaN policy). With
    expert_mask [E] bool a second stable sort puts each group's kept experts first."""
    T, E = router_logits.shape
    G, k_g = num_groups, topk_per_group
    S = E // G
    scores = router_scores(router_logits.float(), score_func)
    scores_by_group = scores.view(T, G, S)
    keys = torch.where(torch.isnan(scores_by_group), float("-inf"), scores_by_group)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices              # [T, G, S] int64
    if expert_mask is not None:
        kept = expert_mask.view(1, G, S).expand(T, G, S).gather(-1, order).to(torch.uint8)
        order = order.gather(-1, torch.sort(kept, dim=-1, descending=True, stable=True).indices)
    picks = order[..., :k_g]                                                            # [T, G, k_g] int64
    topk_weights = scores_by_group.gather(-1, picks).reshape(T, G * k_g)                # [T, K] fp32
    group_base = torch.arange(G, device=router_logits.device).view(1, G, 1) * S
    topk_ids = (picks + group_base).reshape(T, G * k_g)                                 # [T, K] int64
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    if expert_scale is not None:
        topk_weights = topk_weights * expert_scale.float()[topk_ids]
    return topk_weights, topk_ids.to(torch.int32)


def grouped_dispatch(hidden, router_logits, num_groups, topk_per_group=1, expert_scale=None,
                     renormalize=False, score_func="softmax", expert_mask=None):
    T, E = router_logits.shape
    H = hidden.shape[1]
    K = num_groups * topk_per_group
    topk_weights, topk_ids = route(router_logits, num_groups, topk_per_group, expert_scale, renormalize,
                                   score_func, expert_mask)
    if T == 0:   # a shape branch, not a data one: an empty batch never reaches the NPU kernel
        return (hidden.new_empty(0, H), topk_weights, topk_ids,
                torch.zeros(E + 1, dtype=torch.int32, device=hidden.device), topk_ids.clone())
    # Dropless, unquantised, every expert active. active_num must be T*K (validated, otherwise unused);
    # count mode (1) because the aclnnMoeInitRoutingV3 kernel behind this call supports only count and
    # key-value; row_idx_type=0 gives the (t, k) -> row map, which is this package's row_index.
    permuted_hidden, expanded_row_idx, expert_counts, _ = torch_npu.npu_moe_init_routing_v2(
        hidden.contiguous(), topk_ids, active_num=T * K, expert_num=E, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, E], row_idx_type=0)
    expert_offsets = torch.cat([torch.zeros(1, dtype=torch.int32, device=hidden.device),
                                torch.cumsum(expert_counts, 0).to(torch.int32)])          # [E+1] int32
    row_index = expanded_row_idx.to(torch.int32).view(T, K)                                # [T, K] int32
    return permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index


# ----------------------------------------------------------------------------- permute by given ids
def _zero_rows_past_experts(y, expert_offsets):
    """Zeros in rows [expert_offsets[E], M) of y, the rows of no expert, without reading the bound on the
    host: an elementwise pass over y, since whether the caller's offsets end before M is device data."""
    rows = torch.arange(y.shape[0], device=y.device)[:, None]
    return torch.where(rows < expert_offsets[-1], y, torch.zeros((), dtype=y.dtype, device=y.device))


def grouped_permute(hidden, topk_ids, num_experts):
    T, K = topk_ids.shape
    H, E = hidden.shape[1], num_experts
    if T * K == 0:
        return (hidden.new_empty(0, H), torch.zeros(E + 1, dtype=torch.int32, device=hidden.device),
                torch.empty(T, K, dtype=torch.int32, device=hidden.device))
    # The dropped slots as an extra expert E sort after every expert, in (token, slot) order: exactly the
    # contract's rows [expert_offsets[E], T*K). Ids outside [-1, E) (unchecked on the NPU without
    # validation) join them, so the kernel never sees an id out of its range.
    ids = topk_ids.to(torch.int32)
    buckets = torch.where((ids >= 0) & (ids < E), ids, E).contiguous()
    permuted_hidden, expanded_row_idx, bucket_counts, _ = torch_npu.npu_moe_init_routing_v2(
        hidden.contiguous(), buckets, active_num=T * K, expert_num=E + 1, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, E + 1], row_idx_type=0)
    expert_offsets = torch.cat([torch.zeros(1, dtype=torch.int32, device=hidden.device),
                                torch.cumsum(bucket_counts[:E], 0).to(torch.int32)])     # [E+1] int32
    permuted_hidden = _zero_rows_past_experts(permuted_hidden, expert_offsets)          # dropped rows: 0
    return permuted_hidden, expert_offsets, expanded_row_idx.to(torch.int32).view(T, K)


# ----------------------------------------------------------------------------- grouped GEMM / MLP
def _weight_kn(w):
    """w [E, N, Kd] (nn.Linear layout) as the [E, Kd, N] operand npu_grouped_matmul multiplies by.

    The GMM accepts a transposed weight (a view whose last two strides are swapped) without a copy, so a
    contiguous nn.Linear weight passes as w.transpose(1, 2); other layouts are made contiguous first."""
    w_kn = w.transpose(1, 2)
    if w.is_contiguous() or w_kn.is_contiguous():
        return w_kn
    return w.contiguous().transpose(1, 2)


def grouped_gemm(x, w, expert_offsets, bias=None):
    if bias is not None:   # (npu_grouped_matmul's own bias list would need a host split per expert)
        return reference.add_expert_bias(grouped_gemm(x, w, expert_offsets), bias, expert_offsets)
    M, E, N = x.shape[0], w.shape[0], w.shape[1]
    if M == 0:
        return x.new_empty(0, N)
    if E > MAX_GMM_GROUPS:
        raise ValueError(f"ascend grouped_gemm: npu_grouped_matmul takes at most {MAX_GMM_GROUPS} experts, "
                         f"got w with E={E}")
    group_list = expert_offsets[1:].to(torch.int64)    # [E] int64, cumulative row ends (group_list_type=0)
    # The GMM wants the groups to cover all M rows: rows of no expert (past offsets[E], grouped_permute's
    # dropped slots) ride along with the last expert and are zeroed below. Wasted rows, but no host read
    # of offsets[E]; whether there are any is device data.
    group_list = torch.cat([group_list[:-1], group_list.new_full((1,), M)])
    # x must be row-major (the GMM takes no transposed x); split_item=2: one output tensor [M, N];
    # group_type=0: groups along M (the default, -1, would mean no grouping).
    y = torch_npu.npu_grouped_matmul([x.contiguous()], [_weight_kn(w)], group_list=group_list,
                                     split_item=2, group_type=0, group_list_type=0)[0]
    return _zero_rows_past_experts(y, expert_offsets)


def grouped_mlp(x, w_gate_up, w_down, expert_offsets, row_scale=None):
    M, H = x.shape[0], w_down.shape[1]
    if M == 0:
        return x.new_empty(0, H)
    gate_up = grouped_gemm(x, w_gate_up, expert_offsets)             # [M, 2I], gate columns first
    # npu_swiglu splits its last dimension in halves: swish(first) * second, i.e. silu(gate) * up.
    activated = torch_npu.npu_swiglu(gate_up, dim=-1)                  # [M, I]
    y = grouped_gemm(activated, w_down, expert_offsets)              # [M, H]
    if row_scale is not None:
        y = _zero_rows_past_experts((y.float() * row_scale.float()[:, None]).to(y.dtype), expert_offsets)
    return y


# ----------------------------------------------------------------------------- combine
def grouped_combine(expert_out, topk_weights, row_index, shared_out=None):
    T, H = row_index.shape[0], expert_out.shape[1]
    if T == 0:   # CANN's tiling rejects an empty unpermute (error 561002)
        return expert_out.new_empty(0, H)
    # probs in fp32: the kernel reads them as their own dtype (bf16 tokens with fp32 probs is one of its
    # modes), so the weights are not rounded to the activation dtype and the result matches the fp32
    # accumulation of the contract. The kernel skips a slot whose prob is exactly 0, where the reference
    # adds 0 * row: they differ only if that row holds inf or NaN.
    out = torch_npu.npu_moe_token_unpermute(expert_out.contiguous(), row_index.reshape(-1).contiguous(),
                                            probs=topk_weights.float().contiguous())
    if shared_out is not None:
        # The unpermute output is already rounded, so for bf16/fp16 this adds one rounding to the
        # contract's single one (at most one ulp); fp32 is exact. Fusing it would need an fp32 copy of
        # expert_out, which costs more than this [T, H] add.
        out = (out.float() + shared_out.float()).to(out.dtype)
    return out


OPS = {
    "grouped_dispatch": grouped_dispatch,
    "grouped_permute": grouped_permute,
    "grouped_gemm": grouped_gemm,
    "grouped_mlp": grouped_mlp,
    "grouped_combine": grouped_combine,
}
