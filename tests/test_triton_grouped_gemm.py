"""Triton grouped GEMM / grouped MLP (moge_kernels/triton/grouped_gemm.py) against the eager reference.

Without a GPU these run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), in fp32 and fp16 on small ragged shapes. With a GPU they also run bf16, the full
Pangu Pro MoE expert shapes, every candidate config, CUDA-graph replay, torch.compile and a case whose
M*K passes 2^31 elements.

Tolerances. GEMM outputs: flash-attention's rule (moge_kernels.testing.assert_error_within): the
kernel's relative error against an fp64 reference is at most 2x that of the reference computed by PyTorch
in the input dtype, plus a floor; and elementwise, |out - exact| <= GEMM_TOL[dtype] * max|exact|.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import moge_kernels
from moge_kernels import reference, registry, testing

triton_gg = pytest.importorskip("moge_kernels.triton.grouped_gemm")
from moge_kernels.triton import gemm_configs  # noqa: E402
from moge_kernels.triton.gemm_configs import GemmConfig as C  # noqa: E402

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_GPU else "cpu"
if not HAS_GPU and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
# elementwise bound, as a fraction of the output's largest magnitude
GEMM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _triton_backend():
    with moge_kernels.use_backend("triton"):
        yield


def _randn(*shape, dtype, device=DEVICE, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _check(out, lowp_ref, exact_ref, what, factor=2.0):
    """out and lowp_ref in the input dtype (whose tolerance applies), exact_ref in fp32 or fp64."""
    dtype = out.dtype
    assert out.dtype == lowp_ref.dtype, what
    exact = exact_ref.double()
    if exact.numel() == 0:
        assert out.shape == exact.shape
        return
    # torch.testing with a scale-aware bound, then the flash-attention rule
    atol = GEMM_TOL[dtype] * exact.abs().max().item() + 1e-6
    torch.testing.assert_close(out.double().cpu(), exact.cpu(), atol=atol, rtol=0, msg=what)
    testing.assert_error_within(out.double().cpu(), lowp_ref.double().cpu(), exact.cpu(),
                                factor=factor, floor=1e-6 if dtype == torch.float32 else 1e-4,
                                what=what)


def _ref_gemm(x, w, offs):
    lowp = reference.grouped_gemm(x, w, offs)
    exact = reference.grouped_gemm(x.double(), w.double(), offs)
    return lowp, exact


def _ref_mlp(x, wgu, wd, offs, row_scale=None):
    lowp = reference.grouped_mlp(x, wgu, wd, offs, row_scale)
    exact = reference.grouped_mlp(x.double(), wgu.double(), wd.double(), offs,
                                  None if row_scale is None else row_scale.double())
    return lowp, exact


def _offsets(M, E, seed=0, empty_every=3):
    return testing.random_offsets(M, E, seed=seed, empty_every=empty_every, device=DEVICE)


# ----------------------------------------------------------------------------- small ragged shapes
# (M rows, Kd, N, E): M=0, M=1, K and N off the block sizes, H not a power of two, more experts than rows
GEMM_SHAPES = [(0, 32, 48, 4), (1, 40, 24, 3), (37, 40, 50, 5), (70, 96, 33, 8), (19, 24, 64, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "M{}_K{}_N{}_E{}".format(*s))
def test_grouped_gemm_small(shape, dtype):
    M, K, N, E = shape
    x = _randn(M, K, dtype=dtype, seed=1)
    w = _randn(E, N, K, dtype=dtype, seed=2, scale=K ** -0.5)
    offs = _offsets(M, E, seed=M)
    out = torch.ops.moge.grouped_gemm(x, w, offs)
    assert out.shape == (M, N) and out.dtype == dtype
    _check(out, *_ref_gemm(x, w, offs), what=f"grouped_gemm {shape} {dtype}")


# (M, H, I, E, row_scale?)
MLP_SHAPES = [(0, 40, 24, 4, True), (1, 48, 16, 4, False), (45, 40, 24, 6, True), (30, 72, 40, 8, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "M{}_H{}_I{}_E{}_scale{}".format(*s))
def test_grouped_mlp_small(shape, dtype):
    M, H, I, E, scaled = shape
    x = _randn(M, H, dtype=dtype, seed=3)
    wgu, wd = testing.make_expert_weights(E, H, I, dtype=dtype, device=DEVICE, seed=4)
    offs = _offsets(M, E, seed=M + 1)
    row_scale = torch.rand(M, generator=torch.Generator().manual_seed(5)).to(DEVICE) if scaled else None
    out = torch.ops.moge.grouped_mlp(x, wgu, wd, offs, row_scale)
    assert out.shape == (M, H) and out.dtype == dtype
    _check(out, *_ref_mlp(x, wgu, wd, offs, row_scale), what=f"grouped_mlp {shape} {dtype}")


# Explicit configs, so that CI covers every code path of the kernel: pointer loads and TMA descriptors
# (the interpreter runs them; SwiGLU through TMA is the wide [2, BN, BK] box), split tails (half-size
# main loops for an expert's last row tile and the last column tile), the persistent kernel (plain
# GEMMs; a SwiGLU config asking for it runs tiled).
PATH_CONFIGS = [C(16, 32, 32, 4, 1), C(32, 64, 32, 4, 1, split_m=True, split_n=True),
                C(32, 64, 32, 4, 1, tma=True), C(32, 64, 32, 4, 1, tma=True, split_m=True, split_n=True),
                C(32, 64, 32, 4, 1, tma=True, split_n=True), C(32, 64, 32, 4, 1, tma=True, persistent=True),
                C(32, 64, 32, 4, 1, tma=True, persistent=2)]


def test_launch_plans():
    """Which kernel path a config gets: TMA SwiGLU always wide, persistent only for the plain GEMM,
    gate and up halves that are not stacked through pointer loads; plans are cached by shape."""
    offs = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    x = _randn(8, 64, dtype=torch.float16, seed=1)
    w = _randn(2, 64, 64, dtype=torch.float16, seed=2)
    out = torch.empty(8, 32, dtype=torch.float16, device=DEVICE)
    pers = C(32, 32, 32, 4, 1, tma=True, persistent=1)
    tma_ok = triton_gg._tma_device(x.device)
    swiglu_plan = triton_gg._make_plan(x, w, offs, out, True, False, pers, 0, True)
    assert swiglu_plan.kernel is triton_gg._tiled and swiglu_plan.wide == tma_ok
    plain_plan = triton_gg._make_plan(x, w, offs, out, False, False, pers, 0, True)
    assert plain_plan.kernel is (triton_gg._persistent if tma_ok else triton_gg._tiled)
    halves = _randn(2, 96, 64, dtype=torch.float16, seed=3)[:, :64]      # [2, 64, 64], experts 96 rows apart
    apart = triton_gg._make_plan(x, halves, offs, out, True, False, C(32, 32, 32, 4, 1, tma=True), 0, True)
    assert not apart.use_tma and not apart.wide
    y = torch.full((8, 32), float("nan"), dtype=torch.float16, device=DEVICE)
    triton_gg.launch_grouped_gemm(x, halves, offs, y, True, config=C(32, 32, 32, 4, 1, tma=True))
    lowp, exact = _ref_gemm(x, halves, offs)
    _check(y, reference.swiglu(lowp), reference.swiglu(exact), what="gate/up halves not stacked")
    n = len(triton_gg._plans)
    for _ in range(3):
        triton_gg.launch_grouped_gemm(x, halves, offs, y, True, config=C(32, 32, 32, 4, 1, tma=True))
    assert len(triton_gg._plans) == n


@pytest.mark.skipif(triton_gg.TensorDescriptor is None, reason="Triton without host TMA descriptors")
@pytest.mark.parametrize("swiglu,pack", [(True, 0), (False, 0), (True, 16), (False, 16)])
def test_tma_descriptors_from_the_plan_templates(swiglu, pack):
    """A plan's first call validates its descriptors (TensorDescriptor.from_tensor); later calls copy
    them with the call's tensors as bases: the same fields as from_tensor would give, no view retained."""
    from moge_kernels import packing
    E, K, n_out = 3, 64, 48                       # 48 % 32 = 16: the half-width column tile too
    x = _randn(40, K, dtype=torch.float16, seed=1)
    w = _randn(E, 2 * n_out if swiglu else n_out, K, dtype=torch.float16, seed=2)
    if pack:
        w = packing.pack_expert_weights(w, pack)
    offs = torch.tensor([0, 10, 30, 40], dtype=torch.int32, device=DEVICE)
    out = torch.empty(40, n_out, dtype=torch.float16, device=DEVICE)
    cfg = C(32, 32, 16, 4, 1, tma=True, split_m=True, split_n=True)
    plan = triton_gg._make_plan(x, w, offs, out, swiglu, False, cfg, pack, True)
    if not plan.use_tma:
        pytest.skip("no TMA plan here")
    first = triton_gg._descriptors(plan, x, w)
    assert len(plan.descriptor_templates) == 4 and all(t is None or t["base"] is None
                                                       for t in plan.descriptor_templates)
    x2 = x.clone()                                # another call's tensors, same shapes
    again = triton_gg._descriptors(plan, x2, w)
    for d1, d2 in zip(first, again):
        f1, f2 = dict(vars(d1)), dict(vars(d2))
        b1, b2 = f1.pop("base"), f2.pop("base")
        assert f1 == f2 and b2.data_ptr() == (x2 if b1 is x else b1).data_ptr()
        assert b2.shape == b1.shape and b2.stride() == b1.stride()


