"""Load-balance metrics of a routing: per-expert load, per-device load, and the imbalance score.

Imbalance score, as defined in Pangu Pro MoE (arXiv 2505.21411, eq. 3), for a batch X of tokens whose
experts are spread over devices, T_i(X) being the computation load (here: routed (token, expert) rows) of
device i:

    IS(X) = ( max_i T_i(X) - min_i T_i(X) ) / |X|

(The definition was read from two public summaries of the paper found with the `search` tool, not from the
PDF itself; |X| = number of tokens in the batch.) MoGE with one group, or G/D whole groups, per device has
IS = 0 by construction: every device gets exactly |X| * k_g * G/D rows. We also report
`max_over_mean` = max_i T_i / mean_i T_i, the straggler factor: the expert phase of an EP step waits for
the most loaded device, so its time scales with this ratio.

Devices own contiguous expert blocks: device d holds experts [d*E/D, (d+1)*E/D), as in
`moge_kernels.parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import reference


def expert_load(topk_ids: Tensor, num_experts: int) -> Tensor:
    """Rows routed to each expert: [E] int64 (topk_ids [T, K] any integer dtype)."""
    return torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)


def device_load(expert_load: Tensor, num_devices: int) -> Tensor:
    """Rows per device when device d owns experts [d*E/D, (d+1)*E/D): [D] int64."""
    E = expert_load.shape[-1]
    if num_devices < 1 or E % num_devices != 0:
        raise ValueError(f"E={E} experts cannot be split evenly over num_devices={num_devices}")
    return expert_load.reshape(*expert_load.shape[:-1], num_devices, E // num_devices).sum(-1)


def imbalance_score(device_load: Tensor, num_tokens: int) -> float:
    """Pangu Pro MoE's IS = (max_i T_i - min_i T_i) / |X| (0 for an empty batch)."""
    if num_tokens == 0:
        return 0.0
    return float((device_load.max() - device_load.min()).item()) / num_tokens


@dataclass
class LoadStats:
    """Load of one routing of one batch over `num_devices` devices."""
    expert_load: Tensor          # [E] int64 rows per expert
    device_load: Tensor          # [D] int64 rows per device
    num_tokens: int
    imbalance_score: float       # paper's IS
    max_over_mean: float         # straggler factor (1.0 = balanced)

    def as_dict(self) -> dict:
        return dict(device_load=self.device_load.tolist(), imbalance_score=self.imbalance_score,
                    max_over_mean=self.max_over_mean,
                    expert_load_min=int(self.expert_load.min()), expert_load_max=int(self.expert_load.max()))


def load_stats(topk_ids: Tensor, num_experts: int, num_devices: int) -> LoadStats:
    e_load = expert_load(topk_ids, num_experts)
    d_load = device_load(e_load, num_devices)
    mean = d_load.double().mean().item()
    return LoadStats(e_load, d_load, topk_ids.shape[0], imbalance_score(d_load, topk_ids.shape[0]),
                     float(d_load.max().item()) / mean if mean > 0 else 1.0)


def moge_route_ids(router_logits: Tensor, num_groups: int, topk_per_group: int = 1, **route_kwargs) -> Tensor:
    """MoGE expert ids [T, G*k_g] (grouped top-k, moge_kernels.reference.route)."""
    return reference.route(router_logits, num_groups, topk_per_group, **route_kwargs)[1]


def topk_route_ids(router_logits: Tensor, top_k: int, **route_kwargs) -> Tensor:
    """Plain top-k expert ids [T, k] on the same scores (one group spanning all experts)."""
    return reference.route(router_logits, 1, top_k, **route_kwargs)[1]


def compare_routing(router_logits: Tensor, num_groups: int, topk_per_group: int, num_devices: int,
                    top_k: Optional[int] = None, **route_kwargs) -> dict:
    """{"moge": LoadStats, "topk": LoadStats} for MoGE vs plain top-k (K = G*k_g unless given) on the
    same logits, over `num_devices` devices."""
    E = router_logits.shape[1]
    top_k = top_k if top_k is not None else num_groups * topk_per_group
    return {
        "moge": load_stats(moge_route_ids(router_logits, num_groups, topk_per_group, **route_kwargs),
                           E, num_devices),
        "topk": load_stats(topk_route_ids(router_logits, top_k, **route_kwargs), E, num_devices),
    }


