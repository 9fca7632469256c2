"""Contract tests of the Ascend mapping: moge_kernels/ascend/adapter.py run on CPU, with torch
implementations of the documented torch_npu operators (tests/npu_contract_ops.py) in place of torch_npu,
must equal moge_kernels.reference.

What a pass means: the arguments, index conventions and count modes the adapter uses agree with the
operators' documentation (as npu_contract_ops.py reads it), over ragged shapes and dtypes. What it does not
mean: nothing here ran on an Ascend NPU or inside CANN; the kernels themselves are not tested.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import (TOLERANCES, assert_dispatch_equal, check_gemm_and_mlp, make_expert_weights,
                                  make_routing_inputs, make_topk_ids, sample_inputs)

import npu_contract_ops as npu

TESTS_DIR = Path(__file__).resolve().parent
ADAPTER_PATH = Path(mk.__file__).resolve().parent / "ascend" / "adapter.py"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (E, G, k_g): G divides E, k_g <= E/G; (64, 8, 1) is Pangu Pro MoE's routing
ROUTINGS = [(4, 2, 1), (4, 1, 2), (8, 4, 2), (8, 8, 1), (64, 8, 1), (64, 8, 2), (128, 8, 1), (128, 16, 2)]
STAND_INS = types.SimpleNamespace(**{name: getattr(npu, name) for name in npu.FAKE_OPERATORS})


def _load_adapter():
    """adapter.py on its own: importing it through the moge_kernels.ascend package would need torch_npu
    (the package raises ImportError without it, by design)."""
    spec = importlib.util.spec_from_file_location("moge_ascend_adapter_under_contract", ADAPTER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bind(STAND_INS)
    return module


A = _load_adapter()


# ----------------------------------------------------------------------------- the stand-ins themselves
def test_init_routing_stand_in_on_a_hand_computed_case():
    """3 tokens, K=2; flat ids [1, 2, 0, 1, 0, 2] -> stable sort by expert: flat slots [2, 4, 0, 3, 1, 5]."""
    x = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
    expert_idx = torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32)
    kwargs = dict(active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                  quant_mode=-1, active_expert_range=[0, 3])
    expanded_x, gather_map, counts, _ = npu.npu_moe_init_routing_v2(x, expert_idx, row_idx_type=0, **kwargs)
    _, scatter_map, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx, row_idx_type=1, **kwargs)
    assert torch.equal(expanded_x, x[[1, 2, 0, 1, 0, 2]])
    assert scatter_map.tolist() == [2, 4, 0, 3, 1, 5]
    assert gather_map.tolist() == [2, 4, 0, 3, 1, 5]      # this permutation is its own inverse ...
    assert counts.tolist() == [2, 2, 2] and counts.dtype == torch.int64
    expert_idx = torch.tensor([[2, 0], [1, 0], [0, 1]], dtype=torch.int32)   # ... this one is not
    _, gather_map, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx, row_idx_type=0, **kwargs)
    _, scatter_map, _, _ = npu.npu_moe_init_routing_v2(x, expert_idx, row_idx_type=1, **kwargs)
    assert scatter_map.tolist() == [1, 3, 4, 2, 5, 0]       # sorted slot of each expanded row
    assert gather_map.tolist() == [5, 0, 3, 1, 2, 4]        # expanded row of each slot: the contract's row_index


def test_unpermute_stand_in_on_the_documented_example():
    """aclnnMoeTokenUnpermute's sample: tokens [[1, 2], [3, 4]], indices [0, 1], probs [[1, 1]] -> [[4, 6]]."""
    out = npu.npu_moe_token_unpermute(torch.tensor([[1., 2.], [3., 4.]], dtype=torch.bfloat16),
                                      torch.tensor([0, 1], dtype=torch.int32),
                                      probs=torch.tensor([[1., 1.]], dtype=torch.bfloat16))
    assert out.tolist() == [[4.0, 6.0]] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(active_num=0), dict(expert_tokens_num_type=0),
                                 dict(expert_tokens_num_flag=False), dict(drop_pad_mode=1),
                                 dict(active_expert_range=[0, 9]), dict(quant_mode=0)])
def test_init_routing_stand_in_rejects_undocumented_calls(bad):
    x, idx = torch.randn(3, 4), torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32)
    kwargs = dict(active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                  quant_mode=-1, active_expert_range=[0, 3])
    with pytest.raises(npu.NpuContractError):
        npu.npu_moe_init_routing_v2(x, idx, **dict(kwargs, **bad))


