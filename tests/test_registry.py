"""The backend registry (moge_kernels/registry.py): which kernel runs a call, per device, dtype and the
kernels' predicates, and what `explain` / `resolve` report about it."""
import types

import pytest
import torch

import moge_kernels as mk
from moge_kernels import ops, registry
from moge_kernels import reference as R
from moge_kernels.testing import make_expert_weights, make_routing_inputs, random_offsets

HAS_CPU = mk.backends()["cpu"]["available"]
HAS_TRITON = mk.backends()["triton"]["available"]
HAS_GROUPED_MM = mk.backends()["grouped_mm"]["available"]


def _gemm_args(dtype=torch.float32):
    x = torch.randn(7, 8).to(dtype)
    w = torch.randn(3, 5, 8).to(dtype)
    return x, w, random_offsets(7, 3, seed=1)


def _chain(op, device, dtype):
    return [k.backend for k in registry.candidates(op, device, dtype)]


# ------------------------------------------------------------------------------------ explain / resolve
@pytest.mark.skipif(not HAS_CPU, reason="C++ CPU extension not built")
def test_explain_names_the_backend_per_dtype():
    x, w, offsets = _gemm_args()
    info = mk.explain("grouped_gemm", x, w, offsets)
    assert (info["backend"], info["device"], info["dtype"]) == ("cpu", "cpu", "float32")
    assert info["candidates"] == [("cpu", "runs")] and info["selected"] == "auto"
    assert mk.resolve("grouped_gemm", x, w, offsets)[0] == "cpu"
    # float64: no C++ or GPU kernel registers it, the reference runs it
    x64, w64 = x.double(), w.double()
    assert mk.explain("grouped_gemm", x64, w64, offsets)["backend"] == "reference"
    assert mk.resolve("grouped_gemm", x64, w64, offsets)[0] == "reference"
    out = torch.ops.moge.grouped_gemm(x64, w64, offsets)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, R.grouped_gemm(x64, w64, offsets), atol=0, rtol=0)


def test_explain_fills_defaults_and_checks_like_the_op():
    hidden, logits = make_routing_inputs(4, 8, 6)
    info = mk.explain("grouped_dispatch", hidden, logits, 2, score_func="sigmoid")
    assert info["backend"] == ("cpu" if HAS_CPU else "reference")
    with pytest.raises(ValueError, match="score_func must be one of"):
        mk.explain("grouped_dispatch", hidden, logits, 2, score_func="relu")
    with pytest.raises(ValueError, match="unknown op"):
        mk.explain("grouped_gemmm", hidden)
    with mk.use_backend("reference"):
        info = mk.explain("grouped_dispatch", hidden, logits, 2)
        assert info["backend"] == "reference" and info["selected"] == "reference"
        assert info["candidates"][0] == ("reference", "runs")


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_named_backend_serves_its_dtypes_and_falls_through_for_float64():
    x, w, offsets = _gemm_args()
    with mk.use_backend("triton"):
        on_cpu = "cpu" in registry.kernel("triton", "grouped_gemm").devices   # TRITON_INTERPRET=1
        assert mk.explain("grouped_gemm", x, w, offsets)["backend"] == ("triton" if on_cpu else "cpu")
        assert mk.explain("grouped_gemm", x.double(), w.double(), offsets)["backend"] == "reference"
        assert _chain("grouped_gemm", "cuda", torch.float64) == ["reference"]
        assert _chain("grouped_gemm", "cuda", torch.bfloat16)[0] == "triton"


def test_device_form_of_resolve():
    for op in ops.SCHEMAS:
        assert mk.resolve(op, "meta")[0] == "reference"          # no backend runs on meta tensors
    assert mk.resolve("grouped_gemm", "cpu")[0] == ("cpu" if HAS_CPU else "reference")
    assert mk.resolve("grouped_dispatch", "cpu")[0] == ("cpu" if HAS_CPU else "reference")
    # the device form assumes the predicates hold: grouped_mm, though an fp16 call runs on triton
    g = torch.randn(16, 8, dtype=torch.float16)
    w = torch.randn(2, 8, 16, dtype=torch.float16)
    offsets = torch.tensor([0, 9, 16], dtype=torch.int32)
    if HAS_GROUPED_MM:
        assert mk.resolve("grouped_gemm_dgrad", "cuda")[0] == "grouped_mm"
    if HAS_TRITON and "cuda" in registry.kernel("triton", "grouped_gemm_dgrad").devices:
        assert [k.backend for k in registry.candidates("grouped_gemm_dgrad", "cuda", g.dtype)][0] == "triton"
    assert mk.resolve("grouped_gemm_dgrad", g, w, offsets)[0] == "reference"   # CPU: cpu has no dgrad


