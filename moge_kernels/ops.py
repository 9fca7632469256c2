"""The `torch.ops.moge` surface: one schema per op, its fake kernel, and the device kernels that route to
the active backend (`moge_kernels/registry.py`). Every op is here, the backward primitives included; its
argument check is in checks.py, its reference in reference.py, its autograd rule in autograd.py, and
each backend module registers its own kernels.

The schemas are defined here, in Python, rather than in C++ `TORCH_LIBRARY`, because several backends
plug into them and most are Python (Triton, reference, Ascend through torch_npu): defining the ops in
Python keeps them available when the C++ extension is absent or failed to build, and puts schema, fake
kernel, checks and autograd for one op side by side. The C++ kernels register under the private
namespace `moge_C` (csrc/) and are reached through the backend registry.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import checks, eager_graphs, fp8, options, packing, reference, registry

_lib = torch.library.Library("moge", "DEF")

SCHEMAS = {
    "grouped_dispatch": (
        "(Tensor hidden, Tensor router_logits, int num_groups, int topk_per_group=1, "
        "Tensor? expert_scale=None, bool renormalize=False, str score_func='softmax', "
        "Tensor? expert_mask=None) -> (Tensor permuted_hidden, Tensor topk_weights, Tensor topk_ids, "
        "Tensor expert_offsets, Tensor row_index)"),
    "grouped_permute": ("(Tensor hidden, Tensor topk_ids, int num_experts) -> "
                        "(Tensor permuted_hidden, Tensor expert_offsets, Tensor row_index)"),
    "grouped_gemm": "(Tensor x, Tensor w, Tensor expert_offsets, Tensor? bias=None) -> Tensor",
    "grouped_mlp": ("(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor expert_offsets, "
                    "Tensor? row_scale=None) -> Tensor"),
    "grouped_combine": ("(Tensor expert_out, Tensor topk_weights, Tensor row_index, "
                        "Tensor? shared_out=None) -> Tensor"),
    # FP8 expert weights (moge_kernels.fp8): each QuantizedExpertWeights as its e4m3 [E, N, K] and fp32
    # [E, P, NB, KB] scale tensors; block_n = 1, block_k = 0 is the per-channel format
    "grouped_gemm_fp8": ("(Tensor x, Tensor w, Tensor w_scale, Tensor expert_offsets, int block_n=128, "
                         "int block_k=128) -> Tensor"),
    # x_scale: x is e4m3 already (permute_fp8's rows), out_dtype the dtype it was quantized from
    "grouped_mlp_fp8": ("(Tensor x, Tensor w_gate_up, Tensor w_gate_up_scale, Tensor w_down, "
                        "Tensor w_down_scale, Tensor expert_offsets, Tensor? row_scale=None, "
                        "int block_n=128, int block_k=128, Tensor? x_scale=None, "
                        "ScalarType? out_dtype=None) -> Tensor"),
    # the permuted rows in e4m3 with per-row scales in groups of `group` columns (0: one per row):
    # x_q[row_index[t, k]] = quantized hidden[t], zeros for rows >= expert_offsets[E] (dropped slots);
    # x_scale [M, KB] stored k-major (strides (1, M))
    "permute_fp8": ("(Tensor hidden, Tensor row_index, Tensor expert_offsets, int group=128) -> "
                    "(Tensor x_q, Tensor x_scale)"),
    # Backward primitives (autograd.py builds every backward from them):
    #   dgrad: grad_x[rows of e] = grad_y[rows of e] @ w[e]; wgrad: grad_w[e] = grad_y_e^T @ x_e (fp32
    #   accumulation, zeros for an empty expert); swiglu: silu(gate) * up; swiglu_backward: grad_gate_up,
    #   h = rounded swiglu * row_scale (need_h, else [0, I]) and grad_row_scale ([0] without row_scale)
    #   from grad_h (w.r.t. the unscaled output); combine_backward: grad_expert_out[row_index[t,k]] =
    #   w[t,k] * grad_out[t] and grad_topk_weights[t,k] = <grad_out[t], expert_out[row]> (need_weights_grad,
    #   else [0, K])
    "grouped_gemm_dgrad": "(Tensor grad_y, Tensor w, Tensor expert_offsets) -> Tensor",
    "grouped_gemm_wgrad": "(Tensor grad_y, Tensor x, Tensor expert_offsets) -> Tensor",
    "swiglu": "(Tensor gate_up) -> Tensor",
    "swiglu_backward": ("(Tensor grad_h, Tensor gate_up, Tensor? row_scale=None, bool need_h=False) -> "
                        "(Tensor grad_gate_up, Tensor h, Tensor grad_row_scale)"),
    "grouped_combine_backward": (
        "(Tensor grad_out, Tensor expert_out, Tensor topk_weights, Tensor row_index, "
        "bool need_weights_grad) -> (Tensor grad_expert_out, Tensor grad_topk_weights)"),
}
BACKWARD_PRIMITIVES = ("grouped_gemm_dgrad", "grouped_gemm_wgrad", "swiglu", "swiglu_backward",
                       "grouped_combine_backward")
ARG_CHECKS = {   # every op defined through define_op
    "grouped_dispatch": checks.check_dispatch,
    "grouped_permute": checks.check_permute,
    "grouped_gemm": checks.check_gemm,
    "grouped_mlp": checks.check_mlp,
    "grouped_combine": checks.check_combine,
    "grouped_gemm_fp8": checks.check_gemm_fp8,
    "grouped_mlp_fp8": checks.check_mlp_fp8,
    "permute_fp8": checks.check_permute_fp8,
    "grouped_gemm_dgrad": checks.check_dgrad,
    "grouped_gemm_wgrad": checks.check_wgrad,
    "swiglu": checks.check_swiglu,
    "swiglu_backward": checks.check_swiglu_backward,
    "grouped_combine_backward": checks.check_combine_backward,
}
# Devices with a routing kernel; the Ascend backend adds "npu" (PrivateUse1) when torch_npu imports.
_device_types = ["cpu", "cuda"]


# Positions of expert-weight arguments, which may come packed (moge_kernels.packing)
WEIGHT_ARGS = {"grouped_gemm": (1,), "grouped_mlp": (1, 2)}


def _schema_args(op_name):
    """(name, default) of every schema argument, read once: the schema's pybind properties cost
    microseconds per access, and the device kernel runs on every call."""
    return [(arg.name, arg.default_value)
            for arg in getattr(torch.ops.moge, op_name).default._schema.arguments]


# Signatures whose check passed -> the conversions it made ((position, value) pairs: dispatch's
# score_func name to its code). A signature is the op and, per argument, a tensor's shape, dtype and device
# or another value's type and value: all that a check reads when it reads no values. So a repeated call
# is checked with one dict lookup; a signature that fails is never stored (every call raises as before).
# Only calls whose check reads no values are cached: on CPU and with MOGE_VALIDATE=1 the check runs
# every call.
_checked: dict[tuple, tuple] = {}
MAX_CHECKED = 4096
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)   # Parameter disables __torch_function__: plain to ops
_SCALARS = (type(None), int, float, bool, str, torch.dtype)   # dtype: grouped_mlp_fp8's out_dtype


def _signature(name, args) -> Optional[tuple]:
    """The signature of a call for the check cache, or None when an argument has no hashable form."""
    key = [name]
    for a in args:
        if isinstance(a, Tensor):
            key += (a.shape, a.dtype, a.device)
        elif type(a) in _SCALARS:
            key += (type(a), a)
        else:
            return None
    return tuple(key)


def cached_check(name: str, check: Callable, args):
    """check(*args), which raises on bad arguments or returns them converted (or None): once per signature
    where the check reads no values (see _checked), every call elsewhere. Returns check's result."""
    first = args[0]
    # plain tensors only (a FakeTensor's values are never checked, a real one's on CPU are), and never
    # while dynamo traces the caller (moge_forward): its guards would follow the dict
    plain = type(first) in _PLAIN_TENSOR_TYPES and not torch.compiler.is_compiling()
    key = _signature(name, args) if plain and not checks._should_check_values(first) else None
    if key is not None:
        conversions = _checked.get(key)
        if conversions is not None:
            if not conversions:
                return None
            converted = list(args)
            for i, value in conversions:
                converted[i] = value
            return converted
    checked = check(*args)
    if key is not None:
        conversions = _conversions(args, checked)
        if conversions is not None:
            _store(_checked, key, conversions)
    return checked


