"""`MoGELayer`: a trainable Mixture of Grouped Experts layer (Pangu Pro MoE's MLP block) on `torch.ops.moge`.

Parameters and their checkpoint keys (as Pangu Pro MoE checkpoints on the hub name them, relative to
the layer's prefix such as `model.layers.3.mlp.`):

    gate.weight                         [E, H]       router (nn.Linear, no bias)
    router_scale                        [E]          learned per-expert scale (checkpoints: [1, E])
    w_gate_up                           [E, 2I, H]   stacked experts.{e}.gate_proj.weight [I, H] (rows
                                                     [0, I)) and experts.{e}.up_proj.weight (rows [I, 2I))
    w_down                              [E, H, I]    stacked experts.{e}.down_proj.weight
    shared_w_gate_up                    [2Is, H]     optional dense shared SwiGLU expert (Pangu: Is=5376):
                                                     shared_expert.gate_proj.weight [Is, H] (rows [0, Is))
                                                     and shared_expert.up_proj.weight (rows [Is, 2Is))
    shared_w_down                       [H, Is]      shared_expert.down_proj.weight

The stacked layout is the one `moge_kernels.moge_forward` takes, so the layer and the functional API share
weights. `load_state_dict` accepts either layout: a pre-hook stacks the per-expert and per-projection
keys (and flattens a [1, E] router_scale). `from_pretrained_state_dict` builds a layer from such a dict, inferring every size;
`per_expert_state_dict` writes the checkpoint layout back.

Load-balancing loss. Pangu Pro MoE (arXiv 2505.21411) adds a batch-level auxiliary loss computed on the
global softmax scores S (softmax over all E experts, before the per-group top-k):
    aux = coef * sum_i f_i * P_i,   f_i = E / (K * T) * #(tokens routed to expert i),
                                    P_i = (1 / T) * sum_t S[t, i]
(the Switch-Transformer form, f_i from the actual routing, gradient through P_i only). With MoGE,
f is balanced across groups by construction; the loss balances the experts inside each group. The
formula here is our reading of the paper's description, not copied from its code (none is public).
The loss is recorded as `layer.aux_loss` on every training-mode forward and returned by
`forward(x, return_aux_loss=True)`; `aux_loss_coef` defaults to Pangu's 0.001.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import Tensor, nn

from . import checks, expert_subsets, fp8, ops, packing, reference

_EXPERT_KEY = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED_KEYS = tuple(f"shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))


class MoGELayer(nn.Module):
    """Router + grouped top-k dispatch + expert SwiGLU MLPs + combine (+ shared expert), trainable.

    hidden_size H, intermediate_size I (per routed expert), num_experts E in num_groups G groups,
    topk_per_group k_g (K = G * k_g experts per token). Pangu Pro MoE: H=5120, I=1344, E=64, G=8, k_g=1,
    shared_intermediate_size=5376, softmax scores, renormalize=False.

    recompute=False (default) runs the experts as grouped_gemm -> swiglu -> grouped_gemm and keeps
    gate_up [T*K, 2I] and h [T*K, I] for the backward; recompute=True runs the fused grouped_mlp op
    and recomputes gate_up in the backward (one more gate_up GEMM, +22% FLOPs, no saved activations
    beyond the permuted input). See moge_kernels/autograd.py. Where no gradient is recorded (inference,
    torch.no_grad), the fused grouped_mlp runs either way.

    pack_weights_() switches the expert weights to the packed inference layout (moge_kernels.packing:
    same values, k-block-major storage, [E, N, K/64, 64] parameters) that the Triton kernels stream
    faster at decode sizes; unpack_weights_() switches back (checkpoints load into the unpacked layout).
    """

    # (block_n, block_k) of the FP8 expert weights after quantize_ (fp8.py sets it), None before: a class
    # default, so that reading it is an attribute lookup, not nn.Module.__getattr__'s AttributeError
    _fp8_blocks: Optional[tuple] = None
    _fp8_shared_blocks: Optional[tuple] = None      # the same for an FP8 shared expert
    _fp8_shared_scale_format: str = "fp32"          # its scales' format (quantize_'s scale_format)

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, num_groups: int,
                 topk_per_group: int = 1, shared_intermediate_size: int = 0,
                 renormalize: bool = False, score_func: str = "softmax", aux_loss_coef: float = 1e-3,
                 recompute: bool = False, device=None, dtype=None):
        super().__init__()
        checks.check_layer_config(hidden_size, intermediate_size, num_experts, num_groups, topk_per_group,
                                  shared_intermediate_size, score_func)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.shared_intermediate_size = shared_intermediate_size
        self.num_experts, self.num_groups, self.topk_per_group = num_experts, num_groups, topk_per_group
        self.top_k = num_groups * topk_per_group
        self.renormalize, self.score_func = renormalize, score_func
        self.aux_loss_coef, self.recompute = aux_loss_coef, recompute
        kw = dict(device=device, dtype=dtype)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.router_scale = nn.Parameter(torch.empty(num_experts, **kw))
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        Is = shared_intermediate_size
        self.register_parameter("shared_w_gate_up",            # None: no shared expert
                                nn.Parameter(torch.empty(2 * Is, hidden_size, **kw)) if Is else None)
        self.register_parameter("shared_w_down", nn.Parameter(torch.empty(hidden_size, Is, **kw)) if Is else None)
        self.aux_loss: Optional[Tensor] = None
        self.register_load_state_dict_pre_hook(fp8.take_fp8_checkpoint_keys)   # before the bf16 keys
        self.register_load_state_dict_pre_hook(_stack_checkpoint_keys)
        self.register_load_state_dict_pre_hook(_take_kept_expert_ids)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.router_scale.device.type == "meta":
            return
        with torch.no_grad():
            self.router_scale.fill_(1.0)
            # nn.Linear's default init, per matrix: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the shared
            # expert's gate, up and down first, as when they were three nn.Linear (same seed, same layer)
            H, I, Is = self.hidden_size, self.intermediate_size, self.shared_intermediate_size
            shared = () if self.shared_w_gate_up is None else (
                (self.shared_w_gate_up[:Is], H), (self.shared_w_gate_up[Is:], H), (self.shared_w_down, Is))
            for w, fan_in in shared + ((self.w_gate_up, H), (self.w_down, I)):
                w.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def pack_weights_(self, block: int = packing.BLOCK) -> "MoGELayer":
        """Store w_gate_up and w_down packed (moge_kernels.packing), in place; gradients still flow."""
        for name in ("w_gate_up", "w_down"):
            w = getattr(self, name)
            if w.dim() == 3:
                setattr(self, name, nn.Parameter(packing.pack_expert_weights(w.data, block),
                                                 requires_grad=w.requires_grad))
        return self

    def unpack_weights_(self) -> "MoGELayer":
        """Back to the [E, N, K] layout of pack_weights_'s input, in place."""
        for name in ("w_gate_up", "w_down"):
            w = getattr(self, name)
            if w.dim() == 4:
                setattr(self, name, nn.Parameter(packing.unpack(w.data).contiguous(),
                                                 requires_grad=w.requires_grad))
        return self

    @torch.no_grad()
    def quantize_(self, fmt: str = "fp8_block", scale_format: str = "fp32",
                  shared_expert: bool = False) -> "MoGELayer":
        """Expert weights to FP8 (moge_kernels.fp8: "fp8_block" or "fp8_channel"), in place, for
        inference: w_gate_up / w_down become the buffers w_gate_up_fp8, w_gate_up_scale, w_down_fp8,
        w_down_scale (HF FP8 checkpoints load straight into them); the forward runs grouped_mlp_fp8.
        shared_expert=True quantizes the shared expert too (shared_w_gate_up_fp8, ...: the FP8 grouped
        MLP of one expert over every token): faster at prefill, but the shared expert carries most of
        the layer's output, so the layer's error against bf16 grows to about the FP8 mlp's own (~6% on
        random weights against ~0.6% with the default bf16 shared expert; bench/bench_fp8.py prints
        both)."""
        return fp8.quantize_layer_(self, fmt, scale_format, shared_expert)

    @torch.no_grad()
    def prune_experts_(self, keep) -> "MoGELayer":
        """Keep only the experts in `keep` (a bool mask [E] or global ids; the same number in every group,
        at least topk_per_group), in place: the router rows, router_scale and expert weights (packed or
        not) are gathered into smaller tensors and the rest is freed. The layer then routes over the kept
        experts only (softmax over them, as with the dropped experts' logits at -inf). The buffer
        `kept_expert_ids` [E'] int64 records each kept expert's id in the original layer (across repeated
        prunings); it is saved with the state dict, so the pruned layer's checkpoint loads back into
        `from_pretrained_state_dict` or a MoGELayer built with num_experts=E'."""
        if fp8.layer_weights(self) is not None:
            raise RuntimeError("prune_experts_ gathers the bf16/fp16/fp32 expert weights: prune before quantize_()")
        kept = expert_subsets.compact_experts(keep, self.num_groups, self.gate.weight, self.w_gate_up,
                                              self.w_down, self.router_scale, self.topk_per_group)
        for module, name, value in ((self.gate, "weight", kept.router_weight),
                                    (self, "router_scale", kept.router_scale),
                                    (self, "w_gate_up", kept.w_gate_up), (self, "w_down", kept.w_down)):
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
        original = getattr(self, "kept_expert_ids", None)
        ids = kept.kept_ids if original is None else original[kept.kept_ids.to(original.device)]
        self.register_buffer("kept_expert_ids", ids.to(self.router_scale.device))
        self.num_experts = self.gate.out_features = kept.kept_ids.numel()
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, num_groups={self.num_groups}, "
                f"shared_intermediate_size={self.shared_intermediate_size}, "
                f"topk_per_group={self.topk_per_group}, score_func={self.score_func!r}, "
                f"renormalize={self.renormalize}, aux_loss_coef={self.aux_loss_coef}, "
                f"recompute={self.recompute}")

    # ------------------------------------------------------------------------- forward
    def experts(self, permuted: Tensor, expert_offsets: Tensor) -> Tensor:
        """Expert SwiGLU MLPs over expert-sorted rows: [T*K, H] -> [T*K, H]."""
        return ops.run_experts(ops.grouped_mlp, self._grad_experts(), permuted, *self._expert_weights(),
                               expert_offsets)

    def _expert_weights(self):
        """(w_gate_up, w_down) as the ops take them: the parameters, or the FP8 weights after quantize_."""
        return fp8.layer_weights(self) or (self.w_gate_up, self.w_down)

    def _grad_experts(self):
        """The experts where autograd records them (ops.run_experts), or None: the fused grouped_mlp then
        (recompute=True, and FP8 weights, which are inference only)."""
        return None if self.recompute or self._fp8_blocks is not None else self._saving_experts

    @staticmethod
    def _saving_experts(permuted: Tensor, w_gate_up, w_down, expert_offsets: Tensor) -> Tensor:
        # grouped_mlp's signature; keeps gate_up and h for the backward (moge_kernels/autograd.py)
        moge = torch.ops.moge
        gate_up = moge.grouped_gemm(permuted, w_gate_up, expert_offsets)               # [T*K, 2I]
        return moge.grouped_gemm(moge.swiglu(gate_up), w_down, expert_offsets)

    def forward(self, hidden_states: Tensor, return_aux_loss: bool = False,
                expert_mask: Optional[Tensor] = None):
        """hidden_states [..., H] -> [..., H] (and the auxiliary loss with return_aux_loss=True).

        expert_mask [E] bool (True = may be chosen, at least topk_per_group per group) restricts the
        routing to those experts, e.g. `moge_kernels.voted_expert_mask` of this batch's logits."""
        checks.check_layer_input(hidden_states, self.hidden_size, self.gate.weight)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        router_logits = self.gate(x)                                                    # [T, E]
        blocks = self._fp8_blocks
        # FP8 experts: the dispatch writes the permuted rows in e4m3 already (no bf16 round trip)
        layer_ops = ops.MOGE_OPS if blocks is None else fp8.layer_ops(blocks[1])
        out, expert_offsets = ops.compose_layer(
            x, router_logits, *self._expert_weights(), self.num_groups, self.topk_per_group,
            self.router_scale, self.renormalize, self.score_func, *fp8.layer_shared_weights(self),
            layer_ops=layer_ops, grad_experts=self._grad_experts(),
            expert_mask=expert_mask, need_offsets=self.training or return_aux_loss)
        aux = None
        if self.training or return_aux_loss:
            aux = self.load_balancing_loss(router_logits, expert_offsets)
            self.aux_loss = aux
        out = out.reshape(shape)
        return (out, aux) if return_aux_loss else out

    def load_balancing_loss(self, router_logits: Tensor, expert_offsets: Tensor) -> Tensor:
        """aux_loss_coef * sum_i f_i * P_i over the batch (module docstring), fp32 scalar."""
        T, E = router_logits.shape
        scores = reference.router_scores(router_logits.float(), self.score_func)
        if reference.score_func_code(self.score_func) != reference.ScoreFunc.SOFTMAX:
            scores = scores / scores.sum(-1, keepdim=True)   # per token, so that P is a distribution
        tokens = max(T, 1)
        counts = (expert_offsets[1:] - expert_offsets[:-1]).float()                   # [E] rows
        f = counts * (E / (self.top_k * tokens))
        p = scores.sum(0) / tokens
        return self.aux_loss_coef * (f * p).sum()

    # ------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained_state_dict(cls, state_dict: dict, num_groups: int, topk_per_group: int = 1,
                                   prefix: str = "", shared_expert_fp8: bool = False,
                                   **kwargs) -> "MoGELayer":
        """Build a layer from a checkpoint's tensors (per-expert or stacked keys under `prefix`),
        sizes, dtype and device inferred from them; kwargs go to the constructor (score_func, ...).
        An e4m3 shared expert (a full FP8 checkpoint's) is dequantized into the activation dtype, or
        with shared_expert_fp8=True kept in FP8 as it is (quantize_(..., shared_expert=True)'s layout)."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "gate.weight" not in sd:
            raise KeyError(f"{prefix}gate.weight not found in the state dict")
        E, H = sd["gate.weight"].shape
        if "w_down" in sd or "w_down_fp8" in sd:               # a layer's own (or quantized) state dict
            I = sd.get("w_down", sd.get("w_down_fp8")).shape[2]
        elif "experts.0.down_proj.weight" in sd:
            I = sd["experts.0.down_proj.weight"].shape[1]
        else:
            raise KeyError(f"neither {prefix}w_down nor {prefix}experts.0.down_proj.weight found")
        if "shared_expert.gate_proj.weight" in sd:
            shared_size = sd["shared_expert.gate_proj.weight"].shape[0]
        elif "shared_w_gate_up_fp8" in sd:                     # a quantized layer's [1, 2Is, H]
            shared_size = sd["shared_w_gate_up_fp8"].shape[1] // 2
        else:
            shared_size = sd["shared_w_gate_up"].shape[0] // 2 if "shared_w_gate_up" in sd else 0
        kwargs.setdefault("shared_intermediate_size", shared_size)
        ref = sd["gate.weight"]
        kwargs.setdefault("dtype", ref.dtype)
        with torch.device("meta"):
            layer = cls(H, I, E, num_groups, topk_per_group, **kwargs)
        if shared_expert_fp8:
            fp8.keep_checkpoint_shared_expert_fp8(layer, sd)
        # build on meta, then take the checkpoint's tensors (converted to the layer's dtype) in place
        sd = {k: v.to(dtype=kwargs["dtype"], device=ref.device)
              if v.is_floating_point() and v.dtype != fp8.E4M3 and not fp8.is_checkpoint_fp8_key(k)
              else v.to(device=ref.device) for k, v in sd.items()}
        layer.load_state_dict(sd, strict=True, assign=True)
        return layer

    def per_expert_state_dict(self, prefix: str = "") -> dict:
        """The checkpoint layout: experts.{e}.{gate,up,down}_proj.weight, gate.weight, router_scale
        ([1, E], as Pangu stores it), shared_expert.{gate,up,down}_proj.weight; tensors are views of
        (or copies of) the layer's."""
        I, Is = self.intermediate_size, self.shared_intermediate_size
        out = {}
        for name, t in self.state_dict().items():
            if name == "w_gate_up":
                for e in range(self.num_experts):
                    out[f"{prefix}experts.{e}.gate_proj.weight"] = t[e, :I]
                    out[f"{prefix}experts.{e}.up_proj.weight"] = t[e, I:]
            elif name == "w_down":
                for e in range(self.num_experts):
                    out[f"{prefix}experts.{e}.down_proj.weight"] = t[e]
            elif name == "shared_w_gate_up":
                out[f"{prefix}shared_expert.gate_proj.weight"] = t[:Is]
                out[f"{prefix}shared_expert.up_proj.weight"] = t[Is:]
            elif name == "shared_w_down":
                out[f"{prefix}shared_expert.down_proj.weight"] = t
            elif name == "router_scale":
                out[f"{prefix}router_scale"] = t.reshape(1, -1)
            else:
                out[prefix + name] = t
        return out


