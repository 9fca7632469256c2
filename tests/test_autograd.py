"""Backward of every moge op (moge_kernels/autograd.py) and the backward primitives.

Oracles: torch.autograd.gradcheck in fp64 (reference backend), and torch autograd through a plain
differentiable PyTorch MoGE (`_torch_moge`, an expert loop) in fp64. Backends are then compared with
the reference backend's gradients. Tolerances:
  fp64 gradcheck: default where the op computes in fp64; eps=1e-3, atol=rtol=1e-3 where the reference
    computes internally in fp32 (routing scores, SwiGLU, combine accumulate in fp32 by contract);
  fp32 backend vs reference: atol=rtol=1e-4 (different summation order / blocking);
  fp16 (Triton interpreter) and bf16 (GPU): the relative error against an fp32 (fp64 on GPU) oracle
    is at most 2x the error of the reference backend run in the same low precision, plus a floor.
"""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import autograd as AG
from moge_kernels import ops
from moge_kernels import reference as R
from moge_kernels.testing import (make_expert_weights, make_routing_inputs, random_offsets,
                                  relative_error, sample_inputs)

from conftest import HAS_CUDA, requires_cuda, requires_triton

F64 = torch.float64
PRIMITIVES = list(ops.BACKWARD_PRIMITIVES)
PUBLIC = ["grouped_dispatch", "grouped_gemm", "grouped_mlp", "grouped_combine"]


def _leaf(t, dtype=None):
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_()


# --------------------------------------------------------------------------------- plain-torch oracle
def _torch_route(logits, G, k_g, expert_scale, renormalize, score_func):
    T, E = logits.shape
    S = E // G
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    # selection from the reference (integer ids carry no gradient)
    _, ids = mk.reference.route(logits.detach().float(), G, k_g, None, False, score_func)
    ids = ids.long()
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if expert_scale is not None:
        w = w * expert_scale[ids]
    return w, ids


def _torch_moge(hidden, logits, w_gate_up, w_down, G, k_g=1, expert_scale=None, renormalize=False,
                score_func="softmax"):
    """The whole routed layer with differentiable torch ops and a loop over (token, slot)."""
    T, H = hidden.shape
    I = w_down.shape[2]
    w, ids = _torch_route(logits, G, k_g, expert_scale, renormalize, score_func)
    rows = []
    for t in range(T):
        acc = hidden.new_zeros(H)
        for k in range(ids.shape[1]):
            e = ids[t, k]
            gu = w_gate_up[e] @ hidden[t]
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            acc = acc + w[t, k] * (w_down[e] @ h)
        rows.append(acc)
    return torch.stack(rows) if rows else hidden.new_zeros(0, H)


def _moge_ops(hidden, logits, w_gate_up, w_down, G, k_g=1, expert_scale=None, renormalize=False,
              score_func="softmax", recompute=True):
    moge = torch.ops.moge
    permuted, weights, _, offsets, row_index = moge.grouped_dispatch(
        hidden, logits, G, k_g, expert_scale, renormalize, score_func)
    if recompute:
        expert_out = moge.grouped_mlp(permuted, w_gate_up, w_down, offsets)
    else:
        h = moge.swiglu(moge.grouped_gemm(permuted, w_gate_up, offsets))
        expert_out = moge.grouped_gemm(h, w_down, offsets)
    return moge.grouped_combine(expert_out, weights, row_index)


