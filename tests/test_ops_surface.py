"""The `torch.ops.moge` surface: opcheck, argument errors, the NaN policy, backend selection, compile."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import make_expert_weights, make_routing_inputs, sample_inputs

OPS = ["grouped_dispatch", "grouped_gemm", "grouped_mlp", "grouped_combine"]
CPU_BACKENDS = [b for b in ("cpu", "reference") if mk.backends()[b]["available"]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    with mk.use_backend(backend):
        for args, kwargs in sample_inputs("cpu")[op]:
            torch.library.opcheck(getattr(torch.ops.moge, op).default, args, kwargs)


# ------------------------------------------------------------------------------------ bad input
def _dispatch_args(T=4, E=8, H=6):
    hidden, logits = make_routing_inputs(T, E, H)
    return hidden, logits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mutate,exc,match", [
    (lambda h, l: (h[0], l, 2, 1), ValueError, "hidden must have 2 dimensions"),
    (lambda h, l: (h, l[:3], 2, 1), ValueError, "hidden has 4 tokens but router_logits has 3"),
    (lambda h, l: (h.int(), l, 2, 1), TypeError, "hidden must have dtype"),
    (lambda h, l: (h, l.long(), 2, 1), TypeError, "router_logits must have dtype"),
    (lambda h, l: (h, l, 3, 1), ValueError, "num_groups=3 must be >= 1 and divide"),
    (lambda h, l: (h, l, 0, 1), ValueError, "num_groups=0"),
    (lambda h, l: (h, l, 2, 5), ValueError, r"topk_per_group=5 must be in \[1, E/num_groups=4\]"),
    (lambda h, l: (h, l, 2, 0), ValueError, "topk_per_group=0"),
    (lambda h, l: (h, l.to("meta"), 2, 1), ValueError, "router_logits is on meta"),
])
def test_dispatch_bad_input(backend, mutate, exc, match):
    with mk.use_backend(backend), pytest.raises(exc, match=match):
        mk.grouped_dispatch(*mutate(*_dispatch_args()))


def test_dispatch_bad_options():
    hidden, logits = _dispatch_args()
    with pytest.raises(ValueError, match="score_func must be one of"):
        mk.grouped_dispatch(hidden, logits, 2, score_func="relu")
    with pytest.raises(ValueError, match=r"expert_scale must have shape \(8,\)"):
        mk.grouped_dispatch(hidden, logits, 2, expert_scale=torch.ones(7))


def test_score_func_reaches_kernels_as_its_int():
    """The check converts the name once; every backend's kernel gets the reference.ScoreFunc value."""
    from moge_kernels import checks
    hidden, logits = _dispatch_args()
    checked = checks.check_dispatch(hidden, logits, 2, 1, None, False, "sigmoid")
    assert checked[6] == int(R.ScoreFunc.SIGMOID) and type(checked[6]) is int
    assert checked[:6] == (hidden, logits, 2, 1, None, False) and checked[7] is None   # 7: expert_mask


@pytest.mark.skipif(not mk.backends()["cpu"]["available"], reason="C++ CPU extension not built")
def test_cpu_kernel_rejects_unknown_score_func_value():
    hidden, logits = _dispatch_args()
    kernel = torch.ops.moge_C.grouped_dispatch
    for code in (int(R.ScoreFunc.SOFTMAX), int(R.ScoreFunc.SIGMOID)):
        name = R.ScoreFunc(code).name.lower()
        for a, b in zip(kernel(hidden, logits, 2, 1, None, False, code),
                        R.grouped_dispatch(hidden, logits, 2, 1, None, False, name)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="cpu backend.*score_func 2"):
        kernel(hidden, logits, 2, 1, None, False, 2)