@pytest.mark.skipif(triton_gg.TensorDescriptor is None, reason="Triton without host TMA descriptors")
def test_tma_weight_view_copied_to_unaligned_rows():
    """w = W[:, :N, :K] of a wider W: its row stride is aligned but its experts do not merge into one
    [E*N, K] view, so the descriptor is made over a copy whose rows are K wide (40 bytes here): that
    copy's stride decides TMA (pointer loads here), not w.stride(1) (was an AssertionError in
    TensorDescriptor)."""
    M, K, E, N = 32, 20, 2, 16
    x = _randn(M, 32, dtype=torch.float16, seed=1)[:, :K]          # row stride 64 bytes: aligned
    w = _randn(E, 2 * N, 32, dtype=torch.float16, seed=2)[:, :N, :K]
    offs = torch.tensor([0, 10, M], dtype=torch.int32, device=DEVICE)
    out = torch.empty(M, N, dtype=torch.float16, device=DEVICE)
    triton_gg.launch_grouped_gemm(x, w, offs, out, swiglu=False, config=C(16, 16, 16, 4, 1, tma=True))
    _check(out, reference.grouped_gemm(x, w, offs), reference.grouped_gemm(x.double(), w.double(), offs),
           "unaligned weight copy")


@pytest.mark.parametrize("cfg", PATH_CONFIGS, ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_kernel_paths(cfg, swiglu):
    dtype = torch.float16
    # counts (30, 0, 9, 41, 17): tails of 14, 9 (<= 16: half-size M loop), 9, 17 (> 16: full) rows
    offs = torch.tensor([0, 30, 30, 39, 80, 97], dtype=torch.int32, device=DEVICE)
    M, K, E = 97, 64, 5
    n_out = 80                   # 80 % 64 = 16 <= 32: the half-size N loop in the last column tile
    x = _randn(M, K, dtype=dtype, seed=6)
    w = _randn(E, 2 * n_out if swiglu else n_out, K, dtype=dtype, seed=7, scale=K ** -0.5)
    out = torch.full((M, n_out), float("nan"), dtype=dtype, device=DEVICE)    # poison: all must be written
    triton_gg.launch_grouped_gemm(x, w, offs, out, swiglu, config=cfg)
    lowp, exact = _ref_gemm(x, w, offs)
    if swiglu:
        lowp, exact = reference.swiglu(lowp), reference.swiglu(exact)
    _check(out, lowp, exact, what=f"{cfg} swiglu={swiglu}")


@pytest.mark.parametrize("cfg", PATH_CONFIGS, ids=str)
def test_kernel_paths_with_bias(cfg):
    """The bias in the epilogue on every path (tiled, split tails, TMA, persistent): y = x w^T + bias[e]
    on each expert's rows, rows past offsets[E] zero (the tail program's zeros, no bias)."""
    dtype = torch.float16
    offs = torch.tensor([0, 30, 30, 39, 80, 90], dtype=torch.int32, device=DEVICE)
    M, K, E, n_out = 97, 64, 5, 80
    x = _randn(M, K, dtype=dtype, seed=8)
    w = _randn(E, n_out, K, dtype=dtype, seed=9, scale=K ** -0.5)
    bias = _randn(E, n_out, dtype=dtype, seed=10)
    out = torch.full((M, n_out), float("nan"), dtype=dtype, device=DEVICE)
    triton_gg.launch_grouped_gemm(x, w, offs, out, False, config=cfg, zero_tail=True, bias=bias)
    _check(out, reference.grouped_gemm(x, w, offs, bias),
           reference.grouped_gemm(x.double(), w.double(), offs, bias.double()), what=f"{cfg} bias")
    assert not out[90:].any()
    # through the op: a non-contiguous bias (a column slice) is made contiguous
    wide = _randn(E, 2 * n_out, dtype=dtype, seed=11)[:, :n_out]
    with moge_kernels.use_options(triton_gemm_config=tuple(int(v) for v in dataclasses.astuple(cfg))):
        got = moge_kernels.grouped_gemm(x, w, offs, wide)
    _check(got, reference.grouped_gemm(x, w, offs, wide), reference.grouped_gemm(
        x.double(), w.double(), offs, wide.double()), what=f"{cfg} strided bias")


@pytest.mark.parametrize("cfg", PATH_CONFIGS, ids=str)
@pytest.mark.parametrize("block", [32, 16])
def test_kernel_paths_packed_weights(cfg, block):
    """Packed (k-block-major) weights through every kernel path: block 32 = BK (one TMA box per block),
    16 < BK (the slice shrinks to the block). Same offsets and shapes as test_kernel_paths."""
    from moge_kernels import packing
    dtype = torch.float16
    offs = torch.tensor([0, 30, 30, 39, 80, 97], dtype=torch.int32, device=DEVICE)
    M, K, E, n_out = 97, 64, 5, 80
    x = _randn(M, K, dtype=dtype, seed=6)
    for swiglu in (False, True):
        w = _randn(E, 2 * n_out if swiglu else n_out, K, dtype=dtype, seed=7, scale=K ** -0.5)
        w_packed = packing.pack_expert_weights(w, block)
        assert packing.pack_block(w_packed) == block and not w_packed.is_contiguous()
        assert torch.equal(packing.unpack(w_packed), w)
        out = torch.full((M, n_out), float("nan"), dtype=dtype, device=DEVICE)
        triton_gg.launch_grouped_gemm(x, w_packed, offs, out, swiglu, config=cfg)
        lowp, exact = _ref_gemm(x, w, offs)
        if swiglu:
            lowp, exact = reference.swiglu(lowp), reference.swiglu(exact)
        _check(out, lowp, exact, what=f"packed/{block} {cfg} swiglu={swiglu}")


# Tail tiles of a chosen height (tail_m < BM/2): counts (70, 0, 5, 80, 16, 33) with BM = 64 give tails of
# 6, 5, 16 (at the boundary: the tail loop) and 16 rows, and 33 rows in one full tile; M = 0 too.
TAIL_CONFIGS = [C(64, 32, 32, 4, 1, tail_m=16), C(64, 64, 32, 4, 1, tail_m=16, split_n=True),
                C(64, 32, 32, 4, 1, tma=True, tail_m=16), C(64, 64, 32, 4, 1, tma=True, tail_m=32, split_n=True)]


@pytest.mark.parametrize("cfg", TAIL_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tail_tile_heights(cfg, dtype):
    counts = torch.tensor([70, 0, 5, 80, 16, 33])
    E, K, n_out = len(counts), 48, 80                  # K = 48: a masked last k-slice with BK = 32
    for M in (int(counts.sum()), 0):
        offs = torch.zeros(E + 1, dtype=torch.int32)
        if M:
            offs[1:] = torch.cumsum(counts, 0)
        offs = offs.to(DEVICE)
        x = _randn(M, K, dtype=dtype, seed=30)
        for swiglu in (False, True):
            w = _randn(E, 2 * n_out if swiglu else n_out, K, dtype=dtype, seed=31, scale=K ** -0.5)
            out = torch.full((M, n_out), float("nan"), dtype=dtype, device=DEVICE)
            triton_gg.launch_grouped_gemm(x, w, offs, out, swiglu, config=gemm_configs.fit(cfg, swiglu, dtype))
            lowp, exact = _ref_gemm(x, w, offs)
            if swiglu:
                lowp, exact = reference.swiglu(lowp), reference.swiglu(exact)
            _check(out, lowp, exact, what=f"{cfg} swiglu={swiglu} M={M} {dtype}")


def test_config_fields_and_forced_parse():
    assert C(128, 128, 64, 8, 4, split_m=True).tail_rows() == 64
    assert C(128, 128, 64, 8, 4, tail_m=32).tail_rows() == 32
    assert C(128, 128, 64, 8, 4).tail_rows() == 0
    assert str(C(16, 64, 64, 4, 6, tma=True, persistent=2, tail_m=16)) == "16x64x64 w4 s6 tma tailM16 pers2"
    assert gemm_configs._parse_forced("128,128,64,8,4,1,0,1,0,32") == \
        C(128, 128, 64, 8, 4, tma=True, split_n=True, tail_m=32)
    assert gemm_configs._parse_forced("16,64,64,4,6,1,0,0,2").persistent == 2
    fp32 = gemm_configs.fit(C(128, 128, 64, 8, 4, tma=True, persistent=2), False, torch.float32)
    assert not fp32.tma and not fp32.persistent


def test_uneven_k_paths():
    dtype = torch.float16
    M, K, N, E = 33, 72, 40, 3          # K = 72: a masked last k-slice with BK = 32
    x = _randn(M, K, dtype=dtype, seed=8)
    w = _randn(E, 2 * N, K, dtype=dtype, seed=9, scale=K ** -0.5)
    offs = _offsets(M, E, seed=2, empty_every=0)
    lowp, exact = _ref_gemm(x, w, offs)
    for cfg in (C(16, 32, 32, 4, 1), C(32, 32, 32, 4, 1, tma=True)):
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        triton_gg.launch_grouped_gemm(x, w, offs, out, True, config=cfg)
        _check(out, reference.swiglu(lowp), reference.swiglu(exact), what=f"uneven K {cfg}")


def test_all_rows_one_expert_and_all_empty_but_one():
    dtype = torch.float32
    M, K, N, E = 50, 32, 24, 6
    x = _randn(M, K, dtype=dtype, seed=10)
    w = _randn(E, N, K, dtype=dtype, seed=11)
    for last in (True, False):
        offs = torch.zeros(E + 1, dtype=torch.int32)
        if last:
            offs[-1] = M                # every row in the last expert
        else:
            offs[1:] = M                # every row in the first expert
        offs = offs.to(DEVICE)
        _check(torch.ops.moge.grouped_gemm(x, w, offs), *_ref_gemm(x, w, offs), what=f"one expert {last}")


def test_non_contiguous_inputs():
    dtype = torch.float16
    M, H, I, E = 29, 40, 24, 4
    x_wide = _randn(M, H + 8, dtype=dtype, seed=12)
    x = x_wide[:, 4:4 + H]                                  # row stride H + 8, unit column stride
    wgu, wd = testing.make_expert_weights(E, H, I, dtype=dtype, device=DEVICE, seed=13)
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    offs_wide = torch.zeros(2 * (E + 1), dtype=torch.int32, device=DEVICE)
    offs_wide[::2] = _offsets(M, E, seed=14)
    offs = offs_wide[::2]                                   # non-contiguous offsets
    out = torch.ops.moge.grouped_mlp(x, wgu_t, wd, offs)
    _check(out, *_ref_mlp(x.contiguous(), wgu, wd, offs.contiguous()), what="non-contiguous mlp")
    out = torch.ops.moge.grouped_gemm(x, wgu_t, offs)
    _check(out, *_ref_gemm(x.contiguous(), wgu, offs.contiguous()), what="non-contiguous gemm")


def test_registered_and_resolved():
    backend, fn = registry.resolve("grouped_mlp", DEVICE)
    assert backend == "triton" and fn is triton_gg.grouped_mlp
    backend, fn = registry.resolve("grouped_gemm", DEVICE)
    assert backend == "triton" and fn is triton_gg.grouped_gemm


def test_opcheck():
    dtype = torch.float32
    M, H, I, E = 12, 32, 16, 4
    x = _randn(M, H, dtype=dtype, seed=15)
    wgu, wd = testing.make_expert_weights(E, H, I, dtype=dtype, device=DEVICE, seed=16)
    offs = _offsets(M, E, seed=17)
    row_scale = torch.rand(M).to(DEVICE)
    torch.library.opcheck(torch.ops.moge.grouped_gemm.default, (x, wgu, offs))
    torch.library.opcheck(torch.ops.moge.grouped_mlp.default, (x, wgu, wd, offs, row_scale))


def test_config_table_covers_every_regime():
    for swiglu in (False, True):
        for family, table in gemm_configs.TABLES.items():
            for _, regime in gemm_configs.REGIMES:
                cfg = table[(regime, swiglu)]
                assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16, (family, regime)
                for dtype in (torch.bfloat16, torch.float32):
                    fitted = gemm_configs.fit(cfg, swiglu, dtype)
                    es = 4 if dtype == torch.float32 else 2
                    assert (fitted.num_stages * gemm_configs.stage_bytes(fitted, swiglu, es)
                            <= gemm_configs.SMEM_LIMIT), (family, regime, dtype)
    assert gemm_configs.regime(8, 64) == "decode"            # Pangu T=1
    assert gemm_configs.regime(32768, 64) == "prefill"       # Pangu T=4096
    assert gemm_configs.regime(131072, 64) == "large"        # Pangu T=16384
    assert gemm_configs._parse_forced("64,128,64,8,4,1,0,1") == C(64, 128, 64, 8, 4, True, False, True)


# ----------------------------------------------------------------------------- GPU only
PANGU = dict(H=5120, I=1344, E=64, G=8)


def _pangu_problem(T, dtype, seed=0):
    H, I, E, G = PANGU["H"], PANGU["I"], PANGU["E"], PANGU["G"]
    hidden, logits = testing.make_routing_inputs(T, E, H, dtype=dtype, device="cuda", seed=seed)
    x, _, _, offs, _ = reference.grouped_dispatch(hidden, logits, G)
    return x, offs


@pytest.fixture(scope="module")
def pangu_weights():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    H, I, E = PANGU["H"], PANGU["I"], PANGU["E"]
    g = torch.Generator(device="cuda").manual_seed(1)
    wgu = torch.randn(E, 2 * I, H, device="cuda", generator=g) / H ** 0.5
    wd = torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5
    return wgu, wd        # fp32; cast per test


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 16, 128, 1024, 4096])
def test_pangu_mlp_gpu(T, dtype, pangu_weights):
    x, offs = _pangu_problem(T, dtype, seed=T)
    wgu, wd = (w.to(dtype) for w in pangu_weights)
    row_scale = torch.rand(x.shape[0], device="cuda")
    out = torch.ops.moge.grouped_mlp(x, wgu, wd, offs, row_scale)
    lowp = reference.grouped_mlp(x, wgu, wd, offs, row_scale)
    exact = reference.grouped_mlp(x.float(), wgu.float(), wd.float(), offs, row_scale)  # fp32 on GPU
    del wgu, wd
    torch.cuda.empty_cache()
    _check(out, lowp, exact, what=f"pangu mlp T={T} {dtype}")


