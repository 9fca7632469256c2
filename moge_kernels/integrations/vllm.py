"""MoGE routing as a vLLM `custom_routing_function`.

    from moge_kernels.integrations.vllm import moge_routing_function
    experts = FusedMoE(..., top_k=8, renormalize=False,
                       custom_routing_function=moge_routing_function(num_groups=8, expert_scale=router_scale))

vLLM's FusedMoE calls `custom_routing_function(hidden_states=..., gating_output=router_logits, topk=...,
renormalize=...)` and expects `(topk_weights [T, K] fp32, topk_ids [T, K] int32)`; this one runs the fused
MoGE routing of `torch.ops.moge.grouped_dispatch` (softmax or sigmoid over all E experts, top-k_g inside
each of the G groups, renormalize, then the per-expert scale: Pangu Pro MoE's router_scale), i.e. the
routing every other moge path uses, so the ids are group-major and every group gets exactly T*k_g slots.
The hidden rows are not permuted here (vLLM permutes them itself): grouped_dispatch gets a zero-width view
of hidden_states, so its permute step copies nothing.

NOT RUN AGAINST vLLM: vLLM is not installed where this package is developed and tested. The tests call the
function with vLLM's keyword arguments and compare it with the reference routing
(tests/test_integration_vllm.py); whether a given vLLM version passes further arguments (they are
accepted and ignored) or expects other dtypes has not been checked on a vLLM install.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

import moge_kernels

__all__ = ["moge_routing_function"]


def moge_routing_function(num_groups: Optional[int] = None, topk_per_group: int = 1,
                          expert_scale: Union[Tensor, Callable[[], Tensor], None] = None,
                          score_func: str = "softmax",
                          expert_mask: Union[Tensor, Callable[[Tensor], Tensor], None] = None,
                          num_voted_experts: Optional[int] = None) -> Callable:
    """A vLLM `custom_routing_function` doing MoGE routing.

    num_groups G (default: topk // topk_per_group, so topk = G * k_g; Pangu Pro MoE: G = 8, k_g = 1);
    expert_scale: per-expert scale [E] or [1, E] (Pangu's router_scale), or a callable returning it at
    call time, or None; score_func "softmax" or "sigmoid".
    Serving on a subset of the experts (grouped_dispatch's expert_mask, [E] bool, True = may be chosen):
    expert_mask a fixed mask, or a callable mapping the batch's gating_output to one; or
    num_voted_experts=n for Pangu Pro MoE's 300I Duo routing, where each batch votes its n experts per
    group (moge_kernels.voted_expert_mask). The returned function takes
    (hidden_states [T, H], gating_output [T, E], topk, renormalize, *ignored) and returns
    (topk_weights [T, topk] fp32, topk_ids [T, topk] int32)."""
    if expert_mask is not None and num_voted_experts is not None:
        raise ValueError("give expert_mask or num_voted_experts, not both")

    def routing(hidden_states: Tensor, gating_output: Tensor, topk: int, renormalize: bool,
                *args, **kwargs):
        groups = num_groups if num_groups is not None else topk // topk_per_group
        if groups * topk_per_group != topk:
            raise ValueError(f"topk={topk} must equal num_groups * topk_per_group = "
                             f"{groups} * {topk_per_group}")
        scale = expert_scale() if callable(expert_scale) else expert_scale
        if scale is not None:
            scale = scale.reshape(-1)
        if num_voted_experts is not None:
            mask = moge_kernels.voted_expert_mask(gating_output, groups, num_voted_experts)
        else:
            mask = expert_mask(gating_output) if callable(expert_mask) else expert_mask
        _, topk_weights, topk_ids, _, _ = moge_kernels.grouped_dispatch(
            hidden_states[:, :0], gating_output, groups, topk_per_group, scale, renormalize, score_func,
            expert_mask=mask)
        return topk_weights, topk_ids

    return routing
