"""The autograd rule of every `moge` op: `torch.library.register_autograd` (setup_context + backward).

Every backward is written with other `torch.ops.moge` ops and differentiable torch ops only, so
AOTAutograd traces it and `torch.compile(fullgraph=True)` covers forward and backward. The backward
primitives it uses (grouped_gemm_dgrad, grouped_gemm_wgrad, swiglu, swiglu_backward,
grouped_combine_backward) are ops like the others: schemas and fakes in ops.py, checks in checks.py,
references in reference.py, kernels registered by each backend (Triton: triton/backward.py; the
backward GEMMs also on torch._grouped_mm: _grouped_mm.py).

The backward of each public op:

    grouped_gemm      grad_x = dgrad(grad_y, w); grad_w = wgrad(grad_y, x)
    grouped_mlp       RECOMPUTES gate_up = grouped_gemm(x, w_gate_up) (see below), then
                      dh = dgrad(grad_y, w_down); (d_gate_up, h*s, d_s) = swiglu_backward(dh, gate_up, s)
                      grad_w_down = wgrad(grad_y, h*s); grad_x = dgrad(d_gate_up, w_gate_up);
                      grad_w_gate_up = wgrad(d_gate_up, x)
    grouped_combine   grouped_combine_backward; grad_shared_out = grad_out
    grouped_permute   grad_hidden[t] = sum over the kept slots (id >= 0) of grad_permuted[row_index[t,k]]
                      = grouped_combine(grad_permuted, (topk_ids >= 0) as fp32, row_index)
    grouped_dispatch  grad_hidden[t] = sum_k grad_permuted[row_index[t,k]] = grouped_combine(grad_permuted,
                      ones, row_index) (a gather, fp32 accumulation, no atomics); grad_router_logits
                      through the selected weights (expert_scale, renormalize, the score function's
                      backward: reference.router_scores_backward, on [T, E] with torch ops);
                      grad_expert_scale[e] = sum over the slots that picked e of (weight before scaling)
                      * grad_weight, as a [T, E] scatter + column sum (deterministic, no atomics).
                      topk_ids, expert_offsets, row_index: no gradient.
    swiglu            swiglu_backward
    *_fp8             none (inference-only weights): a clear error

Save or recompute gate_up. `grouped_mlp` returns only its output (the fused kernel never writes the
[M, 2I] gate_up), so its backward recomputes gate_up: +4*M*H*I FLOPs, 22% on top of the 18*M*H*I of
forward + backward, and no activation memory beyond x. `MoGELayer(recompute=False)` (the default)
instead composes grouped_gemm -> swiglu -> grouped_gemm, whose autograd saves gate_up [M, 2I] and
h [M, I] (Pangu at T=4096: M = 32768 rows, 176 + 88 MB in bf16 per layer, kept from the forward to
the backward) and needs no extra GEMM. Training usually has that memory and not the FLOPs to spare,
hence the default; recompute=True is the activation-memory-lean choice (over Pangu's 48 MoE layers at
T=4096 it keeps 12.7 GB less). The transient peak of one layer's backward is about the same either way.
"""
from __future__ import annotations

import torch

from . import ops, packing
from .reference import acc_dtype, router_scores, router_scores_backward

_lib = ops._lib


# ----------------------------------------------------------------------------- autograd: dispatch
def route_backward(grad_weights, router_logits, topk_ids, expert_scale, renormalize, score_func,
                   need_logits_grad=True, need_scale_grad=True):
    """Gradients of grouped_dispatch's topk_weights w.r.t. (router_logits, expert_scale).

    grad_weights [T,K], router_logits [T,E], topk_ids [T,K] int32. Torch ops on [T, E] in fp32: a
    handful of small elementwise kernels next to the GEMMs, fused by Inductor under torch.compile."""
    T, E = router_logits.shape
    ids = topk_ids.long()
    logits = router_logits.to(acc_dtype(router_logits))
    acc = logits.dtype
    scores = router_scores(logits, score_func)
    picked = scores.gather(1, ids)                                          # [T, K] selected scores
    g = grad_weights.to(acc)
    if renormalize:
        denom = picked.sum(-1, keepdim=True)
        unscaled = picked / denom
    else:
        unscaled = picked
    grad_scale = None
    if expert_scale is not None:
        if need_scale_grad:
            # Each row picks distinct experts, so the scatter has one writer per element; the column
            # sum is a plain reduction: deterministic, no atomics.
            grad_scale = torch.zeros(T, E, dtype=acc, device=logits.device).scatter_(
                1, ids, g * unscaled).sum(0).to(expert_scale.dtype)
        g = g * expert_scale.to(acc)[ids]
    grad_logits = None
    if need_logits_grad:
        if renormalize:
            g = (g - (g * unscaled).sum(-1, keepdim=True)) / denom
        grad_scores = torch.zeros_like(scores).scatter_(1, ids, g)
        grad_logits = router_scores_backward(grad_scores, scores, score_func).to(router_logits.dtype)
    return grad_logits, grad_scale