@needs_gpu
def test_pangu_fp32_gpu(pangu_weights):
    x, offs = _pangu_problem(64, torch.float32, seed=3)
    wgu, wd = pangu_weights
    assert not torch.backends.cuda.matmul.allow_tf32   # the fp32 reference must be full fp32
    out = torch.ops.moge.grouped_mlp(x, wgu, wd, offs)
    lowp = reference.grouped_mlp(x, wgu, wd, offs)
    exact = reference.grouped_mlp(x.double(), wgu.double(), wd.double(), offs)
    _check(out, lowp, exact, what="pangu mlp fp32", factor=4.0)


@needs_gpu
@pytest.mark.parametrize("swiglu", [True, False], ids=["gate_up", "down"])
def test_every_candidate_config_gpu(swiglu, pangu_weights):
    """Each config the sweep may pick, at the Pangu shapes, on a ragged routing of 300 tokens."""
    dtype = torch.bfloat16
    wgu, wd = (w.to(dtype) for w in pangu_weights)
    x, offs = _pangu_problem(300, dtype, seed=21)
    w = wgu if swiglu else wd
    inp = x if swiglu else _randn(x.shape[0], PANGU["I"], dtype=dtype, device="cuda", seed=22)
    lowp, exact = reference.grouped_gemm(inp, w, offs), reference.grouped_gemm(inp.float(), w.float(), offs)
    if swiglu:
        lowp, exact = reference.swiglu(lowp), reference.swiglu(exact)
    # the candidates of this GEMM kind (a down config's 256-wide tiles need not fit two accumulators)
    configs = {gemm_configs.fit(c, swiglu, dtype) for (_, kind), cands in gemm_configs.CANDIDATES.items()
               if kind == swiglu for c in cands}
    configs |= {gemm_configs.fit(t[(r, swiglu)], swiglu, dtype) for t in gemm_configs.TABLES.values()
                for _, r in gemm_configs.REGIMES}
    for cfg in sorted(configs, key=str):
        out = torch.full(exact.shape, float("nan"), dtype=dtype, device="cuda")
        triton_gg.launch_grouped_gemm(inp, w, offs, out, swiglu, config=cfg)
        _check(out, lowp, exact, what=f"{cfg} swiglu={swiglu}")