def test_float64_secondary_argument_needs_float64_first_argument():
    T, K, H = 3, 2, 4
    expert_out = torch.randn(T * K, H)
    row_index = torch.arange(T * K, dtype=torch.int32).view(T, K)
    with pytest.raises(TypeError, match="topk_weights is float64 but expert_out is torch.float32"):
        mk.grouped_combine(expert_out, torch.rand(T, K, dtype=torch.float64), row_index)
    out = mk.grouped_combine(expert_out.double(), torch.rand(T, K, dtype=torch.float64), row_index)
    assert out.dtype == torch.float64


# ------------------------------------------------------------------------------------ grouped_mm backend
def test_grouped_mm_is_never_chosen_on_cpu():
    for op in ("grouped_gemm_dgrad", "grouped_gemm_wgrad"):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            assert "grouped_mm" not in _chain(op, "cpu", dtype)
    g = torch.randn(16, 8, dtype=torch.bfloat16)
    w = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 9, 16], dtype=torch.int32)
    assert mk.explain("grouped_gemm_dgrad", g, w, offsets)["backend"] == "reference"


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm missing")
def test_grouped_mm_order_on_cuda():
    """bf16 only (its dtype capability), ahead of triton in auto; named backends come first."""
    for op in ("grouped_gemm_dgrad", "grouped_gemm_wgrad"):
        chain = _chain(op, "cuda", torch.bfloat16)
        # the chain ends at the first kernel without a predicate: the one that runs when grouped_mm declines
        assert chain[0] == "grouped_mm" and registry.kernel(chain[-1], op).supports is None
        if HAS_TRITON:
            assert chain[1] == "triton"
        assert "grouped_mm" not in _chain(op, "cuda", torch.float16)
        assert "grouped_mm" not in _chain(op, "cuda", torch.float32)
        assert _chain(op, "cuda", torch.float64) == ["reference"]
        with mk.use_backend("reference"):
            assert _chain(op, "cuda", torch.bfloat16) == ["reference"]
        with mk.use_options(bwd_gemm="triton"):
            assert "grouped_mm" not in _chain(op, "cuda", torch.bfloat16)
    assert registry.kernel("grouped_mm", "grouped_gemm") is None   # the backward GEMMs only


def _meta(shape, ptr=0, contiguous=True, index=0):
    """Tensor metadata the grouped_mm predicate reads, without a CUDA tensor."""
    return types.SimpleNamespace(shape=shape, data_ptr=lambda: ptr, is_contiguous=lambda: contiguous,
                                 device=torch.device("cuda", index))


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm missing")
def test_grouped_mm_predicate(monkeypatch):
    from moge_kernels import _grouped_mm as GM
    assert GM.arch_supported(9) and GM.arch_supported(10)
    assert not GM.arch_supported(8) and not GM.arch_supported(12)
    monkeypatch.setattr(GM, "_arch_ok", {0: True, 1: False})     # device 0 an H100, device 1 an A100
    offsets = None
    grad_y, w, x = _meta((64, 128)), _meta((4, 128, 256)), _meta((64, 256))
    assert GM.supports((grad_y, w, offsets)) and GM.supports((grad_y, x, offsets))
    assert not GM.supports((_meta((64, 120 + 4)), w, offsets))                 # N % 8
    assert not GM.supports((grad_y, _meta((4, 128, 252)), offsets))            # Kd % 8
    assert not GM.supports((_meta((64, 128), ptr=8), w, offsets))              # misaligned base
    assert GM.supports((_meta((64, 128), ptr=8, contiguous=False), w, offsets))   # copied: aligned
    assert not GM.supports((_meta((64, 128), index=1), w, offsets))            # not sm90/sm100
    # the capability is read once per device index, then cached
    assert GM._arch_ok == {0: True, 1: False}


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm missing")
def test_grouped_mm_refusal_runs_the_next_backend(monkeypatch):
    """A refusal torch._grouped_mm makes despite the predicate runs that call on the next backend, with a
    warning, and changes nothing for later calls (no sticky state)."""
    from moge_kernels import _grouped_mm as GM
    kernel = registry.kernel("grouped_mm", "grouped_gemm_wgrad")
    grad_y = torch.randn(16, 8, dtype=torch.bfloat16)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 9, 16], dtype=torch.int32)

    def refuse(*args, **kwargs):
        raise RuntimeError("layout not supported")
    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    before = GM.refused
    with pytest.warns(UserWarning, match="refused grouped_gemm_wgrad"):
        got = kernel.fn(grad_y, x, offsets)
    assert GM.refused == before + 1
    torch.testing.assert_close(got, R.grouped_gemm_wgrad(grad_y, x, offsets))
    assert _chain("grouped_gemm_wgrad", "cuda", torch.bfloat16)[0] == "grouped_mm"


