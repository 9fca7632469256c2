"""The `cuda` backend (C++/CUDA kernels of `moge_kernels._cuda_C`, csrc/cuda/) against the reference.

GPU only: skipped without a CUDA device or without the built extension. Every op on ragged shapes (T=0,
T=1, empty experts, sizes off every block size, H not a power of two), fp32/fp16/bf16, non-contiguous
inputs; the tensor-core GEMM on both of its tiles and its SIMT fallback; opcheck; CUDA-graph replay;
torch.compile; determinism. tests/gpu/run_cuda_checks.sh runs this on the device with MOGE_BACKEND=cuda.

Tolerances: routing ids, offsets, row indices and permuted rows must equal the reference's exactly;
weights within fp32 rounding. combine rounds like the reference (fp32, same operation order), so it is
held to the dtype's TOLERANCES. GEMM outputs follow flash-attention's rule (`assert_error_within`): error
against a float64 reference at most 2x that of PyTorch's own computation in the same dtype.
"""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import testing
from moge_kernels import reference as R
from moge_kernels.testing import (TOLERANCES, assert_error_within, generator, make_expert_weights,
                                  make_routing_inputs, random_offsets, sample_inputs)

HAS_CUDA = torch.cuda.is_available()
CUDA_BACKEND = mk.backends()["cuda"]
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(not CUDA_BACKEND["available"], reason=f"cuda backend: {CUDA_BACKEND['reason']}"),
]
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["grouped_dispatch", "grouped_permute", "grouped_gemm", "grouped_mlp", "grouped_combine"]
# (E, G, k_g): G divides E, k_g <= E/G
ROUTINGS = [(4, 2, 1), (4, 1, 2), (8, 4, 2), (8, 8, 1), (64, 8, 1), (64, 8, 2), (128, 8, 1), (128, 16, 2),
            (40, 5, 3)]


@pytest.fixture(autouse=True)
def _cuda_backend():
    with mk.use_backend("cuda"):
        yield


def _poison_allocator(nbytes=64 << 20):
    """Fill freed cached blocks with NaN so that an output element the kernel never writes shows up."""
    torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).fill_(float("nan"))


def assert_dispatch_equal(out, ref):
    # the fused softmax (expf) may differ from torch's in the last bits of the weights
    testing.assert_dispatch_equal(out, ref, rtol=1e-5, atol=1e-6)


def test_cuda_backend_serves_every_op():
    assert set(CUDA_BACKEND["ops"]) == set(OPS)
    for op in OPS:
        assert mk.resolve(op, "cuda")[0] == "cuda"


# ----------------------------------------------------------------------------- grouped_dispatch
@pytest.mark.parametrize("T", [0, 1, 2, 7, 64, 65, 257, 1000])
@pytest.mark.parametrize("E,G,k_g", ROUTINGS)
def test_dispatch_matches_reference(T, E, G, k_g):
    hidden, logits = make_routing_inputs(T, E, 20, device=DEV, seed=T + E, dead_experts=5)
    _poison_allocator()
    out = mk.grouped_dispatch(hidden, logits, G, k_g)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits_dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(renormalize=True), dict(score_func="sigmoid"),
                                     dict(expert_scale=torch.float32, renormalize=True),
                                     dict(expert_scale=torch.bfloat16, score_func="sigmoid")])
def test_dispatch_options_and_dtypes(dtype, logits_dtype, options):
    T, E, G, k_g, H = 145, 64, 8, 2, 72
    hidden, logits = make_routing_inputs(T, E, H, dtype, DEV, logits_dtype=logits_dtype, seed=3)
    if "expert_scale" in options:
        scale = (torch.rand(E, generator=generator(4)) + 0.5).to(options["expert_scale"]).to(DEV)
        options = dict(options, expert_scale=scale)
    out = torch.ops.moge.grouped_dispatch(hidden, logits, G, k_g, **options)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, **options))


@pytest.mark.parametrize("H", [0, 1, 3, 5120, 5121])
def test_dispatch_row_widths(H):
    """Every access width of the row copy: 16, 8, 4, 2 bytes and the empty row."""
    for dtype in (torch.bfloat16, torch.float32):
        hidden, logits = make_routing_inputs(70, 64, H, dtype, DEV, seed=H)
        assert_dispatch_equal(mk.grouped_dispatch(hidden, logits, 8), R.grouped_dispatch(hidden, logits, 8))


def test_dispatch_many_chunks():
    """More token chunks than warps in the offsets scan (T / 32 > 32), few experts: long runs per expert."""
    hidden, logits = make_routing_inputs(5000, 4, 8, device=DEV, seed=5)
    assert_dispatch_equal(mk.grouped_dispatch(hidden, logits, 2), R.grouped_dispatch(hidden, logits, 2))


