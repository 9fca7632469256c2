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


def make_topk_ids(T, K, E, seed=0, dtype=torch.int32, device="cpu", drop=0.25, empty_every=3):
    """topk_ids [T, K] as a router outside this package gives them: distinct experts per token, every
    `empty_every`-th expert never picked (when K allows), a `drop` fraction of slots -1 (dropped)."""
    g = generator(seed)
    pool = [e for e in range(E) if not empty_every or e % empty_every]
    pool = pool if len(pool) >= K else list(range(E))
    picks = torch.rand(T, len(pool), generator=g).argsort(dim=1)[:, :K]
    ids = torch.tensor(pool, dtype=torch.long)[picks] if T else torch.zeros(0, K, dtype=torch.long)
    ids[torch.rand(T, K, generator=g) < drop] = -1
    return ids.to(dtype).to(device)


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


DISPATCH_OUTPUTS = ("permuted_hidden", "topk_weights", "topk_ids", "expert_offsets", "row_index")


def assert_dispatch_equal(out, ref, rtol=1e-6, atol=1e-7):
    """grouped_dispatch's outputs against the reference's: every output's shape, dtype and device; the
    int32 outputs and the permuted rows bit for bit; the fp32 weights within rtol/atol (NaN == NaN)."""
    for name, a, b in zip(DISPATCH_OUTPUTS, out, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, \
            f"{name}: {tuple(a.shape)} {a.dtype} {a.device} != {tuple(b.shape)} {b.dtype} {b.device}"
        if name == "topk_weights":
            assert a.dtype == torch.float32, f"{name}: {a.dtype}"
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert name == "permuted_hidden" or a.dtype == torch.int32, f"{name}: {a.dtype}"
            assert torch.equal(a, b), f"{name} differs from the reference"


def check_gemm_and_mlp(grouped_gemm, grouped_mlp, dtype, M, E, H=40, I=24):
    """grouped_gemm (with and without a bias) and grouped_mlp (with and without row_scale) against the
    reference on a ragged [M, H] problem over E experts (some empty), within TOLERANCES[dtype]; dtypes
    and shapes too."""
    from . import reference as R
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, H, generator=g).to(dtype)
    offsets = random_offsets(M, E, seed=M)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    row_scale = torch.rand(M, generator=g)
    tol = TOLERANCES[dtype]
    bias = torch.randn(E, 2 * I, generator=g).to(dtype)
    y = grouped_gemm(x, w_gate_up, offsets)
    y_bias = grouped_gemm(x, w_gate_up, offsets, bias)
    z = grouped_mlp(x, w_gate_up, w_down, offsets)
    z_scaled = grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
    torch.testing.assert_close(y, R.grouped_gemm(x, w_gate_up, offsets), **tol)
    torch.testing.assert_close(y_bias, R.grouped_gemm(x, w_gate_up, offsets, bias), **tol)
    torch.testing.assert_close(z, R.grouped_mlp(x, w_gate_up, w_down, offsets), **tol)
    torch.testing.assert_close(z_scaled, R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale), **tol)
    assert y.dtype == z.dtype == z_scaled.dtype == dtype
    assert y.shape == (M, 2 * I) and z.shape == (M, H)


def sample_inputs(device="cpu", dtype=torch.float32):
    """{op: [(args, kwargs), ...]}: small ragged cases of every op, shared by correctness tests, opcheck
    and gradient tests. Covers T=0, T=1, empty experts, odd H, k_g=2, sigmoid, expert_scale, expert_mask,
    row_scale."""
    samples = {"grouped_dispatch": [], "grouped_permute": [], "grouped_gemm": [], "grouped_mlp": [],
               "grouped_combine": []}
    for T, E, G, k_g, H, extra in [(0, 8, 2, 1, 12, {}),
                                   (1, 8, 4, 1, 12, {}),
                                   (9, 16, 4, 2, 12, dict(expert_mask=True)),
                                   (7, 16, 4, 2, 20, dict(score_func="sigmoid", renormalize=True)),
                                   (33, 64, 8, 1, 36, dict(expert_scale=True))]:
        hidden, logits = make_routing_inputs(T, E, H, dtype, device, seed=T, dead_experts=3)
        if extra.get("expert_scale"):
            extra = dict(extra, expert_scale=torch.rand(E, generator=generator(T)).add(0.5).to(device))
        if extra.get("expert_mask"):   # k_g + 1 kept experts per group, at varying positions
            keep = torch.rand(G, E // G, generator=generator(T)).argsort(-1) <= k_g
            extra = dict(extra, expert_mask=keep.reshape(E).to(device))
        samples["grouped_dispatch"].append(((hidden, logits, G, k_g), extra))
    for T, K, E, H, id_dtype in [(0, 2, 4, 8, torch.int32), (1, 1, 3, 12, torch.int32),
                                 (9, 4, 6, 20, torch.int64)]:
        hidden = torch.randn(T, H, generator=generator(T)).to(dtype).to(device)
        samples["grouped_permute"].append(((hidden, make_topk_ids(T, K, E, seed=T, dtype=id_dtype,
                                                                  device=device), E), {}))
    for M, E, N, Kd in [(0, 4, 8, 12), (1, 4, 8, 12), (37, 8, 24, 20)]:
        g = generator(M)
        x = torch.randn(M, Kd, generator=g).to(dtype).to(device)
        w = (torch.randn(E, N, Kd, generator=g) / Kd ** 0.5).to(dtype).to(device)
        offsets = random_offsets(M, E, seed=M, device=device)
        samples["grouped_gemm"].append(((x, w, offsets), {}))
        bias = torch.randn(E, N, generator=g).to(dtype).to(device)
        samples["grouped_gemm"].append(((x, w, offsets), dict(bias=bias)))
        w_gate_up, w_down = make_expert_weights(E, Kd, N // 2, dtype, device, seed=M)
        samples["grouped_mlp"].append(((x, w_gate_up, w_down, offsets), {}))
        row_scale = torch.rand(M, generator=g).to(device)
        samples["grouped_mlp"].append(((x, w_gate_up, w_down, offsets), dict(row_scale=row_scale)))
    for T, K, H in [(0, 2, 8), (1, 8, 12), (9, 4, 20)]:
        g = generator(T)
        expert_out = torch.randn(T * K, H, generator=g).to(dtype).to(device)
        weights = torch.rand(T, K, generator=g).to(device)
        row_index = torch.randperm(T * K, generator=g).to(torch.int32).view(T, K).to(device)
        samples["grouped_combine"].append(((expert_out, weights, row_index), {}))
        shared = torch.randn(T, H, generator=g).to(dtype).to(device)
        samples["grouped_combine"].append(((expert_out, weights, row_index), dict(shared_out=shared)))
    return samples
