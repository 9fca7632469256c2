"""The C++ CPU backend against the reference over a grid of shapes, dtypes and routing options."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import (TOLERANCES, assert_dispatch_equal, check_gemm_and_mlp, make_expert_weights,
                                  make_routing_inputs, random_offsets, sample_inputs)

pytestmark = pytest.mark.skipif(not mk.backends()["cpu"]["available"],
                                reason=f"cpu backend: {mk.backends()['cpu']['reason']}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (E, G, k_g): G divides E, k_g <= E/G
ROUTINGS = [(4, 2, 1), (4, 1, 2), (8, 4, 2), (8, 8, 1), (64, 8, 1), (64, 8, 2), (128, 8, 1), (128, 16, 2)]


@pytest.mark.parametrize("T", [0, 1, 2, 7, 33, 257])
@pytest.mark.parametrize("E,G,k_g", ROUTINGS)
def test_dispatch_matches_reference(T, E, G, k_g):
    H = 20
    hidden, logits = make_routing_inputs(T, E, H, seed=T + E, dead_experts=5)
    with mk.use_backend("cpu"):
        out = mk.grouped_dispatch(hidden, logits, G, k_g)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(renormalize=True), dict(score_func="sigmoid"),
                                     dict(expert_scale=True, renormalize=True)])
def test_dispatch_options_and_dtypes(dtype, logits_dtype, options):
    T, E, G, k_g, H = 45, 64, 8, 2, 72
    hidden, logits = make_routing_inputs(T, E, H, dtype, logits_dtype=logits_dtype, seed=3)
    if options.get("expert_scale"):
        options = dict(options, expert_scale=torch.rand(E) + 0.5)
    out = torch.ops.moge.grouped_dispatch(hidden, logits, G, k_g, **options)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, **options))


def test_dispatch_non_contiguous_inputs():
    T, E, G, H = 19, 16, 4, 24
    wide = torch.randn(T, 2 * H)
    hidden = wide[:, ::2]                              # strided columns
    logits = torch.randn(E, T).t()                     # transposed
    assert not hidden.is_contiguous() and not logits.is_contiguous()
    assert_dispatch_equal(mk.grouped_dispatch(hidden, logits, G), R.grouped_dispatch(hidden, logits, G))


def test_dispatch_moge_group_blocks():
    """Group g owns exactly the rows [g*T*k_g, (g+1)*T*k_g), whatever the logits."""
    T, E, G, k_g = 50, 64, 8, 2
    hidden, logits = make_routing_inputs(T, E, 8, seed=11, dead_experts=2)
    _, _, ids, offsets, _ = mk.grouped_dispatch(hidden, logits, G, k_g)
    S = E // G
    assert offsets[::S].tolist() == [g * T * k_g for g in range(G + 1)]
    groups = ids.long() // S
    assert torch.equal(groups, torch.arange(G).repeat_interleave(k_g).expand(T, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,E", [(0, 4), (1, 4), (37, 8), (300, 64)])
def test_grouped_gemm_and_mlp_match_reference(dtype, M, E):
    with mk.use_backend("cpu"):
        check_gemm_and_mlp(mk.grouped_gemm, mk.grouped_mlp, dtype, M, E)


# rows per expert of E=16: batched (<= 32 rows, most experts with rows), per expert (a slice of 33; half
# the experts empty), and every expert empty
PATH_COUNTS = {"batched": [3, 0, 1, 32, 2, 5, 0, 7, 1, 1, 4, 0, 2, 9, 3, 6],
               "batched_one_row": [1] * 16,
               "per_expert_rows": [33, 1, 0, 4, 2, 2, 0, 8, 3, 1, 1, 0, 5, 2, 7, 1],
               "per_expert_empty": [4, 0, 0, 2, 0, 0, 9, 0, 0, 1, 0, 0, 3, 0, 0, 5],
               "all_empty": [0] * 16}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("path", list(PATH_COUNTS))
def test_batched_and_per_expert_paths_match_reference(dtype, path):
    """The CPU GEMMs take one batched matmul where most experts have at most 32 rows, one matmul per
    expert otherwise: both against the reference, with rows past expert_offsets[E] (dropped slots:
    zero) and row_scale."""
    counts = torch.tensor(PATH_COUNTS[path])
    E, H, I, dropped = len(counts), 24, 12, 5
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    kept = int(offsets[-1])
    g = torch.Generator().manual_seed(E + kept)
    x = torch.randn(kept + dropped, H, generator=g).to(dtype)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    row_scale = torch.rand(kept + dropped, generator=g)
    tol = TOLERANCES.get(dtype, dict(rtol=1e-10, atol=1e-10))
    with mk.use_backend("cpu"):
        y = mk.grouped_gemm(x, w_gate_up, offsets)
        z = mk.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
    torch.testing.assert_close(y, R.grouped_gemm(x, w_gate_up, offsets), **tol)
    torch.testing.assert_close(z, R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale), **tol)
    assert not y[kept:].any() and not z[kept:].any()


def test_grouped_gemm_non_contiguous():
    M, E, H, N = 29, 4, 16, 12
    x = torch.randn(H, M).t()
    w = torch.randn(E, H, N).transpose(1, 2)
    offsets = random_offsets(M, E, seed=5)
    torch.testing.assert_close(mk.grouped_gemm(x, w, offsets), R.grouped_gemm(x, w, offsets))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,H", [(0, 8, 16), (1, 8, 20), (13, 2, 36), (64, 8, 72)])
def test_combine_matches_reference(dtype, T, K, H):
    g = torch.Generator().manual_seed(T)
    expert_out = torch.randn(T * K, H, generator=g).to(dtype)
    weights = torch.rand(T, K, generator=g)
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K)
    shared = torch.randn(T, H, generator=g).to(dtype)
    tol = TOLERANCES[dtype]
    with mk.use_backend("cpu"):
        out = mk.grouped_combine(expert_out, weights, row_index)
        out_shared = mk.grouped_combine(expert_out, weights, row_index, shared)
    torch.testing.assert_close(out, R.grouped_combine(expert_out, weights, row_index), **tol)
    torch.testing.assert_close(out_shared, R.grouped_combine(expert_out, weights, row_index, shared), **tol)
    assert out.dtype == dtype


def test_combine_non_contiguous():
    T, K, H = 11, 4, 10
    expert_out = torch.randn(T * K, 2 * H)[:, :H]
    weights = torch.rand(K, T).t()
    row_index = torch.randperm(T * K).to(torch.int32).view(K, T).t()
    torch.testing.assert_close(mk.grouped_combine(expert_out, weights, row_index),
                               R.grouped_combine(expert_out, weights, row_index))


@pytest.mark.parametrize("dtype", DTYPES)
def test_moge_forward_matches_reference(dtype):
    T, E, G, H, I = 40, 64, 8, 48, 16
    hidden, logits = make_routing_inputs(T, E, H, dtype, seed=7)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    shared_gu, shared_d = (w[0] for w in make_expert_weights(1, H, 2 * I, dtype, seed=9))
    args = (hidden, logits, w_gate_up, w_down, G)
    kwargs = dict(expert_scale=torch.rand(E) + 0.5, shared_w_gate_up=shared_gu, shared_w_down=shared_d)
    torch.testing.assert_close(mk.moge_forward(*args, **kwargs), R.moge_forward(*args, **kwargs),
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("op", ["grouped_dispatch", "grouped_gemm", "grouped_mlp", "grouped_combine"])
def test_sample_inputs_match_reference(op):
    for args, kwargs in sample_inputs("cpu")[op]:
        out = getattr(torch.ops.moge, op)(*args, **kwargs)
        ref = getattr(R, op)(*args, **kwargs)
        for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
