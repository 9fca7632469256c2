"""Triton `moge::grouped_dispatch` against the eager reference.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1): small fp32/fp16 shapes only, since the interpreter has no bf16 and pays per op.
On a GPU the same tests run on CUDA tensors, plus the GPU-only ones (bf16, Pangu shapes, the
T=65536 int64-address case, torch.compile, CUDA graphs)."""
import functools

import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels import testing
from moge_kernels.testing import generator, make_routing_inputs, sample_inputs

from triton_testing import DEVICE, FLOAT_DTYPES, HAS_CUDA, HAS_TRITON, requires_cuda, runs_here

if HAS_TRITON:
    from moge_kernels.triton import dispatch as triton_dispatch
pytestmark = runs_here
# ids, offsets, row_index and the permuted rows bit for bit; weights within 1e-6 relative
assert_dispatch_equal = functools.partial(testing.assert_dispatch_equal, rtol=1e-6, atol=1e-12)


def run_triton(*args, **kwargs):
    with mk.use_backend("triton"):
        assert mk.resolve("grouped_dispatch", args[0].device.type)[0] == "triton"
        return mk.grouped_dispatch(*args, **kwargs)


# ------------------------------------------------------------------------------- shapes (CI + GPU)
@pytest.mark.parametrize("T,E,G,k_g,H", [
    (0, 8, 2, 1, 12),          # no tokens
    (1, 64, 8, 1, 40),         # decode, one token
    (5, 16, 4, 2, 20),         # k_g = 2
    (33, 64, 8, 1, 36),        # Pangu routing, T not a power of two
    (50, 24, 3, 3, 10),        # G, k_g not powers of two
    (12, 20, 4, 2, 5),         # S = 5, H = 5: nothing a power of two
    (17, 256, 16, 4, 8),       # the largest routing of the coverage
    (131, 64, 8, 1, 24),       # past one routing block: the scan launch runs
])
def test_matches_reference(T, E, G, k_g, H):
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=T + E, dead_experts=3)
    assert_dispatch_equal(run_triton(hidden, logits, G, k_g), R.grouped_dispatch(hidden, logits, G, k_g))


@pytest.mark.parametrize("route_block_t,copy_config", [
    (1, (16, 16, 1)),     # 23 blocks: the scan launch
    (1, (2, 8, 1, True)),   # scan launch; the 6 H blocks of a token block on consecutive programs
    (2, (1, 64, 1)),      # 12 blocks: the scan fused into the permute programs
    (2, (1, 16, 1, True)),  # fused scan, 1-d grid
    (4, (16, 32, 2)),     # fused; copy tile clamped to the routing block
    (8, (4, 8, 1)),
    (64, (2, 128, 4))])   # one block
def test_tilings(route_block_t, copy_config):
    """Every tiling gives the same bits: many routing blocks (deep scan), H split in many blocks."""
    T, E, G, k_g, H = 23, 32, 4, 2, 44
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=5, dead_experts=4)
    out = triton_dispatch.grouped_dispatch(hidden, logits, G, k_g, route_block_t=route_block_t,
                                           copy_config=copy_config)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("T,E,G,k_g,H,options", [
    (1, 64, 8, 1, 40, dict()),                                   # decode at Pangu routing
    (3, 16, 4, 2, 20, dict(renormalize=True)),
    (8, 64, 8, 1, 24, dict(score_func="sigmoid")),               # the largest default one-launch tile
    (6, 20, 4, 2, 5, dict(expert_scale=True)),                   # S = 5, H = 5: nothing a power of two
    (21, 32, 4, 2, 16, dict(score_func="sigmoid", renormalize=True)),   # forced past the default bound
    (2, 128, 1, 8, 12, dict()),                                  # plain top-8 of 128 (Qwen3: G=1)
])
def test_one_launch_and_two_launch_paths(fused, T, E, G, k_g, H, options):
    """Small T routes and permutes in one launch (every copy program routes all tokens); the same
    inputs through the route + permute launches give the same bits."""
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=T + E, dead_experts=2)
    if options.get("expert_scale"):
        options = dict(options, expert_scale=(torch.rand(E, generator=generator(2)) + 0.5).to(DEVICE))
    kernel_options = dict(options, score_func=R.score_func_code(options.get("score_func", "softmax")))
    out = triton_dispatch.grouped_dispatch(hidden, logits, G, k_g, fused=fused, **kernel_options)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, **options))


@pytest.mark.parametrize("options", [
    dict(renormalize=True),
    dict(score_func="sigmoid"),
    dict(score_func="sigmoid", renormalize=True),
    dict(expert_scale=torch.float32, renormalize=True),
    dict(expert_scale=torch.float16),
])
def test_options(options):
    T, E, G, k_g, H = 21, 32, 4, 2, 16
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=7)
    if "expert_scale" in options:
        scale = (torch.rand(E, generator=generator(1)) + 0.5).to(options["expert_scale"]).to(DEVICE)
        options = dict(options, expert_scale=scale)
    assert_dispatch_equal(run_triton(hidden, logits, G, k_g, **options),
                          R.grouped_dispatch(hidden, logits, G, k_g, **options))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("logits_dtype", FLOAT_DTYPES)
def test_dtypes(dtype, logits_dtype):
    T, E, G, H = 19, 64, 8, 24
    hidden, logits = make_routing_inputs(T, E, H, dtype, DEVICE, seed=2, logits_dtype=logits_dtype)
    assert_dispatch_equal(run_triton(hidden, logits, G), R.grouped_dispatch(hidden, logits, G))