def test_dispatch_non_contiguous_inputs():
    T, E, G, H = 190, 16, 4, 24
    wide = torch.randn(T, 2 * H, device=DEV)
    logits = torch.randn(E, T, device=DEV).t()                   # transposed
    for hidden in (wide[:, ::2], wide[:, 5:5 + H]):              # strided columns; rows apart, misaligned
        assert not hidden.is_contiguous() and not logits.is_contiguous()
        assert_dispatch_equal(mk.grouped_dispatch(hidden, logits, G), R.grouped_dispatch(hidden, logits, G))


def test_dispatch_ties_and_nan_policy():
    T, E, G, k_g = 9, 16, 4, 2
    hidden = torch.randn(T, 8, device=DEV)
    logits = torch.zeros(T, E, device=DEV)                        # all tied: lowest indices win
    logits[1, 3] = float("nan")                                   # NaN softmax row
    logits[2, 5:9] = float("nan")
    logits[3] = float("-inf")                                     # all -inf: NaN row as in torch
    logits[4, 0] = float("inf")
    logits[5, 2:4] = 7.0                                          # exact tie inside a group
    for score_func in ("softmax", "sigmoid"):
        out = mk.grouped_dispatch(hidden, logits, G, k_g, score_func=score_func)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, score_func=score_func))
        ids = out[2].long()
        assert ((ids // (E // G)) == torch.arange(G, device=DEV).repeat_interleave(k_g)).all()


def test_dispatch_kernel_rejects_unknown_score_func_value():
    hidden = torch.randn(4, 8, device=DEV)
    logits = torch.randn(4, 8, device=DEV)
    kernel = torch.ops.moge_C.grouped_dispatch
    out = kernel(hidden, logits, 2, 1, None, False, int(R.ScoreFunc.SIGMOID))
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, 2, score_func="sigmoid"))
    with pytest.raises(ValueError, match="cuda backend.*score_func 2"):
        kernel(hidden, logits, 2, 1, None, False, 2)


def test_dispatch_moge_group_blocks():
    """Group g owns exactly the rows [g*T*k_g, (g+1)*T*k_g), whatever the logits."""
    T, E, G, k_g = 300, 64, 8, 2
    hidden, logits = make_routing_inputs(T, E, 8, device=DEV, seed=11, dead_experts=2)
    _, _, _, offsets, _ = mk.grouped_dispatch(hidden, logits, G, k_g)
    assert offsets[::E // G].tolist() == [g * T * k_g for g in range(G + 1)]


@pytest.mark.parametrize("T", [1, 16, 300])
def test_dispatch_pangu_shape(T):
    hidden, logits = make_routing_inputs(T, 64, 5120, torch.bfloat16, DEV, seed=T)
    scale = (torch.rand(64, generator=generator(T)) + 0.5).to(DEV)
    out = mk.grouped_dispatch(hidden, logits, 8, 1, scale)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, 8, 1, scale))


# ----------------------------------------------------------------------------- grouped_gemm / mlp
def _exact_gemm(x, w, offsets):
    return R.grouped_gemm(x.double(), w.double(), offsets)


def _exact_mlp(x, w_gate_up, w_down, offsets, row_scale=None):
    return R.grouped_mlp(x.double(), w_gate_up.double(), w_down.double(), offsets,
                         None if row_scale is None else row_scale.double())


def _gemm_case(M, E, Kd, N, dtype, seed, empty_every=3):
    g = generator(seed)
    x = torch.randn(M, Kd, generator=g).to(dtype).to(DEV)
    w = (torch.randn(E, N, Kd, generator=g) / max(Kd, 1) ** 0.5).to(dtype).to(DEV)
    # (with one expert, that expert must hold every row: expert_offsets always ends at M)
    offsets = random_offsets(M, E, seed=seed, empty_every=empty_every if E > 1 else 0, device=DEV)
    return x, w, offsets


