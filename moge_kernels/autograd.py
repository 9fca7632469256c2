"""Backward of every `moge` op, and the backward primitives it is built from.

Each public op gets `torch.library.register_autograd` (setup_context + backward). Every backward is
written with other `torch.ops.moge` ops and differentiable torch ops only, so AOTAutograd traces it
and `torch.compile(fullgraph=True)` covers forward and backward.

Backward primitives (ops of namespace `moge`, defined here: schema, fake kernel, reference kernel,
a routed device kernel like the public ops'; the Triton kernels are moge_kernels/triton/backward.py):

    grouped_gemm_dgrad(grad_y [M,N], w [E,N,Kd], expert_offsets) -> grad_x [M,Kd]
        rows of expert e times w[e] (no transposed copy of w)
    grouped_gemm_wgrad(grad_y [M,N], x [M,Kd], expert_offsets) -> grad_w [E,N,Kd]
        grad_w[e] = grad_y[rows of e]^T @ x[rows of e], fp32 accumulation, zeros for an empty expert
    swiglu(gate_up [M,2I]) -> h [M,I]
        silu(gate) * up in fp32, rounded (the same function as reference.swiglu)
    swiglu_backward(grad_h [M,I], gate_up [M,2I], row_scale [M]?, need_h)
        -> (grad_gate_up [M,2I], h [M,I] or [0,I], grad_row_scale [M] fp32 or [0])
        grad_h is the gradient w.r.t. the unscaled SwiGLU output; h = rounded swiglu * row_scale, the
        operand of the down projection's weight gradient
    grouped_combine_backward(grad_out [T,H], expert_out [T*K,H] or [0,H], topk_weights [T,K],
                             row_index [T,K], need_weights_grad)
        -> (grad_expert_out [T*K,H], grad_topk_weights [T,K] or [0,K])
        grad_expert_out[row_index[t,k]] = w[t,k] * grad_out[t]; grad_w[t,k] = <grad_out[t], expert_out[row]>

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
                      through the selected weights (expert_scale, renormalize, softmax/sigmoid backward,
                      on [T, E] with torch ops); grad_expert_scale[e] = sum over the slots that picked e
                      of (weight before scaling) * grad_weight, as a [T, E] scatter + column sum
                      (deterministic, no atomics). topk_ids, expert_offsets, row_index: no gradient.

Save or recompute gate_up. `grouped_mlp` returns only its output (the fused kernel never writes the
[M, 2I] gate_up), so its backward recomputes gate_up: +4*M*H*I FLOPs, 22% on top of the 18*M*H*I of
forward + backward, and no activation memory beyond x. `MoGELayer(recompute=False)` (the default)
instead composes grouped_gemm -> swiglu -> grouped_gemm, whose autograd saves gate_up [M, 2I] and
h [M, I] (Pangu at T=4096: M = 32768 rows, 176 + 88 MB in bf16 per layer, kept from the forward to
the backward) and needs no extra GEMM. Training usually has that memory and not the FLOPs to spare,
hence the default; recompute=True is the activation-memory-lean choice (over Pangu's 48 MoE layers at
T=4096 it keeps 12.7 GB less). The transient peak of one layer's backward is about the same either way.

Backends. The reference kernels of the primitives loop over experts (host sync, as the reference
does); "triton" registers the kernels of moge_kernels/triton/backward.py (CUDA, and CPU under
TRITON_INTERPRET=1). On CUDA bf16 with 16-byte aligned rows, dgrad and wgrad use torch._grouped_mm
(CUTLASS, both layouts natively) instead of the Triton GEMMs; MOGE_BWD_GEMM=triton forces the Triton
kernels (default "auto").
"""
from __future__ import annotations

import warnings

import torch

from . import checks, ops, options, packing, registry
from .reference import expert_slices, router_scores, router_scores_backward

_lib = ops._lib   # the backward primitives live in the `moge` namespace beside the forward ops

