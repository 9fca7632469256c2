"""The Gluon FP8 GEMM (moge_kernels/triton/fp8_gluon.py) against the reference with the same quantization:
every Gluon candidate forced for gate_up and down on the GPU over ragged shapes (partial column tiles,
a partial k-block, empty experts, M not a multiple of BM, M = 1), the plain GEMM with dropped rows (zero
tail) and row scales, and that the Gluon kernel really ran; on the CPU (interpreter) a Gluon config falls
back to the Triton kernel with the same tile."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import fp8
from moge_kernels.testing import make_expert_weights, random_offsets

from triton_testing import HAS_CUDA, RUNS_HERE

REF_TOL = 1e-2          # vs the reference with the same quantization (issue 21's bound)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _gluon_configs(gemm):
    from moge_kernels.triton import gemm_configs as gc
    return [c for c in gc.FP8_CANDIDATES[("prefill", gemm)] if c.gluon]


def _problem(M, E, H, I, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(dtype)
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.float32, "cpu", seed=seed + 1)
    offsets = random_offsets(M, E, seed=seed, empty_every=3)
    gu = mk.quantize_expert_weights(w_gate_up, "fp8_block", parts=2)
    dn = mk.quantize_expert_weights(w_down, "fp8_block")
    return x.to(device), gu.to(device), dn.to(device), offsets.to(device)


def _count_gluon_launches(monkeypatch):
    from moge_kernels.triton import fp8_gluon
    calls = []
    real = fp8_gluon.launch

    def spy(*args, **kwargs):
        calls.append(kwargs["swiglu"])
        return real(*args, **kwargs)
    monkeypatch.setattr(fp8_gluon, "launch", spy)
    return calls


def _run(x, gu, dn, offsets, row_scale=None):
    with mk.use_backend("triton"):
        y = mk.grouped_mlp(x, gu, dn, offsets, row_scale)
    with mk.use_backend("reference"):
        want = mk.grouped_mlp(x, gu, dn, offsets, row_scale)
    return y, want


gpu = pytest.mark.skipif(not HAS_CUDA or not RUNS_HERE, reason="needs CUDA and the triton backend")


@gpu
@pytest.mark.parametrize("pair", range(4))
@pytest.mark.parametrize("shape", [(300, 5, 256, 144), (1, 4, 256, 128), (513, 3, 384, 208), (700, 4, 1280, 336)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gluon_mlp_against_reference(pair, shape, dtype, monkeypatch):
    """I = 144 / 208 / 336 (16-byte rows, as TMA needs): partial gate / up column tiles and a partial
    k-block in down; H = 256 / 384 / 1280: two, three and ten k-steps (even and odd counts, more steps
    than ring stages); an empty expert every third; row scales."""
    from moge_kernels.triton import fp8_gemm, fp8_gluon
    if not fp8_gluon.AVAILABLE or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on sm_90")
    gu_cfgs, dn_cfgs = _gluon_configs("gate_up"), _gluon_configs("down")
    monkeypatch.setitem(fp8_gemm._forced, "gate_up", gu_cfgs[pair % len(gu_cfgs)])
    monkeypatch.setitem(fp8_gemm._forced, "down", dn_cfgs[pair % len(dn_cfgs)])
    calls = _count_gluon_launches(monkeypatch)
    M, E, H, I = shape
    x, gu, dn, offsets = _problem(M, E, H, I, dtype, "cuda", seed=pair)
    row_scale = torch.rand(M, device="cuda") if pair % 2 else None
    y, want = _run(x, gu, dn, offsets, row_scale)
    assert calls == [True, False]            # gate_up and down both through the Gluon kernel
    assert y.dtype == dtype and rel_err(y, want) <= REF_TOL


@gpu
@pytest.mark.parametrize("cfg", range(4))
def test_gluon_plain_gemm_zero_tail(cfg, monkeypatch):
    """grouped_gemm with dropped rows (expert_offsets[E] < M): the rows past it are zeros, the rest match
    the reference; N = 384 in 128-row tiles of one scale block each."""
    from moge_kernels.triton import fp8_gemm, fp8_gluon
    if not fp8_gluon.AVAILABLE or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on sm_90")
    monkeypatch.setitem(fp8_gemm._forced, "down", _gluon_configs("down")[cfg])
    calls = _count_gluon_launches(monkeypatch)
    M, E, K, N = 260, 4, 256, 384
    g = torch.Generator().manual_seed(cfg)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    w = mk.quantize_expert_weights(torch.randn(E, N, K, generator=g) / 16, "fp8_block").to("cuda")
    offsets = torch.tensor([0, 50, 50, 120, 200], dtype=torch.int32, device="cuda")   # 60 rows dropped
    torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")   # freed: y likely reuses it
    with mk.use_backend("triton"):
        y = mk.grouped_gemm(x, w, offsets)
    with mk.use_backend("reference"):
        want = mk.grouped_gemm(x, w, offsets)
    assert calls == [False]
    assert torch.all(y[200:] == 0)
    assert rel_err(y[:200], want[:200]) <= REF_TOL


@gpu
def test_gluon_layer_pangu_width(monkeypatch):
    """The table's large-M path at Pangu's widths (H = 5120, I = 1344, 8 experts of 64): the FP8 mlp
    with the Gluon configs matches the reference."""
    from moge_kernels.triton import fp8_gemm, fp8_gluon
    if not fp8_gluon.AVAILABLE or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on sm_90")
    monkeypatch.setitem(fp8_gemm._forced, "gate_up", _gluon_configs("gate_up")[0])
    monkeypatch.setitem(fp8_gemm._forced, "down", _gluon_configs("down")[0])
    x, gu, dn, offsets = _problem(2048, 8, 5120, 1344, torch.bfloat16, "cuda", seed=5)
    y, want = _run(x, gu, dn, offsets)
    assert rel_err(y, want) <= REF_TOL


@pytest.mark.skipif(not RUNS_HERE, reason="triton kernels need a GPU or the interpreter")
def test_gluon_config_falls_back_to_triton_off_hopper(monkeypatch):
    """Where the Gluon kernel cannot run (the interpreter here, a GPU other than sm_90), a Gluon config
    runs the Triton kernel with the same tile, and gives the reference's result."""
    from moge_kernels.triton import fp8_gemm, fp8_gluon
    if HAS_CUDA and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("sm_90 runs the Gluon kernel itself")
    monkeypatch.setitem(fp8_gemm._forced, "gate_up", _gluon_configs("gate_up")[2])
    monkeypatch.setitem(fp8_gemm._forced, "down", _gluon_configs("down")[2])
    calls = _count_gluon_launches(monkeypatch)
    x, gu, dn, offsets = _problem(70, 3, 256, 136, torch.float32, "cuda" if HAS_CUDA else "cpu", seed=3)
    assert not fp8_gluon.supported(x.to(fp8.E4M3), gu.weight, 128, 128)
    y, want = _run(x, gu, dn, offsets)
    assert calls == [] and rel_err(y, want) <= REF_TOL