def _conversions(args, checked) -> Optional[tuple]:
    """What a check's result `checked` changed in `args`, as (position, value) pairs, or None where it
    converted a tensor (a converted tensor is per call: nothing to cache)."""
    conversions = () if checked is None else \
        tuple((i, c) for i, (a, c) in enumerate(zip(args, checked)) if c is not a)
    return None if any(isinstance(c, Tensor) for _, c in conversions) else conversions


def _store(cache: dict, key, value) -> None:
    if len(cache) >= MAX_CHECKED:
        cache.clear()
    cache[key] = value


def _kernel_args(op_name, schema_args, args, kwargs, cache=False):
    """The arguments as every backend kernel takes them: all positional, checked, converted.
    cache: through the signature cache (the device kernels: their arguments passed the schema)."""
    if len(args) < len(schema_args):
        args = list(args)
        for name, default in schema_args[len(args):]:
            args.append(kwargs.get(name, default))
    check = ARG_CHECKS[op_name]
    # a check may return the arguments converted for the kernels
    checked = cached_check(op_name, check, args) if cache else check(*args)
    return args if checked is None else checked


def _make_device_kernel(op_name):
    schema_args = _schema_args(op_name)

    def device_kernel(*args, **kwargs):
        # The dispatcher hands over what the caller passed; backends get every argument positionally.
        args = _kernel_args(op_name, schema_args, args, kwargs, cache=True)
        if _on_other_gpu(args[0]):                       # every op's first argument is a tensor
            with torch.cuda.device(args[0].device):
                return _run_kernel(op_name, args)
        return _run_kernel(op_name, args)

    device_kernel.__name__ = f"{op_name}_device_kernel"
    return device_kernel


def _on_other_gpu(t: Tensor) -> bool:
    """Whether t is on a GPU that is not the current one. Triton launches on the current device's stream:
    a layer placed on another GPU (e.g. transformers' device_map="auto") runs there only with that GPU
    made current."""
    # torch._C._cuda_getDevice is torch.cuda.current_device without its lazy-init check: a CUDA tensor
    # exists, so CUDA is initialised (a few us less per call)
    return t.is_cuda and t.get_device() != torch._C._cuda_getDevice()


def _run_kernel(op_name: str, args):
    """The selected backend kernel of `op_name` on checked arguments (every one, positionally), expert
    weights unpacked for a kernel that does not take them packed, grouped_gemm's bias added after a
    kernel that takes none; on the current device."""
    kernel = registry.select(op_name, args)
    weight_args = WEIGHT_ARGS.get(op_name)
    if weight_args and not kernel.packed_weights:
        args = list(args)
        for i in weight_args:
            args[i] = packing.unpack(args[i])
    if op_name == "grouped_gemm" and not kernel.bias:
        x, w, expert_offsets, bias = args
        y = kernel.fn(x, w, expert_offsets)
        return y if bias is None else reference.add_expert_bias(y, bias, expert_offsets)
    return kernel.fn(*args)


# op -> its device kernel: what the dispatcher runs on every device type, and what a direct call runs
DEVICE_KERNELS: dict[str, Callable] = {}
# op -> the Python type each schema argument must have for a direct call: Tensor, _OPTIONAL_TENSOR, or
# int / bool / str (exactly: the dispatcher's own conversions, and its errors, stay with torch.ops)
_ARG_KINDS: dict[str, tuple] = {}
_OPTIONAL_TENSOR = object()
_OPTIONAL_DTYPE = object()   # a schema's ScalarType?: a torch.dtype or None
# keyed by the schema's real_type: its `type` shows ScalarType? as Optional[int], which an int? would share
_SCHEMA_KINDS = {"Tensor": Tensor, "Optional[Tensor]": _OPTIONAL_TENSOR, "int": int, "bool": bool, "str": str,
                 "Optional[ScalarType]": _OPTIONAL_DTYPE}
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1   # a schema int is int64: a larger one is the dispatcher's error