def test_grouped_matmul_stand_in_rejects_default_group_type_and_transposed_x():
    x, w, group_list = torch.randn(4, 6), torch.randn(2, 6, 3), torch.tensor([1, 4])
    npu.npu_grouped_matmul([x], [w], group_list=group_list, split_item=2, group_type=0)
    with pytest.raises(npu.NpuContractError):      # group_type defaults to None, i.e. -1: no grouping
        npu.npu_grouped_matmul([x], [w], group_list=group_list, split_item=2)
    with pytest.raises(npu.NpuContractError):
        npu.npu_grouped_matmul([torch.randn(6, 4).t()], [w], group_list=group_list, split_item=2, group_type=0)


# ----------------------------------------------------------------------------- grouped_dispatch
@pytest.mark.parametrize("T", [0, 1, 2, 7, 33, 257])
@pytest.mark.parametrize("E,G,k_g", ROUTINGS)
def test_dispatch_contract(T, E, G, k_g):
    H = 20
    hidden, logits = make_routing_inputs(T, E, H, seed=T + E, dead_experts=5)
    assert_dispatch_equal(A.grouped_dispatch(hidden, logits, G, k_g), R.grouped_dispatch(hidden, logits, G, k_g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(renormalize=True), dict(score_func="sigmoid"),
                                     dict(expert_scale=True, renormalize=True)])
def test_dispatch_contract_options_and_dtypes(dtype, logits_dtype, options):
    T, E, G, k_g, H = 45, 64, 8, 2, 72
    hidden, logits = make_routing_inputs(T, E, H, dtype, logits_dtype=logits_dtype, seed=3)
    args = [hidden, logits, G, k_g, None, options.get("renormalize", False), options.get("score_func", "softmax")]
    if options.get("expert_scale"):
        args[4] = torch.rand(E) + 0.5
    assert_dispatch_equal(A.grouped_dispatch(*args), R.grouped_dispatch(*args))


def test_dispatch_contract_on_the_aclnn_v2_path():
    """E=128, H=2048 sends torch_npu to aclnnMoeInitRoutingV2, whose counts come back as int32."""
    T, E, G, H = 5, 128, 8, 2048
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, seed=1)
    assert npu._uses_init_routing_v2_kernel(H, E, [0, E], 1, -1)
    assert_dispatch_equal(A.grouped_dispatch(hidden, logits, G), R.grouped_dispatch(hidden, logits, G))


def test_dispatch_contract_non_contiguous_and_nan():
    T, E, G, H = 19, 16, 4, 24
    hidden = torch.randn(T, 2 * H)[:, ::2]
    logits = torch.randn(E, T).t().contiguous()
    logits[3] = float("nan")             # a whole NaN row
    logits[5, 2] = float("nan")          # one NaN logit (softmax makes the row NaN)
    logits = logits.t().contiguous().t()  # and non-contiguous
    assert not hidden.is_contiguous() and not logits.is_contiguous()
    for score_func in ("softmax", "sigmoid"):
        out = A.grouped_dispatch(hidden, logits, G, 2, None, False, score_func)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, 2, None, False, score_func))


def test_dispatch_contract_pins_the_row_index_convention():
    """The gather map (row_idx_type=0) is what the contract calls row_index; the other convention differs
    on this input, so the equality above would fail if the adapter asked for it."""
    T, E, G, H = 9, 8, 2, 4
    hidden, logits = make_routing_inputs(T, E, H, seed=4)
    _, _, ids, _, row_index = R.grouped_dispatch(hidden, logits, G)
    kwargs = dict(active_num=T * G, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                  quant_mode=-1, active_expert_range=[0, E])
    _, as_gather, _, _ = npu.npu_moe_init_routing_v2(hidden, ids, row_idx_type=0, **kwargs)
    _, as_scatter, _, _ = npu.npu_moe_init_routing_v2(hidden, ids, row_idx_type=1, **kwargs)
    assert torch.equal(as_gather.view(T, G), row_index)
    assert not torch.equal(as_scatter.view(T, G), row_index)


# ----------------------------------------------------------------------------- grouped_gemm / grouped_mlp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,E", [(0, 4), (1, 4), (37, 8), (300, 64)])
def test_gemm_and_mlp_contract(dtype, M, E):
    check_gemm_and_mlp(A.grouped_gemm, A.grouped_mlp, dtype, M, E)


def test_gemm_contract_non_contiguous_and_empty_experts():
    M, E, H, N = 29, 6, 16, 12
    x = torch.randn(H, M).t()                          # column-major x: the adapter must copy it
    w_views = [torch.randn(E, H, N).transpose(1, 2),   # [E, N, H] view of a contiguous [E, H, N]
               torch.randn(E, N, 2 * H)[:, :, ::2]]    # strided in its last dimension
    offsets = torch.tensor([0, 0, 10, 10, 10, 29, 29], dtype=torch.int32)   # four empty experts
    for w in w_views:
        torch.testing.assert_close(A.grouped_gemm(x, w, offsets), R.grouped_gemm(x, w, offsets))


