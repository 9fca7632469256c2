"""Swap the MoGE blocks of a loaded Pangu Pro MoE model (or any model with the same block structure) for
`moge_kernels.MoGELayer`.

    from moge_kernels.integrations.pangu import swap_moge_blocks
    swap_moge_blocks(model, num_groups=8)          # every PanguProMoESparseMoeBlock -> MoGELayer, in place

A MoGE block is recognised by its structure, as Pangu Pro MoE's `PanguProMoESparseMoeBlock` has it:

    gate.weight                               [E, H]   router, a bias-free nn.Linear
    router_scale                              [1, E]   (or [E]) per-expert scale of the routing weights
    experts.{e}.{gate,up,down}_proj.weight    [I, H], [I, H], [H, I]   E bias-free SwiGLU MLPs
    shared_expert.{gate,up,down}_proj.weight  optional dense SwiGLU MLP

and its computation: softmax over all E experts, the best k_g of each of the G groups, times
router_scale[expert], no renormalisation (MoGELayer's defaults; pass score_func= / renormalize= to
override), the weighted expert outputs plus the shared expert. The MoGELayer is built from the block's own
state dict through `MoGELayer.from_pretrained_state_dict` (so it follows whatever layout MoGELayer stores:
the per-expert weights are stacked into its [E, 2I, H] / [E, H, I] tensors, the rest is taken over as it
is), then replaces the block in its parent. Blocks are swapped one at a time and the old block is dropped
as soon as its replacement is in place: the model never holds a second copy of its expert weights, and the
transient extra memory is one block's routed-expert weights. Device, dtype, training mode and
requires_grad carry over.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layer import MoGELayer

__all__ = ["is_moge_block", "moge_layer_from_block", "swap_moge_blocks"]

_MLP = ("gate_proj", "up_proj", "down_proj")


def _is_swiglu_mlp(module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) and getattr(module, n).bias is None
               for n in _MLP)


def is_moge_block(module: nn.Module) -> bool:
    """True for a module with Pangu Pro MoE's MoGE block structure (module docstring)."""
    gate = getattr(module, "gate", None)
    scale = getattr(module, "router_scale", None)
    experts = getattr(module, "experts", None)
    if not isinstance(gate, nn.Linear) or gate.bias is not None or not isinstance(scale, torch.Tensor):
        return False
    E = gate.out_features
    if scale.numel() != E or not isinstance(experts, nn.ModuleList) or len(experts) != E:
        return False
    shared = getattr(module, "shared_expert", None)
    return all(_is_swiglu_mlp(e) for e in experts) and (shared is None or _is_swiglu_mlp(shared))


def moge_layer_from_block(block: nn.Module, num_groups: int, topk_per_group: int = 1,
                          **layer_kwargs) -> MoGELayer:
    """A MoGELayer holding `block`'s weights (module docstring); layer_kwargs go to MoGELayer."""
    if not is_moge_block(block):
        raise ValueError(f"{type(block).__name__} does not have the MoGE block structure "
                         "(gate, router_scale, experts.{e}.{gate,up,down}_proj, shared_expert)")
    state = block.state_dict()
    ref = block.gate.weight
    layer = MoGELayer.from_pretrained_state_dict(state, num_groups, topk_per_group, **layer_kwargs)
    del state
    layer.train(block.training)
    for p in layer.parameters():
        p.requires_grad_(ref.requires_grad)
    return layer


def swap_moge_blocks(model: nn.Module, num_groups: Optional[int] = None, topk_per_group: int = 1,
                     **layer_kwargs) -> list:
    """Replace every MoGE block of `model` by a MoGELayer, in place; returns the swapped module names.

    num_groups defaults to `model.config.num_experts_per_tok // topk_per_group` (Pangu Pro MoE: top-8 of 64
    experts in 8 groups, one per group)."""
    if num_groups is None:
        topk = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
        if topk is None:
            raise ValueError("num_groups not given and model.config.num_experts_per_tok not found")
        num_groups = topk // topk_per_group
    names = [name for name, module in model.named_modules() if name and is_moge_block(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = moge_layer_from_block(getattr(parent, child), num_groups, topk_per_group, **layer_kwargs)
        setattr(parent, child, layer)      # the old block (and its per-expert weights) is released here
    return names
