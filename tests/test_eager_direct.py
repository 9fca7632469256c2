"""The eager direct path (moge_kernels.ops.direct_call_allowed): a public op called with nothing to record
runs its device kernel without torch.ops' dispatcher; every other call goes through torch.ops. Observed by
counting calls of the device kernels (ops.DEVICE_KERNELS) and of torch.ops.moge.<op>, with results
compared bit for bit against the dispatcher path (eager_direct=False)."""
import cProfile
import pstats

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moge_kernels as mk
from moge_kernels import checks, ops
from moge_kernels.testing import make_expert_weights, make_routing_inputs

T, H, I, E, G = 5, 32, 16, 8, 2


def _inputs(requires_grad=False):
    hidden, logits = make_routing_inputs(T, E, H, seed=3)
    w_gate_up, w_down = make_expert_weights(E, H, I)
    if requires_grad:
        hidden.requires_grad_(True)
    return hidden, logits, w_gate_up, w_down


class _Counts:
    """Calls of each op through torch.ops ("ops"; not under a mode, which looks the op up there itself)
    and of its device kernel directly ("direct")."""

    def __init__(self, monkeypatch, through_ops=True):
        self.ops, self.direct = [], []
        for name in ("grouped_dispatch", "grouped_mlp", "grouped_combine", "grouped_permute", "swiglu"):
            if through_ops:
                monkeypatch.setattr(torch.ops.moge, name, self._counting(self.ops, name,
                                                                         getattr(torch.ops.moge, name)))
            monkeypatch.setitem(ops.DEVICE_KERNELS, name,
                                self._counting(self.direct, name, ops.DEVICE_KERNELS[name]))

    @staticmethod
    def _counting(log, name, fn):
        def call(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return call


def _layer_ops(hidden, logits, w_gate_up, w_down):
    permuted, weights, ids, offsets, row_index = mk.grouped_dispatch(hidden, logits, G)
    y = mk.grouped_mlp(permuted, w_gate_up, w_down, offsets)
    return permuted, weights, ids, offsets, row_index, y, mk.grouped_combine(y, weights, row_index)


def _equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert type(a) is type(b) and torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad_mode_no_requires_grad"])
def test_direct_when_nothing_to_record_and_bit_identical(monkeypatch, backend, context):
    if not mk.backends()[backend if backend != "auto" else "reference"]["available"]:
        pytest.skip(f"{backend} backend not available")
    mk.set_backend(backend)
    inputs = _inputs()
    guard = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
             "grad_mode_no_requires_grad": torch.enable_grad}[context]
    with guard():
        with mk.use_options(eager_direct=False):
            want = _layer_ops(*inputs)
        counts = _Counts(monkeypatch)
        got = _layer_ops(*inputs)
    assert counts.direct == ["grouped_dispatch", "grouped_mlp", "grouped_combine"] and counts.ops == []
    _equal(got, want)
    assert all(not t.requires_grad for t in got)


def test_layer_and_moge_forward_never_enter_torch_ops(monkeypatch):
    """moge_forward and MoGELayer under no_grad: every op direct (torch.ops.moge.* would raise)."""
    hidden, logits, w_gate_up, w_down = _inputs()
    layer = mk.MoGELayer(H, I, E, G, 1, shared_intermediate_size=8).eval()
    with torch.no_grad():
        want_fwd = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
        want_layer = layer(hidden)

        def entered(*args, **kwargs):
            raise AssertionError("the op path was entered")
        for name in ops.SCHEMAS:
            monkeypatch.setattr(torch.ops.moge, name, entered)
        assert torch.equal(mk.moge_forward(hidden, logits, w_gate_up, w_down, G), want_fwd)
        assert torch.equal(layer(hidden), want_layer)    # Parameters (requires_grad) under no_grad


def _python_calls(fn):
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return sum(stat[1] for stat in pstats.Stats(prof).stats.values())


def test_direct_path_does_less_host_work_per_layer():
    """The host work of one layer call, counted (not timed): Python and C function calls under cProfile.
    The dispatcher path runs torch.library's autograd wrapper for each op; the direct path none of it."""
    hidden, logits, w_gate_up, w_down = _inputs()
    call = lambda: mk.moge_forward(hidden, logits, w_gate_up, w_down, G)   # noqa: E731
    with torch.no_grad():
        call()
        direct = _python_calls(call)
        with mk.use_options(eager_direct=False):
            call()
            dispatched = _python_calls(call)
    # >= 3 calls saved per op, 3 ops (torch 2.13: 5+ per op; torch 2.11 on the H200 machine: 180 vs 192)
    assert direct <= dispatched - 3 * 3, (direct, dispatched)


