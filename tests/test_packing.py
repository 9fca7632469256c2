"""Packed expert weights (moge_kernels.packing): the layout, every backend's ops given packed weights
against the reference on unpacked ones, opcheck, gradients, and clear errors for bad shapes."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import packing
from moge_kernels import reference as R
from moge_kernels.testing import TOLERANCES, make_expert_weights, random_offsets

from triton_testing import FLOAT_DTYPES, HAS_CUDA, RUNS_HERE

DEVICE = "cuda" if HAS_CUDA else "cpu"
# backends that run here on DEVICE: triton only where its kernels run (GPU or the interpreter)
BACKENDS = [b for b in ("reference", "cpu", "cuda", "triton")
            if mk.backends()[b]["available"] and (b != "triton" or RUNS_HERE)
            and (b != "cuda" or HAS_CUDA) and (b != "cpu" or DEVICE == "cpu")]


def _problem(M, E, H, I, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).to(dtype).to(DEVICE)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype, DEVICE, seed=seed + 1)
    offsets = random_offsets(M, E, seed=seed, device=DEVICE)
    return x, w_gate_up, w_down, offsets


def test_layout():
    w = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    p = packing.pack_expert_weights(w, block=4)
    assert p.shape == (2, 3, 2, 4) and packing.pack_block(p) == 4
    assert torch.equal(p, w.view(2, 3, 2, 4))                     # same values as the k-blocked view
    # storage is k-block-major: block 0 of every row, then block 1
    assert p.permute(0, 2, 1, 3).is_contiguous()
    assert torch.equal(p.permute(0, 2, 1, 3).reshape(-1)[:12], w[0, :, :4].reshape(-1))
    assert torch.equal(packing.unpack(p), w)
    assert packing.pack_block(w.view(2, 3, 2, 4)) == 0            # a plain view is not packed
    assert packing.pack_block(w) == 0
    with pytest.raises(ValueError, match="multiple of block"):
        packing.pack_expert_weights(w, block=3)
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        packing.pack_expert_weights(w[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("M", [0, 1, 45])
def test_ops_take_packed_weights(backend, dtype, M):
    E, H, I = 6, 64, 32
    x, w_gate_up, w_down, offsets = _problem(M, E, H, I, dtype, seed=M + 3)
    row_scale = torch.rand(M, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    pgu, pd = packing.pack_expert_weights(w_gate_up, 16), packing.pack_expert_weights(w_down, 16)
    tol = TOLERANCES[dtype] if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2) \
        if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    with mk.use_backend(backend):
        y = mk.grouped_gemm(x, pgu, offsets)
        out = mk.grouped_mlp(x, pgu, pd, offsets, row_scale)
    torch.testing.assert_close(y, R.grouped_gemm(x, w_gate_up, offsets), **tol)
    torch.testing.assert_close(out, R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale), **tol)


@pytest.mark.parametrize("block", [8, 48])
def test_blocks_no_triton_slice_fits(block):
    """Blocks of 8 (below tl.dot's 16) or 48 (not a power of two): still correct on every backend."""
    x, w_gate_up, w_down, offsets = _problem(21, 3, 96, 48, torch.float32, seed=9)
    pgu, pd = packing.pack_expert_weights(w_gate_up, block), packing.pack_expert_weights(w_down, block)
    for backend in BACKENDS:
        with mk.use_backend(backend):
            out = mk.grouped_mlp(x, pgu, pd, offsets)
        torch.testing.assert_close(out, R.grouped_mlp(x, w_gate_up, w_down, offsets), **TOLERANCES[torch.float32])


def test_opcheck_packed():
    x, w_gate_up, w_down, offsets = _problem(20, 4, 32, 16, torch.float32, seed=5)
    pgu, pd = packing.pack_expert_weights(w_gate_up, 16), packing.pack_expert_weights(w_down, 16)
    torch.library.opcheck(torch.ops.moge.grouped_gemm.default, (x, pgu, offsets),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.moge.grouped_mlp.default, (x, pgu, pd, offsets, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradients_of_packed_weights():
    """Packed weights train too: their gradient is the unpacked weights' gradient, k-blocked."""
    x, w_gate_up, w_down, offsets = _problem(30, 4, 32, 16, torch.float32, seed=8)
    grads = []
    for pack in (False, True):
        wgu = w_gate_up.clone().requires_grad_()
        wd = w_down.clone().requires_grad_()
        xi = x.clone().requires_grad_()
        a = packing.pack_expert_weights(wgu, 16).requires_grad_() if pack else wgu
        b = packing.pack_expert_weights(wd, 16).requires_grad_() if pack else wd
        out = torch.ops.moge.grouped_mlp(xi, a, b, offsets)
        out.square().sum().backward()
        grads.append((xi.grad, packing.unpack(a.grad), packing.unpack(b.grad)))
        assert a.grad.shape == a.shape and b.grad.shape == b.shape
    for plain, packed in zip(*grads):
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_bad_packed_shapes_name_the_argument():
    x, w_gate_up, w_down, offsets = _problem(10, 4, 32, 16, torch.float32)
    pgu = packing.pack_expert_weights(w_gate_up, 16)
    with pytest.raises(ValueError, match="w_gate_up"):
        torch.ops.moge.grouped_mlp(x[:, :16], pgu, w_down, offsets)
    with pytest.raises(ValueError, match="w_down"):
        torch.ops.moge.grouped_mlp(x, pgu, packing.pack_expert_weights(w_down[:, :16], 8), offsets)
    with pytest.raises(TypeError, match="w"):
        torch.ops.moge.grouped_gemm(x, pgu.half(), offsets)