# (M, E, Kd, N): skinny tile (M < 64 E), big tile (M >= 64 E), K off the 64-wide k-tile, K not a multiple
# of 8 (SIMT fallback for fp16/bf16), N odd, N off the n-tile, one expert with all rows.
GEMM_SHAPES = [(1, 4, 16, 8), (37, 8, 24, 40), (300, 4, 96, 72), (255, 4, 200, 136), (256, 4, 200, 136),
               (700, 3, 136, 300), (97, 5, 20, 33), (513, 2, 72, 257), (1500, 1, 520, 264)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,E,Kd,N", GEMM_SHAPES)
def test_grouped_gemm_matches_reference(dtype, M, E, Kd, N):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, offsets = _gemm_case(M, E, Kd, N, dtype, seed=M + N)
    _poison_allocator()
    y = mk.grouped_gemm(x, w, offsets)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_error_within(y, R.grouped_gemm(x, w, offsets), _exact_gemm(x, w, offsets), floor=1e-6,
                        what=f"grouped_gemm {dtype}")


# (M, E, H, I): as GEMM_SHAPES; I off the SwiGLU half-tile (64 / 128 columns), I not a multiple of 8.
MLP_SHAPES = [(1, 4, 16, 8), (37, 8, 24, 20), (300, 4, 96, 72), (600, 4, 136, 200), (97, 5, 40, 12),
              (200, 3, 20, 16), (1100, 2, 264, 136)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,E,H,I", MLP_SHAPES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_grouped_mlp_matches_reference(dtype, M, E, H, I, with_scale):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, _, offsets = _gemm_case(M, E, H, 8, dtype, seed=M + I)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype, DEV, seed=M)
    row_scale = (torch.rand(M, generator=generator(M)) + 0.5).to(DEV) if with_scale else None
    _poison_allocator()
    y = mk.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
    assert y.dtype == dtype and y.shape == (M, H)
    assert_error_within(y, R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale),
                        _exact_mlp(x, w_gate_up, w_down, offsets, row_scale), floor=1e-6,
                        what=f"grouped_mlp {dtype}")


@pytest.mark.parametrize("variant", ["wgmma", "wgmma96", "wgmma128", "big"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_big_tile_variants(variant, dtype):
    """Every variant of the big tensor-core tile (option cuda_gemm_tile) on shapes with row, column and K
    tails, an expert whose rows fill whole tiles, and the Pangu widths."""
    torch.backends.cuda.matmul.allow_tf32 = False
    mk.set_options(cuda_gemm_tile=variant)
    for M, E, Kd, N in [(700, 3, 136, 300), (1024, 2, 512, 256), (513, 2, 72, 257), (1500, 1, 520, 264)]:
        x, w, offsets = _gemm_case(M, E, Kd, N, dtype, seed=M + N)
        _poison_allocator()
        assert_error_within(mk.grouped_gemm(x, w, offsets), R.grouped_gemm(x, w, offsets),
                            _exact_gemm(x, w, offsets), floor=1e-6, what=f"grouped_gemm tile {variant}")
    for M, E, H, I in [(600, 4, 136, 200), (1100, 2, 264, 136), (1024, 8, 5120, 1344)]:
        x, _, offsets = _gemm_case(M, E, H, 8, dtype, seed=M + I)
        w_gate_up, w_down = make_expert_weights(E, H, I, dtype, DEV, seed=M)
        scale = (torch.rand(M, generator=generator(M)) + 0.5).to(DEV)
        _poison_allocator()
        assert_error_within(mk.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                            R.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                            _exact_mlp(x, w_gate_up, w_down, offsets, scale), floor=1e-6,
                            what=f"grouped_mlp tile {variant}")


def test_hopper_runs_the_wgmma_kernel():
    """On an sm_90 device a 9.0a build must run the wgmma kernel for the many-rows case (seen in the
    profiler's kernel names), not silently fall back to the mma.sync one."""
    from moge_kernels import _cuda
    if torch.cuda.get_device_capability() != (9, 0) or not _cuda.wgmma_built():
        pytest.skip("needs an sm_90 device and a build with TORCH_CUDA_ARCH_LIST holding 9.0a")
    x, _, offsets = _gemm_case(2048, 4, 512, 8, torch.bfloat16, seed=3)
    w_gate_up, w_down = make_expert_weights(4, 512, 192, torch.bfloat16, DEV, seed=3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mk.grouped_mlp(x, w_gate_up, w_down, offsets)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("wgmma_kernel" in n for n in names) == 2, names    # gate_up + SwiGLU, then down


@pytest.mark.parametrize("variant", ["wgmma", "big"])
def test_int64_addressing(variant):
    """M * Kd > 2^31 (rows past 419430 at Kd = 5120): the output and row offsets need int64."""
    mk.set_options(cuda_gemm_tile=variant)
    M, K, N, E = 524288, 5120, 256, 4
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=DEV) / K ** 0.5).to(torch.bfloat16)
    offsets = torch.tensor([0, 1000, 300000, 300001, M], dtype=torch.int32, device=DEV)
    out = mk.grouped_gemm(x, w, offsets)
    for e, lo, hi in [(0, 0, 1000), (1, 1000, 1512), (2, 300000, 300001), (3, 300001, 300513), (3, M - 777, M)]:
        exact = x[lo:hi].float() @ w[e].float().t()
        assert_error_within(out[lo:hi], (x[lo:hi] @ w[e].t()), exact, what=f"int64 rows {lo}:{hi}")
    del x, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("M", [0, 1, 5])
def test_gemm_and_mlp_tiny_and_empty(M):
    for dtype in DTYPES:
        x, w, offsets = _gemm_case(M, 4, 16, 8, dtype, seed=M, empty_every=2)
        y = mk.grouped_gemm(x, w, offsets)
        assert y.shape == (M, 8)
        torch.testing.assert_close(y.float(), _exact_gemm(x, w, offsets).float(), **TOLERANCES[dtype])
        w_gate_up, w_down = make_expert_weights(4, 16, 8, dtype, DEV)
        z = mk.grouped_mlp(x, w_gate_up, w_down, offsets)
        torch.testing.assert_close(z.float(), _exact_mlp(x, w_gate_up, w_down, offsets).float(),
                                   **TOLERANCES[dtype])


def test_gemm_row_scale_dtypes():
    x, _, offsets = _gemm_case(300, 4, 64, 8, torch.bfloat16, seed=1)
    w_gate_up, w_down = make_expert_weights(4, 64, 32, torch.bfloat16, DEV)
    for scale_dtype in (torch.float32, torch.bfloat16, torch.float16):
        scale = (torch.rand(300, generator=generator(2)) + 0.5).to(scale_dtype).to(DEV)
        assert_error_within(mk.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                            R.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                            _exact_mlp(x, w_gate_up, w_down, offsets, scale), what="row_scale")


def test_gemm_non_contiguous_and_misaligned():
    for dtype in DTYPES:
        M, E, Kd, N = 290, 4, 64, 48
        x = torch.randn(Kd, M, device=DEV).to(dtype).t()                          # transposed
        w = torch.randn(E, Kd, N, device=DEV).to(dtype).transpose(1, 2) / 8       # [E, N, Kd] view
        offsets = random_offsets(M, E, seed=5, device=DEV)
        assert_error_within(mk.grouped_gemm(x, w, offsets), R.grouped_gemm(x, w, offsets),
                            _exact_gemm(x, w, offsets), what="non-contiguous")
        x_off = torch.randn(M * Kd + 1, device=DEV).to(dtype)[1:].view(M, Kd)    # 2-byte offset base
        assert_error_within(mk.grouped_gemm(x_off, w, offsets), R.grouped_gemm(x_off, w, offsets),
                            _exact_gemm(x_off, w, offsets), what="misaligned")


@pytest.mark.parametrize("M", [24, 1024])
def test_grouped_mlp_pangu_width(M):
    """The real widths (H=5120, I=1344) on 8 experts: the skinny tile at M=24, the big one at M=1024."""
    E, H, I = 8, 5120, 1344
    x, _, offsets = _gemm_case(M, E, H, 8, torch.bfloat16, seed=M, empty_every=0)
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, DEV, seed=2)
    scale = torch.rand(M, device=DEV)
    assert_error_within(mk.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                        R.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
                        _exact_mlp(x, w_gate_up, w_down, offsets, scale), what="pangu grouped_mlp")


# ----------------------------------------------------------------------------- grouped_combine
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,H", [(0, 8, 16), (1, 8, 20), (13, 2, 36), (64, 8, 72), (33, 3, 5), (7, 17, 1040),
                                   (129, 8, 5120)])
