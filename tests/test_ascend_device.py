"""The ascend backend on a real Ascend NPU against the reference on CPU. Skipped unless torch_npu imports
and an NPU is present (never the case in this project's CI: these tests exist for machines that have one).

Tolerances: dispatch and combine do the reference's arithmetic (exact ids, offsets, rows; combine within
one rounding); the GEMM paths follow the flash-attention rule of moge_kernels.testing.assert_error_within.
"""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import TOLERANCES, assert_error_within, make_expert_weights, make_routing_inputs

try:
    import torch_npu  # noqa: F401
    HAS_NPU = torch.npu.is_available()
except Exception:   # not installed, or installed without the CANN runtime
    HAS_NPU = False

pytestmark = pytest.mark.skipif(not (HAS_NPU and mk.backends()["ascend"]["available"]),
                                reason="needs torch_npu, CANN and an Ascend NPU")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("T", [0, 1, 33, 1024])
@pytest.mark.parametrize("E,G,k_g", [(64, 8, 1), (64, 8, 2), (128, 8, 1)])
def test_dispatch_on_npu(T, E, G, k_g):
    H = 2048 if E == 128 else 5120 // 4   # E=128, H=2048 takes torch_npu's aclnnMoeInitRoutingV2 path
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, seed=T, dead_experts=5)
    with mk.use_backend("ascend"):
        out = mk.grouped_dispatch(hidden.npu(), logits.npu(), G, k_g)
    ref = R.grouped_dispatch(hidden, logits, G, k_g)
    for name, a, b in zip(("permuted_hidden", "topk_weights", "topk_ids", "expert_offsets", "row_index"), out, ref):
        if name == "topk_weights":
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 128, 1000])
def test_moge_layer_on_npu(dtype, T):
    E, G, H, I = 64, 8, 1024, 336    # Pangu Pro MoE's routing; H and I cut so the CPU reference stays quick
    hidden, logits = make_routing_inputs(T, E, H, dtype, seed=T)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    exact = R.moge_forward(hidden.double(), logits, w_gate_up.double(), w_down.double(), G)
    lowp = R.moge_forward(hidden, logits, w_gate_up, w_down, G)
    with mk.use_backend("ascend"):
        out = mk.moge_forward(hidden.npu(), logits.npu(), w_gate_up.npu(), w_down.npu(), G).cpu()
    assert out.dtype == dtype
    assert_error_within(out, lowp, exact, what=f"ascend moge_forward {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_on_npu(dtype):
    T, K, H = 257, 8, 1000
    g = torch.Generator().manual_seed(0)
    expert_out = torch.randn(T * K, H, generator=g).to(dtype)
    weights = torch.rand(T, K, generator=g) + 0.01
    row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K)
    shared = torch.randn(T, H, generator=g).to(dtype)
    with mk.use_backend("ascend"):
        out = mk.grouped_combine(expert_out.npu(), weights.npu(), row_index.npu(), shared.npu()).cpu()
    torch.testing.assert_close(out, R.grouped_combine(expert_out, weights, row_index, shared), **TOLERANCES[dtype])