def _grads(fn, inputs, seed=0):
    """(output, grads of sum(out * fixed random)) for the leaf tensors in inputs."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * g.to(out.device)).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad.detach().clone() for t in inputs]


ROUTING_CASES = [
    # (T, E, G, k_g, H, I, options)
    (5, 8, 4, 1, 6, 4, dict()),
    (6, 8, 2, 2, 5, 3, dict(renormalize=True, scale=True)),
    (4, 8, 4, 2, 6, 4, dict(score_func="sigmoid", scale=True)),
    (3, 16, 8, 1, 7, 5, dict(score_func="sigmoid", renormalize=True)),
]


def _routing_case(T, E, G, k_g, H, I, opts, dtype=torch.float32, device="cpu"):
    hidden, logits = make_routing_inputs(T, E, H, seed=T + E)
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=H)
    scale = (torch.rand(E, generator=torch.Generator().manual_seed(E)) + 0.5) if opts.get("scale") else None
    kw = dict(renormalize=opts.get("renormalize", False), score_func=opts.get("score_func", "softmax"))
    tensors = [hidden, logits, w_gate_up, w_down] + ([scale] if scale is not None else [])
    tensors = [_leaf(t.to(device), dtype) for t in tensors]
    return tensors, kw


def _bind(G, k_g, kw, fn, has_scale, **extra):
    def run(hidden, logits, w_gate_up, w_down, scale=None):
        return fn(hidden, logits, w_gate_up, w_down, G, k_g, scale if has_scale else None, **kw, **extra)
    return run


# --------------------------------------------------------------------------------- fp64 oracles
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: f"T{c[0]}E{c[1]}G{c[2]}k{c[3]}")
def test_layer_grads_match_torch_autograd_fp64(case, recompute):
    T, E, G, k_g, H, I, opts = case
    tensors, kw = _routing_case(T, E, G, k_g, H, I, opts, dtype=F64)
    has_scale = len(tensors) == 5
    with mk.use_backend("reference"):
        out, grads = _grads(_bind(G, k_g, kw, _moge_ops, has_scale, recompute=recompute), tensors)
    exp_out, exp_grads = _grads(_bind(G, k_g, kw, _torch_moge, has_scale), tensors)
    # the reference rounds routing scores, SwiGLU and the combine sum to fp32 by contract
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    for name, g, e in zip(["hidden", "logits", "w_gate_up", "w_down", "scale"], grads, exp_grads):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_gradcheck_grouped_gemm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 3, 5, generator=g, dtype=F64, requires_grad=True)
    offsets = torch.tensor([0, 4, 4, 9, 9], dtype=torch.int32)           # two empty experts
    with mk.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b: torch.ops.moge.grouped_gemm(a, b, offsets), (x, w))
    # with a bias, and rows past offsets[E] (no expert: no bias, no gradient into it)
    x = torch.randn(11, 5, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    with mk.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.moge.grouped_gemm(a, b, offsets, c),
                                        (x, w, bias))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grouped_gemm_bias_gradient_is_the_per_expert_sum(backend):
    """grad_bias[e] = sum of grad_y over the rows of e (a deterministic wgrad GEMM), fp32; the cpu backend
    adds the bias after its kernel (reference.add_expert_bias): the same values."""
    g = torch.Generator().manual_seed(3)
    E, N, K, M = 5, 6, 8, 40
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    bias = torch.randn(E, N, generator=g, requires_grad=True)
    offsets = random_offsets(M - 3, E, seed=3)             # 3 rows of no expert
    with mk.use_backend(backend):
        y = mk.grouped_gemm(x, w, offsets, bias)
        grad_y = torch.randn(M, N, generator=g)
        (grad_bias,) = torch.autograd.grad(y, bias, grad_y)
    torch.testing.assert_close(y, R.grouped_gemm(x, w, offsets, bias.detach()), atol=1e-5, rtol=1e-5)
    assert not y[offsets[-1]:].any()
    want = torch.stack([grad_y[lo:hi].sum(0) for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    torch.testing.assert_close(grad_bias, want, atol=1e-5, rtol=1e-5)


def test_gradcheck_grouped_mlp():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=F64, requires_grad=True)
    w_gate_up = (torch.randn(3, 8, 6, generator=g, dtype=F64) / 2).requires_grad_()
    w_down = (torch.randn(3, 6, 4, generator=g, dtype=F64) / 2).requires_grad_()
    row_scale = torch.rand(8, generator=g, dtype=F64).add(0.5).requires_grad_()
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    with mk.use_backend("reference"):
        # the reference's SwiGLU runs in fp32 (by contract): fp32-level finite-difference tolerances
        assert torch.autograd.gradcheck(
            lambda *a: torch.ops.moge.grouped_mlp(*a[:3], offsets, a[3]),
            (x, w_gate_up, w_down, row_scale), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_gradcheck_grouped_combine():
    g = torch.Generator().manual_seed(2)
    T, K, H = 5, 3, 7
    expert_out = torch.randn(T * K, H, generator=g, dtype=F64, requires_grad=True)
    weights = torch.rand(T, K, generator=g, dtype=F64, requires_grad=True)
    shared = torch.randn(T, H, generator=g, dtype=F64, requires_grad=True)
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K)
    with mk.use_backend("reference"):
        # bilinear, so a wide step is exact; the fp32 accumulation sets the tolerance
        assert torch.autograd.gradcheck(
            lambda a, b, c: torch.ops.moge.grouped_combine(a, b, row_index, c),
            (expert_out, weights, shared), eps=1e-2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opts", [dict(), dict(renormalize=True), dict(score_func="sigmoid"),
                                  dict(score_func="sigmoid", renormalize=True)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "softmax")
def test_gradcheck_grouped_dispatch(opts):
    g = torch.Generator().manual_seed(3)
    T, E, H, G = 4, 8, 5, 2
    hidden = torch.randn(T, H, generator=g, dtype=F64, requires_grad=True)
    # well separated logits: the finite-difference steps never change which experts are picked
    logits = (torch.randperm(T * E, generator=g).view(T, E).to(F64) / 4).requires_grad_()
    scale = torch.rand(E, generator=g, dtype=F64).add(0.5).requires_grad_()

    def fn(h, l, s):
        permuted, weights, *_ = torch.ops.moge.grouped_dispatch(h, l, G, 2, s, **opts)
        return permuted, weights

    with mk.use_backend("reference"):
        # routing weights are fp32 by contract: fp32-level tolerances
        assert torch.autograd.gradcheck(fn, (hidden, logits, scale), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_gradcheck_primitives_fp64():
    """The backward primitives compute in fp64 for fp64 inputs: default gradcheck tolerances."""
    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(6, 8, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.moge.swiglu, (gate_up,))
    # swiglu_backward is the exact derivative of swiglu
    grad_h = torch.randn(6, 4, generator=g, dtype=F64)
    (expected,) = torch.autograd.grad(R.swiglu(gate_up), gate_up, grad_h)
    got = torch.ops.moge.swiglu_backward(grad_h, gate_up.detach())[0]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_route_backward_matches_autograd():
    g = torch.Generator().manual_seed(5)
    T, E, G, k_g = 6, 8, 2, 2
    for renormalize in (False, True):
        for score_func in ("softmax", "sigmoid"):
            logits = torch.randn(T, E, generator=g, dtype=F64, requires_grad=True)
            scale = torch.rand(E, generator=g, dtype=F64).add(0.5).requires_grad_()
            w, ids = _torch_route(logits, G, k_g, scale, renormalize, score_func)
            gw = torch.randn(T, G * k_g, generator=g, dtype=F64)
            exp_logits, exp_scale = torch.autograd.grad(w, (logits, scale), gw)
            got_logits, got_scale = AG.route_backward(gw, logits.detach(), ids.int(), scale.detach(),
                                                      renormalize, score_func)
            torch.testing.assert_close(got_logits, exp_logits, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(got_scale, exp_scale, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------- backends vs reference
def _cpu_backends():
    return [b for b in ("cpu", "reference") if mk.backends()[b]["available"]]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("recompute", [True, False])
def test_fp32_backend_grads_match_reference(backend, recompute):
    T, E, G, k_g, H, I, opts = 12, 16, 4, 2, 20, 12, dict(renormalize=True, scale=True)
    tensors, kw = _routing_case(T, E, G, k_g, H, I, opts)
    fn = _bind(G, k_g, kw, _moge_ops, True, recompute=recompute)
    with mk.use_backend("reference"):
        exp_out, exp_grads = _grads(fn, tensors)
    with mk.use_backend(backend):
        out, grads = _grads(fn, tensors)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def _primitive_cases(dtype, device="cpu"):
    """(op, args) of every primitive: ragged offsets with empty experts, M=0, M=1, odd sizes,
    non-contiguous operands."""
    g = torch.Generator().manual_seed(6)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    cases = []
    for M, E, N, Kd in [(0, 3, 8, 12), (1, 4, 8, 12), (37, 5, 24, 20), (50, 3, 33, 17)]:
        offsets = random_offsets(M, E, seed=M, device=device)
        wide = rnd(M, 2 * N)
        grad_y = wide[:, ::2]                       # non-contiguous rows
        x = rnd(M, Kd)
        w = rnd(E, Kd, N).transpose(1, 2)           # non-contiguous [E, N, Kd]
        cases.append(("grouped_gemm_dgrad", (grad_y, w, offsets)))
        cases.append(("grouped_gemm_wgrad", (grad_y, x, offsets)))
    for M, I in [(0, 4), (1, 6), (29, 12), (17, 37)]:
        gate_up = rnd(M, 2 * I)
        grad_h = rnd(M, I)
        scale = torch.rand(M, generator=g).add(0.5).to(device)
        cases.append(("swiglu", (gate_up,)))
        cases.append(("swiglu_backward", (grad_h, gate_up, None, False)))
        cases.append(("swiglu_backward", (grad_h, gate_up, scale, True)))
    for T, K, H in [(0, 2, 8), (1, 8, 12), (9, 3, 20), (6, 4, 33)]:
        row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K).to(device)
        weights = torch.rand(T, K, generator=g).to(device)
        cases.append(("grouped_combine_backward", (rnd(T, H), rnd(T * K, H), weights, row_index, True)))
        cases.append(("grouped_combine_backward", (rnd(T, H), rnd(0, H), weights, row_index, False)))
    return cases


def _primitive_close(got, exp, dtype):
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    got = got if isinstance(got, (tuple, list)) else (got,)
    exp = exp if isinstance(exp, (tuple, list)) else (exp,)
    for a, b in zip(got, exp):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_primitives_match_reference(dtype):
    device = "cuda" if HAS_CUDA else "cpu"
    for op, args in _primitive_cases(dtype, device):
        with mk.use_backend("reference"):
            exp = getattr(torch.ops.moge, op)(*args)
        with mk.use_backend("triton"):
            got = getattr(torch.ops.moge, op)(*args)
        _primitive_close(got, exp, dtype)


@requires_triton
def test_triton_layer_grads_fp32_and_fp16():
    T, E, G, k_g, H, I, opts = 6, 8, 4, 1, 20, 12, dict(scale=True)
    device = "cuda" if HAS_CUDA else "cpu"
    tensors, kw = _routing_case(T, E, G, k_g, H, I, opts, device=device)
    fn = _bind(G, k_g, kw, _moge_ops, True, recompute=False)     # saved gate_up: swiglu_backward
    fn_rc = _bind(G, k_g, kw, _moge_ops, True, recompute=True)   # grouped_mlp: recompute + row path
    with mk.use_backend("reference"):
        exp_out, exp_grads = _grads(fn, tensors)
    with mk.use_backend("triton"):
        out, grads = _grads(fn, tensors)
    torch.testing.assert_close(out, exp_out, atol=1e-4, rtol=1e-4)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # fp16: error against the fp32 gradients within 2x the reference backend's own fp16 error
    half = [_leaf(t) if i == 1 else _leaf(t, torch.float16) for i, t in enumerate(tensors)]  # fp32 logits
    with mk.use_backend("reference"):
        _, ref16 = _grads(fn_rc, half)
    with mk.use_backend("triton"):
        _, got16 = _grads(fn_rc, half)
    for name, g, r, e in zip(["hidden", "logits", "w_gate_up", "w_down", "scale"], got16, ref16, exp_grads):
        err, ref_err = relative_error(g, e), relative_error(r, e)
        assert err <= 2 * ref_err + 1e-3, f"{name}: {err:.2e} vs reference fp16 {ref_err:.2e}"


def test_grouped_mm_layouts_on_cpu():
    """The torch._grouped_mm calls used on Hopper, checked on the CPU build of the same op."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    from moge_kernels import _grouped_mm as GM
    g = torch.Generator().manual_seed(7)
    M, E, N, Kd = 40, 5, 16, 24
    offsets = torch.tensor([0, 10, 10, 30, 30, 40], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        grad_y = torch.randn(M, N, generator=g).to(dtype)
        x = torch.randn(M, Kd, generator=g).to(dtype)
        w = torch.randn(E, N, Kd, generator=g).to(dtype)
        try:
            dx = GM.grouped_mm_dgrad(grad_y, w, offsets)
            dw = GM.grouped_mm_wgrad(grad_y, x, offsets)
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"torch._grouped_mm on CPU: {err}")
        _primitive_close(dx, R.grouped_gemm_dgrad(grad_y, w, offsets), dtype)
        _primitive_close(dw, R.grouped_gemm_wgrad(grad_y, x, offsets), dtype)
    empty = GM.grouped_mm_wgrad(grad_y[:0], x[:0], torch.zeros(E + 1, dtype=torch.int32))
    assert empty.shape == (E, N, Kd) and not empty.any()