def test_combine_matches_reference(dtype, T, K, H):
    g = generator(T + H)
    expert_out = torch.randn(T * K, H, generator=g).to(dtype).to(DEV)
    weights = torch.rand(T, K, generator=g).to(DEV)
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K).to(DEV)
    tol = TOLERANCES[dtype]
    _poison_allocator()
    out = mk.grouped_combine(expert_out, weights, row_index)
    assert out.dtype == dtype and out.shape == (T, H)
    torch.testing.assert_close(out, R.grouped_combine(expert_out, weights, row_index), **tol)
    for shared_dtype in (dtype, torch.float32):
        shared = torch.randn(T, H, generator=g).to(shared_dtype).to(DEV)
        torch.testing.assert_close(mk.grouped_combine(expert_out, weights, row_index, shared),
                                   R.grouped_combine(expert_out, weights, row_index, shared), **tol)


def test_combine_non_contiguous():
    T, K, H = 11, 4, 10
    expert_out = torch.randn(T * K, 2 * H, device=DEV)[:, :H]
    weights = torch.rand(K, T, device=DEV).t().to(torch.bfloat16)
    row_index = torch.randperm(T * K, device=DEV).to(torch.int32).view(K, T).t()
    shared = torch.randn(T, 3 * H, device=DEV)[:, H:2 * H]
    torch.testing.assert_close(mk.grouped_combine(expert_out, weights, row_index, shared),
                               R.grouped_combine(expert_out, weights, row_index, shared))


