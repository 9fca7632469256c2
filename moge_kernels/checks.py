"""Argument checks shared by the fake (meta) kernels and every real backend.

Shape, dtype and device checks only read metadata, so they run everywhere, under FakeTensorMode and
`torch.compile` included. Checks of values (expert_offsets monotone, row_index in range) need the data:
they run on CPU tensors always, and on accelerators only with MOGE_VALIDATE=1, because reading device
memory from the host would synchronise the hot path.

Dtypes: every float argument is fp32, fp16, bf16 or float64. float64 (gradcheck, `MoGELayer.double()`)
runs on the reference backend (the registry's dtype capabilities: no other backend registers it), so the
first tensor argument of an op decides: another float argument may be float64 only when that one is.
"""
from __future__ import annotations

import torch

from . import fp8, options
from .reference import SCORE_FUNC_NAMES, score_func_code

INT32_MAX = 2**31 - 1
LOWP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = LOWP_DTYPES + (torch.float64,)
SCORE_FUNCS = tuple(SCORE_FUNC_NAMES)


def _fail(msg: str, exc=ValueError):
    raise exc(msg)


def check_tensor(name, t, ndim, dtypes=FLOAT_DTYPES, device=None, like=None):
    """like=(name, tensor): the op's first argument; `t` may be float64 only when that one is."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a Tensor, got {type(t).__name__}", TypeError)
    if t.dim() != ndim:
        _fail(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        _fail(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}", TypeError)
    if like is not None and t.dtype == torch.float64 and like[1].dtype != torch.float64:
        _fail(f"{name} is float64 but {like[0]} is {like[1].dtype}: float64 arguments run on the "
              f"reference backend, with a float64 {like[0]}", TypeError)
    if device is not None and t.device != device:
        _fail(f"{name} is on {t.device} but the other inputs are on {device}")


def check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_rows_fit_int32(name, rows):
    if rows > INT32_MAX:
        _fail(f"{name}: {rows} rows overflow the int32 row indices (max {INT32_MAX})")


def validate_values() -> bool:
    return options.current.validate


def _should_check_values(t) -> bool:
    if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
        return False
    return t.device.type == "cpu" or validate_values()


def check_dispatch(hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize,
                   score_func, expert_mask=None):
    """Returns the arguments as the kernels take them: score_func as its reference.ScoreFunc int."""
    check_tensor("hidden", hidden, 2)
    check_tensor("router_logits", router_logits, 2, device=hidden.device, like=("hidden", hidden))
    T, E = router_logits.shape
    if hidden.shape[0] != T:
        _fail(f"hidden has {hidden.shape[0]} tokens but router_logits has {T}")
    if num_groups < 1 or E % num_groups != 0:
        _fail(f"num_groups={num_groups} must be >= 1 and divide the number of experts E={E}")
    group_size = E // num_groups
    if not 1 <= topk_per_group <= group_size:
        _fail(f"topk_per_group={topk_per_group} must be in [1, E/num_groups={group_size}]")
    score_code = score_func_code(score_func)
    if expert_scale is not None:
        check_tensor("expert_scale", expert_scale, 1, device=hidden.device, like=("hidden", hidden))
        check_shape("expert_scale", expert_scale, (E,))
    if expert_mask is not None:
        check_expert_mask(expert_mask, E, num_groups, topk_per_group, hidden.device)
    check_rows_fit_int32("grouped_dispatch T*K", T * num_groups * topk_per_group)
    return (hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_code,
            expert_mask)


def check_permute(hidden, topk_ids, num_experts):
    check_tensor("hidden", hidden, 2)
    check_tensor("topk_ids", topk_ids, 2, dtypes=(torch.int32, torch.int64), device=hidden.device)
    T, K = topk_ids.shape
    if hidden.shape[0] != T:
        _fail(f"hidden has {hidden.shape[0]} tokens but topk_ids has {T}")
    if num_experts < 1:
        _fail(f"num_experts must be an int >= 1, got {num_experts!r}")
    check_rows_fit_int32("grouped_permute T*K", T * K)
    if _should_check_values(topk_ids) and topk_ids.numel() > 0:
        lo, hi = topk_ids.min().item(), topk_ids.max().item()
        if lo < -1 or hi >= num_experts:
            _fail(f"topk_ids values must lie in [-1, num_experts={num_experts}) (-1: a dropped slot), "
                  f"got [{lo}, {hi}]")


def check_expert_mask(expert_mask, num_experts, num_groups, topk_per_group, device):
    """expert_mask [E] bool on the inputs' device, and (values, where they are checked) at least
    topk_per_group kept experts in every group."""
    check_tensor("expert_mask", expert_mask, 1, dtypes=(torch.bool,), device=device)
    check_shape("expert_mask", expert_mask, (num_experts,))
    if _should_check_values(expert_mask):
        kept = expert_mask.reshape(num_groups, -1).sum(-1).cpu()
        if bool((kept < topk_per_group).any()):
            _fail(f"expert_mask must keep at least topk_per_group={topk_per_group} experts in every group, "
                  f"got {kept.tolist()} kept per group")


def check_offsets(expert_offsets, num_experts, num_rows, device):
    check_tensor("expert_offsets", expert_offsets, 1, dtypes=(torch.int32,), device=device)
    check_shape("expert_offsets", expert_offsets, (num_experts + 1,))
    if _should_check_values(expert_offsets):
        offsets = expert_offsets.cpu()
        # Rows past offsets[E] belong to no expert (grouped_permute's dropped slots): outputs are zero there.
        if offsets[0].item() != 0 or not 0 <= offsets[-1].item() <= num_rows:
            _fail(f"expert_offsets must start at 0 and end at most at the row count {num_rows}, "
                  f"got {offsets[0].item()} ... {offsets[-1].item()}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            _fail("expert_offsets must be non-decreasing")


def expert_weight_shape(name, w, dtype, device):
    """(E, N, K) of expert weights given as [E, N, K] or packed [E, N, K/B, B] (moge_kernels.packing)."""
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        check_tensor(name, w, 4, dtypes=(dtype,), device=device)
        E, N, blocks, block = w.shape
        return E, N, blocks * block
    check_tensor(name, w, 3, dtypes=(dtype,), device=device)
    return tuple(w.shape)


def check_gemm(x, w, expert_offsets, bias=None):
    check_tensor("x", x, 2)
    E, N, K = expert_weight_shape("w", w, x.dtype, x.device)
    if K != x.shape[1]:
        _fail(f"w must be [E, N, K] (or packed [E, N, K/B, B]) with K = x.shape[1] = {x.shape[1]}, "
              f"got shape {tuple(w.shape)}")
    check_rows_fit_int32("grouped_gemm x", x.shape[0])
    check_offsets(expert_offsets, w.shape[0], x.shape[0], x.device)
    check_expert_bias(bias, E, N, x)


def check_expert_bias(bias, num_experts, n, x):
    """bias: None, or [E, N] in x's dtype on x's device (one row per expert)."""
    if bias is None:
        return
    check_tensor("bias", bias, 2, dtypes=(x.dtype,), device=x.device)
    check_shape("bias", bias, (num_experts, n))


def check_mlp(x, w_gate_up, w_down, expert_offsets, row_scale):
    check_tensor("x", x, 2)
    E, two_i, H = expert_weight_shape("w_gate_up", w_gate_up, x.dtype, x.device)
    down_shape = expert_weight_shape("w_down", w_down, x.dtype, x.device)
    if H != x.shape[1] or two_i % 2 != 0:
        _fail(f"w_gate_up must be [E, 2I, H] (or packed [E, 2I, H/B, B]) with H = x.shape[1] = "
              f"{x.shape[1]}, got shape {tuple(w_gate_up.shape)}")
    if down_shape != (E, H, two_i // 2):
        _fail(f"w_down must have shape {(E, H, two_i // 2)} (or be packed [E, H, I/B, B]), "
              f"got {tuple(w_down.shape)}")
    check_rows_fit_int32("grouped_mlp x", x.shape[0])
    if row_scale is not None:
        check_tensor("row_scale", row_scale, 1, device=x.device, like=("x", x))
        check_shape("row_scale", row_scale, (x.shape[0],))
    check_offsets(expert_offsets, E, x.shape[0], x.device)


def check_combine(expert_out, topk_weights, row_index, shared_out):
    check_tensor("expert_out", expert_out, 2)
    check_tensor("topk_weights", topk_weights, 2, device=expert_out.device, like=("expert_out", expert_out))
    check_tensor("row_index", row_index, 2, dtypes=(torch.int32,), device=expert_out.device)
    T, K = row_index.shape
    check_shape("topk_weights", topk_weights, (T, K))
    if expert_out.shape[0] != T * K:
        _fail(f"expert_out must have T*K = {T * K} rows (row_index is [{T}, {K}]), "
              f"got {expert_out.shape[0]}")
    if shared_out is not None:
        check_tensor("shared_out", shared_out, 2, device=expert_out.device, like=("expert_out", expert_out))
        check_shape("shared_out", shared_out, (T, expert_out.shape[1]))
    if _should_check_values(row_index) and row_index.numel() > 0:
        lo, hi = row_index.min().item(), row_index.max().item()
        if lo < 0 or hi >= T * K:
            _fail(f"row_index values must lie in [0, {T * K}), got [{lo}, {hi}]")


def _check_fp8_weight(name, w, w_scale, block_n, block_k, device):
    fp8.check_quantized_weight(name, w, w_scale, block_n, block_k)
    if w.device != device:
        _fail(f"{name} is on {w.device} but x is on {device}")
    return tuple(w.shape)


def check_gemm_fp8(x, w, w_scale, expert_offsets, block_n, block_k):
    check_tensor("x", x, 2)
    E, N, K = _check_fp8_weight("w", w, w_scale, block_n, block_k, x.device)
    if K != x.shape[1]:
        _fail(f"w must be [E, N, K] with K = x.shape[1] = {x.shape[1]}, got shape {tuple(w.shape)}")
    check_rows_fit_int32("grouped_gemm x", x.shape[0])
    check_offsets(expert_offsets, E, x.shape[0], x.device)


def check_activation_scale(x, x_scale, group, out_dtype):
    """x [M, K] float (x_scale None), or e4m3 with x_scale [M, ceil(K/group)] (group 0: [M, 1]) fp32
    and out_dtype, the dtype of the activations it was quantized from (the op's output dtype)."""
    if x_scale is None:
        check_tensor("x", x, 2)
        return
    check_tensor("x", x, 2, dtypes=(fp8.E4M3,))
    check_tensor("x_scale", x_scale, 2, dtypes=(torch.float32,), device=x.device)
    M, K = x.shape
    check_shape("x_scale", x_scale, (M, 1 if group == 0 else -(-K // group)))
    if out_dtype not in FLOAT_DTYPES:
        _fail(f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]} with e4m3 x (the dtype the "
              f"activations were quantized from), got {out_dtype}", TypeError)


def check_permute_fp8(hidden, row_index, expert_offsets, group):
    check_tensor("hidden", hidden, 2)
    check_tensor("row_index", row_index, 2, dtypes=(torch.int32,), device=hidden.device)
    T, K = row_index.shape
    if hidden.shape[0] != T:
        _fail(f"hidden has {hidden.shape[0]} tokens but row_index has {T}")
    if group < 0 or (group and (group < 16 or group & (group - 1))):
        _fail(f"group must be 0 (one scale per row) or a power of two >= 16, got {group}")
    check_rows_fit_int32("permute_fp8 T*K", T * K)
    check_tensor("expert_offsets", expert_offsets, 1, dtypes=(torch.int32,), device=hidden.device)
    if _should_check_values(row_index) and row_index.numel() > 0:
        lo, hi = row_index.min().item(), row_index.max().item()
        if lo < 0 or hi >= T * K:
            _fail(f"row_index values must lie in [0, {T * K}), got [{lo}, {hi}]")


def check_mlp_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale,
                  block_n, block_k, x_scale=None, out_dtype=None):
    check_activation_scale(x, x_scale, block_k, out_dtype)
    E, two_i, H = _check_fp8_weight("w_gate_up", w_gate_up, w_gate_up_scale, block_n, block_k, x.device)
    down_shape = _check_fp8_weight("w_down", w_down, w_down_scale, block_n, block_k, x.device)
    if H != x.shape[1] or two_i % 2 != 0:
        _fail(f"w_gate_up must be [E, 2I, H] with H = x.shape[1] = {x.shape[1]}, "
              f"got shape {tuple(w_gate_up.shape)}")
    I = two_i // 2
    if down_shape != (E, H, I):
        _fail(f"w_down must have shape {(E, H, I)}, got {down_shape}")
    parts = w_gate_up_scale.shape[1]
    if parts not in (1, 2) or (parts == 1 and I % block_n):
        _fail(f"w_gate_up_scale must block gate and up rows apart (P = 2 projections, as checkpoints "
              f"store them: quantize_expert_weights(w, parts=2)); with P = {parts} its {block_n}-row "
              f"blocks straddle the gate/up boundary at I = {I}")
    if w_down_scale.shape[1] != 1:
        _fail(f"w_down_scale must hold one projection (P = 1), got shape {tuple(w_down_scale.shape)}")
    check_rows_fit_int32("grouped_mlp x", x.shape[0])
    if row_scale is not None:
        check_tensor("row_scale", row_scale, 1, device=x.device, like=("x", x))
        check_shape("row_scale", row_scale, (x.shape[0],))
    check_offsets(expert_offsets, E, x.shape[0], x.device)


# ----------------------------------------------------------------------------- the layer's own arguments
# moge_forward, MoGELayer and parallel check what their caller passed, under the caller's names, before
# any op runs: otherwise a wrong E shows as "expert_offsets must have shape ...", an argument the user
# never passed.
def check_size(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{name} must be an int, got {type(value).__name__}", TypeError)
    if value < minimum:
        _fail(f"{name} must be >= {minimum}, got {value}")


def check_layer_config(hidden_size, intermediate_size, num_experts, num_groups, topk_per_group,
                       shared_intermediate_size, score_func):
    """MoGELayer's constructor arguments."""
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts), ("num_groups", num_groups),
                        ("topk_per_group", topk_per_group)):
        check_size(name, value)
    check_size("shared_intermediate_size", shared_intermediate_size, minimum=0)
    if num_experts % num_groups != 0:
        _fail(f"num_groups={num_groups} must divide num_experts={num_experts}")
    if topk_per_group > num_experts // num_groups:
        _fail(f"topk_per_group={topk_per_group} must be in [1, num_experts/num_groups="
              f"{num_experts // num_groups}]")
    score_func_code(score_func)            # raises naming score_func


def check_layer_input(hidden_states, hidden_size, param):
    """MoGELayer.forward's input: [..., hidden_size], the dtype and device of the layer's parameters."""
    if not isinstance(hidden_states, torch.Tensor):
        _fail(f"hidden_states must be a Tensor, got {type(hidden_states).__name__}", TypeError)
    if hidden_states.dim() == 0 or hidden_states.shape[-1] != hidden_size:
        _fail(f"hidden_states must have shape [..., hidden_size={hidden_size}], got "
              f"{tuple(hidden_states.shape)}")
    if hidden_states.dtype != param.dtype:
        _fail(f"hidden_states has dtype {hidden_states.dtype} but the layer's parameters are {param.dtype} "
              f"(convert one of them, e.g. layer.to({param.dtype}))", TypeError)
    if hidden_states.device != param.device:
        _fail(f"hidden_states is on {hidden_states.device} but the layer's parameters are on {param.device}")


def _layer_weight_shape(name, w, hidden):
    """(E, N, K) of expert weights in hidden's dtype (plain or packed) or FP8 (their own checks)."""
    if isinstance(w, fp8.QuantizedExpertWeights):
        if w.device != hidden.device:
            _fail(f"{name} is on {w.device} but hidden is on {hidden.device}")
        return tuple(w.shape)
    return expert_weight_shape(name, w, hidden.dtype, hidden.device)


def check_layer_weights(hidden, router_logits, w_gate_up, w_down, shared_w_gate_up, shared_w_down,
                        num_experts=None):
    """moge_forward's tensors: hidden [T, H], router_logits [T, E], w_gate_up [E, 2I, H] and w_down
    [E, H, I] (or packed) in hidden's dtype, the optional shared expert [2Is, H] and [H, Is]. Expert
    parallelism passes num_experts = the experts this rank holds (E/D)."""
    check_tensor("hidden", hidden, 2)
    check_tensor("router_logits", router_logits, 2, device=hidden.device)
    H, E = hidden.shape[1], router_logits.shape[1] if num_experts is None else num_experts
    E_w, two_i, H_w = _layer_weight_shape("w_gate_up", w_gate_up, hidden)
    if E_w != E:
        _fail(f"w_gate_up holds {E_w} experts but router_logits scores {E} "
              f"(router_logits is {tuple(router_logits.shape)}, w_gate_up {tuple(w_gate_up.shape)})"
              if num_experts is None else f"w_gate_up holds {E_w} experts, expected {E}")
    if H_w != H or two_i % 2 != 0:
        _fail(f"w_gate_up must be [E, 2I, H] with H = hidden.shape[1] = {H}, got shape "
              f"{tuple(w_gate_up.shape)}")
    down_shape = _layer_weight_shape("w_down", w_down, hidden)
    if down_shape != (E, H, two_i // 2):
        _fail(f"w_down must have shape {(E, H, two_i // 2)} (the [E, 2I, H] of w_gate_up), got "
              f"{tuple(w_down.shape)}")
    if (shared_w_gate_up is None) != (shared_w_down is None):
        _fail("shared_w_gate_up and shared_w_down must be given together")
    if shared_w_gate_up is None:
        return
    fp8_shared = [isinstance(w, fp8.QuantizedExpertWeights) for w in (shared_w_gate_up, shared_w_down)]
    if any(fp8_shared):     # an FP8 shared expert: one expert, [1, 2Is, H] and [1, H, Is]
        if not all(fp8_shared):
            _fail("shared_w_gate_up and shared_w_down must both be FP8 (QuantizedExpertWeights) or both "
                  "tensors")
        E_s, two_is, H_s = _layer_weight_shape("shared_w_gate_up", shared_w_gate_up, hidden)
        if E_s != 1 or H_s != H or two_is % 2 != 0:
            _fail(f"an FP8 shared_w_gate_up must be [1, 2*Is, H] with H = hidden.shape[1] = {H}, got "
                  f"shape {tuple(shared_w_gate_up.shape)}")
        if _layer_weight_shape("shared_w_down", shared_w_down, hidden) != (1, H, two_is // 2):
            _fail(f"an FP8 shared_w_down must have shape {(1, H, two_is // 2)}, got "
                  f"{tuple(shared_w_down.shape)}")
        return
    check_tensor("shared_w_gate_up", shared_w_gate_up, 2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("shared_w_down", shared_w_down, 2, dtypes=(hidden.dtype,), device=hidden.device)
    two_is = shared_w_gate_up.shape[0]
    if shared_w_gate_up.shape[1] != H or two_is % 2 != 0:
        _fail(f"shared_w_gate_up must be [2*Is, H] with H = hidden.shape[1] = {H}, got shape "
              f"{tuple(shared_w_gate_up.shape)}")
    check_shape("shared_w_down", shared_w_down, (H, two_is // 2))


# ----------------------------------------------------------------------------- backward primitives
def check_dgrad(grad_y, w, expert_offsets):
    check_tensor("grad_y", grad_y, 2)
    check_tensor("w", w, 3, dtypes=(grad_y.dtype,), device=grad_y.device)
    if w.shape[1] != grad_y.shape[1]:
        _fail(f"w must be [E, N, Kd] with N = grad_y.shape[1] = {grad_y.shape[1]}, got shape {tuple(w.shape)}")
    check_offsets(expert_offsets, w.shape[0], grad_y.shape[0], grad_y.device)


def check_wgrad(grad_y, x, expert_offsets):
    check_tensor("grad_y", grad_y, 2)
    check_tensor("x", x, 2, dtypes=(grad_y.dtype,), device=grad_y.device)
    if x.shape[0] != grad_y.shape[0]:
        _fail(f"x has {x.shape[0]} rows but grad_y has {grad_y.shape[0]}")
    check_tensor("expert_offsets", expert_offsets, 1, dtypes=(torch.int32,), device=grad_y.device)
    check_offsets(expert_offsets, expert_offsets.shape[0] - 1, grad_y.shape[0], grad_y.device)


def check_swiglu(gate_up):
    check_tensor("gate_up", gate_up, 2)
    if gate_up.shape[1] % 2 != 0:
        _fail(f"gate_up must be [M, 2I], got shape {tuple(gate_up.shape)}")


def check_swiglu_backward(grad_h, gate_up, row_scale, need_h):
    check_swiglu(gate_up)
    check_tensor("grad_h", grad_h, 2, dtypes=(gate_up.dtype,), device=gate_up.device)
    check_shape("grad_h", grad_h, (gate_up.shape[0], gate_up.shape[1] // 2))
    if row_scale is not None:
        check_tensor("row_scale", row_scale, 1, device=gate_up.device, like=("grad_h", grad_h))
        check_shape("row_scale", row_scale, (gate_up.shape[0],))


def check_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    check_tensor("grad_out", grad_out, 2)
    check_tensor("topk_weights", topk_weights, 2, device=grad_out.device, like=("grad_out", grad_out))
    check_tensor("row_index", row_index, 2, dtypes=(torch.int32,), device=grad_out.device)
    T, K = row_index.shape
    check_shape("grad_out", grad_out, (T, grad_out.shape[1]))
    check_shape("topk_weights", topk_weights, (T, K))
    if need_weights_grad:
        check_tensor("expert_out", expert_out, 2, device=grad_out.device, like=("grad_out", grad_out))
        check_shape("expert_out", expert_out, (T * K, grad_out.shape[1]))