def test_non_differentiable_outputs_and_unused_grads():
    hidden, logits = make_routing_inputs(5, 8, 6)
    hidden, logits = _leaf(hidden), _leaf(logits)
    permuted, weights, ids, offsets, row_index = torch.ops.moge.grouped_dispatch(hidden, logits, 4)
    assert permuted.requires_grad and weights.requires_grad
    assert not (ids.requires_grad or offsets.requires_grad or row_index.requires_grad)
    weights.sum().backward()                        # permuted unused: no gradient for hidden
    assert hidden.grad is None and logits.grad is not None
    # gradient only w.r.t. the routing weights of combine: expert_out's gradient not requested
    w = _leaf(weights)
    eo = torch.randn(permuted.shape)
    torch.ops.moge.grouped_combine(eo, w, row_index).sum().backward()
    torch.testing.assert_close(w.grad, eo[row_index.long()].sum(-1))


# --------------------------------------------------------------------------------- opcheck
def _with_grad(args):
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


@pytest.mark.parametrize("op", PUBLIC)
def test_opcheck_requires_grad(op):
    # the autograd registration is the same for every backend: the reference one keeps this quick
    with mk.use_backend("reference"):
        for args, kwargs in sample_inputs("cpu")[op][-2:]:   # the non-empty, option-rich samples
            kwargs = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v)
                      for k, v in kwargs.items()}
            torch.library.opcheck(getattr(torch.ops.moge, op).default, _with_grad(args), kwargs)