# ----------------------------------------------------------------------------- whole layer, opcheck, graphs
@pytest.mark.parametrize("dtype", DTYPES)
def test_moge_forward_matches_reference(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    T, E, G, H, I = 200, 64, 8, 136, 72
    hidden, logits = make_routing_inputs(T, E, H, dtype, DEV, seed=7)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype, DEV)
    shared_gu, shared_d = (w[0] for w in make_expert_weights(1, H, 2 * I, dtype, DEV, seed=9))
    kwargs = dict(expert_scale=(torch.rand(E, generator=generator(1)) + 0.5).to(DEV),
                  shared_w_gate_up=shared_gu, shared_w_down=shared_d)
    out = mk.moge_forward(hidden, logits, w_gate_up, w_down, G, **kwargs)
    with mk.use_backend("reference"):
        ref = mk.moge_forward(hidden, logits, w_gate_up, w_down, G, **kwargs)
        exact = R.moge_forward(hidden.double(), logits.double(), w_gate_up.double(), w_down.double(), G,
                               expert_scale=kwargs["expert_scale"], shared_w_gate_up=shared_gu.double(),
                               shared_w_down=shared_d.double())
    assert_error_within(out, ref, exact, what="moge_forward")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_inputs_match_reference(op, dtype):
    for args, kwargs in sample_inputs(DEV, dtype)[op]:
        out = getattr(torch.ops.moge, op)(*args, **kwargs)
        ref = getattr(R, op)(*args, **kwargs)
        if op in ("grouped_gemm", "grouped_mlp"):    # GEMMs: error relative to float64, as above
            exact = getattr(R, op)(*(a.double() if a.is_floating_point() and a.dim() > 1 else a
                                     for a in args),
                                   **{k: v.double() if k == "bias" else v for k, v in kwargs.items()})
            assert_error_within(out, ref, exact, floor=1e-6, what=op)
            continue
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        for a, b in zip(outs, refs):
            tol = TOLERANCES[dtype] if a.is_floating_point() else dict(rtol=0, atol=0)
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args, kwargs in sample_inputs(DEV)[op]:
        torch.library.opcheck(getattr(torch.ops.moge, op).default, args, kwargs)


def _layer_inputs(T, seed, E=64, H=264, I=72):
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, DEV, seed=seed)
    return hidden, logits


def test_cuda_graph_replay():
    """dispatch -> mlp -> combine captured once, replayed on new inputs: no host sync anywhere."""
    T, E, G, H, I = 96, 64, 8, 264, 72
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, DEV)
    static_hidden, static_logits = _layer_inputs(T, seed=0, E=E, H=H)

    def layer(hidden, logits):
        permuted, weights, _, offsets, row_index = mk.grouped_dispatch(hidden, logits, G)
        return mk.grouped_combine(mk.grouped_mlp(permuted, w_gate_up, w_down, offsets), weights, row_index)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_hidden, static_logits)                      # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_hidden, static_logits)
    for seed in (1, 2, 3):
        hidden, logits = _layer_inputs(T, seed=seed, E=E, H=H)
        static_hidden.copy_(hidden)
        static_logits.copy_(logits)
        graph.replay()
        torch.testing.assert_close(static_out, layer(hidden, logits), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    T, E, G, H, I = 40, 64, 8, 48, 16
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, DEV, seed=3)
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, DEV)
    compiled = torch.compile(mk.moge_forward, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, logits, w_gate_up, w_down, G),
                               mk.moge_forward(hidden, logits, w_gate_up, w_down, G), rtol=0, atol=0)


def test_deterministic():
    T, E, G, H, I = 700, 64, 8, 136, 64
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, DEV, seed=4)
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, DEV)
    first = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
    for _ in range(3):
        assert torch.equal(mk.moge_forward(hidden, logits, w_gate_up, w_down, G), first)


def test_direct_moge_C_calls_check_arguments():
    """The C++ entry points check on their own: a direct call can never index out of bounds."""
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.moge_C.grouped_gemm(x, torch.randn(2, 8, 7, device=DEV), torch.zeros(2, dtype=torch.int32,
                                                                                       device=DEV))
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.moge_C.grouped_combine(x, torch.rand(2, 3, device=DEV),
                                         torch.zeros(2, 2, dtype=torch.int32, device=DEV), None)
