"""Eager PyTorch reference of every `moge` op: the specification all backends are tested against.

Small and obviously correct on purpose; speed is not a goal here. The contract in words is
docs/contract.md. Index tensors passed between the ops:

    topk_ids        [T, K] int32   global expert id of slot k of token t, group-major (K = G * k_g)
    topk_weights    [T, K] fp32    routing weight of that slot
    expert_offsets  [E+1]  int32   exclusive cumsum of rows per expert; rows of expert e are
                                   [expert_offsets[e], expert_offsets[e+1]) of the permuted tensor
    row_index       [T, K] int32   permuted row that (token t, slot k) was copied to

Rows of no expert: grouped_permute's topk_ids may hold -1 (a dropped slot); those slots get the rows
[expert_offsets[E], T*K). Every op that takes expert_offsets accepts expert_offsets[E] <= M and writes
zeros to the rows past it (its gradients too), which is how a dropped slot contributes 0 in combine.

NaN policy: a NaN score ranks below every number when experts are selected (ties, NaN ties included, go
to the lower expert index), so every id is a valid expert of its group whatever the logits hold. The
weight of a selected NaN score stays NaN, so the token's output is NaN: a broken router is visible in
the loss, never hidden by a silently substituted weight.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from . import fp8


class ScoreFunc(enum.IntEnum):
    """Router score functions. The public ops take the name (`score_func="softmax"`); every kernel gets
    the value as an int (`checks.check_dispatch` converts it once) and fails on a value it has no branch
    for. A new one: a member here, its formula in `router_scores`, a branch in the kernels."""
    SOFTMAX = 0   # softmax over all E experts
    SIGMOID = 1   # sigmoid of each logit


SCORE_FUNC_NAMES = {f.name.lower(): int(f) for f in ScoreFunc}   # "softmax" -> 0, the schema's spelling


def score_func_code(score_func) -> int:
    """The ScoreFunc value of a name ("softmax") or of a value; ValueError naming score_func otherwise."""
    code = SCORE_FUNC_NAMES.get(score_func) if isinstance(score_func, str) else score_func
    if isinstance(code, int) and not isinstance(code, bool) and code in ScoreFunc._value2member_map_:
        return int(code)
    raise ValueError(f"score_func must be one of {tuple(SCORE_FUNC_NAMES)}, got {score_func!r}")


def router_scores(logits, score_func):
    """Scores [T, E] of router logits [T, E], in the logits' dtype (callers pass fp32, or fp64 for
    exact gradients): the one eager formula of every score function, used by the reference routing,
    its backward, the load-balancing loss and the eager adapters."""
    code = score_func_code(score_func)
    if code == ScoreFunc.SOFTMAX:
        return torch.softmax(logits, dim=-1)
    if code == ScoreFunc.SIGMOID:
        return torch.sigmoid(logits)
    raise AssertionError(f"router_scores has no formula for {ScoreFunc(code)!r}")


def router_scores_backward(grad_scores, scores, score_func):
    """Gradient w.r.t. the logits of `scores = router_scores(logits, score_func)`, given grad_scores
    [T, E] (same dtype): the derivative of each formula above."""
    code = score_func_code(score_func)
    if code == ScoreFunc.SOFTMAX:
        return scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    if code == ScoreFunc.SIGMOID:
        return grad_scores * scores * (1 - scores)
    raise AssertionError(f"router_scores_backward has no formula for {ScoreFunc(code)!r}")


def route(router_logits, num_groups, topk_per_group=1, expert_scale=None, renormalize=False,
          score_func="softmax", expert_mask=None):
    """Grouped top-k: returns (topk_weights [T,K] fp32, topk_ids [T,K] int32).

    expert_mask [E] bool: each group picks among its kept (True) experts first; its masked experts come
    after all kept ones (reached only when a group keeps fewer than k_g, which the checks reject). The
    weights are the scores over all E either way."""
    T, E = router_logits.shape
    G, k_g = num_groups, topk_per_group
    S = E // G
    scores = router_scores(router_logits.float(), score_func)
    # A stable descending sort gives "ties -> lower index first"; NaN keys sort as -inf.
    keys = scores.nan_to_num(nan=float("-inf")).view(T, G, S)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices            # [T, G, S]
    if expert_mask is not None:   # kept first, each part still in key order (a second stable sort)
        kept = expert_mask.view(1, G, S).expand(T, G, S).gather(-1, order).to(torch.uint8)
        order = order.gather(-1, torch.sort(kept, dim=-1, descending=True, stable=True).indices)
    idx = order[..., :k_g]                                                             # [T, G, k_g]
    vals = scores.view(T, G, S).gather(-1, idx)
    group_base = torch.arange(G, device=router_logits.device).view(1, G, 1) * S
    topk_ids = (idx + group_base).reshape(T, G * k_g)
    topk_weights = vals.reshape(T, G * k_g)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    if expert_scale is not None:
        topk_weights = topk_weights * expert_scale.float()[topk_ids]
    return topk_weights, topk_ids.to(torch.int32)


def permute(hidden, topk_ids, num_experts):
    """Stable sort of the T*K (token, slot) pairs by expert; the op `moge::grouped_permute`.

    topk_ids [T, K] int32 or int64, any strides; -1 marks a dropped slot (no expert, or an expert that
    lives on another rank). Returns (permuted_hidden [T*K,H], expert_offsets [E+1] int32,
    row_index [T,K] int32). Dropped slots sort after every expert, in (token, slot) order, so they own
    rows [expert_offsets[E], T*K); those rows of permuted_hidden are zero, and row_index stays a
    permutation of [0, T*K). "Rows of no expert" (past expert_offsets[E]) are zero in every grouped op's
    output too (grouped_gemm, grouped_mlp and their gradients), so a dropped slot contributes
    weight * 0 = 0 in grouped_combine whatever its weight. Ids outside [-1, E) are the caller's error
    (checks.check_permute)."""
    T, K = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()
    valid = flat_ids >= 0
    keys = torch.where(valid, flat_ids, num_experts)                # dropped slots -> bucket E, last
    order = torch.argsort(keys, stable=True)                        # order[r] = t*K + k
    permuted_hidden = torch.where(valid[order, None], hidden[order // K], 0).to(hidden.dtype)
    counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=hidden.device)
    expert_offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    row_index = torch.empty(T * K, dtype=torch.int32, device=hidden.device)
    row_index[order] = torch.arange(T * K, dtype=torch.int32, device=hidden.device)
    return permuted_hidden, expert_offsets, row_index.view(T, K)


def grouped_permute(hidden, topk_ids, num_experts):
    return permute(hidden, topk_ids, num_experts)


def grouped_dispatch(hidden, router_logits, num_groups, topk_per_group=1, expert_scale=None,
                     renormalize=False, score_func="softmax", expert_mask=None):
    topk_weights, topk_ids = route(router_logits, num_groups, topk_per_group, expert_scale,
                                   renormalize, score_func, expert_mask)
    permuted_hidden, expert_offsets, row_index = permute(hidden, topk_ids, router_logits.shape[1])
    return permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index


def expert_slices(expert_offsets):
    """(e, lo, hi) for every expert with rows."""
    bounds = expert_offsets.tolist()   # host sync: fine for the reference, never in a kernel path
    for e in range(len(bounds) - 1):
        if bounds[e + 1] > bounds[e]:
            yield e, bounds[e], bounds[e + 1]


def grouped_gemm(x, w, expert_offsets, bias=None):
    """y[rows of e] = x[rows of e] @ w[e]^T (+ bias[e]); fp32 accumulation (matmul's, bias included),
    output in x's dtype; rows past offsets[E] zero (no bias)."""
    y = x.new_zeros(x.shape[0], w.shape[1])
    for e, lo, hi in expert_slices(expert_offsets):
        y[lo:hi] = x[lo:hi] @ w[e].t() if bias is None else torch.addmm(bias[e], x[lo:hi], w[e].t())
    return y


def expert_of_rows(expert_offsets, num_rows):
    """[num_rows] int64: the expert each row belongs to, E for the rows past offsets[E]. No host sync."""
    rows = torch.arange(num_rows, device=expert_offsets.device, dtype=expert_offsets.dtype)
    return torch.searchsorted(expert_offsets[1:].contiguous(), rows, right=True)


def add_expert_bias(y, bias, expert_offsets):
    """y [M, N] + bias[e] on the rows of each expert e (bias [E, N]); rows past offsets[E] unchanged. No
    host sync: the bias of backends whose grouped_gemm kernel takes none."""
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])])      # row E: the rows of no expert
    return y + padded[expert_of_rows(expert_offsets, y.shape[0])].to(y.dtype)