@pytest.mark.skipif(not mk.backends()["triton"]["available"], reason="no triton")
def test_triton_kernel_rejects_unknown_score_func_value():
    from moge_kernels.triton import dispatch as triton_dispatch
    hidden, logits = _dispatch_args()
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("triton needs CUDA or the interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, logits = hidden.to(device), logits.to(device)
    with pytest.raises(Exception) as err:
        triton_dispatch.grouped_dispatch(hidden, logits, 2, 1, None, False, 2)
    # Triton 3.6 reports a failed static_assert of a nested @jit function as a CompilationError of the
    # outer kernel, with the assertion's message in the exception's cause
    messages, exc = [], err.value
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("no branch for this score_func" in m for m in messages), messages


def test_dispatch_int32_overflow_is_caught_before_allocation():
    # 2^28 tokens x K=8 = 2^31 rows: checked on meta tensors, nothing is allocated
    hidden = torch.empty(2**28, 8, device="meta")
    logits = torch.empty(2**28, 64, device="meta")
    with pytest.raises(ValueError, match="overflow the int32 row indices"):
        torch.ops.moge.grouped_dispatch(hidden, logits, 8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gemm_bad_input(backend):
    x, w = torch.randn(6, 4), torch.randn(3, 5, 4)
    good = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    cases = [
        ((x, w, good.long()), TypeError, "expert_offsets must have dtype"),
        ((x, w, good[:3]), ValueError, r"expert_offsets must have shape \(4,\)"),
        ((x, w, torch.tensor([0, 3, 2, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
        ((x, w, torch.tensor([0, 2, 2, 7], dtype=torch.int32)), ValueError, "end at most at the row count 6"),
        ((x, w, torch.tensor([1, 2, 2, 6], dtype=torch.int32)), ValueError, "start at 0"),
        ((x, torch.randn(3, 5, 7), good), ValueError, "w must be"),
        ((x, w.half(), good), TypeError, "w must have dtype"),
        ((x[None], w, good), ValueError, "x must have 2 dimensions"),
        ((x, w, good, torch.randn(3, 4)), ValueError, r"bias must have shape \(3, 5\)"),
        ((x, w, good, torch.randn(5)), ValueError, "bias must have 2 dimensions"),
        ((x, w, good, torch.randn(3, 5).half()), TypeError, "bias must have dtype"),
        ((x, w, good, torch.randn(3, 5, device="meta")), ValueError, "bias is on meta"),
    ]
    with mk.use_backend(backend):
        for args, exc, match in cases:
            with pytest.raises(exc, match=match):
                mk.grouped_gemm(*args)


def test_mlp_bad_input():
    x, offsets = torch.randn(6, 4), torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    w_gate_up, w_down = torch.randn(3, 10, 4), torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"w_down must have shape \(3, 4, 5\)"):
        mk.grouped_mlp(x, w_gate_up, w_down[:, :, :4], offsets)
    with pytest.raises(ValueError, match="w_gate_up must be"):
        mk.grouped_mlp(x, torch.randn(3, 9, 4), w_down, offsets)
    with pytest.raises(ValueError, match=r"row_scale must have shape \(6,\)"):
        mk.grouped_mlp(x, w_gate_up, w_down, offsets, torch.ones(5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_combine_bad_input(backend):
    expert_out, weights = torch.randn(8, 3), torch.rand(4, 2)
    row_index = torch.arange(8, dtype=torch.int32).view(4, 2)
    with mk.use_backend(backend):
        with pytest.raises(ValueError, match=r"row_index values must lie in \[0, 8\)"):
            mk.grouped_combine(expert_out, weights, row_index + 1)
        with pytest.raises(ValueError, match="expert_out must have T\\*K = 8 rows"):
            mk.grouped_combine(expert_out[:7], weights, row_index)
        with pytest.raises(TypeError, match="row_index must have dtype"):
            mk.grouped_combine(expert_out, weights, row_index.long())
        with pytest.raises(ValueError, match=r"topk_weights must have shape \(4, 2\)"):
            mk.grouped_combine(expert_out, weights[:3], row_index)
        with pytest.raises(ValueError, match=r"shared_out must have shape \(4, 3\)"):
            mk.grouped_combine(expert_out, weights, row_index, torch.randn(4, 2))


def test_moge_forward_shared_weights_together():
    hidden, logits = _dispatch_args()
    w_gate_up, w_down = make_expert_weights(8, 6, 4)
    with pytest.raises(ValueError, match="given together"):
        mk.moge_forward(hidden, logits, w_gate_up, w_down, 2, shared_w_gate_up=torch.randn(8, 6))


def test_moge_forward_errors_name_its_own_arguments():
    """moge_forward checks what its caller passed, under those names, before any op runs."""
    hidden, logits = _dispatch_args()                        # T=4, E=8, H=6
    w_gate_up, w_down = make_expert_weights(8, 6, 4)
    cases = [
        (dict(w_gate_up=make_expert_weights(16, 6, 4)[0], w_down=make_expert_weights(16, 6, 4)[1]),
         ValueError, r"w_gate_up holds 16 experts but router_logits scores 8"),
        (dict(w_gate_up=torch.randn(8, 8, 5)), ValueError, r"w_gate_up must be \[E, 2I, H\] with H = hidden.shape\[1\] = 6"),
        (dict(w_down=torch.randn(8, 6, 3)), ValueError, r"w_down must have shape \(8, 6, 4\)"),
        (dict(w_gate_up=w_gate_up.half()), TypeError, "w_gate_up must have dtype"),
        (dict(shared_w_gate_up=torch.randn(10, 6), shared_w_down=torch.randn(6, 4)), ValueError,
         r"shared_w_down must have shape \(6, 5\)"),
        (dict(shared_w_gate_up=torch.randn(10, 7), shared_w_down=torch.randn(6, 5)), ValueError,
         r"shared_w_gate_up must be \[2\*Is, H\] with H = hidden.shape\[1\] = 6"),
        (dict(shared_w_gate_up=torch.randn(9, 6), shared_w_down=torch.randn(6, 4)), ValueError,
         r"shared_w_gate_up must be \[2\*Is, H\]"),
        (dict(shared_w_gate_up=torch.randn(10, 6)[None], shared_w_down=torch.randn(6, 5)), ValueError,
         "shared_w_gate_up must have 2 dimensions"),
        (dict(shared_w_gate_up=torch.randn(10, 6).double(), shared_w_down=torch.randn(6, 5)), TypeError,
         "shared_w_gate_up must have dtype"),
        (dict(hidden=hidden[None]), ValueError, "hidden must have 2 dimensions"),
        (dict(router_logits=logits[:, :4]), ValueError, "w_gate_up holds 8 experts but router_logits scores 4"),
    ]
    for change, exc, match in cases:
        args = dict(hidden=hidden, router_logits=logits, w_gate_up=w_gate_up, w_down=w_down, num_groups=2)
        args.update(change)
        with pytest.raises(exc, match=match):
            mk.moge_forward(**args)
    ok = mk.moge_forward(hidden, logits, w_gate_up, w_down, 2, shared_w_gate_up=torch.randn(10, 6),
                         shared_w_down=torch.randn(6, 5))
    assert ok.shape == (4, 6)


# ------------------------------------------------------------------------------------ NaN policy
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_nan_logits_never_give_out_of_range_ids(backend, score_func):
    T, E, G, H = 16, 64, 8, 8
    hidden, logits = make_routing_inputs(T, E, H, seed=2)
    logits[3, 5] = float("nan")          # one NaN expert
    logits[7] = float("nan")             # a whole NaN row
    logits[9, 8:16] = float("nan")       # a whole NaN group
    logits[11, 0] = float("inf")
    with mk.use_backend(backend):
        permuted, weights, ids, offsets, row_index = mk.grouped_dispatch(hidden, logits, G, 2,
                                                                         score_func=score_func)
    ref = R.grouped_dispatch(hidden, logits, G, 2, score_func=score_func)
    S = E // G
    assert (ids.long() // S == torch.arange(G).repeat_interleave(2)).all()    # each id in its group
    assert torch.equal(ids, ref[2]) and torch.equal(offsets, ref[3]) and torch.equal(row_index, ref[4])
    torch.testing.assert_close(weights, ref[1], equal_nan=True)
    assert torch.isfinite(weights[[0, 1, 2, 4]]).all()                        # untouched rows stay clean
    if score_func == "softmax":
        assert torch.isnan(weights[7]).all()


# ------------------------------------------------------------------------------------ registry
def test_backend_selection_and_report():
    report = mk.backends()
    assert set(report) == {"triton", "grouped_mm", "cuda", "cpu", "ascend", "reference"}
    assert report["reference"]["available"] and set(OPS) <= set(report["reference"]["ops"])
    for name, row in report.items():
        assert row["available"] or row["reason"], f"{name} is off without a reason"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mk.set_backend("fastest")
    before = mk.get_backend()   # "auto" unless MOGE_BACKEND is set
    with mk.use_backend("reference"):
        assert mk.resolve("grouped_gemm", "cpu")[0] == "reference"
        assert mk.get_backend() == "reference"
    assert mk.get_backend() == before
    off = [n for n, r in report.items() if not r["available"]]
    for name in off:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
            mk.set_backend(name)


def test_backend_env_var():
    code = "import moge_kernels as mk; print(mk.get_backend(), mk.resolve('grouped_combine', 'cpu')[0])"
    env = dict(os.environ, MOGE_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference", "reference"]


# ------------------------------------------------------------------------------------ compile
def test_compile_fullgraph_matches_eager():
    T, E, G, H, I = 24, 16, 4, 32, 8
    hidden, logits = make_routing_inputs(T, E, H, seed=4)
    w_gate_up, w_down = make_expert_weights(E, H, I)
    scale = torch.rand(E) + 0.5
    compiled = torch.compile(mk.moge_forward, fullgraph=True)
    out = compiled(hidden, logits, w_gate_up, w_down, G, 1, scale, True)
    torch.testing.assert_close(out, mk.moge_forward(hidden, logits, w_gate_up, w_down, G, 1, scale, True))
    # new data, same shapes: no recompilation needed, same answer as the reference
    hidden2, logits2 = make_routing_inputs(T, E, H, seed=5)
    torch.testing.assert_close(compiled(hidden2, logits2, w_gate_up, w_down, G, 1, scale, True),
                               R.moge_forward(hidden2, logits2, w_gate_up, w_down, G, 1, scale, True),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ package surface
def test_version_single_source_and_all():
    from moge_kernels import _version
    assert mk.__version__ == _version.__version__ and mk.__version__.count(".") >= 2
    pyproject = pytest.importorskip("setuptools.config.pyprojecttoml")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = pyproject.read_configuration(os.path.join(root, "pyproject.toml"))
    assert config["project"]["version"] == mk.__version__        # pyproject reads moge_kernels/_version.py
    for name in mk.__all__:
        assert hasattr(mk, name), name
    assert "pack_expert_weights" in mk.__all__ and "__version__" in mk.__all__


@pytest.mark.parametrize("fn", [mk.grouped_dispatch, mk.grouped_permute, mk.grouped_gemm, mk.grouped_mlp,
                                mk.grouped_combine, mk.moge_forward], ids=lambda f: f.__name__)
def test_api_docstrings_document_every_argument(fn):
    """help() shows each argument with its shape and dtype, and what comes back."""
    import inspect
    doc = inspect.getdoc(fn)
    assert "Args:" in doc and "Returns" in doc and "float32" in doc
    args_section = doc.split("Args:")[1]
    for name in inspect.signature(fn).parameters:
        assert name in args_section, f"{fn.__name__}: argument {name} is not documented"
    assert "[T, H]" in doc or "[M, " in doc                    # shapes, not just names


def test_cpp_checks_join_their_messages_without_iostreams():
    """csrc/moge.h says why: a TORCH_CHECK message that c10::str formats through an ostringstream (any
    message with a number) crashed the process on the H200 machine; MOGE_CHECK* join it as one string."""
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
                 if p.suffix in (".cpp", ".cu", ".cuh", ".h") and p.name != "moge.h"
                 and re.search(r"\bTORCH_CHECK(_VALUE|_TYPE|_INDEX)?\(", p.read_text())]
    assert not offenders, f"TORCH_CHECK outside csrc/moge.h (use MOGE_CHECK*): {offenders}"


@pytest.mark.skipif(not mk.backends()["cpu"]["available"], reason="cpu backend not built")
def test_cpp_check_messages_keep_their_numbers():
    hidden, logits = _dispatch_args()
    with pytest.raises(ValueError, match=r"num_groups=3 must be >= 1 and divide the number of experts E=\d+"):
        torch.ops.moge_C.grouped_dispatch(hidden, logits, 3, 1, None, False, 0)