SCHEMAS = {
    "grouped_gemm_dgrad": "(Tensor grad_y, Tensor w, Tensor expert_offsets) -> Tensor",
    "grouped_gemm_wgrad": "(Tensor grad_y, Tensor x, Tensor expert_offsets) -> Tensor",
    "swiglu": "(Tensor gate_up) -> Tensor",
    "swiglu_backward": ("(Tensor grad_h, Tensor gate_up, Tensor? row_scale=None, bool need_h=False) -> "
                        "(Tensor grad_gate_up, Tensor h, Tensor grad_row_scale)"),
    "grouped_combine_backward": (
        "(Tensor grad_out, Tensor expert_out, Tensor topk_weights, Tensor row_index, "
        "bool need_weights_grad) -> (Tensor grad_expert_out, Tensor grad_topk_weights)"),
}
# The primitives also accept fp64 (gradcheck runs the whole backward in fp64 on the CPU).
FLOAT_DTYPES = checks.FLOAT_DTYPES + (torch.float64,)



# ----------------------------------------------------------------------------- argument checks
def _tensor(name, t, ndim, dtypes=FLOAT_DTYPES, device=None):
    checks.check_tensor(name, t, ndim, dtypes=dtypes, device=device)


def check_dgrad(grad_y, w, expert_offsets):
    _tensor("grad_y", grad_y, 2)
    _tensor("w", w, 3, dtypes=(grad_y.dtype,), device=grad_y.device)
    if w.shape[1] != grad_y.shape[1]:
        checks._fail(f"w must be [E, N, Kd] with N = grad_y.shape[1] = {grad_y.shape[1]}, "
                     f"got shape {tuple(w.shape)}")
    checks.check_offsets(expert_offsets, w.shape[0], grad_y.shape[0], grad_y.device)


def check_wgrad(grad_y, x, expert_offsets):
    _tensor("grad_y", grad_y, 2)
    _tensor("x", x, 2, dtypes=(grad_y.dtype,), device=grad_y.device)
    if x.shape[0] != grad_y.shape[0]:
        checks._fail(f"x has {x.shape[0]} rows but grad_y has {grad_y.shape[0]}")
    checks.check_tensor("expert_offsets", expert_offsets, 1, dtypes=(torch.int32,), device=grad_y.device)
    checks.check_offsets(expert_offsets, expert_offsets.shape[0] - 1, grad_y.shape[0], grad_y.device)


def check_swiglu(gate_up):
    _tensor("gate_up", gate_up, 2)
    if gate_up.shape[1] % 2 != 0:
        checks._fail(f"gate_up must be [M, 2I], got shape {tuple(gate_up.shape)}")