def acc_dtype(t):
    """The accumulation dtype of the reference: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def swiglu(gate_up):
    """[M, 2I] (gate columns first) -> silu(gate) * up in fp32 (fp64 for fp64), rounded to gate_up's dtype."""
    gate, up = gate_up.to(acc_dtype(gate_up)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def grouped_mlp(x, w_gate_up, w_down, expert_offsets, row_scale=None):
    """SwiGLU expert MLP over expert-sorted rows; row_scale [M] fp32 optionally scales each output row."""
    h = swiglu(grouped_gemm(x, w_gate_up, expert_offsets))
    y = grouped_gemm(h, w_down, expert_offsets)
    if row_scale is not None:
        acc = acc_dtype(y)
        y = (y.to(acc) * row_scale.to(acc)[:, None]).to(y.dtype)
        y[int(expert_offsets[-1]):] = 0     # rows of no expert stay zero whatever their scale
    return y


def grouped_combine(expert_out, topk_weights, row_index, shared_out=None):
    """out[t] = sum_k w[t,k] * expert_out[row_index[t,k]] (+ shared_out[t]); fp32 (fp64 for fp64), in
    slot order."""
    T, K = row_index.shape
    dt = acc_dtype(expert_out)
    acc = torch.zeros(T, expert_out.shape[1], dtype=dt, device=expert_out.device)
    for k in range(K):
        acc = acc + topk_weights[:, k:k + 1].to(dt) * expert_out[row_index[:, k].long()].to(dt)
    if shared_out is not None:
        acc = acc + shared_out.to(dt)
    return acc.to(expert_out.dtype)


def grouped_gemm_fp8(x, w, w_scale, expert_offsets, block_n=fp8.BLOCK, block_k=fp8.BLOCK):
    """grouped_gemm with FP8 weights (moge_kernels.fp8): x quantized per token in groups of block_k,
    both sides dequantized, fp32 products; output in x's dtype."""
    return _grouped_gemm_fp8_f32(x, w, w_scale, expert_offsets, block_n, block_k).to(x.dtype)


def _grouped_gemm_fp8_f32(x, w, w_scale, expert_offsets, block_n, block_k, x_deq=None):
    if x_deq is None:
        x_deq = fp8.dequantize_activations(*fp8.quantize_activations(x, block_k), block_k)
    return grouped_gemm(x_deq, fp8.dequantize_weight(w, w_scale, block_n, block_k), expert_offsets)


def grouped_mlp_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale=None,
                    block_n=fp8.BLOCK, block_k=fp8.BLOCK, x_scale=None, out_dtype=None):
    """grouped_mlp with FP8 weights: the gate_up GEMM on quantized x in fp32, h = silu(gate) * up rounded
    to x's dtype, h quantized (groups of block_k along I), the down GEMM in fp32, row_scale, x's dtype.
    With x_scale, x is e4m3 already (quantized from out_dtype) and is only dequantized."""
    dtype = x.dtype if x_scale is None else out_dtype
    x_deq = fp8.dequantize_activations(x, x_scale, block_k) if x_scale is not None else None
    gate_up = _grouped_gemm_fp8_f32(x, w_gate_up, w_gate_up_scale, expert_offsets, block_n, block_k, x_deq)
    h = swiglu(gate_up).to(dtype)
    y = _grouped_gemm_fp8_f32(h, w_down, w_down_scale, expert_offsets, block_n, block_k)
    if row_scale is not None:
        y = y * row_scale.float()[:, None]
    return y.to(dtype)