def _needs(ctx, n):
    """ctx.needs_input_grad as n flags, one per schema input. It covers only the arguments the caller
    passed (the dispatcher drops trailing defaults), plus torch.library's metadata slot in setup_context."""
    needs = tuple(ctx.needs_input_grad)[:n]
    return needs + (False,) * (n - len(needs))


def _dispatch_setup_context(ctx, inputs, output):
    hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func = inputs[:7]
    _, _, topk_ids, expert_offsets, row_index = output
    ctx.mark_non_differentiable(topk_ids, expert_offsets, row_index)
    ctx.set_materialize_grads(False)   # an unused output (often permuted or weights) costs no kernel
    ctx.renormalize, ctx.score_func = renormalize, score_func
    ctx.hidden_dtype = hidden.dtype
    ctx.save_for_backward(router_logits, expert_scale, topk_ids, row_index)


def _dispatch_backward(ctx, grad_permuted, grad_weights, *_):
    router_logits, expert_scale, topk_ids, row_index = ctx.saved_tensors
    # expert_mask only restricts which experts are picked: the gradient through the scores is unchanged
    need_hidden, need_logits, _, _, need_scale, _, _, _ = _needs(ctx, 8)
    grad_hidden = grad_logits = grad_scale = None
    if need_hidden and grad_permuted is not None:
        ones = torch.ones(row_index.shape, dtype=torch.float32, device=row_index.device)
        grad_hidden = torch.ops.moge.grouped_combine(grad_permuted, ones, row_index, None)
    if (need_logits or need_scale) and grad_weights is not None:
        grad_logits, grad_scale = route_backward(
            grad_weights, router_logits, topk_ids, expert_scale, ctx.renormalize, ctx.score_func,
            need_logits_grad=need_logits, need_scale_grad=need_scale and expert_scale is not None)
    return grad_hidden, grad_logits, None, None, grad_scale, None, None, None


# ----------------------------------------------------------------------------- autograd: permute
def _permute_setup_context(ctx, inputs, output):
    hidden, topk_ids, num_experts = inputs
    _, expert_offsets, row_index = output
    ctx.mark_non_differentiable(expert_offsets, row_index)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(topk_ids, row_index)


def _permute_backward(ctx, grad_permuted, *_):
    topk_ids, row_index = ctx.saved_tensors
    if grad_permuted is None or not _needs(ctx, 3)[0]:
        return None, None, None
    # Dropped slots hold zeros, not copies of hidden: weight 0 keeps their rows out of the sum.
    kept = (topk_ids >= 0).to(torch.float32)
    return torch.ops.moge.grouped_combine(grad_permuted, kept, row_index, None), None, None


# ----------------------------------------------------------------------------- autograd: grouped_gemm
def _as_weight(grad_w, shape):
    """A weight gradient [E, N, K] in the weight's own shape ([E, N, K/B, B] when packed)."""
    return grad_w if grad_w is None or grad_w.shape == shape else grad_w.view(shape)


def _gemm_setup_context(ctx, inputs, output):
    x, w, expert_offsets, bias = inputs
    need_x, need_w, _, _ = _needs(ctx, 4)
    ctx.w_shape = w.shape
    ctx.save_for_backward(x if need_w else None, w if need_x else None, expert_offsets)


def _gemm_backward(ctx, grad_y):
    x, w, expert_offsets = ctx.saved_tensors
    need_x, need_w, _, need_bias = _needs(ctx, 4)
    grad_y = grad_y.contiguous()
    grad_x = torch.ops.moge.grouped_gemm_dgrad(grad_y, packing.unpack(w), expert_offsets) if need_x else None
    grad_w = torch.ops.moge.grouped_gemm_wgrad(grad_y, x, expert_offsets) if need_w else None
    return grad_x, _as_weight(grad_w, ctx.w_shape), None, _bias_grad(grad_y, expert_offsets) if need_bias else None


# The bias gradient, grad_bias[e] = sum of grad_y over the rows of e, as a weight gradient against a ones
# operand: grad_y_e^T @ ones_e (a wgrad GEMM: fp32 accumulation, deterministic, no atomics). Columns of
# ones are BIAS_GRAD_COLS wide (16-byte rows for the GEMM kernels) and the first one is kept.
BIAS_GRAD_COLS = 16


def _bias_grad(grad_y, expert_offsets):
    ones = grad_y.new_ones(grad_y.shape[0], BIAS_GRAD_COLS)
    return torch.ops.moge.grouped_gemm_wgrad(grad_y, ones, expert_offsets)[:, :, 0]


