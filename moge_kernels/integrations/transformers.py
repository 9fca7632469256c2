"""moge_kernels as a transformers experts implementation, `"moge"`.

    import moge_kernels.integrations.transformers            # registers "moge" in transformers' ExpertsInterface
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moge")
    # or, on a loaded model: model.set_experts_implementation("moge")

Every experts module decorated with transformers' `@use_experts_implementation` (Qwen3-MoE, Mixtral, OLMoE,
Qwen2-MoE, DeepSeek-V2/V3, gpt-oss, ... 57 classes in transformers 5.17) then runs

    grouped_permute(hidden, top_k_index, E) -> experts -> grouped_combine(expert_out, top_k_weights, row_index)

forward and backward (every step is a `torch.ops.moge` op or a differentiable torch op; the router's
top_k_weights get their gradient through grouped_combine). The experts step depends on what the module
declares (its decorator flags) and what it defines:

    module                                          experts step
    is_concatenated, no bias, default _apply_gate,  grouped_mlp (fused SwiGLU) where no gradient is recorded;
    SiLU act_fn (Qwen3-MoE, Mixtral, OLMoE,         grouped_gemm -> swiglu -> grouped_gemm while training,
    Qwen2-MoE, DeepSeek-V3, most others)            which saves gate_up instead of recomputing it (as MoGELayer)
    any other gate: the module's own _apply_gate    grouped_gemm -> (+ bias) -> module._apply_gate ->
    (gpt-oss's clamped interleaved SwiGLU, GELU     grouped_gemm -> (+ bias): the module's own gate function
    experts, clamped SwiGLUs), has_bias             reads its layout (is_concatenated=False: gate/up columns
                                                    interleaved), so no weight is reordered
    has_gate=False (ungated, e.g. Nemotron-H)       grouped_gemm(up_proj) -> act_fn -> grouped_gemm(down_proj)

With the option `eager_graphs = N` (moge_kernels/eager_graphs.py), the experts step of an eager call of
at most N tokens on a GPU with nothing to record (generate() without a compiled graph) is replayed from a
CUDA graph captured per module, shape and weights: the decode step's host work is then a copy in, one
replay and a clone out. For the module's own gate this captures its _apply_gate / act_fn as well: a
replay runs it as it ran at capture (an attribute it reads, e.g. gpt-oss's `limit`, changed later is not
seen; a gate that cannot be captured, e.g. one that syncs, warns once and runs eagerly).

Weight layouts. The kernels take expert weights as [E, N, K] with unit stride along K (nn.Linear's
layout, which is transformers' default, is_transposed=False): those run as they are, no copy. Transposed
weights (is_transposed=True: gate_up_proj [E, H, 2I], down_proj [E, I, H], gpt-oss) would need a transposed
copy per call; instead they are re-laid out ONCE, in place, the first time the module runs (or by
`relayout_experts_(model)`): the parameter keeps its shape, values and identity, only its storage order
changes (`p.data = p.transpose(1, 2).contiguous().transpose(1, 2)`), so `p.transpose(1, 2)` is a
contiguous [E, N, K] view. There is no second copy to cache or invalidate: an optimizer step or
`load_state_dict` writes into the same storage, and the gradient is the parameter's own (autograd of the
transpose view; `p.grad` gets the parameter's strides). Under torch.compile a module that has not run yet
cannot be re-laid out inside the graph (it would mutate a parameter): call `relayout_experts_(model)`
before compiling, otherwise the compiled graph transposes per call. `save_pretrained` writes contiguous
copies, so checkpoints are unchanged.

Biases (has_bias) go to grouped_gemm's bias argument: added in the GEMM's epilogue (triton), their
gradient a per-expert sum of the output gradient (a wgrad GEMM: deterministic).

Expert parallelism: transformers' EP router marks slots of experts on other ranks with the id E; when
torch.distributed is initialised those become -1 before grouped_permute, which puts them past
expert_offsets[E] so they contribute nothing.

What is not supported falls back to transformers' own "grouped_mm", with one warning per class and
reason: expert weights that are not plain 3-D fp32/fp16/bf16 tensors (quantized or fp8 experts, tensor
subclasses), and devices without moge kernels.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe

import moge_kernels  # noqa: F401  defines torch.ops.moge and its autograd
from moge_kernels import checks, eager_graphs, ops

IMPLEMENTATION = "moge"
__all__ = ["IMPLEMENTATION", "moge_experts_forward", "relayout_experts_", "experts_path"]

_warned: set = set()


def _up_name(module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _unsupported(module, hidden_states: Tensor) -> Optional[str]:
    """Why this module cannot run on the moge kernels, or None."""
    if hidden_states.device.type not in ops._device_types:
        return f"runs on {hidden_states.device.type}, which has no moge kernels"
    names = [_up_name(module), "down_proj"]
    if module.has_bias:
        names += [f"{_up_name(module)}_bias", "down_proj_bias"]
    dtype = None
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, Tensor) or type(w) not in (Tensor, torch.nn.Parameter):
            return f"has {name} of type {type(w).__name__} (not a plain tensor)"
        if w.dim() != (2 if name.endswith("_bias") else 3):
            return f"has {name} of shape {tuple(w.shape)}"
        if w.dtype not in checks.FLOAT_DTYPES or (dtype is not None and w.dtype != dtype):
            return f"has {name} of dtype {w.dtype}"
        dtype = w.dtype
    return None


def _is_silu(act) -> bool:
    return isinstance(act, (SiLUActivation, torch.nn.SiLU)) or act is F.silu


def _fused_swiglu(module) -> bool:
    """The module's gate is silu(gate) * up over [gate | up] columns, no bias: grouped_mlp's SwiGLU."""
    return (module.has_gate and module.is_concatenated and not module.has_bias
            and type(module)._apply_gate is hf_moe._default_apply_gate
            and _is_silu(getattr(module, "act_fn", None)))


def experts_path(module) -> str:
    """Which path `moge_experts_forward` takes for `module` (for users and tests):
    "fused_swiglu", "gemm_gate" (module's _apply_gate or act_fn between two grouped GEMMs), or
    "grouped_mm (<reason>)" for the fallback. Says nothing about a device; assumes CPU/CUDA tensors."""
    w = getattr(module, _up_name(module), None)
    probe = w if isinstance(w, Tensor) else torch.empty(0)
    reason = _unsupported(module, probe)
    if reason is not None:
        return f"grouped_mm ({reason})"
    return "fused_swiglu" if _fused_swiglu(module) else "gemm_gate"


def _relayout_transposed_(p: Tensor) -> None:
    """Store p [E, K, N] so that p.transpose(1, 2) is contiguous; same tensor, shape and values."""
    # inference_mode(False): a re-layout first run under inference_mode must still be trainable later
    with torch.inference_mode(False), torch.no_grad():
        p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)


def _expert_weight(module, name: str) -> Tensor:
    """module.<name> as [E, N, K] with unit stride along K (see the module docstring, "Weight layouts")."""
    w = getattr(module, name)
    if not module.is_transposed:
        return w
    if w.transpose(1, 2).stride(2) != 1 and not torch.compiler.is_compiling():
        _relayout_transposed_(w)
    return w.transpose(1, 2)


def relayout_experts_(model: torch.nn.Module) -> int:
    """Re-lay out the transposed expert weights of every experts module of `model` in place (what the first
    forward does lazily); call it before torch.compile. Returns how many modules were touched."""
    count = 0
    for module in model.modules():
        if getattr(module, "is_transposed", False) and hasattr(module, "has_gate") and hasattr(module, "down_proj"):
            for name in (_up_name(module), "down_proj"):
                _expert_weight(module, name)
            count += 1
    return count


def _warn_fallback(module, reason: str) -> None:
    key = (type(module).__name__, reason)
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(f"experts_implementation='moge': {type(module).__name__} {reason}; running transformers' "
                  f"'grouped_mm' for it instead", stacklevel=3)


def _ep_sentinels_possible() -> bool:
    """transformers marks slots of experts on other ranks with id E only under expert parallelism."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# The ops through moge_kernels.ops: an eager call with nothing to record skips torch.ops' dispatcher there.
def _swiglu_experts(permuted: Tensor, w_gate_up: Tensor, w_down: Tensor, expert_offsets: Tensor) -> Tensor:
    if not ops.records_grad(permuted, w_gate_up, w_down):
        return ops.grouped_mlp(permuted, w_gate_up, w_down, expert_offsets)
    gate_up = ops.grouped_gemm(permuted, w_gate_up, expert_offsets)            # [M, 2I], saved
    return ops.grouped_gemm(ops.swiglu(gate_up), w_down, expert_offsets)


def _gemm_gate_experts(module, permuted: Tensor, w_up: Tensor, w_down: Tensor,
                       expert_offsets: Tensor) -> Tensor:
    up_bias = getattr(module, f"{_up_name(module)}_bias") if module.has_bias else None
    down_bias = module.down_proj_bias if module.has_bias else None
    h = ops.grouped_gemm(permuted, w_up, expert_offsets, up_bias)            # [M, N1], bias in the epilogue
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    # rows past offsets[E] (dropped slots) stay 0: the op adds no bias there
    return ops.grouped_gemm(h.to(w_down.dtype), w_down, expert_offsets, down_bias)   # [M, H]


def moge_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers experts forward on the moge kernels: hidden_states [T, H], top_k_index [T, K] (ids in
    [0, E), or E for a slot dropped by expert parallelism), top_k_weights [T, K] -> [T, H]."""
    reason = _unsupported(self, hidden_states)
    if reason is not None:
        _warn_fallback(self, reason)
        return hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    w_up = _expert_weight(self, _up_name(self))                                 # [E, N1, H]
    w_down = _expert_weight(self, "down_proj")                                  # [E, H, I]
    E = w_up.shape[0]
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(w_up.dtype)      # autocast: weights' dtype
    topk_ids = top_k_index.reshape(x.shape[0], -1)
    if _ep_sentinels_possible():
        topk_ids = torch.where(topk_ids < E, topk_ids, -1)
    topk_weights = top_k_weights.reshape(topk_ids.shape)
    per_call = (x, topk_ids, topk_weights)
    if _fused_swiglu(self):
        def experts(x, topk_ids, topk_weights):
            return _fused_experts(x, topk_ids, topk_weights, w_up, w_down, E)

        weights, fixed = (w_up, w_down), (E,)
    else:
        def experts(x, topk_ids, topk_weights):
            return _gate_experts(self, x, topk_ids, topk_weights, w_up, w_down)

        # the module's gate is captured too: its class, identity and every tensor it holds (biases, and
        # whatever its gate may read) are part of the key
        weights = (w_up, w_down) + tuple(t for t in self._parameters.values() if t is not None) + \
            tuple(t for t in self._buffers.values() if t is not None)
        fixed = (type(self), id(self))
    if eager_graphs.applies(x) and ops.replay_allowed(*per_call, *weights):
        out, = eager_graphs.run(experts, per_call, weights + fixed, IMPLEMENTATION)
    else:
        out, = experts(*per_call)
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def _fused_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                   E: int) -> tuple[Tensor]:
    """permute -> grouped_mlp (fused SwiGLU) -> combine: [T, H] -> ([T, H],)."""
    permuted, expert_offsets, row_index = ops.grouped_permute(x, topk_ids, E)
    expert_out = _swiglu_experts(permuted, w_gate_up, w_down, expert_offsets)
    return (ops.grouped_combine(expert_out, topk_weights, row_index),)


def _gate_experts(module, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_up: Tensor,
                  w_down: Tensor) -> tuple[Tensor]:
    """permute -> grouped_gemm, the module's gate, grouped_gemm -> combine: [T, H] -> ([T, H],)."""
    permuted, expert_offsets, row_index = ops.grouped_permute(x, topk_ids, w_up.shape[0])
    expert_out = _gemm_gate_experts(module, permuted, w_up, w_down, expert_offsets)
    return (ops.grouped_combine(expert_out, topk_weights, row_index),)


hf_moe.ExpertsInterface.register(IMPLEMENTATION, moge_experts_forward)