def permute_fp8(hidden, row_index, expert_offsets, group=fp8.BLOCK):
    """x_q[row_index[t, k]] = hidden[t] quantized (fp8.quantize_activations), rows >= expert_offsets[E]
    (dropped slots) a quantized zero row; x_scale stored k-major."""
    T, K = row_index.shape
    M, H = T * K, hidden.shape[1]
    q, s = fp8.quantize_activations(hidden.float(), group)                      # [T, H], [T, KB]
    zq, zs = fp8.quantize_activations(hidden.new_zeros(1, H, dtype=torch.float32), group)
    rows = row_index.reshape(-1).long()
    src = torch.arange(T, device=hidden.device).repeat_interleave(K)
    dropped = rows >= expert_offsets[-1].long()
    # e4m3 through its bytes: index_put has no float8 kernels everywhere
    x_q = q.view(torch.uint8)[src].where(~dropped[:, None], zq.view(torch.uint8))
    x_s = s[src].where(~dropped[:, None], zs)
    out_q = torch.empty(M, H, dtype=torch.uint8, device=hidden.device)
    out_q[rows] = x_q
    out_s = fp8.new_scales(hidden, M, H, group)
    out_s[rows] = x_s
    return out_q.view(fp8.E4M3), out_s


def swiglu_mlp(x, w_gate_up, w_down):
    """Dense SwiGLU MLP (shared experts): x [T,H], w_gate_up [2I,H], w_down [H,I]."""
    return swiglu(x @ w_gate_up.t()) @ w_down.t()