@dataclass
class ExpertImportance:
    """Per-expert routing statistics over calibration batches (PreMoe's expected selection score).

    Accumulate with `expert_importance(logits, ..., state=previous)`; merge accumulators (other ranks,
    other data) with `+`."""
    weight_sum: Tensor    # [E] fp64 sum over tokens of the expert's routing weight where chosen, 0 elsewhere
    chosen: Tensor        # [E] int64 tokens that chose the expert
    num_tokens: int
    num_groups: int

    @property
    def score(self) -> Tensor:
        """[E] fp64 expected selection score: mean over tokens of the routing weight where chosen, else 0."""
        return self.weight_sum / max(self.num_tokens, 1)

    @property
    def frequency(self) -> Tensor:
        """[E] fp64 fraction of tokens that chose the expert."""
        return self.chosen.double() / max(self.num_tokens, 1)

    def top_experts(self, experts_per_group: int) -> Tensor:
        """[G * experts_per_group] int64 ascending global ids of each group's highest-scoring experts
        (ties to the lower id): a keep set for `compact_experts` / `MoGELayer.prune_experts_`."""
        E = self.weight_sum.shape[0]
        S = E // self.num_groups
        if not 1 <= experts_per_group <= S:
            raise ValueError(f"experts_per_group={experts_per_group} must be in [1, E/num_groups={S}]")
        order = torch.sort(self.score.view(self.num_groups, S), dim=-1, descending=True, stable=True).indices
        base = torch.arange(self.num_groups, device=order.device)[:, None] * S
        return torch.sort((order[:, :experts_per_group] + base).reshape(-1)).values

    def __add__(self, other: "ExpertImportance") -> "ExpertImportance":
        if self.weight_sum.shape != other.weight_sum.shape or self.num_groups != other.num_groups:
            raise ValueError("cannot add ExpertImportance of different expert layouts: "
                             f"{tuple(self.weight_sum.shape)}/G={self.num_groups} and "
                             f"{tuple(other.weight_sum.shape)}/G={other.num_groups}")
        return ExpertImportance(self.weight_sum + other.weight_sum.to(self.weight_sum.device),
                                self.chosen + other.chosen.to(self.chosen.device),
                                self.num_tokens + other.num_tokens, self.num_groups)


def expert_importance(router_logits: Tensor, num_groups: int, topk_per_group: int = 1,
                      expert_scale: Optional[Tensor] = None, renormalize: bool = False,
                      score_func: str = "softmax", expert_mask: Optional[Tensor] = None, *,
                      state: Optional[ExpertImportance] = None) -> ExpertImportance:
    """Add one calibration batch's routing (router_logits [T, E], routed as the layer routes: grouped
    top-k, renormalize, expert_scale, expert_mask) to `state` (None: start from zero) and return the sum.

    The returned accumulator's `score` [E] is PreMoe's expected selection score, `frequency` [E] how often
    each expert is chosen, `top_experts(n)` the per-group keep set. Torch ops on the logits' device, no
    host sync; deterministic (no float atomics)."""
    T, E = router_logits.shape
    topk_weights, topk_ids = reference.route(router_logits, num_groups, topk_per_group, expert_scale,
                                             renormalize, score_func, expert_mask)
    ids = topk_ids.long()
    # a token's K slots name K distinct experts: scatter (not add) into a dense [T, E], then reduce
    dense = torch.zeros(T, E, dtype=torch.float64, device=router_logits.device)
    dense.scatter_(1, ids, topk_weights.double())
    picked = torch.zeros(T, E, dtype=torch.int64, device=router_logits.device)
    picked.scatter_(1, ids, 1)
    batch = ExpertImportance(dense.sum(0), picked.sum(0), T, num_groups)
    return batch if state is None else state + batch


def skewed_logits(num_tokens: int, num_experts: int, skew: float = 1.0, seed: int = 0,
                  token_scale: float = 1.0, device="cpu") -> Tensor:
    """Router logits with a per-expert popularity bias, as trained routers show.

    logits[t, e] = token_scale * N(0,1) + skew * b_e with b_e ~ N(0,1) fixed per seed: skew=0 is uniform
    popularity; skew ~1 gives a few hot experts (the hottest expert draws several times its fair share
    under plain top-k)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(num_experts, generator=g)
    noise = torch.randn(num_tokens, num_experts, generator=g)
    return (token_scale * noise + skew * bias).to(device)


__all__ = ["expert_load", "device_load", "imbalance_score", "LoadStats", "load_stats", "moge_route_ids",
           "topk_route_ids", "compare_routing", "skewed_logits", "ExpertImportance", "expert_importance"]