@pytest.mark.parametrize("op", PRIMITIVES)
def test_opcheck_primitives(op):
    cases = [args for name, args in _primitive_cases(torch.float32) if name == op]
    for args in cases[1::2]:       # M/T = 1 and an odd size of each op
        torch.library.opcheck(getattr(torch.ops.moge, op).default, args)


def test_primitive_bad_input():
    x, w = torch.randn(6, 4), torch.randn(3, 5, 4)
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="w must be"):
        torch.ops.moge.grouped_gemm_dgrad(torch.randn(6, 4), w, offsets)
    with pytest.raises(ValueError, match="x has 5 rows"):
        torch.ops.moge.grouped_gemm_wgrad(torch.randn(6, 5), x[:5], offsets)
    with pytest.raises(ValueError, match="gate_up must be"):
        torch.ops.moge.swiglu(torch.randn(4, 5))
    with pytest.raises(ValueError, match="expert_out must have shape"):
        torch.ops.moge.grouped_combine_backward(torch.randn(2, 4), torch.randn(3, 4), torch.rand(2, 2),
                                                torch.zeros(2, 2, dtype=torch.int32), True)


# --------------------------------------------------------------------------------- GPU
def _oracle_f64(tensors, fn):
    """fp64 gradients of the same inputs (rounded values) through the reference backend."""
    wide = [_leaf(t, F64) for t in tensors]
    with mk.use_backend("reference"):
        return _grads(fn, wide)