# ------------------------------------------------------------------------------------ score functions
def test_dispatch_kernels_decline_score_funcs_they_lack():
    """A dispatch kernel registers the score functions it has a branch for; a call with another runs on
    the next backend (the reference has them all), so a new ScoreFunc works before every kernel has it."""
    only_softmax = ops.supports_score_funcs(R.ScoreFunc.SOFTMAX)
    hidden, logits = make_routing_inputs(4, 8, 6)
    args = (hidden, logits, 2, 1, None, False)
    assert only_softmax(args + (0,)) and not only_softmax(args + (1,)) and not only_softmax(args + (2,))
    if HAS_CPU:
        assert _chain("grouped_dispatch", "cpu", torch.float32) == ["cpu", "reference"]
        assert registry.select("grouped_dispatch", args + (1,)).backend == "cpu"
        # a value no kernel has a branch for (a ScoreFunc member added in Python only) declines to the
        # reference, which then names the missing formula instead of computing something else
        assert registry.select("grouped_dispatch", args + (7,)).backend == "reference"


# ------------------------------------------------------------------------------------ float64
def test_layer_double_forward_and_backward():
    torch.manual_seed(0)
    layer = mk.MoGELayer(hidden_size=16, intermediate_size=8, num_experts=8, num_groups=4,
                         topk_per_group=1, shared_intermediate_size=8).double()
    hidden = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out, aux = layer(hidden, return_aux_loss=True)
    assert out.dtype == torch.float64
    (out.pow(2).sum() + aux).backward()
    assert hidden.grad.dtype == torch.float64 and layer.w_gate_up.grad.dtype == torch.float64
    # the same layer in fp32 agrees to fp32 precision (routing and combine weights are fp32 by contract)
    layer32 = mk.MoGELayer(hidden_size=16, intermediate_size=8, num_experts=8, num_groups=4,
                           topk_per_group=1, shared_intermediate_size=8)
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(layer32(hidden.detach().float()), out.detach().float(), atol=1e-5, rtol=1e-5)


def test_gradcheck_grouped_permute_fp64():
    g = torch.Generator().manual_seed(8)
    T, K, H, E = 5, 2, 3, 4
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    ids[1, 0] = -1                                                      # a dropped slot
    assert torch.autograd.gradcheck(lambda h: torch.ops.moge.grouped_permute(h, ids, E)[0], (hidden,))