# ----------------------------------------------------------------------------- grouped_permute
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H,drop", [(0, 2, 4, 8, 0.3), (1, 1, 1, 4, 0.0), (37, 8, 64, 20, 0.3),
                                          (50, 2, 3, 6, 1.0), (64, 8, 128, 2048, 0.2)])   # last: the V2 path?
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_contract(dtype, T, K, E, H, drop, id_dtype):
    hidden = torch.randn(T, H).to(dtype)
    ids = make_topk_ids(T, K, E, seed=T, dtype=id_dtype, drop=drop)
    for a, b in zip(A.grouped_permute(hidden, ids, E), R.permute(hidden, ids, E), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_permute_contract_non_contiguous_ids_and_out_of_range():
    """Transposed ids; ids outside [-1, E) (only reachable on the NPU without validation) act as dropped."""
    hidden = torch.randn(9, 5)
    ids = make_topk_ids(9, 3, 6, seed=1).t().contiguous().t()
    for a, b in zip(A.grouped_permute(hidden, ids, 6), R.permute(hidden, ids.contiguous(), 6)):
        assert torch.equal(a, b)
    wild = ids.clone()
    wild[0, 0], wild[3, 2] = 17, -4
    dropped = torch.where((wild >= 0) & (wild < 6), wild, -1)
    for a, b in zip(A.grouped_permute(hidden, wild, 6), R.permute(hidden, dropped, 6)):
        assert torch.equal(a, b)


def test_gemm_and_mlp_contract_rows_past_offsets():
    """Rows past expert_offsets[E] (dropped slots): zeros in both outputs, whatever the GMM left there."""
    M, E, H, I = 23, 3, 8, 4
    x = torch.randn(M, H)
    offsets = torch.tensor([0, 4, 4, 15], dtype=torch.int32)
    w_gate_up, w_down = make_expert_weights(E, H, I)
    row_scale = torch.rand(M)
    y, z = A.grouped_gemm(x, w_gate_up, offsets), A.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
    torch.testing.assert_close(y, R.grouped_gemm(x, w_gate_up, offsets))
    torch.testing.assert_close(z, R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale))
    assert not y[15:].any() and not z[15:].any()


def test_gemm_rejects_more_groups_than_the_npu_takes():
    with pytest.raises(ValueError, match="1024"):
        A.grouped_gemm(torch.randn(3, 4), torch.randn(1025, 2, 4), torch.zeros(1026, dtype=torch.int32))


# ----------------------------------------------------------------------------- grouped_combine
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,H", [(0, 8, 16), (1, 8, 20), (13, 2, 36), (64, 8, 72)])
def test_combine_contract(dtype, T, K, H):
    g = torch.Generator().manual_seed(T)
    expert_out = torch.randn(T * K, H, generator=g).to(dtype)
    weights = torch.rand(T, K, generator=g) + 0.01     # the kernel skips exact zeros; see the test below
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K)
    shared = torch.randn(T, H, generator=g).to(dtype)
    out = A.grouped_combine(expert_out, weights, row_index)
    # fp32 probs and fp32 accumulation in slot order, rounded once: the same arithmetic as the reference.
    assert torch.equal(out, R.grouped_combine(expert_out, weights, row_index)) and out.dtype == dtype
    out_shared = A.grouped_combine(expert_out, weights, row_index, shared)
    torch.testing.assert_close(out_shared, R.grouped_combine(expert_out, weights, row_index, shared),
                               **TOLERANCES[dtype])
    if dtype == torch.float32:
        assert torch.equal(out_shared, R.grouped_combine(expert_out, weights, row_index, shared))


def test_combine_contract_non_contiguous():
    T, K, H = 11, 4, 10
    expert_out = torch.randn(T * K, 2 * H)[:, :H]
    weights = torch.rand(K, T).t()
    row_index = torch.randperm(T * K).to(torch.int32).view(K, T).t()
    assert torch.equal(A.grouped_combine(expert_out, weights, row_index),
                       R.grouped_combine(expert_out, weights, row_index))


def test_combine_zero_weight_deviation_is_only_for_non_finite_rows():
    """npu_moe_token_unpermute skips a slot whose weight is exactly 0; the reference adds 0 * row. Equal for
    finite rows; for an inf row the reference gives NaN and the NPU mapping a finite value."""
    expert_out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("inf"), 5.0], [6.0, 7.0]])
    weights = torch.tensor([[0.5, 0.0], [0.0, 0.25]])
    row_index = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    out, ref = A.grouped_combine(expert_out, weights, row_index), R.grouped_combine(expert_out, weights, row_index)
    assert torch.equal(out[0], ref[0])
    assert torch.isnan(ref[1, 0]) and out[1].tolist() == [1.5, 1.75]