@needs_gpu
def test_cuda_graph_and_determinism_gpu(pangu_weights):
    dtype = torch.bfloat16
    wgu, wd = (w.to(dtype) for w in pangu_weights)
    x, offs = _pangu_problem(128, dtype, seed=5)
    static_x, static_offs = x.clone(), offs.clone()
    eager = torch.ops.moge.grouped_mlp(x, wgu, wd, offs)
    assert torch.equal(eager, torch.ops.moge.grouped_mlp(x, wgu, wd, offs)), "not deterministic"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.moge.grouped_mlp(static_x, wgu, wd, static_offs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.moge.grouped_mlp(static_x, wgu, wd, static_offs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # new routing, same row count: the replayed graph follows the new offsets (no host-side schedule)
    x2, offs2 = _pangu_problem(128, dtype, seed=6)
    static_x.copy_(x2)
    static_offs.copy_(offs2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, torch.ops.moge.grouped_mlp(x2, wgu, wd, offs2))


@needs_gpu
@pytest.mark.parametrize("T", [128, 1024])
def test_two_stream_mlp_gpu(T, pangu_weights):
    """triton_mlp_streams=True (expert halves on two streams) against False (one stream): equal bit for
    bit, also as a replayed CUDA graph with new routing."""
    dtype = torch.bfloat16
    wgu, wd = (w.to(dtype) for w in pangu_weights)
    x, offs = _pangu_problem(T, dtype, seed=T + 7)
    row_scale = torch.rand(x.shape[0], device="cuda")
    moge_kernels.set_options(triton_mlp_streams=False)
    one_stream = torch.ops.moge.grouped_mlp(x, wgu, wd, offs, row_scale)
    moge_kernels.set_options(triton_mlp_streams=True)
    assert torch.equal(torch.ops.moge.grouped_mlp(x, wgu, wd, offs, row_scale), one_stream)
    static_x, static_offs = x.clone(), offs.clone()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        torch.ops.moge.grouped_mlp(static_x, wgu, wd, static_offs, row_scale)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.moge.grouped_mlp(static_x, wgu, wd, static_offs, row_scale)
    x2, offs2 = _pangu_problem(T, dtype, seed=T + 8)
    static_x.copy_(x2)
    static_offs.copy_(offs2)
    graph.replay()
    torch.cuda.synchronize()
    moge_kernels.set_options(triton_mlp_streams=False)
    assert torch.equal(static_out, torch.ops.moge.grouped_mlp(x2, wgu, wd, offs2, row_scale))


@needs_gpu
def test_torch_compile_fullgraph_gpu(pangu_weights):
    dtype = torch.bfloat16
    wgu, wd = (w.to(dtype) for w in pangu_weights)
    x, offs = _pangu_problem(16, dtype, seed=7)
    scale = torch.rand(x.shape[0], device="cuda")

    def layer(x, offs, scale):
        return torch.ops.moge.grouped_mlp(x * 1.0, wgu, wd, offs, scale) + 0.0

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x, offs, scale), layer(x, offs, scale), atol=0, rtol=0)


