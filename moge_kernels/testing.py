"""Input makers and tolerances shared by the test suite, the self-check and the benchmarks."""
from __future__ import annotations

import torch

# Elementwise tolerances for outputs that are computed the same way as the reference up to summation
# order (dispatch weights, combine). GEMM outputs use `assert_error_within` instead.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=torch.device(device).type).manual_seed(seed)


def make_routing_inputs(T, E, H, dtype=torch.float32, device="cpu", seed=0, logits_dtype=torch.float32,
                        dead_experts=0):
    """hidden [T,H] in dtype, router_logits [T,E] in logits_dtype.

    `dead_experts` > 0 pushes the logits of every `dead_experts`-th expert far down, so those experts
    get no rows whenever their group has another candidate (ragged, empty experts)."""
    g = generator(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g) * 2
    if dead_experts:
        logits[:, ::dead_experts] -= 30.0
    return hidden.to(device), logits.to(logits_dtype).to(device)


def make_expert_weights(E, H, I, dtype=torch.float32, device="cpu", seed=1):
    """w_gate_up [E,2I,H], w_down [E,H,I], scaled so activations stay O(1)."""
    g = generator(seed)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=g) / I ** 0.5
    return w_gate_up.to(dtype).to(device), w_down.to(dtype).to(device)


def random_offsets(M, E, seed=0, empty_every=3, device="cpu"):
    """expert_offsets [E+1] int32 over M rows, ragged, every `empty_every`-th expert empty."""
    g = generator(seed)
    weights = torch.rand(E, generator=g) + 0.05
    if empty_every:
        weights[::empty_every] = 0
    if M == 0 or weights.sum() == 0:
        counts = torch.zeros(E, dtype=torch.long)
    else:
        picks = torch.multinomial(weights, M, replacement=True, generator=g)
        counts = torch.bincount(picks, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(device)


def relative_error(out, exact) -> float:
    out64, exact64 = out.double(), exact.double()
    return ((out64 - exact64).norm() / exact64.norm().clamp_min(1e-30)).item()


def assert_error_within(out, lowp_ref, exact_ref, factor=2.0, floor=1e-6, what="output"):
    """flash-attention's rule: the kernel's error against an exact (fp32/fp64) reference is at most
    `factor` times the error of the same computation done by PyTorch in the low precision, plus `floor`."""
    assert out.shape == exact_ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact_ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, ref_err = relative_error(out, exact_ref), relative_error(lowp_ref, exact_ref)
    assert err <= factor * ref_err + floor, \
        f"{what}: relative error {err:.3e} > {factor} x PyTorch's {ref_err:.3e} + {floor:.0e}"