# ----------------------------------------------------------------------------- autograd: grouped_mlp
def _mlp_setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, expert_offsets, row_scale = inputs
    ctx.w_shapes = (w_gate_up.shape, w_down.shape)
    ctx.save_for_backward(x, w_gate_up, w_down, expert_offsets, row_scale)


def _mlp_backward(ctx, grad_y):
    x, w_gate_up, w_down, expert_offsets, row_scale = ctx.saved_tensors
    w_gate_up, w_down = packing.unpack(w_gate_up), packing.unpack(w_down)   # packed: a copy per call
    need_x, need_wgu, need_wd, _, need_scale = _needs(ctx, 5)
    moge = torch.ops.moge
    grad_y = grad_y.contiguous()
    gate_up = moge.grouped_gemm(x, w_gate_up, expert_offsets)              # recomputed [M, 2I]
    grad_h = moge.grouped_gemm_dgrad(grad_y, w_down, expert_offsets)      # w.r.t. unscaled h, [M, I]
    grad_gate_up, h, grad_scale = moge.swiglu_backward(grad_h, gate_up, row_scale, need_wd)
    del gate_up, grad_h                                                   # lower the backward's peak
    grad_wd = moge.grouped_gemm_wgrad(grad_y, h, expert_offsets) if need_wd else None
    del h
    grad_x = moge.grouped_gemm_dgrad(grad_gate_up, w_gate_up, expert_offsets) if need_x else None
    grad_wgu = moge.grouped_gemm_wgrad(grad_gate_up, x, expert_offsets) if need_wgu else None
    if need_scale and row_scale is not None:
        grad_scale = grad_scale.to(row_scale.dtype)
    else:
        grad_scale = None
    gu_shape, d_shape = ctx.w_shapes
    return grad_x, _as_weight(grad_wgu, gu_shape), _as_weight(grad_wd, d_shape), None, grad_scale


# ----------------------------------------------------------------------------- autograd: combine
def _combine_setup_context(ctx, inputs, output):
    expert_out, topk_weights, row_index, shared_out = inputs
    need_w = _needs(ctx, 4)[1]
    ctx.need_w = need_w
    ctx.has_shared = shared_out is not None
    ctx.shared_dtype = shared_out.dtype if shared_out is not None else None
    ctx.save_for_backward(expert_out if need_w else None, topk_weights, row_index)


def _combine_backward(ctx, grad_out):
    expert_out, topk_weights, row_index = ctx.saved_tensors
    need_eo, need_w, _, need_shared = _needs(ctx, 4)
    grad_out = grad_out.contiguous()
    grad_eo = grad_w = grad_shared = None
    if need_eo or need_w:
        placeholder = expert_out if ctx.need_w else grad_out.new_empty(0, grad_out.shape[1])
        grad_eo, grad_w = torch.ops.moge.grouped_combine_backward(
            grad_out, placeholder, topk_weights, row_index, ctx.need_w)
        grad_eo = grad_eo if need_eo else None
        grad_w = grad_w if need_w else None
    if need_shared and ctx.has_shared:
        grad_shared = grad_out.to(ctx.shared_dtype)
    return grad_eo, grad_w, None, grad_shared


# ----------------------------------------------------------------------------- autograd: swiglu
def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_h):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.moge.swiglu_backward(grad_h.contiguous(), gate_up, None, False)[0]


torch.library.register_autograd("moge::grouped_dispatch", _dispatch_backward,
                                setup_context=_dispatch_setup_context, lib=_lib)
torch.library.register_autograd("moge::grouped_permute", _permute_backward,
                                setup_context=_permute_setup_context, lib=_lib)
torch.library.register_autograd("moge::grouped_gemm", _gemm_backward,
                                setup_context=_gemm_setup_context, lib=_lib)
torch.library.register_autograd("moge::grouped_mlp", _mlp_backward,
                                setup_context=_mlp_setup_context, lib=_lib)
torch.library.register_autograd("moge::grouped_combine", _combine_backward,
                                setup_context=_combine_setup_context, lib=_lib)
torch.library.register_autograd("moge::swiglu", _swiglu_backward,
                                setup_context=_swiglu_setup_context, lib=_lib)


# ----------------------------------------------------------------------------- autograd: fp8 (none)
def _fp8_no_backward(op_name):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"moge::{op_name} is inference-only: FP8 expert weights have no backward. Train with the "
            "bf16 weights (MoGELayer before quantize_()), or run the FP8 layer under torch.no_grad()")
    return backward


for _fp8_op in ("grouped_gemm_fp8", "grouped_mlp_fp8", "permute_fp8"):
    torch.library.register_autograd(f"moge::{_fp8_op}", _fp8_no_backward(_fp8_op),
                                    setup_context=lambda ctx, inputs, output: None, lib=_lib)
