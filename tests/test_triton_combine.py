"""Triton `moge::grouped_combine` against the eager reference (interpreter on CPU in CI, CUDA on a GPU)."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import TOLERANCES, generator, make_routing_inputs, sample_inputs

from triton_testing import DEVICE, FLOAT_DTYPES, HAS_CUDA, HAS_TRITON, requires_cuda, runs_here

if HAS_TRITON:
    from moge_kernels.triton import combine as triton_combine
pytestmark = runs_here


def make_combine_inputs(T, K, H, dtype=torch.float32, seed=0, weights_dtype=torch.float32, shared=False):
    g = generator(seed)
    expert_out = torch.randn(T * K, H, generator=g).to(dtype).to(DEVICE)
    weights = torch.rand(T, K, generator=g).to(weights_dtype).to(DEVICE)
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K).to(DEVICE)
    shared_out = torch.randn(T, H, generator=g).to(dtype).to(DEVICE) if shared else None
    return expert_out, weights, row_index, shared_out


def run_triton(*args):
    with mk.use_backend("triton"):
        assert mk.resolve("grouped_combine", args[0].device.type)[0] == "triton"
        return mk.grouped_combine(*args)


def assert_combine_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    # Same fp32 sums in the same (slot) order; only FMA contraction and the final rounding can differ.
    torch.testing.assert_close(out, ref, **TOLERANCES[out.dtype])


@pytest.mark.parametrize("T,K,H", [(0, 8, 12), (1, 8, 40), (5, 3, 20), (33, 8, 36), (9, 12, 5), (40, 2, 130)])
@pytest.mark.parametrize("shared", [False, True])
def test_matches_reference(T, K, H, shared):
    args = make_combine_inputs(T, K, H, seed=T + K, shared=shared)
    assert_combine_close(run_triton(*args), R.grouped_combine(*args))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.float16])
def test_dtypes(dtype, weights_dtype):
    args = make_combine_inputs(17, 8, 24, dtype, seed=3, weights_dtype=weights_dtype, shared=True)
    assert_combine_close(run_triton(*args), R.grouped_combine(*args))


@pytest.mark.parametrize("config", [(1, 16, 1), (4, 8, 1), (2, 64, 2), (16, 128, 4)])
def test_tilings(config):
    """Any tiling gives the same bits: each output element is summed by one program in slot order."""
    args = make_combine_inputs(13, 4, 44, seed=4, shared=True)
    first = triton_combine.grouped_combine(*args, config=config)
    assert_combine_close(first, R.grouped_combine(*args))
    assert torch.equal(first, triton_combine.grouped_combine(*args, config=(1, 64, 2)))


def test_non_contiguous_inputs():
    T, K, H = 11, 4, 24
    expert_out, weights, row_index, shared = make_combine_inputs(T, K, 3 * H, seed=5, shared=True)
    expert_out, shared = expert_out[:, H:2 * H], shared[:, ::3]      # row stride 3H; strided columns
    weights = weights.t().contiguous().t()                           # column-major [T, K]
    row_index = torch.stack([row_index, row_index], dim=2)[..., 0]   # strides (2K, 2)
    assert not (expert_out.is_contiguous() or shared.is_contiguous() or weights.is_contiguous()
                or row_index.is_contiguous())
    assert_combine_close(run_triton(expert_out, weights, row_index, shared),
                         R.grouped_combine(expert_out, weights, row_index, shared))


def test_round_trip_through_dispatch():
    """combine(dispatch(x)) with weights 1/K gives x back: the row_index of dispatch is a permutation."""
    T, E, G, k_g, H = 29, 32, 4, 2, 20
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=8, dead_experts=3)
    with mk.use_backend("triton"):
        permuted, weights, _, _, row_index = mk.grouped_dispatch(hidden, logits, G, k_g)
        out = mk.grouped_combine(permuted, torch.full_like(weights, 1.0 / (G * k_g)), row_index)
        assert_combine_close(mk.grouped_combine(permuted, weights, row_index),
                             R.grouped_combine(permuted, weights, row_index))
    torch.testing.assert_close(out, hidden, rtol=1e-6, atol=1e-6)


def test_opcheck():
    with mk.use_backend("triton"):
        for args, kwargs in sample_inputs(DEVICE)["grouped_combine"]:
            torch.library.opcheck(torch.ops.moge.grouped_combine.default, args, kwargs)


def test_compile_fullgraph():
    args = make_combine_inputs(9, 4, 12, seed=6, shared=True)

    def fn(expert_out, weights, row_index, shared):
        return torch.ops.moge.grouped_combine(expert_out * 2, weights, row_index, shared) + 1

    with mk.use_backend("triton"):
        compiled = torch.compile(fn, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
        got = compiled(*args)
    expert_out, weights, row_index, shared = args
    assert_combine_close(got, R.grouped_combine(expert_out * 2, weights, row_index, shared) + 1)


# ------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("T", [1, 128, 4096])
def test_pangu_shape_bf16(T):
    args = make_combine_inputs(T, 8, 5120, torch.bfloat16, seed=T, shared=True)
    out = run_triton(*args)
    assert_combine_close(out, R.grouped_combine(*args))
    assert torch.equal(out, run_triton(*args))     # deterministic: no atomics


@requires_cuda
def test_int64_addresses_T65536():
    """expert_out has T*K*H = 65536*8*5120 > 2^31 elements."""
    T, K, H = 65536, 8, 5120
    g = torch.Generator(device="cuda").manual_seed(0)
    expert_out = torch.randn(T * K, H, generator=g, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(T, K, generator=g, device="cuda")
    row_index = torch.randperm(T * K, generator=g, device="cuda").to(torch.int32).view(T, K)
    out = run_triton(expert_out, weights, row_index)
    assert_combine_close(out, R.grouped_combine(expert_out, weights, row_index))


@requires_cuda
def test_cuda_graph_replay():
    T, K, H = 300, 8, 256
    static = [a.clone() for a in make_combine_inputs(T, K, H, torch.bfloat16, seed=0, shared=True)]
    with mk.use_backend("triton"):
        mk.grouped_combine(*static)                  # compile outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            mk.grouped_combine(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = mk.grouped_combine(*static)
    for seed in (1, 2):
        fresh = make_combine_inputs(T, K, H, torch.bfloat16, seed=seed, shared=True)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        assert_combine_close(static_out, R.grouped_combine(*fresh))