def define_op(name: str, schema: str, arg_check, reference_fn) -> None:
    """Define `moge::<name>` once: its schema, a routing kernel on every device type (argument check,
    then the active backend's implementation), and `reference_fn` as its reference backend."""
    _lib.define(name + schema)
    registry.declare_op(name)
    ARG_CHECKS[name] = arg_check
    DEVICE_KERNELS[name] = _make_device_kernel(name)
    _ARG_KINDS[name] = tuple(_SCHEMA_KINDS.get(str(arg.real_type))
                             for arg in getattr(torch.ops.moge, name).default._schema.arguments)
    for device_type in _device_types:
        torch.library.impl(f"moge::{name}", device_type, DEVICE_KERNELS[name], lib=_lib)
    registry.register_kernel("reference", name, reference_fn, devices=("*",), dtypes=None,
                             bias=name == "grouped_gemm")


def register_device_type(device_type: str) -> None:
    """Route every `torch.ops.moge.*` op on `device_type` tensors through the backend registry."""
    if device_type in _device_types:
        return
    _device_types.append(device_type)
    for name in ARG_CHECKS:
        torch.library.impl(f"moge::{name}", device_type, DEVICE_KERNELS[name], lib=_lib)


# ----------------------------------------------------------------------------- eager direct calls
# An eager call of torch.ops.moge.<op> passes the dispatcher and torch.library's Python autograd wrapper
# before it reaches the device kernel above: tens of microseconds of host time a call, more than the GPU
# time of a decode-size kernel, even when neither has anything to do. The public functions below call the
# device kernel themselves when direct_call_allowed says that nothing between would act on the call: the
# same checks, backend choice and kernel, so the same results, bit for bit. Any other call (autograd,
# torch.compile, FakeTensor, a mode, vmap, tracing, a tensor subclass) goes through torch.ops.
_profiler_enabled = torch._C._autograd._profiler_enabled


def direct_call_allowed(op_name: str, args) -> bool:
    """Whether calling `op_name`'s device kernel with `args` (every schema argument, positionally) is the
    same as calling torch.ops.moge.<op_name>: the one rule of the direct path. True when the option
    eager_direct is on and
      - no torch.compile / dynamo tracing, no torch.jit tracing, no forward-mode AD level;
      - no TorchDispatchMode (FakeTensorMode, FunctionalTensorMode, proxy tracing included), no
        TorchFunctionMode (torch.device(...) contexts included), no functorch transform (vmap, grad);
      - every tensor argument is exactly a torch.Tensor or nn.Parameter (no FakeTensor, no subclass) and,
        with grad mode on, none requires grad (inference_mode and no_grad are fine);
      - every other argument has exactly its schema type (int within int64, bool, str, torch.dtype; None
        for an absent tensor or dtype);
      - the first tensor is on a device type with a routing kernel (not meta)."""
    return _nothing_intercepts() and _args_direct(args, _ARG_KINDS[op_name])


def _nothing_intercepts() -> bool:
    """direct_call_allowed's conditions that do not depend on the arguments (its first two)."""
    return options.current.eager_direct and _untraced()


def _untraced() -> bool:
    """No torch.compile / dynamo or jit tracing, forward-mode AD level, dispatch or function mode, or
    functorch transform: what runs is what an eager call of real tensors runs."""
    if torch.compiler.is_compiling():
        return False
    C = torch._C
    return not (C._len_torch_dispatch_stack() or C._is_torch_function_mode_enabled()
                or C._functorch.peek_interpreter_stack() is not None or C._get_tracing_state() is not None
                or _forward_ad._current_level >= 0)


def _untracked(t: Tensor, grad: bool) -> bool:
    """A plain tensor (no subclass) that autograd does not record (grad: torch.is_grad_enabled())."""
    return type(t) in _PLAIN_TENSOR_TYPES and not (grad and t.requires_grad)


def _args_direct(args, kinds) -> bool:
    """direct_call_allowed's conditions on the arguments (the last three), `kinds` as in _ARG_KINDS."""
    if len(args) != len(kinds):
        return False
    grad = torch.is_grad_enabled()
    device_type = None
    for arg, kind in zip(args, kinds):
        if kind is Tensor or (kind is _OPTIONAL_TENSOR and arg is not None):
            if not _untracked(arg, grad):
                return False
            if device_type is None:
                device_type = arg.device.type
        elif kind is _OPTIONAL_DTYPE:
            if arg is not None and type(arg) is not torch.dtype:
                return False
        elif kind is int:
            if type(arg) is not int or not _INT64_MIN <= arg <= _INT64_MAX:
                return False
        elif kind is not _OPTIONAL_TENSOR and type(arg) is not kind:
            return False
    return device_type in _device_types


def replay_allowed(*tensors: Tensor) -> bool:
    """Whether a composition of the ops over these tensors (plain tensors, not recorded by autograd) may
    be replayed from a CUDA graph (eager_graphs.run): nothing would record or intercept it, as for the
    direct path, and no profiler (its traces keep the ops' names)."""
    grad = torch.is_grad_enabled()
    return (_nothing_intercepts() and not _profiler_enabled()
            and all(_untracked(t, grad) for t in tensors))


def _run(op_name: str, *args):
    """torch.ops.moge.<op_name>(*args), through its device kernel directly where that is the same."""
    if direct_call_allowed(op_name, args):
        if _profiler_enabled():     # keep the op's name in torch.profiler traces
            with torch.autograd.profiler.record_function(f"moge::{op_name}"):
                out = DEVICE_KERNELS[op_name](*args)
        else:
            out = DEVICE_KERNELS[op_name](*args)
        return tuple(out) if isinstance(out, list) else out
    return getattr(torch.ops.moge, op_name)(*args)


for _name, _schema in SCHEMAS.items():
    define_op(_name, _schema, ARG_CHECKS[_name], getattr(reference, _name))


