"""Expert parallelism (EP) for MoGE over `torch.distributed` (NCCL on GPUs, gloo on CPU).

Layout: D ranks, G groups (G % D == 0). Rank r owns groups [r*G/D, (r+1)*G/D), i.e. experts
[r*E/D, (r+1)*E/D), and holds only their weights: w_gate_up [E/D, 2I, H], w_down [E/D, H, I]. Every rank
routes its own T tokens against all E experts.

Why MoGE needs no count exchange: grouped_dispatch sorts the T*K (token, slot) rows by expert, experts are
group-major, and group g always owns exactly T*k_g rows, the block [g*T*k_g, (g+1)*T*k_g). So the rows
for rank r are the contiguous block [r*R, (r+1)*R) with

    R = T * k_g * G / D        rows this rank sends to every rank (and receives from every rank)

known on the host from (T, k_g, G, D) alone: the row exchange is an `all_to_all_single` with equal splits,
no device-to-host copy, nothing data-dependent on the host, so the layer can be captured in a CUDA graph.
Only the split *inside* a group is data-dependent; the receiver learns it from a second, fixed-size
exchange of per-expert counts ([D, E/D] int32, also equal splits) and computes its expert offsets on the
device.

One layer, on every rank (index tensors named as in moge_kernels/reference.py):

    permuted [T*K, H], topk_weights [T,K] f32, topk_ids, expert_offsets [E+1] i32, row_index [T,K] i32
        = grouped_dispatch(hidden, router_logits, G, k_g)                 # local routing + permute
    send_counts  [D, E/D] int32 = diff(expert_offsets).view(D, E/D)       # rows per (dest rank, its expert)
    recv_counts  [D, E/D] int32 = all_to_all(send_counts)                 # rows per (source rank, my expert)
    recv_rows    [D*R, H]       = all_to_all(permuted)                    # source-major, expert-sorted per source
    dest [D*R] int64: where received row j goes when rows are sorted by (local expert, source, position)
    order[D*R] int64: its inverse (order[dest[j]] = j)
    local_offsets [E/D+1] int32 = exclusive cumsum of recv_counts.sum(0)
    expert_out = grouped_mlp(recv_rows[order], w_gate_up, w_down, local_offsets)[dest]
    returned   [T*K, H] = all_to_all(expert_out)                          # back in the source's permuted order
    out [T, H] = grouped_combine(returned, topk_weights, row_index, shared_out)

Sorting by (local expert, source rank, position) reproduces exactly the row order a single process gets for
the concatenated batch (tokens rank-major), so EP equals `moge_forward` on the gathered inputs.

Autograd: the row exchanges are `_AllToAll` (backward = the reverse exchange) and the local sort is
`_PermuteRows` (backward = the inverse gather, no atomics), so EP training works whenever the local ops are
differentiable: `impl="reference"` (moge_kernels.reference, eager) always; `impl="moge"` (torch.ops.moge)
once the ops have autograd registered (see `ops_have_autograd()`).

Paths that synchronise with the host (they say so in `info["host_sync"]` when `return_info=True`):
  * `ragged_tokens=True`: tokens per rank differ and the caller did not pass `tokens_per_rank`; the token
    counts are all-gathered once per call (pass `tokens_per_rank=exchange_token_counts(T)` to pay it once).
  * `ep_topk_forward`: plain top-k routing, where rows per rank are data-dependent (dynamic splits).
  * validation (`validate=True`, default on CPU tensors or MOGE_VALIDATE=1): token counts are all-gathered
    to turn a mismatched T into a clear error instead of a hang inside the collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks, ops, reference

# The local ops EP composes (through ops.compose_layer, the one composition of the layer): the public
# torch.ops.moge surface, or the eager reference (differentiable by plain autograd: a cross-check).
IMPLS = {
    "moge": ops.MOGE_OPS,
    "reference": ops.LayerOps(reference.grouped_dispatch, reference.grouped_mlp, reference.grouped_combine,
                              reference.swiglu_mlp),
}
PHASES = ("route", "a2a_dispatch", "experts", "a2a_combine", "combine", "end")


def ops_have_autograd() -> bool:
    """True when torch.ops.moge.{grouped_dispatch, grouped_mlp, grouped_combine} have autograd kernels."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"moge::{op}", "Autograd")
               for op in ("grouped_dispatch", "grouped_mlp", "grouped_combine"))


