"""Serving a MoGE layer on a subset of its experts, chosen per group so the layer stays balanced.

Two deployments run MoGE models on fewer experts than they were trained with:

* **Pangu Pro MoE on Ascend 300I Duo** (vllm-ascend `pangu_moe.py`, `num_voted_experts=5`): per batch,
  every token votes for its best expert in each group, each group keeps its most-voted experts, and the
  routing picks among the kept ones. `voted_expert_mask` is that vote; passing its result as `expert_mask`
  to `grouped_dispatch` / `moge_forward` / `MoGELayer.forward` gives that routing.
* **PreMoe** (arXiv 2505.17639): experts are scored on calibration data (`moge_kernels.metrics.
  expert_importance`), and only the kept experts' weights are loaded: `compact_experts` (functional) and
  `MoGELayer.prune_experts_` slice the router and gather the kept experts into a smaller table.

Both keep the same number of experts in every group: the pruned layer is again MoGE (every group, and so
every expert-parallel device, gets exactly T*k_g rows).

    expert_mask     [E]      bool   True = expert e may be chosen (a tensor: changing it recompiles nothing)
    kept_ids        [E']     int64  global (original) id of each kept expert, ascending, E' = G * S'
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import checks, reference


def _vote_scores(router_logits: Tensor, score_func: str) -> Tensor:
    """fp32 scores with NaN ranked below every number, as the routing ranks them (reference.route)."""
    scores = reference.router_scores(router_logits.float(), score_func)
    return scores.nan_to_num(nan=float("-inf"))


def voted_expert_mask(router_logits: Tensor, num_groups: int, num_voted_experts: int,
                      score_func: str = "softmax") -> Tensor:
    """Pangu's batch vote: the experts each group keeps for this batch, as an `expert_mask` [E] bool.

    router_logits [T, E] (E experts in num_groups groups of S = E/G). Every token votes for its best expert
    in each group (its top-1 score; ties to the lower index); each group keeps the num_voted_experts
    in-group positions with the most votes, ties in vote count going to the lower in-group index. With
    T = 0 every group keeps its first num_voted_experts. Torch ops on the logits' device, no host sync."""
    checks.check_tensor("router_logits", router_logits, 2)
    T, E = router_logits.shape
    if num_groups < 1 or E % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the number of experts E={E}")
    S = E // num_groups
    if not 1 <= num_voted_experts <= S:
        raise ValueError(f"num_voted_experts={num_voted_experts} must be in [1, E/num_groups={S}]")
    scores = _vote_scores(router_logits, score_func).view(T, num_groups, S)
    best = scores.argmax(dim=-1)                                                # [T, G] first max
    votes = torch.nn.functional.one_hot(best, S).sum(0)                         # [G, S] int64
    # rank of position s in its group: positions with more votes, or as many votes and a lower index
    more = votes[:, None, :] > votes[:, :, None]                               # [G, s, s'] s' beats s
    lower_tie = (votes[:, None, :] == votes[:, :, None]) & torch.ones(S, S, dtype=torch.bool,
                                                                       device=votes.device).tril(-1)
    rank = (more | lower_tie).sum(-1)                                           # [G, S]
    return (rank < num_voted_experts).reshape(E)


def kept_expert_ids(keep: Union[Tensor, Sequence[int]], num_experts: int, num_groups: int,
                    min_per_group: int = 1) -> list:
    """The ascending global ids of a keep set given as a bool mask [E] or as expert ids; checks that every
    group keeps the same number (>= min_per_group) of experts. Reads keep on the host (pruning is a
    one-time step, never in the hot path)."""
    if isinstance(keep, Tensor) and keep.dtype == torch.bool:
        if tuple(keep.shape) != (num_experts,):
            raise ValueError(f"keep as a mask must have shape ({num_experts},), got {tuple(keep.shape)}")
        ids = torch.nonzero(keep.cpu()).reshape(-1).tolist()
    else:
        if isinstance(keep, Tensor):
            if keep.dim() != 1 or keep.is_floating_point() or keep.is_complex():
                raise TypeError(f"keep must be a bool mask [E] or a 1-D tensor of integer expert ids, got "
                                f"dtype {keep.dtype} shape {tuple(keep.shape)}")
            keep = keep.cpu().tolist()
        ids = [int(e) for e in keep]
        if len(set(ids)) != len(ids):
            raise ValueError(f"keep lists an expert more than once: {sorted(ids)}")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"keep holds expert ids outside [0, {num_experts}): {bad}")
        ids = sorted(ids)
    S = num_experts // num_groups
    per_group = [sum(1 for e in ids if e // S == g) for g in range(num_groups)]
    if len(set(per_group)) != 1:
        raise ValueError(f"keep must hold the same number of experts in every group, so that the pruned "
                         f"layer stays MoGE (each group, and each expert-parallel device, gets the same "
                         f"rows); got per-group counts {per_group}")
    if per_group[0] < min_per_group:
        raise ValueError(f"keep must hold at least {min_per_group} expert(s) per group (topk_per_group), got "
                         f"{per_group[0]}")
    return ids


class CompactExperts(NamedTuple):
    """The kept experts' tensors: E' = G * S' experts, group-major as before."""
    kept_ids: Tensor                 # [E'] int64 original global id of each kept expert
    router_weight: Tensor            # [E', H]
    router_scale: Optional[Tensor]   # [E'] or None
    w_gate_up: Tensor                # [E', 2I, H] (or packed [E', 2I, H/B, B])
    w_down: Tensor                   # [E', H, I] (or packed)


def compact_experts(keep: Union[Tensor, Sequence[int]], num_groups: int, router_weight: Tensor,
                    w_gate_up: Tensor, w_down: Tensor, router_scale: Optional[Tensor] = None,
                    topk_per_group: int = 1) -> CompactExperts:
    """Gather the kept experts into new, smaller tensors (PreMoe-style pruning, functional).

    keep: a bool mask [E] or expert ids; every group must keep the same number S' >= topk_per_group of
    experts. router_weight [E, H] (nn.Linear layout), w_gate_up / w_down [E, ...] (packed or not),
    router_scale [E]. The results are copies: the caller drops its references to free the rest. Routing on
    the compacted router equals routing on the full one with the dropped experts' logits at -inf (the
    softmax runs over the kept experts only), unlike `expert_mask`, whose weights are the scores over all
    E experts."""
    E = router_weight.shape[0]
    if num_groups < 1 or E % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be >= 1 and divide the number of experts E={E}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down), ("router_scale", router_scale)):
        if t is not None and t.shape[0] != E:
            raise ValueError(f"{name} holds {t.shape[0]} experts but router_weight holds E={E}")
    ids = kept_expert_ids(keep, E, num_groups, topk_per_group)
    index = torch.tensor(ids, dtype=torch.int64, device=router_weight.device)

    def take(t):
        return None if t is None else t.index_select(0, index.to(t.device))

    return CompactExperts(index, take(router_weight), take(router_scale), take(w_gate_up), take(w_down))


__all__ = ["voted_expert_mask", "kept_expert_ids", "compact_experts", "CompactExperts"]