def _take_kept_expert_ids(module, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs):
    """load_state_dict pre-hook: a pruned layer's checkpoint carries kept_expert_ids; give the layer the
    buffer so that it loads (a layer built with num_experts=E' has none yet)."""
    ids = state_dict.get(prefix + "kept_expert_ids")
    if ids is not None and getattr(module, "kept_expert_ids", None) is None:
        module.register_buffer("kept_expert_ids", torch.empty_like(ids, device=module.router_scale.device))


def _stack_checkpoint_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs):
    """load_state_dict pre-hook: checkpoint keys -> the stacked parameters (per-expert keys ->
    w_gate_up / w_down, shared_expert.{gate,up,down}_proj.weight -> shared_w_gate_up / shared_w_down)."""
    scale_key = prefix + "router_scale"
    if scale_key in state_dict and state_dict[scale_key].dim() == 2:
        state_dict[scale_key] = state_dict[scale_key].reshape(-1)      # checkpoints store [1, E]
    _stack_shared_keys(state_dict, prefix, error_msgs)
    _stack_expert_keys(module, state_dict, prefix, unexpected_keys, error_msgs)


def _stack_shared_keys(state_dict, prefix, error_msgs):
    keys = [prefix + k for k in _SHARED_KEYS]
    present = [k for k in keys if k in state_dict]
    if not present:
        return
    if len(present) < len(keys):   # leave the keys in place: strict loading then names the rest
        error_msgs.append(f"shared expert checkpoint keys incomplete, missing "
                          f"{[k for k in keys if k not in state_dict]}")
        return
    gate, up, down = (state_dict.pop(k) for k in keys)
    state_dict[prefix + "shared_w_gate_up"] = torch.cat([gate, up], dim=0)
    state_dict[prefix + "shared_w_down"] = down


def _stack_expert_keys(module, state_dict, prefix, unexpected_keys, error_msgs):
    per_expert = {}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        m = _EXPERT_KEY.fullmatch(key[len(prefix):])
        if m:
            per_expert[(int(m.group(1)), m.group(2))] = key
    if not per_expert:
        return
    E = module.num_experts
    wanted = [(e, p) for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")]
    missing = [f"{prefix}experts.{e}.{p}.weight" for e, p in wanted if (e, p) not in per_expert]
    if missing:   # leave the keys in place: strict loading then names what is missing and extra
        error_msgs.append(f"per-expert checkpoint keys incomplete, missing e.g. {missing[:3]}")
        return
    gate_up, down = [], []
    for e in range(E):
        gate = state_dict.pop(per_expert[(e, "gate_proj")])
        up = state_dict.pop(per_expert[(e, "up_proj")])
        gate_up.append(torch.cat([gate, up], dim=0))
        down.append(state_dict.pop(per_expert[(e, "down_proj")]))
    for (e, _), key in per_expert.items():
        if e >= E:
            unexpected_keys.append(key)
            state_dict.pop(key, None)
    state_dict[prefix + "w_gate_up"] = torch.stack(gate_up)
    state_dict[prefix + "w_down"] = torch.stack(down)
