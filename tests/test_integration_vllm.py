"""moge_kernels.integrations.vllm.moge_routing_function, called as vLLM's FusedMoE calls a
custom_routing_function (keywords), against the reference routing, on every backend available here.
vLLM itself is not installed: this checks the contract, not a vLLM run."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference
from moge_kernels.integrations.vllm import moge_routing_function

BACKENDS = [b for b in ("cpu", "triton", "reference") if mk.backends()[b]["available"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,G,k_g,renormalize,score_func,scaled", [
    (7, 16, 4, 1, False, "softmax", True),     # Pangu-like: one expert per group, router_scale
    (5, 16, 4, 2, True, "sigmoid", False),
    (1, 8, 8, 1, False, "softmax", False),
    (0, 8, 2, 1, False, "softmax", True),
])
def test_matches_reference_routing(backend, T, E, G, k_g, renormalize, score_func, scaled):
    g = torch.Generator().manual_seed(T * 31 + E)
    hidden = torch.randn(T, 24, generator=g)
    logits = torch.randn(T, E, generator=g)
    router_scale = torch.rand(1, E, generator=g) + 0.5 if scaled else None
    fn = moge_routing_function(num_groups=G, topk_per_group=k_g, expert_scale=router_scale,
                               score_func=score_func)
    with mk.use_backend(backend):
        weights, ids = fn(hidden_states=hidden, gating_output=logits, topk=G * k_g, renormalize=renormalize)
    want_w, want_ids = reference.route(logits, G, k_g, None if router_scale is None else router_scale[0],
                                       renormalize, score_func)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (T, G * k_g)
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def test_group_count_from_topk_callable_scale_and_extra_arguments():
    logits = torch.randn(6, 16)
    scale = torch.rand(16) + 0.5
    fn = moge_routing_function(expert_scale=lambda: scale)
    weights, ids = fn(torch.randn(6, 4), logits, 4, False, "ignored", extra=None)   # G = topk = 4
    want_w, want_ids = reference.route(logits, 4, 1, scale)
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_w)
    with pytest.raises(ValueError, match="topk=5"):
        moge_routing_function(num_groups=4)(torch.randn(6, 4), logits, 5, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_mask_and_pangu_vote(backend):
    """A fixed mask, a mask computed from the batch, and num_voted_experts (Pangu's 300I Duo routing) each
    route exactly as grouped_dispatch with that mask."""
    g = torch.Generator().manual_seed(3)
    T, E, G = 9, 16, 4
    hidden, logits = torch.randn(T, 8, generator=g), torch.randn(T, E, generator=g)
    fixed = torch.tensor([True, False, True, True] * 4)
    voted = mk.voted_expert_mask(logits, G, 2)
    cases = [(moge_routing_function(num_groups=G, expert_mask=fixed), fixed),
             (moge_routing_function(num_groups=G, expert_mask=lambda lg: mk.voted_expert_mask(lg, G, 2)), voted),
             (moge_routing_function(num_groups=G, num_voted_experts=2), voted)]
    for fn, mask in cases:
        with mk.use_backend(backend):
            weights, ids = fn(hidden_states=hidden, gating_output=logits, topk=G, renormalize=False)
        _, want_w, want_ids, _, _ = reference.grouped_dispatch(hidden, logits, G, 1, None, False, "softmax",
                                                               mask)
        torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
        torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)
        assert bool(mask[ids.long()].all()), "a masked expert was chosen"
    with pytest.raises(ValueError, match="not both"):
        moge_routing_function(num_groups=G, expert_mask=fixed, num_voted_experts=2)