@needs_gpu
def test_tma_launch_from_a_new_thread_gpu():
    """A thread whose first CUDA work is a TMA GEMM launch (autograd's device thread in a backward that
    starts with one) has no current context for Triton's descriptor encoding: launch.ensure_context
    makes the primary one current (was "invalid device context")."""
    import threading
    M, K, E, N = 256, 128, 2, 128
    x = _randn(M, K, dtype=torch.bfloat16, seed=1)
    w = _randn(E, N, K, dtype=torch.bfloat16, seed=2, scale=K ** -0.5)
    offs = torch.tensor([0, 100, M], dtype=torch.int32, device=DEVICE)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=DEVICE)
    torch.cuda.synchronize()
    errors = []

    def work():
        try:
            triton_gg.launch_grouped_gemm(x, w, offs, out, False, config=C(64, 128, 64, 4, 3, tma=True))
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001  reported below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    _check(out, *_ref_gemm(x, w, offs), what="TMA launch from a new thread")


@needs_gpu
def test_int64_addressing_gpu():
    """M*Kd > 2^31: rows past 419430 at Kd=5120 need int64 offsets."""
    dtype = torch.bfloat16
    M, K, N, E = 524288, 5120, 128, 4
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(E, N, K, device="cuda") / K ** 0.5).to(dtype)
    offs = torch.tensor([0, 1000, 300000, 300001, M], dtype=torch.int32, device="cuda")
    out = torch.ops.moge.grouped_gemm(x, w, offs)
    # check the first rows of each expert and the last rows of the tensor against fp32 matmuls
    picks = [(0, 0, 1000), (1, 1000, 1512), (2, 300000, 300001), (3, 300001, 300513), (3, M - 777, M)]
    for e, lo, hi in picks:
        exact = x[lo:hi].float() @ w[e].float().t()
        lowp = x[lo:hi] @ w[e].t()
        _check(out[lo:hi], lowp, exact, what=f"int64 rows {lo}:{hi}")
    del x
    torch.cuda.empty_cache()