# ----------------------------------------------------------------------------- host-side plans
def moge_rows_per_rank(num_tokens: int, topk_per_group: int, num_groups: int, world_size: int) -> int:
    """Rows a rank with `num_tokens` tokens sends to each rank: T * k_g * G / D (static, no sync)."""
    check_ep_config(num_groups, world_size)
    return num_tokens * topk_per_group * (num_groups // world_size)


def check_ep_config(num_groups: int, world_size: int, num_experts: Optional[int] = None,
                    local_experts: Optional[int] = None) -> None:
    """Clear errors for EP configurations that cannot give every rank whole groups."""
    if world_size < 1:
        raise ValueError(f"expert-parallel world size must be >= 1, got {world_size}")
    if num_groups % world_size != 0:
        raise ValueError(f"num_groups={num_groups} must be divisible by the expert-parallel world size "
                         f"D={world_size}: every rank owns num_groups/D whole groups")
    if num_experts is not None and local_experts is not None and local_experts * world_size != num_experts:
        raise ValueError(f"each rank must hold E/D = {num_experts}/{world_size} experts' weights, got "
                         f"w_gate_up/w_down with {local_experts} experts")


@dataclass(frozen=True)
class ExchangePlan:
    """Row split sizes of one rank's dispatch exchange (the combine exchange swaps them).

    `send_splits[r]` rows go to rank r; `recv_splits[s]` rows come from rank s. `equal` means every split
    is the same on every rank, so the exchange passes no split sizes at all."""
    send_splits: tuple
    recv_splits: tuple
    equal: bool

    @property
    def num_recv(self) -> int:
        return sum(self.recv_splits)


def plan_moge_exchange(tokens_per_rank: Sequence[int], rank: int, topk_per_group: int,
                       num_groups: int) -> ExchangePlan:
    """The MoGE exchange from the token counts alone: a rank sends T_self*k_g*G/D rows to every rank."""
    D = len(tokens_per_rank)
    send = moge_rows_per_rank(tokens_per_rank[rank], topk_per_group, num_groups, D)
    recv = tuple(moge_rows_per_rank(t, topk_per_group, num_groups, D) for t in tokens_per_rank)
    return ExchangePlan((send,) * D, recv, equal=len(set(tokens_per_rank)) == 1)


def exchange_token_counts(num_tokens: int, group=None, device="cpu") -> list:
    """All-gather every rank's token count (host sync: call it once, pass the result as tokens_per_rank)."""
    D = dist.get_world_size(group)
    mine = torch.tensor([num_tokens], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(D)]
    dist.all_gather(gathered, mine, group=group)
    return [int(t.item()) for t in gathered]


# ----------------------------------------------------------------------------- differentiable pieces
def _all_to_all(x: Tensor, send_splits, recv_splits, group) -> Tensor:
    """all_to_all_single along dim 0; split lists None means equal splits (no sizes passed)."""
    x = x.contiguous()
    rows = x.shape[0] if recv_splits is None else sum(recv_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=None if recv_splits is None else list(recv_splits),
                           input_split_sizes=None if send_splits is None else list(send_splits),
                           group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Row exchange whose backward is the reverse exchange (sent rows' gradients come back)."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad_out, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all_rows(x: Tensor, send_splits=None, recv_splits=None, group=None) -> Tensor:
    """Differentiable `all_to_all_single` over rows of `x` (None splits = equal split, no sizes sent)."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


class _PermuteRows(torch.autograd.Function):
    """y = x[index] for a permutation `index`; backward gathers with `inverse` (deterministic, no atomics,
    unlike index_select's index_add backward)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse), None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    return _PermuteRows.apply(x, index, inverse)


# ----------------------------------------------------------------------------- receiver layout
def local_expert_layout(recv_counts: Tensor, num_rows: int):
    """Device-side layout of received rows: no host sync, static shapes given `num_rows`.

    recv_counts [D, El] int: rows from source s for local expert e; the received buffer holds segments
    (s, e) in source-major, expert-minor order (each source sent its rows sorted by expert).
    Returns
        dest          [num_rows] int64  position of received row j once sorted by (expert, source, j)
        order         [num_rows] int64  inverse permutation: sorted row i is received row order[i]
        local_offsets [El+1]     int32  exclusive cumsum of rows per local expert (for grouped_mlp)
    """
    D, El = recv_counts.shape
    device = recv_counts.device
    counts = recv_counts.to(torch.int64)
    seg_counts = counts.reshape(-1)                                         # [D*El] buffer order
    seg_end = torch.cumsum(seg_counts, 0)
    seg_start = seg_end - seg_counts
    per_expert = counts.sum(0)                                              # [El]
    expert_start = torch.cumsum(per_expert, 0) - per_expert                 # [El]
    before_in_expert = torch.cumsum(counts, 0) - counts                     # [D, El] rows of e from s' < s
    sorted_seg_start = (expert_start.unsqueeze(0) + before_in_expert).reshape(-1)   # [D*El]
    row = torch.arange(num_rows, device=device, dtype=torch.int64)
    # Empty segments end where the next one starts; right=True lands on the non-empty one holding `row`.
    seg = torch.searchsorted(seg_end, row, right=True).clamp_max(max(D * El - 1, 0))
    dest = sorted_seg_start[seg] + (row - seg_start[seg])
    order = torch.empty_like(dest)
    order[dest] = row                                                       # unique indices: no accumulation
    local_offsets = torch.zeros(El + 1, dtype=torch.int32, device=device)
    local_offsets[1:] = torch.cumsum(per_expert, 0).to(torch.int32)
    return dest, order, local_offsets


def _run_local_experts(recv_rows, recv_counts, w_gate_up, w_down, mlp_fn):
    dest, order, local_offsets = local_expert_layout(recv_counts, recv_rows.shape[0])
    sorted_rows = permute_rows(recv_rows, order, dest)
    sorted_out = mlp_fn(sorted_rows, w_gate_up, w_down, local_offsets)
    return permute_rows(sorted_out, dest, order)


# ----------------------------------------------------------------------------- EP layers
def _exchanged_experts(group, D, mlp_fn, splits_fn, info, phase_hook):
    """The expert step of ops.compose_layer under EP (grouped_mlp's signature): this rank's permuted rows
    go to the ranks owning their experts, run there, and come back in the same order.
    splits_fn(send_counts, recv_counts) -> (send_splits, recv_splits), None for equal splits."""
    def experts(permuted, w_gate_up, w_down, expert_offsets):
        send_counts = (expert_offsets[1:] - expert_offsets[:-1]).view(D, -1)      # [D, El] int32
        _hook(phase_hook, "a2a_dispatch")
        recv_counts = _all_to_all(send_counts, None, None, group)                 # [D, El] int32
        send_splits, recv_splits = splits_fn(send_counts, recv_counts)
        recv_rows = all_to_all_rows(permuted, send_splits, recv_splits, group)     # [sum recv, H]
        _hook(phase_hook, "experts")
        expert_out = _run_local_experts(recv_rows, recv_counts, w_gate_up, w_down, mlp_fn)
        _hook(phase_hook, "a2a_combine")
        info.update(recv_expert_counts=recv_counts, send_splits=send_splits, recv_splits=recv_splits)
        return all_to_all_rows(expert_out, recv_splits, send_splits, group)      # [T*K, H]
    return experts


def _check_local_weights(hidden, router_logits, w_gate_up, w_down, num_groups, D, shared_w_gate_up,
                         shared_w_down):
    checks.check_tensor("router_logits", router_logits, 2)
    check_ep_config(num_groups, D, router_logits.shape[1], w_gate_up.shape[0])
    checks.check_layer_weights(hidden, router_logits, w_gate_up, w_down, shared_w_gate_up, shared_w_down,
                               num_experts=w_gate_up.shape[0])


def _default_validate(t: Tensor) -> bool:
    return t.device.type == "cpu" or checks.validate_values()


def _hook(phase_hook, name):
    if phase_hook is not None:
        phase_hook(name)


def ep_moge_forward(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                    num_groups: int, topk_per_group: int = 1, expert_scale: Optional[Tensor] = None,
                    renormalize: bool = False, score_func: str = "softmax",
                    shared_w_gate_up: Optional[Tensor] = None, shared_w_down: Optional[Tensor] = None,
                    expert_mask: Optional[Tensor] = None, *,
                    group=None, tokens_per_rank: Optional[Sequence[int]] = None, ragged_tokens: bool = False,
                    impl: str = "moge", validate: Optional[bool] = None,
                    phase_hook: Optional[Callable[[str], None]] = None, return_info: bool = False):
    """Expert-parallel MoGE layer: this rank's tokens in, this rank's outputs out.

    hidden [T,H] and router_logits [T,E] are this rank's tokens (logits over ALL E experts);
    w_gate_up [E/D,2I,H], w_down [E/D,H,I] are this rank's experts (global ids [r*E/D, (r+1)*E/D));
    expert_scale [E], expert_mask [E] bool (grouped_dispatch's; masked experts get no rows, the splits stay
    static) and the shared expert weights are replicated. Returns out [T,H] (and, with
    return_info, a dict with the split sizes, received per-expert counts and whether the host synced).

    Every rank must pass the same T unless `tokens_per_rank` (all ranks' T, known to the caller: no sync)
    or `ragged_tokens=True` (T all-gathered here: host sync) says otherwise. `phase_hook(name)` is called
    at the phase boundaries in PHASES (for timing with device events)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    layer_ops = IMPLS[impl]
    D, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_local_weights(hidden, router_logits, w_gate_up, w_down, num_groups, D, shared_w_gate_up,
                         shared_w_down)
    T = router_logits.shape[0]
    if hidden.shape[0] != T:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but router_logits has {T}")
    validate = validate if validate is not None else _default_validate(hidden)
    if tokens_per_rank is not None:
        tokens_per_rank = [int(t) for t in tokens_per_rank]
        if len(tokens_per_rank) != D:
            raise ValueError(f"tokens_per_rank={tokens_per_rank} must list the token counts of all {D} ranks")
    host_sync = False
    seen = None
    if validate or (ragged_tokens and tokens_per_rank is None):
        seen, host_sync = exchange_token_counts(T, group, hidden.device), True
    if tokens_per_rank is not None:
        # With validation every rank sees the same gathered counts, so every rank raises together;
        # without it only a rank whose own entry is wrong can tell.
        if (seen is not None and seen != tokens_per_rank) or tokens_per_rank[rank] != T:
            raise ValueError(f"tokens_per_rank={tokens_per_rank} does not match the ranks' token counts "
                             f"({seen if seen is not None else f'rank {rank} has T={T}'})")
    elif ragged_tokens:
        tokens_per_rank = seen
    else:
        if seen is not None and len(set(seen)) != 1:
            raise ValueError(f"tokens per rank differ {seen}: MoGE EP with static splits needs the same T "
                             f"on every rank; pass ragged_tokens=True or tokens_per_rank=[...]")
        tokens_per_rank = [T] * D
    plan = plan_moge_exchange(tokens_per_rank, rank, topk_per_group, num_groups)
    # Equal splits pass no sizes at all; ragged tokens only change what is received.
    splits = (None, None) if plan.equal else (plan.send_splits, plan.recv_splits)

    info = {}
    experts = _exchanged_experts(group, D, layer_ops.mlp, lambda send, recv: splits, info, phase_hook)
    out, _ = ops.compose_layer(hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group,
                               expert_scale, renormalize, score_func, shared_w_gate_up, shared_w_down,
                               layer_ops=layer_ops, experts=experts, phase_hook=phase_hook,
                               expert_mask=expert_mask)
    if not return_info:
        return out
    return out, dict(send_splits=plan.send_splits, recv_splits=plan.recv_splits, static=True,
                     recv_expert_counts=info["recv_expert_counts"], host_sync=host_sync)


def ep_topk_forward(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int,
                    expert_scale: Optional[Tensor] = None, renormalize: bool = False,
                    score_func: str = "softmax", shared_w_gate_up: Optional[Tensor] = None,
                    shared_w_down: Optional[Tensor] = None, *, group=None, impl: str = "moge",
                    phase_hook: Optional[Callable[[str], None]] = None, return_info: bool = False):
    """Comparison path: plain top-k MoE routing (no groups) with the usual dynamic splits.

    Rank r owns experts [r*E/D, (r+1)*E/D). Rows per rank depend on the routing, so the per-expert counts
    are exchanged and copied to the host (one sync per layer) before the variable-size row exchange.
    Token counts may differ per rank. Equals `moge_forward(..., num_groups=1, topk_per_group=top_k)`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    layer_ops = IMPLS[impl]
    D = dist.get_world_size(group)
    checks.check_tensor("router_logits", router_logits, 2)
    E = router_logits.shape[1]
    if E % D != 0:
        raise ValueError(f"the number of experts E={E} must be divisible by the world size D={D}")
    if w_gate_up.shape[0] * D != E or w_down.shape[0] * D != E:
        raise ValueError(f"each rank must hold E/D = {E}/{D} experts' weights, got "
                         f"{w_gate_up.shape[0]} (w_gate_up) and {w_down.shape[0]} (w_down)")
    checks.check_layer_weights(hidden, router_logits, w_gate_up, w_down, shared_w_gate_up, shared_w_down,
                               num_experts=w_gate_up.shape[0])

    def dynamic_splits(send_counts, recv_counts):
        # The host sync MoGE avoids: split sizes are data-dependent.
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        return tuple(splits[0]), tuple(splits[1])

    info = {}
    experts = _exchanged_experts(group, D, layer_ops.mlp, dynamic_splits, info, phase_hook)
    out, _ = ops.compose_layer(hidden, router_logits, w_gate_up, w_down, 1, top_k, expert_scale,
                               renormalize, score_func, shared_w_gate_up, shared_w_down,
                               layer_ops=layer_ops, experts=experts, phase_hook=phase_hook)
    if not return_info:
        return out
    return out, dict(send_splits=info["send_splits"], recv_splits=info["recv_splits"], static=False,
                     recv_expert_counts=info["recv_expert_counts"], host_sync=True)


def shard_experts(w_gate_up: Tensor, w_down: Tensor, rank: int, world_size: int):
    """This rank's slice [r*E/D, (r+1)*E/D) of full expert weights [E, ...] (views, no copy)."""
    E = w_gate_up.shape[0]
    if E % world_size != 0:
        raise ValueError(f"E={E} experts cannot be split over {world_size} ranks")
    El = E // world_size
    return w_gate_up[rank * El:(rank + 1) * El], w_down[rank * El:(rank + 1) * El]


__all__ = [
    "ep_moge_forward", "ep_topk_forward", "all_to_all_rows", "permute_rows", "local_expert_layout",
    "plan_moge_exchange", "moge_rows_per_rank", "exchange_token_counts", "check_ep_config",
    "shard_experts", "ops_have_autograd", "ExchangePlan", "IMPLS", "PHASES",
]