# ----------------------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("moge::grouped_dispatch")
def _(hidden, router_logits, num_groups, topk_per_group=1, expert_scale=None, renormalize=False,
      score_func="softmax", expert_mask=None):
    checks.check_dispatch(hidden, router_logits, num_groups, topk_per_group, expert_scale,
                          renormalize, score_func, expert_mask)
    T, E = router_logits.shape
    K = num_groups * topk_per_group
    return (hidden.new_empty(T * K, hidden.shape[1]),
            hidden.new_empty(T, K, dtype=torch.float32),
            hidden.new_empty(T, K, dtype=torch.int32),
            hidden.new_empty(E + 1, dtype=torch.int32),
            hidden.new_empty(T, K, dtype=torch.int32))


@torch.library.register_fake("moge::grouped_permute")
def _(hidden, topk_ids, num_experts):
    checks.check_permute(hidden, topk_ids, num_experts)
    T, K = topk_ids.shape
    return (hidden.new_empty(T * K, hidden.shape[1]),
            hidden.new_empty(num_experts + 1, dtype=torch.int32),
            hidden.new_empty(T, K, dtype=torch.int32))


@torch.library.register_fake("moge::grouped_gemm")
def _(x, w, expert_offsets, bias=None):
    checks.check_gemm(x, w, expert_offsets, bias)
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.register_fake("moge::grouped_mlp")
def _(x, w_gate_up, w_down, expert_offsets, row_scale=None):
    checks.check_mlp(x, w_gate_up, w_down, expert_offsets, row_scale)
    return x.new_empty(x.shape[0], w_down.shape[1])


@torch.library.register_fake("moge::grouped_combine")
def _(expert_out, topk_weights, row_index, shared_out=None):
    checks.check_combine(expert_out, topk_weights, row_index, shared_out)
    return expert_out.new_empty(row_index.shape[0], expert_out.shape[1])


@torch.library.register_fake("moge::grouped_gemm_fp8")
def _(x, w, w_scale, expert_offsets, block_n=128, block_k=128):
    checks.check_gemm_fp8(x, w, w_scale, expert_offsets, block_n, block_k)
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.register_fake("moge::grouped_mlp_fp8")
def _(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale=None,
      block_n=128, block_k=128, x_scale=None, out_dtype=None):
    checks.check_mlp_fp8(x, w_gate_up, w_gate_up_scale, w_down, w_down_scale, expert_offsets, row_scale,
                         block_n, block_k, x_scale, out_dtype)
    return x.new_empty(x.shape[0], w_down.shape[1], dtype=x.dtype if x_scale is None else out_dtype)


@torch.library.register_fake("moge::permute_fp8")
def _(hidden, row_index, expert_offsets, group=128):
    checks.check_permute_fp8(hidden, row_index, expert_offsets, group)
    M, H = row_index.numel(), hidden.shape[1]
    return hidden.new_empty(M, H, dtype=fp8.E4M3), fp8.new_scales(hidden, M, H, group)


@torch.library.register_fake("moge::grouped_gemm_dgrad")
def _(grad_y, w, expert_offsets):
    checks.check_dgrad(grad_y, w, expert_offsets)
    return grad_y.new_empty(grad_y.shape[0], w.shape[2])


@torch.library.register_fake("moge::grouped_gemm_wgrad")
def _(grad_y, x, expert_offsets):
    checks.check_wgrad(grad_y, x, expert_offsets)
    return x.new_empty(expert_offsets.shape[0] - 1, grad_y.shape[1], x.shape[1])