def test_gradcheck_fp64_under_the_default_backend():
    """float64 needs no backend choice and no widened checks: the registry runs it on the reference,
    which accumulates float64 in float64, so gradcheck holds at its default tolerances."""
    F64 = torch.float64
    g = torch.Generator().manual_seed(9)
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    x = torch.randn(8, 6, generator=g, dtype=F64, requires_grad=True)
    w_gate_up = (torch.randn(3, 8, 6, generator=g, dtype=F64) / 2).requires_grad_()
    w_down = (torch.randn(3, 6, 4, generator=g, dtype=F64) / 2).requires_grad_()
    row_scale = torch.rand(8, generator=g, dtype=F64).add(0.5).requires_grad_()
    assert mk.explain("grouped_mlp", x, w_gate_up, w_down, offsets)["backend"] == "reference"
    assert torch.autograd.gradcheck(lambda a, b: mk.grouped_gemm(a, b, offsets), (x, w_gate_up))
    assert torch.autograd.gradcheck(lambda *a: mk.grouped_mlp(*a[:3], offsets, a[3]),
                                    (x, w_gate_up, w_down, row_scale))
    assert torch.autograd.gradcheck(mk.swiglu, (torch.randn(5, 8, generator=g, dtype=F64, requires_grad=True),))
    T, K, H = 4, 2, 3
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K)
    expert_out = torch.randn(T * K, H, generator=g, dtype=F64, requires_grad=True)
    weights = torch.rand(T, K, generator=g, dtype=F64, requires_grad=True)
    shared = torch.randn(T, H, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: mk.grouped_combine(a, b, row_index, c),
                                    (expert_out, weights, shared))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backward_gemm_backends_on_cuda():
    """What runs each backward GEMM on this GPU, per dtype and layout, and that each computes the same."""
    sm = torch.cuda.get_device_capability()[0]
    offsets = torch.tensor([0, 40, 40, 128], dtype=torch.int32, device="cuda")
    for op in ("grouped_gemm_dgrad", "grouped_gemm_wgrad"):
        for dtype, n, expect in [(torch.bfloat16, 64, "grouped_mm" if sm in (9, 10) else "triton"),
                                 (torch.bfloat16, 60, "triton"),           # N % 8: 16-byte rows fail
                                 (torch.float16, 64, "triton"), (torch.float64, 64, "reference")]:
            grad_y = torch.randn(128, n, device="cuda").to(dtype)
            other = (torch.randn(3, n, 32, device="cuda") if op.endswith("dgrad")
                     else torch.randn(128, 32, device="cuda")).to(dtype)
            info = mk.explain(op, grad_y, other, offsets)
            backend = info["backend"]
            if backend != "reference" and not HAS_TRITON and expect == "triton":
                expect = "cuda" if mk.backends()["cuda"]["available"] else "reference"
            assert backend == expect, (op, dtype, n, info)
            got = getattr(torch.ops.moge, op)(grad_y, other, offsets)
            exp = getattr(R, op)(grad_y.double(), other.double(), offsets).to(dtype)
            torch.testing.assert_close(got.float(), exp.float(), atol=5e-2, rtol=2e-2)
            with mk.use_options(bwd_gemm="triton"):
                assert mk.explain(op, grad_y, other, offsets)["backend"] != "grouped_mm"


@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_explain_names_the_triton_gemm_variant():
    from moge_kernels.triton import gemm_configs
    if "cpu" not in registry.kernel("triton", "grouped_mlp").devices and not torch.cuda.is_available():
        pytest.skip("triton runs on neither CPU (interpreter) nor CUDA here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(6, 16, device=device)
    w_gate_up, w_down = torch.randn(3, 16, 16, device=device), torch.randn(3, 16, 8, device=device)
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int32, device=device)
    with mk.use_backend("triton"):
        info = mk.explain("grouped_mlp", x, w_gate_up, w_down, offsets)
        table = gemm_configs.table_config(6, 3, True, x.dtype, x.device)
        assert info["backend"] == "triton" and info["variant"].startswith(f"gate_up {table}, down ")
        notice = gemm_configs.table_notice(x.device)
        assert info["variant"].endswith(f"one stream ({notice})")   # fp32: never two streams
        assert mk.explain("grouped_gemm", x, w_gate_up, offsets)["variant"] == \
            f"config {gemm_configs.table_config(6, 3, False, x.dtype, x.device)} ({notice})"


def test_table_notice_names_the_fallback_for_an_unknown_card(monkeypatch):
    from moge_kernels.triton import gemm_configs
    names = {0: "NVIDIA H200", 1: "NVIDIA B200"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: names[index])
    gemm_configs.device_family.cache_clear()
    try:
        assert gemm_configs.table_notice(torch.device("cuda", 0)) == "H200 table"
        assert gemm_configs.table_notice(torch.device("cuda", 1)) == \
            "H100 table (no table for NVIDIA B200: nearest family)"
        assert gemm_configs.table_notice(torch.device("cpu")) == "interpreter config"
    finally:
        gemm_configs.device_family.cache_clear()