def check_swiglu_backward(grad_h, gate_up, row_scale, need_h):
    check_swiglu(gate_up)
    _tensor("grad_h", grad_h, 2, dtypes=(gate_up.dtype,), device=gate_up.device)
    checks.check_shape("grad_h", grad_h, (gate_up.shape[0], gate_up.shape[1] // 2))
    if row_scale is not None:
        _tensor("row_scale", row_scale, 1, device=gate_up.device)
        checks.check_shape("row_scale", row_scale, (gate_up.shape[0],))


def check_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    _tensor("grad_out", grad_out, 2)
    _tensor("topk_weights", topk_weights, 2, device=grad_out.device)
    checks.check_tensor("row_index", row_index, 2, dtypes=(torch.int32,), device=grad_out.device)
    T, K = row_index.shape
    checks.check_shape("grad_out", grad_out, (T, grad_out.shape[1]))
    checks.check_shape("topk_weights", topk_weights, (T, K))
    if need_weights_grad:
        _tensor("expert_out", expert_out, 2, device=grad_out.device)
        checks.check_shape("expert_out", expert_out, (T * K, grad_out.shape[1]))


ARG_CHECKS = {
    "grouped_gemm_dgrad": check_dgrad,
    "grouped_gemm_wgrad": check_wgrad,
    "swiglu": check_swiglu,
    "swiglu_backward": check_swiglu_backward,
    "grouped_combine_backward": check_combine_backward,
}


# ----------------------------------------------------------------------------- reference kernels
def _acc_dtype(t):
    """Accumulate in fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ref_grouped_gemm_dgrad(grad_y, w, expert_offsets):
    grad_x = grad_y.new_zeros(grad_y.shape[0], w.shape[2])
    for e, lo, hi in expert_slices(expert_offsets):
        grad_x[lo:hi] = grad_y[lo:hi] @ w[e]
    return grad_x


def ref_grouped_gemm_wgrad(grad_y, x, expert_offsets):
    acc = _acc_dtype(x)
    grad_w = x.new_zeros(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])
    for e, lo, hi in expert_slices(expert_offsets):
        grad_w[e] = (grad_y[lo:hi].to(acc).t() @ x[lo:hi].to(acc)).to(x.dtype)
    return grad_w


def ref_swiglu(gate_up):
    gate, up = gate_up.to(_acc_dtype(gate_up)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def ref_swiglu_backward(grad_h, gate_up, row_scale=None, need_h=False):
    acc = _acc_dtype(gate_up)
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


def ref_grouped_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    T, K = row_index.shape
    H = grad_out.shape[1]
    acc = _acc_dtype(grad_out)
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


REFERENCE = {
    "grouped_gemm_dgrad": ref_grouped_gemm_dgrad,
    "grouped_gemm_wgrad": ref_grouped_gemm_wgrad,
    "swiglu": ref_swiglu,
    "swiglu_backward": ref_swiglu_backward,
    "grouped_combine_backward": ref_grouped_combine_backward,
}


for _name, _schema in SCHEMAS.items():
    ops.define_op(_name, _schema, ARG_CHECKS[_name], REFERENCE[_name])


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("moge::grouped_gemm_dgrad")
def _(grad_y, w, expert_offsets):
    check_dgrad(grad_y, w, expert_offsets)
    return grad_y.new_empty(grad_y.shape[0], w.shape[2])


@torch.library.register_fake("moge::grouped_gemm_wgrad")
def _(grad_y, x, expert_offsets):
    check_wgrad(grad_y, x, expert_offsets)
    return x.new_empty(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])


@torch.library.register_fake("moge::swiglu")
def _(gate_up):
    check_swiglu(gate_up)
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.register_fake("moge::swiglu_backward")
def _(grad_h, gate_up, row_scale=None, need_h=False):
    check_swiglu_backward(grad_h, gate_up, row_scale, need_h)
    M, two_i = gate_up.shape
    return (gate_up.new_empty(M, two_i),
            gate_up.new_empty(M if need_h else 0, two_i // 2),
            gate_up.new_empty(M if row_scale is not None else 0, dtype=torch.float32))


@torch.library.register_fake("moge::grouped_combine_backward")
def _(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    check_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad)
    T, K = row_index.shape
    return (grad_out.new_empty(T * K, grad_out.shape[1]),
            topk_weights.new_empty(T if need_weights_grad else 0, K))


# ----------------------------------------------------------------------------- GPU kernels
def _bwd_gemm_mode() -> str:
    return options.current.bwd_gemm


_grouped_mm_failed = False


def _grouped_mm_applies(*tensors) -> bool:
    """torch._grouped_mm's CUTLASS path: CUDA sm90/sm100, bf16, 16-byte aligned bases and row strides."""
    if _grouped_mm_failed or _bwd_gemm_mode() == "triton" or not hasattr(torch, "_grouped_mm"):
        return False
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] not in (9, 10):
        return False
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


def _grouped_mm_call(fn, *args):
    """Runs fn (a torch._grouped_mm call); a Python-level refusal (a layout rule we did not foresee)
    switches this process to the Triton kernels, once, with a warning. Not during CUDA-graph capture:
    an error there is the capture's (an earlier illegal call invalidates it), so it propagates."""
    global _grouped_mm_failed
    try:
        return fn(*args)
    except RuntimeError as err:
        if torch.cuda.is_current_stream_capturing():
            raise
        _grouped_mm_failed = True
        warnings.warn(f"torch._grouped_mm refused a backward GEMM ({err}); using the Triton kernels",
                      stacklevel=3)
        return None


def grouped_mm_dgrad(grad_y, w, expert_offsets):
    """grad_x = rows of e of grad_y @ w[e] through torch._grouped_mm (2D x 3D, w row-major)."""
    if grad_y.shape[0] == 0:
        return grad_y.new_empty(0, w.shape[2])
    return torch._grouped_mm(grad_y, w, offs=expert_offsets[1:])


def grouped_mm_wgrad(grad_y, x, expert_offsets):
    """grad_w[e] = grad_y_e^T x_e through torch._grouped_mm (2D x 2D, ragged reduction dimension)."""
    if grad_y.shape[0] == 0:     # a zero-length reduction has no valid stride for _grouped_mm
        return x.new_zeros(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])
    return torch._grouped_mm(grad_y.t(), x, offs=expert_offsets[1:])