@torch.library.register_fake("moge::swiglu")
def _(gate_up):
    checks.check_swiglu(gate_up)
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.register_fake("moge::swiglu_backward")
def _(grad_h, gate_up, row_scale=None, need_h=False):
    checks.check_swiglu_backward(grad_h, gate_up, row_scale, need_h)
    M, two_i = gate_up.shape
    return (gate_up.new_empty(M, two_i),
            gate_up.new_empty(M if need_h else 0, two_i // 2),
            gate_up.new_empty(M if row_scale is not None else 0, dtype=torch.float32))


@torch.library.register_fake("moge::grouped_combine_backward")
def _(grad_out, expert_out, topk_weights, row_index, need_weights_grad):
    checks.check_combine_backward(grad_out, expert_out, topk_weights, row_index, need_weights_grad)
    T, K = row_index.shape
    return (grad_out.new_empty(T * K, grad_out.shape[1]),
            topk_weights.new_empty(T if need_weights_grad else 0, K))


# ----------------------------------------------------------------------------- backend capabilities
def supports_score_funcs(*score_funcs):
    """A grouped_dispatch kernel's `supports` predicate: it has branches for these reference.ScoreFunc
    values; a call with another one runs on the next backend (the reference has every one)."""
    codes = frozenset(int(f) for f in score_funcs)
    return lambda args: args[6] in codes


def explain(op: str, *args, **kwargs) -> dict:
    """Which backend (and variant) `torch.ops.moge.<op>(*args, **kwargs)` runs, and why: the arguments are
    checked as the op checks them. Returns {"op", "device", "dtype", "selected", "backend", "variant",
    "candidates": [(backend, "runs" | "declines these arguments" | "not tried")]}."""
    if op not in SCHEMAS:
        raise ValueError(f"unknown op {op!r}; expected one of {tuple(SCHEMAS)}")
    args = _kernel_args(op, _schema_args(op), args, kwargs)
    kernel = registry.select(op, args)
    first = args[0]
    chain = registry.candidates(op, first.device.type, first.dtype)
    runs = next(i for i, k in enumerate(chain) if k is kernel)
    tried = [(k.backend, "declines these arguments" if i < runs else "runs" if i == runs else "not tried")
             for i, k in enumerate(chain)]
    return {"op": op, "device": first.device.type, "dtype": str(first.dtype).replace("torch.", ""),
            "selected": registry.get_backend(), "backend": kernel.backend,
            "variant": kernel.variant(args) if kernel.variant is not None else None, "candidates": tried}


# ----------------------------------------------------------------------------- Python API
# Index tensors as in docs/contract.md: T tokens, H hidden, E experts in G groups, k_g experts per group
# and token, K = G * k_g slots per token, M = T * K expert-sorted rows, I the expert intermediate size.
def grouped_dispatch(hidden: Tensor, router_logits: Tensor, num_groups: int, topk_per_group: int = 1,
                     expert_scale: Optional[Tensor] = None, renormalize: bool = False,
                     score_func: str = "softmax", expert_mask: Optional[Tensor] = None):
    """Route every token to its top-k_g experts inside each group and sort the copies by expert.

    Args:
        hidden: [T, H] float32/float16/bfloat16, the tokens.
        router_logits: [T, E] float (any of the three), same device; E must be a multiple of num_groups.
        num_groups: G, the number of equal expert groups (experts [g*E/G, (g+1)*E/G) form group g).
        topk_per_group: k_g in [1, E/G], experts chosen per group and token.
        expert_scale: optional [E] float, multiplies each chosen weight by the scale of its expert.
        renormalize: divide each token's K chosen scores by their sum (before expert_scale).
        score_func: "softmax" (over all E experts) or "sigmoid" (per expert), computed in float32.
        expert_mask: optional [E] bool on hidden's device, True = may be chosen: each group picks its
            top-k_g among its kept experts (at least k_g per group: checked on CPU, on GPUs with
            validation on); the weights stay the scores over all E. It is data: a new mask recompiles
            and recaptures nothing (moge_kernels.voted_expert_mask gives Pangu's batch vote).

    Returns (permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index):
        permuted_hidden: [M, H] hidden's dtype, token copies sorted stably by expert (token, then slot).
        topk_weights: [T, K] float32, the routing weight of each slot.
        topk_ids: [T, K] int32, the global expert id of each slot, group-major (slot j in group j // k_g).
        expert_offsets: [E+1] int32, rows of expert e are [expert_offsets[e], expert_offsets[e+1]).
        row_index: [T, K] int32, the row of permuted_hidden that slot (t, k) was copied to.

    Ties go to the lower expert index; a NaN score ranks below every number (docs/contract.md)."""
    return _run("grouped_dispatch", hidden, router_logits, num_groups, topk_per_group, expert_scale,
                renormalize, score_func, expert_mask)


def grouped_permute(hidden: Tensor, topk_ids: Tensor, num_experts: int):
    """Stable permute by given expert ids, for any router (grouped_dispatch without the routing).

    Args:
        hidden: [T, H] float32/float16/bfloat16, the tokens.
        topk_ids: [T, K] int32/int64, the expert of each slot in [0, num_experts), or -1 to drop the slot.
        num_experts: E.

    Returns (permuted_hidden [M, H] hidden's dtype, expert_offsets [E+1] int32, row_index [T, K] int32),
    M = T * K, in grouped_dispatch's order (by expert, then token, then slot). Dropped slots take the zero
    rows [expert_offsets[E], M), which every grouped op treats as rows of no expert (zero output), so they
    contribute 0 in grouped_combine."""
    return _run("grouped_permute", hidden, topk_ids, num_experts)


def grouped_gemm(x: Tensor, w: Tensor, expert_offsets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Grouped GEMM: rows [expert_offsets[e], expert_offsets[e+1]) of x times w[e]^T, plus bias[e], for
    every expert.

    Args:
        x: [M, K] float32/float16/bfloat16, rows sorted by expert (as grouped_dispatch leaves them).
        w: [E, N, K] in x's dtype (nn.Linear layout, one [N, K] matrix per expert), or packed
            [E, N, K/B, B] (moge_kernels.pack_expert_weights), or FP8 (fp8.QuantizedExpertWeights:
            moge::grouped_gemm_fp8 runs, x quantized per token).
        expert_offsets: [E+1] int32, non-decreasing from 0 to at most M (experts may have no rows; rows
            past expert_offsets[E] belong to no expert).
        bias: optional [E, N] in x's dtype, one row per expert (gpt-oss-style expert biases), added in
            the GEMM's fp32 epilogue where the backend can (triton); its gradient is the sum of the
            output gradient over each expert's rows (deterministic).

    Returns [M, N] in x's dtype, accumulated in float32; rows of no expert are zero (no bias)."""
    if isinstance(w, fp8.QuantizedExpertWeights):
        if bias is not None:
            checks.check_expert_bias(bias, w.weight.shape[0], w.weight.shape[1], x)
        y = _run("grouped_gemm_fp8", x, w.weight, w.scale, expert_offsets, w.block_n, w.block_k)
        return y if bias is None else reference.add_expert_bias(y, bias, expert_offsets)
    return _run("grouped_gemm", x, w, expert_offsets, bias)


def grouped_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor, expert_offsets: Tensor,
                row_scale: Optional[Tensor] = None) -> Tensor:
    """Per-expert SwiGLU MLP over expert-sorted rows: y = (silu(x Wg^T) * (x Wu^T)) Wd^T.

    Args:
        x: [M, H] float32/float16/bfloat16, rows sorted by expert; with FP8 weights also
            fp8.QuantizedActivations (grouped_permute_fp8 / grouped_dispatch_fp8: already in e4m3).
        w_gate_up: [E, 2I, H] in x's dtype, gate rows [0, I) then up rows [I, 2I) (or packed).
        w_down: [E, H, I] in x's dtype (or packed). FP8 weights (fp8.QuantizedExpertWeights, both in
            one format) run moge::grouped_mlp_fp8.
        expert_offsets: [E+1] int32, non-decreasing from 0 to at most M (rows past expert_offsets[E]
            belong to no expert).
        row_scale: optional [M] float, multiplies each output row (in float32).

    Returns [M, H] in x's dtype (zero rows for rows of no expert); GEMMs accumulate in float32 and the SwiGLU product is rounded to x's
    dtype before the down projection, as the reference does."""
    w_gate_up_q = isinstance(w_gate_up, fp8.QuantizedExpertWeights)
    if w_gate_up_q or isinstance(w_down, fp8.QuantizedExpertWeights) or \
            isinstance(x, fp8.QuantizedActivations):
        blocks = fp8.same_blocks(w_gate_up, w_down)
        x, x_scale, out_dtype = fp8.activation_args(x, blocks[1])
        return _run("grouped_mlp_fp8", x, w_gate_up.weight, w_gate_up.scale, w_down.weight, w_down.scale,
                    expert_offsets, row_scale, *blocks, x_scale, out_dtype)
    return _run("grouped_mlp", x, w_gate_up, w_down, expert_offsets, row_scale)


def grouped_combine(expert_out: Tensor, topk_weights: Tensor, row_index: Tensor,
                    shared_out: Optional[Tensor] = None) -> Tensor:
    """Weighted un-permute: out[t] = sum_k topk_weights[t, k] * expert_out[row_index[t, k]] (+ shared_out[t]).

    Args:
        expert_out: [M, H] float32/float16/bfloat16, one row per (token, slot), M = T * K.
        topk_weights: [T, K] float (grouped_dispatch gives float32).
        row_index: [T, K] int32, values in [0, M).
        shared_out: optional [T, H], added to every token's sum (a shared expert's output).

    Returns [T, H] in expert_out's dtype: summed in float32 in slot order, no atomics (deterministic)."""
    return _run("grouped_combine", expert_out, topk_weights, row_index, shared_out)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up over gate_up [M, 2I] (gate columns first), differentiable: [M, I]."""
    return _run("swiglu", gate_up)


def shared_expert_mlp(hidden: Tensor, shared_w_gate_up, shared_w_down) -> Tensor:
    """Dense SwiGLU MLP of a shared expert: hidden [T, H], shared_w_gate_up [2Is, H] (gate rows first),
    shared_w_down [H, Is] -> [T, H] in hidden's dtype; or FP8 weights (QuantizedExpertWeights of one
    expert, [1, 2Is, H] and [1, H, Is]: fp8.shared_expert_mlp, the FP8 grouped MLP over all T rows).

    Two dense GEMMs (cuBLAS on CUDA) around the `moge.swiglu` kernel: the shared expert is one dense
    matrix for every token, where cuBLAS is the reference rate that the grouped kernels reach 80-94% of
    at prefill sizes (bench/README.md); at decode sizes both stream the weights once."""
    if isinstance(shared_w_gate_up, fp8.QuantizedExpertWeights):
        return fp8.shared_expert_mlp(hidden, shared_w_gate_up, shared_w_down)
    return F.linear(swiglu(F.linear(hidden, shared_w_gate_up)), shared_w_down)


class LayerOps(NamedTuple):
    """The ops one layer is composed of (parallel.py swaps in the eager reference for comparisons)."""
    dispatch: Callable      # grouped_dispatch's signature
    mlp: Callable           # grouped_mlp's signature
    combine: Callable       # grouped_combine's signature
    shared_mlp: Callable    # shared_expert_mlp's signature


MOGE_OPS = LayerOps(grouped_dispatch, grouped_mlp, grouped_combine, shared_expert_mlp)


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# The shared expert reads only `hidden`, so it may run beside the dispatch and the routed experts. On the
# H200 (bench/ab_shared_overlap.py, Pangu layer; bench/results/shared_overlap_h200_90ac255.txt) the side
# stream took every graph replay 1-9% down (bf16 T=1 0.150 -> 0.136 ms, FP8 experts 0.122 -> 0.113) and
# eager calls from T=1024 on (T=1024 1.240 -> 1.194); below that an eager call pays more host time for the
# stream switch than the overlap gains (bf16 T=1 0.289 -> 0.329 ms, FP8 experts T=16 0.466 -> 0.590).
SHARED_STREAM_EAGER_MIN_TOKENS = 1024
_shared_streams: dict[int, tuple] = {}    # device index -> (side stream, fork event, join event)


def shared_expert_side_stream(hidden: Tensor, shared_w_gate_up, shared_w_down) -> Optional[tuple]:
    """(side stream, fork event, join event) where the layer's shared expert runs on a side stream (option
    shared_expert_stream: "auto" = under CUDA-graph capture, or eager calls of at least
    SHARED_STREAM_EAGER_MIN_TOKENS tokens), else None: not CUDA, no tokens, anything tracing or recording
    gradients (training stays on one stream)."""
    flag = options.current.shared_expert_stream
    if flag is False or not hidden.is_cuda or hidden.shape[0] == 0 or type(hidden) not in _PLAIN_TENSOR_TYPES:
        return None
    if flag is None and hidden.shape[0] < SHARED_STREAM_EAGER_MIN_TOKENS \
            and not torch.cuda.is_current_stream_capturing():
        return None
    weights = [w for w in (shared_w_gate_up, shared_w_down) if isinstance(w, Tensor)]
    if not _untraced() or records_grad(hidden, *weights):
        return None
    index = hidden.get_device()
    if index not in _shared_streams:
        _shared_streams[index] = (torch.cuda.Stream(device=index), torch.cuda.Event(), torch.cuda.Event())
    return _shared_streams[index]


def _fork_shared(side: tuple, fn: Callable, hidden: Tensor, *args):
    """fn(hidden, *args) on the side stream, after the current stream's work so far."""
    stream, fork, join = side
    fork.record(torch.cuda.current_stream(hidden.device))
    stream.wait_event(fork)
    with torch.cuda.stream(stream):
        out = fn(hidden, *args)
    join.record(stream)
    return out