# ----------------------------------------------------------------------------- whole layer, shared samples
@pytest.mark.parametrize("dtype", DTYPES)
def test_moge_layer_contract(dtype):
    """Pangu Pro MoE's routing (E=64, G=8, k_g=1) with a small H and I, through all four adapter ops."""
    T, E, G, H, I = 40, 64, 8, 48, 16
    hidden, logits = make_routing_inputs(T, E, H, dtype, seed=7)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    scale = torch.rand(E) + 0.5
    permuted, weights, _, offsets, row_index = A.grouped_dispatch(hidden, logits, G, 1, scale)
    out = A.grouped_combine(A.grouped_mlp(permuted, w_gate_up, w_down, offsets), weights, row_index)
    ref = R.moge_forward(hidden, logits, w_gate_up, w_down, G, expert_scale=scale)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("op", ["grouped_dispatch", "grouped_permute", "grouped_gemm", "grouped_mlp",
                                "grouped_combine"])
def test_sample_inputs_contract(op):
    """The suite's shared ragged samples, with every argument passed positionally as the registry does."""
    schema_args = getattr(torch.ops.moge, op).default._schema.arguments
    for args, kwargs in sample_inputs("cpu")[op]:
        full = list(args) + [kwargs.get(a.name, a.default_value) for a in schema_args[len(args):]]
        out, ref = A.OPS[op](*full), getattr(R, op)(*args, **kwargs)
        for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------- plan and registration
def test_plan_prefers_python_and_falls_back_per_op():
    full = STAND_INS
    partial = types.SimpleNamespace(**{n: getattr(npu, n) for n in npu.FAKE_OPERATORS
                                       if n != "npu_moe_token_unpermute"})
    all_ops = set(A.REQUIRED_OPERATORS)
    assert A.plan(full, set()) == dict.fromkeys(all_ops, "python")
    assert A.plan(full, all_ops, prefer="cpp") == dict.fromkeys(all_ops, "cpp")
    assert A.plan(full, {"grouped_gemm"}, prefer="cpp")["grouped_mlp"] == "python"
    assert A.plan(partial, set())["grouped_combine"] is None
    assert A.plan(partial, {"grouped_combine"})["grouped_combine"] == "cpp"
    with pytest.raises(ValueError, match="MOGE_ASCEND_IMPL"):
        A.plan(full, set(), prefer="fast")


torch_npu_installed = importlib.util.find_spec("torch_npu") is not None


@pytest.mark.skipif(torch_npu_installed, reason="torch_npu is installed here")
def test_backend_reports_missing_torch_npu_quickly():
    report = mk.backends()["ascend"]
    assert not report["available"] and report["reason"] == "torch_npu is not installed"
    start = time.perf_counter()
    with pytest.raises(ImportError, match="torch_npu is not installed"):
        importlib.import_module("moge_kernels.ascend")
    assert time.perf_counter() - start < 0.5


@pytest.mark.skipif(torch_npu_installed, reason="a real torch_npu would shadow the stand-in package")
def test_registration_path_with_a_stand_in_torch_npu(tmp_path):
    """`import moge_kernels` with a stand-in `torch_npu` package (the real one needs CANN to import): the
    ascend backend registers every op for "npu", the moge ops get a PrivateUse1 kernel, and the kernel the
    registry resolves for "npu" computes the reference's result (on CPU tensors, through the stand-ins)."""
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import torch
        torch.utils.rename_privateuse1_backend("npu")   # what the real torch_npu does at import
        from npu_contract_ops import *  # noqa: F401,F403
        __version__ = "contract-stand-in"
    """))
    script = textwrap.dedent("""
        import torch
        import moge_kernels as mk
        from moge_kernels import reference as R
        from moge_kernels.testing import make_routing_inputs
        import moge_kernels.ascend as ascend
        ops = list(ascend.adapter.OPS)
        report = mk.backends()["ascend"]
        assert report["available"], report
        assert report["devices"] == ["npu"] and report["ops"] == ops, report
        assert ascend.PLAN == dict.fromkeys(ops, "python"), ascend.PLAN
        for op in ops:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moge::{op}", "PrivateUse1"), op
            assert mk.resolve(op, "npu")[0] == "ascend", op
        hidden, logits = make_routing_inputs(6, 64, 16, seed=2)
        out = mk.resolve("grouped_dispatch", "npu")[1](hidden, logits, 8, 1, None, False, "softmax")
        for a, b in zip(out, R.grouped_dispatch(hidden, logits, 8)):
            assert torch.equal(a, b)
        print("REGISTERED")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS_DIR),
                                                       os.environ.get("PYTHONPATH", "")]),
               TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    env.pop("MOGE_ASCEND_IMPL", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "REGISTERED" in result.stdout, result.stderr[-3000:]