@requires_cuda
@pytest.mark.parametrize("gemm_mode", ["auto", "triton"])
@pytest.mark.parametrize("recompute", [True, False])
def test_cuda_bf16_backward_vs_reference(recompute, gemm_mode):
    mk.set_options(bwd_gemm=gemm_mode)
    T, E, G, k_g, H, I = 256, 64, 8, 1, 512, 192
    tensors, kw = _routing_case(T, E, G, k_g, H, I, dict(scale=True), device="cuda")
    bf = [_leaf(t, torch.bfloat16) if i != 1 else _leaf(t) for i, t in enumerate(tensors)]
    fn = _bind(G, k_g, kw, _moge_ops, True, recompute=recompute)
    exact_out, exact = _oracle_f64(bf, _bind(G, k_g, kw, _moge_ops, True, recompute=True))
    with mk.use_backend("reference"):
        ref_out, ref = _grads(fn, bf)
    out, got = _grads(fn, bf)                      # auto: triton on CUDA
    assert relative_error(out, exact_out) <= 2 * relative_error(ref_out, exact_out) + 1e-3
    for name, g, r, e in zip(["hidden", "logits", "w_gate_up", "w_down", "scale"], got, ref, exact):
        err, ref_err = relative_error(g, e), relative_error(r, e)
        assert err <= 2 * ref_err + 2e-3, f"{name}: {err:.2e} vs reference bf16 {ref_err:.2e}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_primitives_vs_reference(dtype):
    for op, args in _primitive_cases(dtype, "cuda"):
        with mk.use_backend("reference"):
            exp = getattr(torch.ops.moge, op)(*args)
        got = getattr(torch.ops.moge, op)(*args)
        if dtype == torch.bfloat16:
            got = got if isinstance(got, (tuple, list)) else (got,)
            exp = exp if isinstance(exp, (tuple, list)) else (exp,)
            for a, b in zip(got, exp):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(a.float(), b.float(), atol=6e-2, rtol=3e-2)
        else:
            _primitive_close(got, exp, dtype)


@requires_cuda
def test_cuda_graph_capture_backward():
    """The backward launches no host sync: it records into a CUDA graph."""
    T, E, G, H, I = 64, 16, 4, 128, 64
    tensors, kw = _routing_case(T, E, G, 1, H, I, dict(scale=True), dtype=torch.bfloat16, device="cuda")
    tensors[1] = _leaf(tensors[1], torch.float32)
    fn = _bind(G, 1, kw, _moge_ops, True, recompute=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                # warm up off the default stream, as capture wants
        for _ in range(2):
            fn(*tensors).float().sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*tensors).float().sum().backward()
    graph.replay()
    torch.cuda.synchronize()


def test_registry_lists_primitives():
    assert set(PRIMITIVES) <= set(mk.registry.OPS)
    assert set(PRIMITIVES) <= set(mk.backends()["reference"]["ops"])