def test_non_contiguous_inputs():
    T, E, G, H = 19, 16, 4, 24
    g = generator(0)
    wide = torch.randn(T, 3 * H, generator=g).to(DEVICE)
    for hidden in (wide[:, ::3], wide[:, H:2 * H]):       # strided columns; row stride 3H
        logits = torch.randn(E, T, generator=g).to(DEVICE).t()
        assert not hidden.is_contiguous() and not logits.is_contiguous()
        assert_dispatch_equal(run_triton(hidden, logits, G), R.grouped_dispatch(hidden, logits, G))


def test_nan_inf_and_ties():
    """NaN ranks below every number, ties go to the lower index, ids always valid (reference.route)."""
    T, E, G, k_g, H = 12, 16, 4, 2, 8
    hidden, _ = make_routing_inputs(T, E, H, device=DEVICE, seed=3)
    logits = torch.randint(-2, 3, (T, E), generator=generator(4)).float()   # many exact ties
    logits[1, 5] = float("nan")                   # one NaN: softmax makes the whole row NaN
    logits[2] = float("nan")
    logits[3, :4] = float("-inf")                 # a whole group at -inf
    logits[4] = float("-inf")                     # all -inf: NaN row
    logits[5, 7] = float("inf")
    logits[6] = 1.0                               # all tied
    logits = logits.to(DEVICE)
    for options in (dict(), dict(score_func="sigmoid"), dict(renormalize=True)):
        out = run_triton(hidden, logits, G, k_g, **options)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, **options))
        ids = out[2].long()
        assert ((ids // (E // G)) == torch.arange(G, device=DEVICE).repeat_interleave(k_g)).all()


def test_group_blocks_are_static():
    """Group g owns exactly the permuted rows [g*T*k_g, (g+1)*T*k_g), whatever the logits."""
    T, E, G, k_g = 50, 64, 8, 2
    hidden, logits = make_routing_inputs(T, E, 8, device=DEVICE, seed=11, dead_experts=2)
    offsets = run_triton(hidden, logits, G, k_g)[3]
    assert offsets[::E // G].tolist() == [g * T * k_g for g in range(G + 1)]


def test_opcheck():
    with mk.use_backend("triton"):
        for args, kwargs in sample_inputs(DEVICE)["grouped_dispatch"]:
            torch.library.opcheck(torch.ops.moge.grouped_dispatch.default, args, kwargs)


def test_compile_fullgraph():
    T, E, G, H = 9, 16, 4, 12
    hidden, logits = make_routing_inputs(T, E, H, device=DEVICE, seed=1)

    def fn(hidden, logits):
        permuted, weights, _, _, row_index = torch.ops.moge.grouped_dispatch(hidden, logits, G)
        return permuted * 2, weights, row_index

    with mk.use_backend("triton"):
        compiled = torch.compile(fn, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
        got = compiled(hidden, logits)
    ref = R.grouped_dispatch(hidden, logits, G)
    assert torch.equal(got[0], ref[0] * 2) and torch.equal(got[2], ref[4])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("T", [1, 128, 4096])
def test_pangu_shape_bf16(T):
    hidden, logits = make_routing_inputs(T, 64, 5120, torch.bfloat16, "cuda", seed=T)
    expert_scale = (torch.rand(64, generator=generator(T)) + 0.5).cuda()
    assert_dispatch_equal(run_triton(hidden, logits, 8, expert_scale=expert_scale),
                          R.grouped_dispatch(hidden, logits, 8, expert_scale=expert_scale))


@requires_cuda
def test_int64_addresses_T65536():
    """T*K*H = 65536*8*5120 > 2^31 elements: the last rows sit past any int32 element offset."""
    T, E, G, H = 65536, 64, 8, 5120
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=9)
    out = run_triton(hidden, logits, G)
    torch.cuda.synchronize()
    ref = R.grouped_dispatch(hidden, logits, G)
    assert_dispatch_equal(out, ref)
    del ref
    # The rows past 2^31 elements really hold their tokens.
    permuted, row_index = out[0], out[4]
    last = row_index.view(-1).argmax()
    assert row_index.view(-1)[last].item() == T * 8 - 1
    assert torch.equal(permuted[-1], hidden[last // 8])


@requires_cuda
def test_cuda_graph_replay():
    T, E, G, H = 300, 64, 8, 256
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=0)
    static_hidden, static_logits = hidden.clone(), logits.clone()
    with mk.use_backend("triton"):
        mk.grouped_dispatch(static_hidden, static_logits, G)      # compile outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            mk.grouped_dispatch(static_hidden, static_logits, G)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = mk.grouped_dispatch(static_hidden, static_logits, G)
    for seed in (1, 2):
        hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=seed)
        static_hidden.copy_(hidden)
        static_logits.copy_(logits)
        graph.replay()
        assert_dispatch_equal(static_out, R.grouped_dispatch(hidden, logits, G))


@requires_cuda
@pytest.mark.parametrize("T", [300, 4096])
def test_pdl_on_and_off_agree(T):
    """The three-launch dispatch with programmatic dependent launch (default on sm_90+) and without:
    identical outputs (T = 300: the permute programs scan; 4096: the scan launch runs)."""
    from moge_kernels.triton import dispatch as td
    hidden, logits = make_routing_inputs(T, 64, 5120, torch.bfloat16, "cuda", seed=T)
    ref = R.grouped_dispatch(hidden, logits, 8)
    for pdl in (True, False):
        torch.empty(1 << 26, device="cuda").fill_(float("nan"))
        assert_dispatch_equal(td.grouped_dispatch(hidden, logits, 8, pdl=pdl), ref)