def moge_forward(hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group=1,
                 expert_scale=None, renormalize=False, score_func="softmax",
                 shared_w_gate_up=None, shared_w_down=None, expert_mask=None):
    """The whole routed (+ shared) MoGE layer, composed from the reference ops."""
    permuted, weights, _, offsets, row_index = grouped_dispatch(
        hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
        expert_mask)
    expert_out = grouped_mlp(permuted, w_gate_up, w_down, offsets)
    shared = None
    if shared_w_gate_up is not None:
        shared = swiglu_mlp(hidden, shared_w_gate_up, shared_w_down)
    return grouped_combine(expert_out, weights, row_index, shared)


# ----------------------------------------------------------------------------- backward primitives
def grouped_gemm_dgrad(grad_y, w, expert_offsets):
    """grad_x[rows of e] = grad_y[rows of e] @ w[e] (w [E, N, Kd], no transposed copy); zero rows past
    offsets[E]."""
    grad_x = grad_y.new_zeros(grad_y.shape[0], w.shape[2])
    for e, lo, hi in expert_slices(expert_offsets):
        grad_x[lo:hi] = grad_y[lo:hi] @ w[e]
    return grad_x


def grouped_gemm_wgrad(grad_y, x, expert_offsets):
    """grad_w[e] = grad_y[rows of e]^T @ x[rows of e]: [E, N, Kd], fp32 (fp64) accumulation, zeros for an
    empty expert."""
    acc = acc_dtype(x)
    grad_w = x.new_zeros(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])
    for e, lo, hi in expert_slices(expert_offsets):
        grad_w[e] = (grad_y[lo:hi].to(acc).t() @ x[lo:hi].to(acc)).to(x.dtype)
    return grad_w


def swiglu_backward(grad_h, gate_up, row_scale=None, need_h=False):
    """(grad_gate_up [M, 2I], h [M, I] or [0, I], grad_row_scale [M] fp32 or [0]) of
    y = swiglu(gate_up) * row_scale, from grad_h, the gradient w.r.t. the unscaled SwiGLU output;
    h = rounded swiglu * row_scale, the operand of the down projection's weight gradient."""
    acc = acc_dtype(gate_up)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    g = grad_h.to(acc)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).to(gate_up.dtype).to(acc)    # rounded, as the forward feeds it to the down GEMM
    scale = None if row_scale is None else row_scale.to(acc)[:, None]
    gs = g if scale is None else g * scale
    grad_gate_up = torch.cat([gs * up * (sig + silu * (1 - sig)), gs * silu], dim=1).to(gate_up.dtype)
    if need_h:
        h_out = (h if scale is None else h * scale).to(gate_up.dtype)
    else:
        h_out = gate_up.new_empty(0, gate_up.shape[1] // 2)
    if row_scale is not None:
        grad_scale = (g * h).sum(-1).to(torch.float32)
    else:
        grad_scale = torch.zeros(0, dtype=torch.float32, device=gate_up.device)
    return grad_gate_up, h_out, grad_scale


def grouped_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    """(grad_expert_out [T*K, H], grad_topk_weights [T, K] or [0, K]): grad_expert_out[row_index[t,k]] =
    w[t,k] * grad_out[t]; grad_w[t,k] = <grad_out[t], expert_out[row_index[t,k]]>."""
    T, K = row_index.shape
    H = grad_out.shape[1]
    acc = acc_dtype(grad_out)
    g = grad_out.to(acc)
    w = topk_weights.to(acc)
    rows = row_index.reshape(-1).long()
    # index_add_ sums duplicate rows too, so the reference stays right for any in-range row_index
    grad_expert_out = torch.zeros(T * K, H, dtype=acc, device=grad_out.device).index_add_(
        0, rows, (w[:, :, None] * g[:, None, :]).reshape(T * K, H)).to(grad_out.dtype)
    if need_weights_grad:
        gathered = expert_out.to(acc)[row_index.long()]                       # [T, K, H]
        grad_w = (gathered * g[:, None, :]).sum(-1).to(topk_weights.dtype)
    else:
        grad_w = topk_weights.new_empty(0, K)
    return grad_expert_out, grad_w