@needs_gpu
@pytest.mark.parametrize("streams", [False, True], ids=["one-stream", "two-streams"])
@pytest.mark.parametrize("T", [1, 16, 128, 1024, 4096])
def test_gpu_mlp_dependent_launch_changes_no_bit(T, streams):
    """grouped_mlp's down GEMM as a dependent launch of its gate_up (option triton_pdl, the default) or
    as a plain one: the same bits, eagerly and as a graph replay, at the Pangu shape (decode to prefill:
    tiled and persistent down kernels), on one stream and on two."""
    H, I, E, K = 5120, 1344, 64, 8
    M = T * K
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w_gate_up, w_down = testing.make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=T)
    offsets = testing.random_offsets(M, E, seed=T, device="cuda")
    row_scale = torch.rand(M, device="cuda")
    runs = {}
    for pdl in (True, False):
        with moge_kernels.use_options(triton_pdl=pdl, triton_mlp_streams=streams), torch.no_grad():
            eager = torch.ops.moge.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = torch.ops.moge.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
            graph.replay()
            torch.cuda.synchronize()
            runs[pdl] = (eager, captured.clone())
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    assert torch.equal(runs[True][0], runs[True][1])


@needs_gpu
@pytest.mark.parametrize("route", ["dispatch", "permute"])
@pytest.mark.parametrize("T", [1, 16, 128, 1024])
def test_gpu_layer_dependent_launches_change_no_bit(T, route):
    """Every op's first launch as a dependent launch of the op before it (option triton_pdl: gate_up after
    the dispatch's or the permute's last launch, combine after the down GEMM, each waiting before it reads
    anything) or as plain launches: the same bits for the whole chain, eagerly and as a graph replay
    (back to back, so each op's launch overlaps the previous op's), Pangu shape, MoGE routing through
    grouped_dispatch or plain top-8 ids through grouped_permute."""
    H, I, E, G = 5120, 1344, 64, 8
    hidden, logits = testing.make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=T)
    w_gate_up, w_down = testing.make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=T)
    ids = testing.make_topk_ids(T, G, E, seed=T, device="cuda", drop=0.1, empty_every=3)
    weights = torch.rand(T, G, device="cuda")

    def chain():
        if route == "dispatch":
            x, w, _, offsets, row_index = torch.ops.moge.grouped_dispatch(hidden, logits, G)
        else:
            (x, offsets, row_index), w = torch.ops.moge.grouped_permute(hidden, ids, E), weights
        y = torch.ops.moge.grouped_mlp(x, w_gate_up, w_down, offsets)
        return torch.ops.moge.grouped_combine(y, w, row_index)

    runs = {}
    for pdl in (True, False):
        with moge_kernels.use_options(triton_pdl=pdl), moge_kernels.use_backend("triton"), torch.no_grad():
            eager = chain()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = chain()
            graph.replay()
            torch.cuda.synchronize()
            runs[pdl] = (eager, captured.clone())
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    assert torch.equal(runs[True][0], runs[True][1])