def _register_triton() -> None:
    try:
        from .triton import DEVICES
        from .triton import backward as tb
        from .triton.grouped_gemm import zero_rows_past_experts
    except Exception:   # noqa: BLE001  no Triton: the reference serves every device
        return
    lowp = (torch.float16, torch.bfloat16, torch.float32)

    def backward_gemm(grouped_mm_fn, triton_fn, ref_fn):
        """torch._grouped_mm where its layout rules hold, else Triton (fp32/fp16/bf16), else the reference.
        `other` is w [E, N, Kd] for dgrad or x [M, Kd] for wgrad: both need 16-byte rows."""
        def fn(grad_y, other, expert_offsets):
            grad_y, other = grad_y.contiguous(), other.contiguous()
            if _grouped_mm_applies(grad_y, other) and grad_y.shape[1] % 8 == 0 and other.shape[-1] % 8 == 0:
                out = _grouped_mm_call(grouped_mm_fn, grad_y, other, expert_offsets.contiguous())
                if out is not None:
                    return out
            if grad_y.dtype not in lowp:
                return ref_fn(grad_y, other, expert_offsets)
            return triton_fn(grad_y, other, expert_offsets)
        return fn

    def grouped_mm_dgrad_zeroed(grad_y, w, expert_offsets):   # rows of no expert: zero gradient
        return zero_rows_past_experts(grouped_mm_dgrad(grad_y, w, expert_offsets), expert_offsets)

    # (the Triton dgrad kernel and the reference zero those rows themselves)
    dgrad = backward_gemm(grouped_mm_dgrad_zeroed, tb.grouped_gemm_dgrad, ref_grouped_gemm_dgrad)
    wgrad = backward_gemm(grouped_mm_wgrad, tb.grouped_gemm_wgrad, ref_grouped_gemm_wgrad)

    def only_lowp(triton_fn, ref_fn):
        def fn(*args):
            return (triton_fn if args[0].dtype in lowp else ref_fn)(*args)
        fn.__name__ = triton_fn.__name__
        return fn

    registry.register_kernel("triton", "grouped_gemm_dgrad", dgrad, devices=DEVICES)
    registry.register_kernel("triton", "grouped_gemm_wgrad", wgrad, devices=DEVICES)
    registry.register_kernel("triton", "swiglu", only_lowp(tb.swiglu, ref_swiglu), devices=DEVICES)
    registry.register_kernel("triton", "swiglu_backward",
                             only_lowp(tb.swiglu_backward, ref_swiglu_backward), devices=DEVICES)
    registry.register_kernel("triton", "grouped_combine_backward",
                             only_lowp(tb.grouped_combine_backward, ref_grouped_combine_backward),
                             devices=DEVICES)


_register_triton()


# ----------------------------------------------------------------------------- Python API
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over gate_up [M, 2I] (gate columns first), differentiable: [M, I]."""
    return torch.ops.moge.swiglu(gate_up)


def route_backward(grad_weights, router_logits, topk_ids, expert_scale, renormalize, score_func,
                   need_logits_grad=True, need_scale_grad=True):
    """Gradients of grouped_dispatch's topk_weights w.r.t. (router_logits, expert_scale).

    grad_weights [T,K], router_logits [T,E], topk_ids [T,K] int32. Torch ops on [T, E] in fp32: a
    handful of small elementwise kernels next to the GEMMs, fused by Inductor under torch.compile."""
    T, E = router_logits.shape
    ids = topk_ids.long()
    logits = router_logits.to(_acc_dtype(router_logits))
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


# ----------------------------------------------------------------------------- autograd: dispatch
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
    x, w, expert_offsets = inputs
    need_x, need_w, _ = _needs(ctx, 3)
    ctx.w_shape = w.shape
    ctx.save_for_backward(x if need_w else None, w if need_x else None, expert_offsets)


def _gemm_backward(ctx, grad_y):
    x, w, expert_offsets = ctx.saved_tensors
    need_x, need_w, _ = _needs(ctx, 3)
    grad_y = grad_y.contiguous()
    grad_x = torch.ops.moge.grouped_gemm_dgrad(grad_y, packing.unpack(w), expert_offsets) if need_x else None
    grad_w = torch.ops.moge.grouped_gemm_wgrad(grad_y, x, expert_offsets) if need_w else None
    return grad_x, _as_weight(grad_w, ctx.w_shape), None


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


for _fp8_op in ("grouped_gemm_fp8", "grouped_mlp_fp8"):
    torch.library.register_autograd(f"moge::{_fp8_op}", _fp8_no_backward(_fp8_op),
                                    setup_context=lambda ctx, inputs, output: None, lib=_lib)