def _join_shared(side: tuple, shared_out: Tensor) -> None:
    """The current stream waits for the side stream's shared expert, whose output it then reads (and, in
    an eager call, frees: record_stream keeps the side stream from reusing it first)."""
    main = torch.cuda.current_stream(shared_out.device)
    main.wait_event(side[2])
    if not torch.cuda.is_current_stream_capturing():
        shared_out.record_stream(main)


def run_experts(mlp: Callable, grad_experts: Optional[Callable], permuted: Tensor, w_gate_up, w_down,
                expert_offsets: Tensor) -> Tensor:
    """The layer's expert step: grad_experts where autograd records it and one is given, else mlp (both
    with grouped_mlp's signature)."""
    if grad_experts is not None and records_grad(permuted, w_gate_up, w_down):
        return grad_experts(permuted, w_gate_up, w_down, expert_offsets)
    return mlp(permuted, w_gate_up, w_down, expert_offsets)


def compose_layer(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                  num_groups: int, topk_per_group: int, expert_scale: Optional[Tensor], renormalize: bool,
                  score_func: str, shared_w_gate_up: Optional[Tensor], shared_w_down: Optional[Tensor], *,
                  layer_ops: LayerOps = MOGE_OPS, experts: Optional[Callable] = None,
                  grad_experts: Optional[Callable] = None,
                  phase_hook: Optional[Callable[[str], None]] = None,
                  expert_mask: Optional[Tensor] = None,
                  weights_check: Optional[Callable] = None,
                  need_offsets: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """The MoGE layer, written once: dispatch -> experts -> shared expert -> combine.

    moge_forward, MoGELayer and moge_kernels.parallel all run it. `weights_check`
    (checks.check_layer_weights, moge_forward's) checks the tensors under the caller's names before any
    op runs; callers without one check their own arguments first.
    `experts(permuted, w_gate_up, w_down, expert_offsets) -> [M, H]` replaces layer_ops.mlp (parallel: the
    row exchange around the local experts); `grad_experts`, of the same signature, replaces it where
    autograd records the experts (MoGELayer's activation-saving training path; run_experts).
    `phase_hook(name)` is called before "route", "combine" and at "end". Returns (out [T, H],
    expert_offsets [E+1] int32 of the local routing), or (out, None) with need_offsets=False (a replayed
    call then copies out only the output).

    With the package's own ops and nothing recording the call (direct_call_allowed for every argument),
    the ops' device kernels are called straight from here (_compose_direct): the same checks, kernels
    and order, so the same results bit for bit, with the per-op host work done once per layer."""
    if layer_ops is MOGE_OPS and experts is None and phase_hook is None:
        layer_args = (hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group, expert_scale,
                      renormalize, score_func, shared_w_gate_up, shared_w_down, expert_mask)
        # (the profiler's per-op names come with the per-op path below)
        if _nothing_intercepts() and not _profiler_enabled() and _args_direct(layer_args, _LAYER_KINDS):
            if _on_other_gpu(hidden):
                with torch.cuda.device(hidden.device):
                    return _compose_direct_or_replay(layer_args, weights_check, need_offsets)
            return _compose_direct_or_replay(layer_args, weights_check, need_offsets)
    if weights_check is not None:
        cached_check("moge_forward", weights_check,
                     (hidden, router_logits, w_gate_up, w_down, shared_w_gate_up, shared_w_down))
    per_op = (w_gate_up, w_down, num_groups, topk_per_group, expert_scale, renormalize, score_func,
              shared_w_gate_up, shared_w_down, layer_ops, grad_experts, expert_mask)
    if experts is None and phase_hook is None and eager_graphs.applies(hidden):
        # the per-op path's layers (FP8 weights) replay from a graph too, keyed on every tensor they hold
        fixed = _flat_fixed((w_gate_up, w_down, num_groups, topk_per_group, expert_scale, renormalize,
                             score_func, shared_w_gate_up, shared_w_down, expert_mask))
        if replay_allowed(hidden, router_logits, *[t for t in fixed if isinstance(t, Tensor)]):
            def layer(hidden, router_logits):
                out, expert_offsets = _compose_ops(hidden, router_logits, *per_op, need_offsets)
                return (out, expert_offsets) if need_offsets else (out,)
            outputs = eager_graphs.run(layer, (hidden, router_logits), fixed,
                                       ("compose_layer_ops", layer_ops, need_offsets))
            return outputs if need_offsets else (outputs[0], None)
    return _compose_ops(hidden, router_logits, *per_op, need_offsets, experts, phase_hook)


def _flat_fixed(args) -> tuple:
    """compose_layer's fixed arguments for eager_graphs.run's key: FP8 weights as their tensors and
    blocks."""
    flat = []
    for a in args:
        if isinstance(a, fp8.QuantizedExpertWeights):
            flat += [a.weight, a.scale, a.block_n, a.block_k]
        else:
            flat.append(a)
    return tuple(flat)


def _compose_ops(hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group, expert_scale,
                 renormalize, score_func, shared_w_gate_up, shared_w_down, layer_ops, grad_experts,
                 expert_mask, need_offsets, experts=None, phase_hook=None):
    """compose_layer's per-op path: each step through layer_ops (the public ops, or a caller's)."""
    if phase_hook is not None:
        phase_hook("route")
    side = None
    if shared_w_gate_up is not None and experts is None and phase_hook is None:
        side = shared_expert_side_stream(hidden, shared_w_gate_up, shared_w_down)
    if side is not None:
        shared_out = _fork_shared(side, layer_ops.shared_mlp, hidden, shared_w_gate_up, shared_w_down)
    permuted, topk_weights, _, expert_offsets, row_index = layer_ops.dispatch(
        hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
        expert_mask)
    # `is None`, not `or`: dynamo (torch 2.11) treats the truthiness of a bound method as data-dependent
    if experts is None:
        expert_out = run_experts(layer_ops.mlp, grad_experts, permuted, w_gate_up, w_down, expert_offsets)
    else:
        expert_out = experts(permuted, w_gate_up, w_down, expert_offsets)
    if phase_hook is not None:
        phase_hook("combine")
    if side is not None:
        _join_shared(side, shared_out)
    elif shared_w_gate_up is not None:
        shared_out = layer_ops.shared_mlp(hidden, shared_w_gate_up, shared_w_down)
    else:
        shared_out = None
    out = layer_ops.combine(expert_out, topk_weights, row_index, shared_out)
    if phase_hook is not None:
        phase_hook("end")
    return out, (expert_offsets if need_offsets else None)


# compose_layer's arguments as _compose_direct takes them, kinds as in _ARG_KINDS: plain tensors for the
# expert weights (FP8 weights take the per-op path, where grouped_mlp routes them)
_LAYER_KINDS = (Tensor, Tensor, Tensor, Tensor, int, int, _OPTIONAL_TENSOR, bool, str, _OPTIONAL_TENSOR,
                _OPTIONAL_TENSOR, _OPTIONAL_TENSOR)
# Layer signatures (_signature of the arguments, and the weights check) whose every check passed ->
# grouped_dispatch's conversions. Every op after the dispatch takes tensors whose shapes, dtypes and
# device the dispatch's contract derives from the layer's arguments (the fake kernels above), so a
# signature that passed once passes every check again: where the checks read no values, a repeated
# layer call is checked with one dict lookup (as cached_check does per op).
_layer_checked: dict[tuple, tuple] = {}


def _compose_direct_or_replay(layer_args, weights_check, need_offsets):
    """_compose_direct, or its replay from a CUDA graph where the option eager_graphs applies (the graph's
    outputs that are copied out: out, and expert_offsets where the caller reads them)."""
    if not eager_graphs.applies(layer_args[0]):
        out, expert_offsets = _compose_direct(layer_args, weights_check)
        return out, (expert_offsets if need_offsets else None)
    fixed = layer_args[2:]

    def layer(hidden, router_logits):
        out, expert_offsets = _compose_direct((hidden, router_logits) + fixed, weights_check)
        return (out, expert_offsets) if need_offsets else (out,)

    outputs = eager_graphs.run(layer, layer_args[:2], fixed, ("compose_layer", weights_check, need_offsets))
    return outputs if need_offsets else (outputs[0], None)


def _compose_direct(layer_args, weights_check):
    """compose_layer with MOGE_OPS, each op's device kernel called as _run calls it, where nothing
    records the call: the checks (moge_forward's, then each op's in turn, as the per-op path runs them)
    on a signature's first call, or on every call where they read values (CPU tensors, MOGE_VALIDATE=1)."""
    (hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group, expert_scale, renormalize,
     score_func, shared_w_gate_up, shared_w_down, expert_mask) = layer_args
    dispatch_args = [hidden, router_logits, num_groups, topk_per_group, expert_scale, renormalize,
                     score_func, expert_mask]
    key = None if checks._should_check_values(hidden) else (_signature("layer", layer_args), weights_check)
    dispatch_conversions = None if key is None else _layer_checked.get(key)
    check = dispatch_conversions is None
    if check:
        if weights_check is not None:
            weights_check(hidden, router_logits, w_gate_up, w_down, shared_w_gate_up, shared_w_down)
        converted = ARG_CHECKS["grouped_dispatch"](*dispatch_args)
        dispatch_conversions = _conversions(dispatch_args, converted)
        if converted is not None:
            dispatch_args = converted
        cacheable = key is not None and dispatch_conversions is not None
    else:
        for i, value in dispatch_conversions:
            dispatch_args[i] = value
    side = None if shared_w_gate_up is None else shared_expert_side_stream(hidden, shared_w_gate_up,
                                                                           shared_w_down)
    if side is not None:
        shared_out, shared_checked = _fork_shared(side, _shared_expert_direct, hidden, shared_w_gate_up,
                                                  shared_w_down, check)
    permuted, topk_weights, _, expert_offsets, row_index = _run_kernel("grouped_dispatch", dispatch_args)
    mlp_args = (permuted, w_gate_up, w_down, expert_offsets, None)
    if check:
        cacheable &= ARG_CHECKS["grouped_mlp"](*mlp_args) is None     # (a check converting nothing returns None)
    expert_out = _run_kernel("grouped_mlp", mlp_args)
    if side is not None:
        _join_shared(side, shared_out)
    elif shared_w_gate_up is not None:
        shared_out, shared_checked = _shared_expert_direct(hidden, shared_w_gate_up, shared_w_down, check)
    else:
        shared_out, shared_checked = None, True
    if check:
        cacheable &= shared_checked
    combine_args = (expert_out, topk_weights, row_index, shared_out)
    if check:
        cacheable &= ARG_CHECKS["grouped_combine"](*combine_args) is None
    out = _run_kernel("grouped_combine", combine_args)
    if check and cacheable:
        _store(_layer_checked, key, dispatch_conversions)
    return out, expert_offsets


def _shared_expert_direct(hidden, shared_w_gate_up, shared_w_down, check: bool) -> tuple:
    """_compose_direct's shared_expert_mlp: (out, whether its swiglu check passed, or True unchecked)."""
    shared_gate_up = F.linear(hidden, shared_w_gate_up)
    checked = ARG_CHECKS["swiglu"](shared_gate_up) is None if check else True
    return F.linear(_run_kernel("swiglu", (shared_gate_up,)), shared_w_down), checked


def moge_forward(hidden: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor,
                 num_groups: int, topk_per_group: int = 1, expert_scale: Optional[Tensor] = None,
                 renormalize: bool = False, score_func: str = "softmax",
                 shared_w_gate_up: Optional[Tensor] = None,
                 shared_w_down: Optional[Tensor] = None,
                 expert_mask: Optional[Tensor] = None) -> Tensor:
    """One MoGE layer: grouped_dispatch, the experts' grouped_mlp, an optional shared expert, grouped_combine.

    Args:
        hidden: [T, H] float32/float16/bfloat16.
        router_logits: [T, E] float, same device (E experts in num_groups groups).
        w_gate_up: [E, 2I, H] in hidden's dtype (gate rows first; or packed, pack_expert_weights).
        w_down: [E, H, I] in hidden's dtype (or packed).
        num_groups, topk_per_group, expert_scale, renormalize, score_func, expert_mask: the routing,
            as in grouped_dispatch.
        shared_w_gate_up, shared_w_down: optional dense shared expert [2Is, H] and [H, Is] in hidden's
            dtype, or FP8 weights of one expert ([1, 2Is, H], [1, H, Is]; given together), run on
            every token and added to the routed experts' sum.

    Returns [T, H] in hidden's dtype. The arguments are checked here, under these names, before any
    op runs. Differentiable in every tensor argument; works under torch.compile(fullgraph=True)."""
    return compose_layer(hidden, router_logits, w_gate_up, w_down, num_groups, topk_per_group,
                         expert_scale, renormalize, score_func, shared_w_gate_up, shared_w_down,
                         expert_mask=expert_mask, weights_check=checks.check_layer_weights,
                         need_offsets=False)[0]