def test_grad_goes_through_torch_ops(monkeypatch):
    hidden, logits, w_gate_up, w_down = _inputs(requires_grad=True)
    counts = _Counts(monkeypatch)
    out = _layer_ops(hidden, logits, w_gate_up, w_down)[-1]
    assert counts.direct == [] and counts.ops == ["grouped_dispatch", "grouped_mlp", "grouped_combine"]
    out.sum().backward()
    assert hidden.grad is not None


def test_off_switch(monkeypatch):
    counts = _Counts(monkeypatch)
    with torch.no_grad(), mk.use_options(eager_direct=False):
        _layer_ops(*_inputs())
    assert counts.direct == [] and len(counts.ops) == 3


def test_fake_tensor_mode_goes_through_torch_ops(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    counts = _Counts(monkeypatch, through_ops=False)
    with FakeTensorMode() as mode, torch.no_grad():
        hidden, logits, w_gate_up, w_down = (mode.from_tensor(t) for t in _inputs())
        out = _layer_ops(hidden, logits, w_gate_up, w_down)[-1]
    assert counts.direct == []
    assert out.shape == (T, H) and type(out).__name__ == "FakeTensor"


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_mode_sees_the_ops(monkeypatch):
    inputs = _inputs()
    with torch.no_grad():
        want = _layer_ops(*inputs)
        counts = _Counts(monkeypatch, through_ops=False)
        with _Recording() as mode:
            got = _layer_ops(*inputs)
    assert counts.direct == []
    assert any("moge.grouped_mlp" in name for name in mode.seen)
    _equal(got, want)


def test_compile_goes_through_torch_ops(monkeypatch):
    inputs = _inputs()
    with torch.no_grad():
        want = _layer_ops(*inputs)
    direct = []
    monkeypatch.setitem(ops.DEVICE_KERNELS, "grouped_combine",
                        _Counts._counting(direct, "grouped_combine", ops.DEVICE_KERNELS["grouped_combine"]))
    torch._dynamo.reset()
    compiled = torch.compile(lambda y, w, r: mk.grouped_combine(y, w, r), fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(want[5], want[1], want[4])
    torch._dynamo.reset()
    assert direct == []
    assert torch.equal(got, want[6])


def test_schema_types_and_errors_are_the_dispatchers(monkeypatch):
    """Arguments of another type than the schema's (a float num_groups) take the dispatcher path, so the
    error is the dispatcher's; a check's error is the same either way."""
    hidden, logits, _, _ = _inputs()
    for direct in (True, False):
        with torch.no_grad(), mk.use_options(eager_direct=direct):
            with pytest.raises(Exception) as bad_type:
                mk.grouped_dispatch(hidden, logits, 2.0)
            with pytest.raises(ValueError, match="num_groups=3 must be >= 1 and divide"):
                mk.grouped_dispatch(hidden, logits, 3)
        if direct:
            direct_error = (type(bad_type.value), str(bad_type.value))
    assert direct_error == (type(bad_type.value), str(bad_type.value))


def test_direct_call_allowed_rule():
    x = torch.randn(4, 2)
    w = torch.randn(4, 1)
    r = torch.zeros(4, 1, dtype=torch.int32)
    args = (x, w, r, None)
    with torch.no_grad():
        assert ops.direct_call_allowed("grouped_combine", args)
        assert not ops.direct_call_allowed("grouped_combine", (x.to("meta"), w, r, None))   # fake kernel
        assert not ops.direct_call_allowed("grouped_combine", args[:3])                     # not all given
        with torch.device("cpu"):                                                           # a function mode
            assert not ops.direct_call_allowed("grouped_combine", args)

        class Sub(torch.Tensor):
            pass
        assert not ops.direct_call_allowed("grouped_combine", (x.as_subclass(Sub), w, r, None))
        p = torch.nn.Parameter(x)
        assert ops.direct_call_allowed("grouped_combine", (p, w, r, None))
    assert not ops.direct_call_allowed("grouped_combine", (torch.nn.Parameter(x), w, r, None))  # grad on
    assert torch.vmap(lambda xs: torch.tensor(ops.direct_call_allowed("grouped_combine", (xs, w, r, None)))
                      )(x[None]).item() is False


def test_argument_checks_cached_by_signature(monkeypatch):
    """Where checks read no values (GPU tensors without MOGE_VALIDATE: here simulated), a repeated
    signature is checked once; a failing one raises every call; validate=True checks every call."""
    monkeypatch.setattr(checks, "_should_check_values", lambda t: checks.validate_values())   # as on GPUs
    monkeypatch.setattr(ops, "_checked", {})
    runs = []
    check = ops.ARG_CHECKS["grouped_dispatch"]

    def counting(*args):
        runs.append(1)
        return check(*args)
    monkeypatch.setitem(ops.ARG_CHECKS, "grouped_dispatch", counting)
    hidden, logits, _, _ = _inputs()
    with torch.no_grad():
        first = mk.grouped_dispatch(hidden, logits, G, score_func="sigmoid")
        again = mk.grouped_dispatch(hidden, logits, G, score_func="sigmoid")   # converted name cached too
        assert len(runs) == 1
        _equal(again, first)
        for _ in range(2):
            with pytest.raises(ValueError, match="topk_per_group=9"):
                mk.grouped_dispatch(hidden, logits, G, 9)
        assert len(runs) == 3
        with mk.use_options(validate=True):
            mk.grouped_dispatch(hidden, logits, G, score_func="sigmoid")
            mk.grouped_dispatch(hidden, logits, G, score_func="sigmoid")
        assert len(runs) == 5


def test_layer_check_cached_and_its_errors_kept(monkeypatch):
    """moge_forward's own check (checks.check_layer_weights) goes through the same cache: once per
    signature where values are not read, and a bad call raises the same error every time."""
    monkeypatch.setattr(checks, "_should_check_values", lambda t: checks.validate_values())   # as on GPUs
    monkeypatch.setattr(ops, "_checked", {})
    runs = []
    check = checks.check_layer_weights

    def counting(*args, **kwargs):
        runs.append(1)
        return check(*args, **kwargs)
    monkeypatch.setattr(checks, "check_layer_weights", counting)
    hidden, logits, w_gate_up, w_down = _inputs()
    with torch.no_grad():
        want = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
        assert torch.equal(mk.moge_forward(hidden, logits, w_gate_up, w_down, G), want)
        assert len(runs) == 1
        for _ in range(2):
            with pytest.raises(ValueError, match="w_gate_up holds 8 experts but router_logits scores 4"):
                mk.moge_forward(hidden, logits[:, :4], w_gate_up, w_down, G)
        assert len(runs) == 3


def test_fp8_mlp_dtype_argument_takes_the_direct_path():
    """grouped_mlp_fp8's `ScalarType? out_dtype` (Optional[int] in the schema) accepts a torch.dtype or None
    on the direct path; anything else goes through torch.ops, whose schema parsing decides."""
    x = torch.zeros(4, 8)
    tensors = (x, torch.zeros(2, 8, 8), torch.ones(1, 1), torch.zeros(2, 8, 4), torch.ones(1, 1),
               torch.zeros(3, dtype=torch.int32), None, 128, 128)
    for out_dtype in (None, torch.bfloat16):
        assert ops.direct_call_allowed("grouped_mlp_fp8", tensors + (torch.ones(4, 1), out_dtype))
    assert not ops.direct_call_allowed("grouped_mlp_fp8", tensors + (torch.ones(4, 1), 15))


@pytest.mark.parametrize("bad", [2**63, -2**63 - 1, 2**64])
def test_ints_past_int64_raise_the_dispatchers_error(bad):
    """A schema int is an int64: torch.ops rejects a larger Python int while parsing the schema, so the
    direct path must leave it to torch.ops (it went to the check, or to the C++ kernel's own parsing)."""
    hidden, logits, _, _ = _inputs()
    ids = torch.zeros(T, 1, dtype=torch.int32)
    errors = []
    for direct in (False, True):
        with torch.no_grad(), mk.use_options(eager_direct=direct):
            for call in (lambda: mk.grouped_permute(hidden, ids, bad),
                         lambda: mk.grouped_dispatch(hidden, logits, bad)):
                with pytest.raises(Exception) as error:
                    call()
                errors.append((type(error.value), str(error.value)))
    assert errors[:2] == errors[2:] and "moge::grouped_permute()" in errors[0][1]


@pytest.mark.parametrize("context", ["autocast", "inference_tensors"])
def test_autocast_and_inference_tensors_same_as_torch_ops(monkeypatch, context):
    """torch.autocast (no autocast kernel: the dispatcher falls through to the same kernel, which runs
    under autocast either way) and inference tensors used outside inference_mode with grad on: direct,
    and the same outputs (values, dtypes, inference-ness) as through torch.ops."""
    if context == "inference_tensors":
        with torch.inference_mode():
            inputs = tuple(t.clone() for t in _inputs())
        guard = torch.enable_grad
    else:
        inputs = _inputs()
        guard = lambda: torch.autocast("cpu", dtype=torch.bfloat16)   # noqa: E731
    with guard():
        with mk.use_options(eager_direct=False):
            want = _layer_ops(*inputs)
        counts = _Counts(monkeypatch)
        got = _layer_ops(*inputs)
    assert counts.ops == [] and len(counts.direct) == 3
    _equal(got, want)
    assert [t.is_inference() for t in got] == [t.is_inference() for t in want]


def test_cached_check_never_passes_what_the_full_check_rejects(monkeypatch):
    """Random calls (views with other strides and storage offsets, None or a tensor, bools for ints, bad
    score_func names, wrong dtypes and shapes) through the signature cache as on GPUs: each call's
    outcome (error, or the converted arguments) is the full check's."""
    import random
    monkeypatch.setattr(checks, "_should_check_values", lambda t: checks.validate_values())   # as on GPUs
    monkeypatch.setattr(ops, "_checked", {})
    rng = random.Random(0)
    pick = rng.choice

    def tensor(shape, dtype=torch.float32):
        base = torch.zeros([s + pick((0, 2)) for s in shape], dtype=dtype)
        view = base[tuple(slice(o, o + s) for s, o in zip(shape, (pick((0, 1)) for _ in shape)))]
        return view.t() if view.dim() == 2 and pick((False, True)) and shape[0] == shape[1] else view

    def outcome(fn):
        try:
            result = fn()
        except (TypeError, ValueError) as error:
            return type(error), str(error)
        return None if result is None else tuple(id(a) if isinstance(a, torch.Tensor) else a for a in result)
    for _ in range(1500):
        e, t, h, i, k = pick((4, 8)), pick((0, 1, 3)), pick((8, 16)), pick((4, 8)), pick((1, 2))
        dt = pick((torch.float32, torch.float16, torch.float64))
        op = pick(("grouped_dispatch", "grouped_permute", "grouped_mlp", "grouped_combine", "moge_forward"))
        x = tensor((t, h), dt)
        if op == "grouped_dispatch":
            logits = tensor((t, pick((e, e + 1))), pick((dt, torch.float32)))
            scale = pick((None, tensor((e,)), tensor((e + 1,))))
            mask = pick((None, tensor((e,), torch.bool), tensor((e,))))
            args = (x, logits, pick((1, 2, 3, True)), pick((1, 2, 5, True)), scale, pick((False, True)),
                    pick(("softmax", "sigmoid", "tanh")), mask)
        elif op == "grouped_permute":
            ids = tensor((pick((t, t + 1)), k), pick((torch.int32, torch.int64, torch.float32)))
            args = (x, ids, pick((e, 0, True)))
        elif op == "grouped_mlp":
            w_gate_up = tensor((e, pick((2 * i, 2 * i + 1)), h), dt)
            offsets = tensor((pick((e + 1, e)),), pick((torch.int32, torch.int64)))
            args = (x, w_gate_up, tensor((e, h, pick((i, i + 1))), dt), offsets,
                    pick((None, tensor((t,)), tensor((t + 1,)))))
        elif op == "grouped_combine":
            expert_out = tensor((pick((t * k, t * k + 1)), h), dt)
            shared_out = pick((None, tensor((t, h), dt), tensor((t, h + 1), dt)))
            args = (expert_out, tensor((t, k), pick((torch.float32, dt))),
                    tensor((t, k), pick((torch.int32, torch.int64))), shared_out)
        else:
            shared = pick((None, tensor((2 * i, h), dt)))
            args = (x, tensor((t, pick((e, e + 1)))), tensor((e, 2 * i, h), dt),
                    tensor((e, h, i), pick((dt, torch.float32))), shared,
                    pick((None, shared, tensor((h, i), dt))))
        check = checks.check_layer_weights if op == "moge_forward" else ops.ARG_CHECKS[op]
        assert outcome(lambda: ops.cached_check(op, check, args)) == outcome(lambda: check(*args)), (op, args)
    assert 0 < len(ops._checked) <= ops.MAX_CHECKED


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_gpu_that_is_not_current():
    """A layer on cuda:1 while cuda:0 is current (device_map="auto"): same results as with cuda:1 current."""
    hidden, logits, w_gate_up, w_down = (t.to("cuda:1", torch.bfloat16) for t in _inputs())
    logits = logits.float()
    with torch.cuda.device(1):
        want = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
    with torch.cuda.device(0):
        got = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
    assert got.device == hidden.device
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- the layer's direct composition
# ops.compose_layer calls the ops' device kernels itself (ops._compose_direct) where nothing records the
# call: one eligibility test and, where checks read no values, one signature lookup per layer call.
_LAYER_CASES = {   # compose_layer's routing and shared-expert variants
    "plain": dict(),
    "shared_scaled_sigmoid": dict(shared=True, scale=True, score_func="sigmoid", renormalize=True),
    "masked_topk2": dict(topk_per_group=2, mask=True, shared=True),
}


def _layer_inputs(case, dtype=torch.float32):
    hidden, logits, w_gate_up, w_down = _inputs()
    hidden, w_gate_up, w_down = hidden.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
    g = torch.Generator().manual_seed(5)
    kw = dict(topk_per_group=case.get("topk_per_group", 1), renormalize=case.get("renormalize", False),
              score_func=case.get("score_func", "softmax"))
    if case.get("scale"):
        kw["expert_scale"] = torch.rand(E, generator=g) + 0.5
    if case.get("mask"):
        kw["expert_mask"] = torch.tensor([True, True, False, True, True, False, True, True])
    if case.get("shared"):
        kw["shared_w_gate_up"] = (torch.randn(2 * 8, H, generator=g) / H ** 0.5).to(dtype)
        kw["shared_w_down"] = (torch.randn(H, 8, generator=g) / 8 ** 0.5).to(dtype)
    return (hidden, logits, w_gate_up, w_down, G), kw


def _count_direct_compositions(monkeypatch):
    calls = []
    compose = ops._compose_direct

    def counting(*args):
        calls.append(1)
        return compose(*args)
    monkeypatch.setattr(ops, "_compose_direct", counting)
    return calls


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", list(_LAYER_CASES))
def test_layer_direct_composition_bit_identical_to_torch_ops(monkeypatch, backend, case):
    """moge_forward and MoGELayer through the direct composition give the torch.ops route's outputs bit
    for bit (eager_direct off: every op through the dispatcher), on the CPU backends and through the
    Triton interpreter."""
    if not mk.backends()[backend]["available"]:
        pytest.skip(f"{backend} backend not available")
    mk.set_backend(backend)
    args, kw = _layer_inputs(_LAYER_CASES[case])
    layer = mk.MoGELayer(H, I, E, G, kw["topk_per_group"], shared_intermediate_size=8 if "shared_w_down" in kw else 0,
                         score_func=kw["score_func"], renormalize=kw["renormalize"]).eval()
    mask = kw.get("expert_mask")
    direct = _count_direct_compositions(monkeypatch)
    for context in (torch.no_grad, torch.inference_mode, torch.enable_grad):   # (no tensor requires grad)
        with context():
            with mk.use_options(eager_direct=False):
                want = mk.moge_forward(*args, **kw)
                want_layer = layer(args[0], expert_mask=mask) if context is not torch.enable_grad else None
            assert direct == []
            got = mk.moge_forward(*args, **kw)
            assert len(direct) == 1
            assert torch.equal(got, want) and got.dtype == want.dtype
            if want_layer is not None:                       # the layer's parameters require grad
                assert torch.equal(layer(args[0], expert_mask=mask), want_layer)
                assert len(direct) == 2
            direct.clear()


def test_layer_direct_composition_never_enters_torch_ops_or_the_per_op_path(monkeypatch):
    """Under no_grad, moge_forward reaches the backends through ops._run_kernel only: no torch.ops call,
    no public op, no per-op device kernel."""
    args, kw = _layer_inputs(_LAYER_CASES["shared_scaled_sigmoid"])
    with torch.no_grad():
        want = mk.moge_forward(*args, **kw)
        counts = _Counts(monkeypatch)
        assert torch.equal(mk.moge_forward(*args, **kw), want)
    assert counts.ops == [] and counts.direct == []


@pytest.mark.parametrize("why", ["grad", "eager_direct_off", "profiler", "dispatch_mode", "packed_weights"])
def test_layer_per_op_path_where_something_records(monkeypatch, why):
    """The direct composition stays out of the way where an op would not be called directly: autograd,
    the switch off, the profiler (which keeps each op's record_function name), a dispatch mode; packed
    weights still take it (the kernels unpack them where they need to)."""
    args, kw = _layer_inputs(_LAYER_CASES["plain"])
    hidden, logits, w_gate_up, w_down, groups = args
    with torch.no_grad():
        want = mk.moge_forward(*args, **kw)
    direct = _count_direct_compositions(monkeypatch)
    with torch.no_grad() if why != "grad" else torch.enable_grad():
        if why == "grad":
            got = mk.moge_forward(hidden.clone().requires_grad_(True), logits, w_gate_up, w_down, groups)
        elif why == "eager_direct_off":
            with mk.use_options(eager_direct=False):
                got = mk.moge_forward(*args, **kw)
        elif why == "profiler":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = mk.moge_forward(*args, **kw)
            names = {e.key for e in prof.key_averages()}
            assert {"moge::grouped_dispatch", "moge::grouped_mlp", "moge::grouped_combine"} <= names
        elif why == "dispatch_mode":
            with _Recording():
                got = mk.moge_forward(*args, **kw)
        else:
            got = mk.moge_forward(hidden, logits, mk.pack_expert_weights(w_gate_up, 8),
                                  mk.pack_expert_weights(w_down, 8), groups)
    assert direct == ([1] if why == "packed_weights" else [])
    assert torch.equal(got.detach(), want)


def test_layer_checks_once_per_signature_and_errors_name_the_arguments(monkeypatch):
    """Where checks read no values (GPU tensors without MOGE_VALIDATE: here simulated) a repeated layer
    signature runs no check, not moge_forward's nor any op's; a new signature, and validate=True, run
    them all; a failing call raises the per-op path's error, naming the user's argument, every time."""
    monkeypatch.setattr(checks, "_should_check_values", lambda t: checks.validate_values())   # as on GPUs
    monkeypatch.setattr(ops, "_checked", {})
    monkeypatch.setattr(ops, "_layer_checked", {})
    runs = []

    def counting(name, check):
        def run(*args, **kwargs):
            runs.append(name)
            return check(*args, **kwargs)
        return run
    for name in ("grouped_dispatch", "grouped_mlp", "grouped_combine", "swiglu"):
        monkeypatch.setitem(ops.ARG_CHECKS, name, counting(name, ops.ARG_CHECKS[name]))
    monkeypatch.setattr(checks, "check_layer_weights", counting("layer", checks.check_layer_weights))
    args, kw = _layer_inputs(_LAYER_CASES["shared_scaled_sigmoid"])
    every = ["layer", "grouped_dispatch", "grouped_mlp", "swiglu", "grouped_combine"]
    with torch.no_grad():
        with mk.use_options(eager_direct=False):
            want = mk.moge_forward(*args, **kw)
        runs.clear()
        for _ in range(3):
            assert torch.equal(mk.moge_forward(*args, **kw), want)
        assert runs == every
        hidden, logits = args[0][:3], args[1][:3]                       # another signature: checked once
        mk.moge_forward(hidden, logits, *args[2:], **kw)
        mk.moge_forward(hidden, logits, *args[2:], **kw)
        assert runs == every * 2
        with mk.use_options(validate=True):
            mk.moge_forward(*args, **kw)
        assert runs == every * 3
        for direct in (True, False):
            with mk.use_options(eager_direct=direct):
                with pytest.raises(ValueError, match="w_gate_up holds 8 experts but router_logits scores 4"):
                    mk.moge_forward(args[0], args[1][:, :4], *args[2:], **kw)
                with pytest.raises(ValueError, match="topk_per_group=5 must be in"):
                    mk.moge_forward(*args, **dict(kw, topk_per_group=5))
                with pytest.raises(ValueError, match="shared_w_down must have shape"):
                    mk.moge_forward(*args, **dict(kw, shared_w_down=kw["shared_w_down"][:, :4]))


def test_moge_layer_training_path_unchanged(monkeypatch):
    """With gradients recorded MoGELayer saves gate_up and h (grouped_gemm -> swiglu -> grouped_gemm);
    recompute=True runs the fused grouped_mlp; without gradients the fused op runs either way."""
    hidden, _, _, _ = _inputs()
    counts = _Counts(monkeypatch)
    for recompute in (False, True):
        layer = mk.MoGELayer(H, I, E, G, 1, recompute=recompute)
        counts.ops.clear()
        layer(hidden).sum().backward()
        assert ("grouped_mlp" in counts.ops) == recompute and ("swiglu" in counts.ops) != recompute
        assert layer.w_gate_up.grad is not None
        counts.ops.clear()
        with torch.no_grad():
            layer(hidden)
        assert counts.ops == []
