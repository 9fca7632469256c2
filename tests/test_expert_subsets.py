"""Serving on a subset of the experts (moge_kernels/expert_subsets.py, metrics.expert_importance,
MoGELayer.prune_experts_): Pangu's batch vote, PreMoe-style importance and pruning, checkpoints."""
from collections import Counter

import pytest
import torch

import moge_kernels as mk
from moge_kernels import MoGELayer
from moge_kernels import reference as R
from moge_kernels.metrics import expert_importance

H, I, E, G, IS = 24, 12, 16, 4, 20      # hidden, expert intermediate, experts, groups (S = 4), shared


# ----------------------------------------------------------------------------- the vote
def _plain_vote(logits, num_groups, n):
    """Pangu's vote restated with Python loops: each token's best in-group position (first of equal
    scores) is one vote; keep the n positions with most votes, equal counts -> lower position."""
    T, E = logits.shape
    S = E // num_groups
    scores = torch.softmax(logits.float(), dim=-1).nan_to_num(nan=float("-inf")).tolist()
    mask = [False] * E
    for g in range(num_groups):
        votes = Counter()
        for t in range(T):
            row = scores[t][g * S:(g + 1) * S]
            votes[max(range(S), key=lambda s: (row[s], -s))] += 1
        for s in sorted(range(S), key=lambda s: (-votes[s], s))[:n]:
            mask[g * S + s] = True
    return torch.tensor(mask)


def _tied_logits(T, E, seed):
    """Few distinct values: equal scores inside a group and equal vote counts are common."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (T, E), generator=g).float()


@pytest.mark.parametrize("T", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_voted_expert_mask_matches_plain_vote(T, n):
    for logits in (torch.randn(T, E, generator=torch.Generator().manual_seed(T)) * 2, _tied_logits(T, E, T)):
        mask = mk.voted_expert_mask(logits, G, n)
        assert mask.dtype == torch.bool and mask.shape == (E,)
        assert torch.equal(mask, _plain_vote(logits, G, n)), (T, n, logits)
        assert mask.view(G, -1).sum(-1).tolist() == [n] * G


def test_voted_expert_mask_nan_and_input_dtype():
    logits = torch.randn(9, E, generator=torch.Generator().manual_seed(5))
    logits[3, 2] = float("nan")            # one NaN logit makes that token's softmax NaN: it votes for s=0
    assert torch.equal(mk.voted_expert_mask(logits, G, 2), _plain_vote(logits, G, 2))
    assert torch.equal(mk.voted_expert_mask(logits.half(), G, 2), _plain_vote(logits.half(), G, 2))


def test_voted_expert_mask_errors():
    logits = torch.randn(4, E)
    with pytest.raises(ValueError, match="num_voted_experts"):
        mk.voted_expert_mask(logits, G, 5)
    with pytest.raises(ValueError, match="num_voted_experts"):
        mk.voted_expert_mask(logits, G, 0)
    with pytest.raises(ValueError, match="num_groups"):
        mk.voted_expert_mask(logits, 3, 1)
    with pytest.raises(ValueError, match="router_logits"):
        mk.voted_expert_mask(logits[0], G, 1)


def test_voted_expert_mask_compiles():
    logits = torch.randn(11, E)
    fn = torch.compile(mk.voted_expert_mask, fullgraph=True, dynamic=True)
    assert torch.equal(fn(logits, G, 3), _plain_vote(logits, G, 3))


# ----------------------------------------------------------------------------- importance
def _plain_importance(logits, num_groups, k_g, expert_scale, renormalize):
    """Mean over tokens of the routing weight where chosen (0 elsewhere), and the choice counts."""
    T, E = logits.shape
    w, ids = R.route(logits, num_groups, k_g, expert_scale, renormalize)
    score, chosen = [0.0] * E, [0] * E
    for t in range(T):
        for k in range(ids.shape[1]):
            score[ids[t, k]] += float(w[t, k])
            chosen[ids[t, k]] += 1
    return torch.tensor(score, dtype=torch.float64) / max(T, 1), torch.tensor(chosen)


@pytest.mark.parametrize("k_g,renormalize", [(1, False), (2, True)])
def test_expert_importance_accumulates(k_g, renormalize):
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(E, generator=gen) + 0.5
    batches = [torch.randn(T, E, generator=gen) for T in (5, 0, 17, 1)]
    state = None
    for logits in batches:
        state = expert_importance(logits, G, k_g, scale, renormalize, state=state)
    score, chosen = _plain_importance(torch.cat(batches), G, k_g, scale, renormalize)
    assert state.num_tokens == 23
    torch.testing.assert_close(state.score, score, atol=1e-6, rtol=1e-6)
    assert torch.equal(state.chosen, chosen)
    torch.testing.assert_close(state.frequency, chosen.double() / 23)
    # merging two accumulators equals accumulating both
    a = expert_importance(batches[0], G, k_g, scale, renormalize)
    b = expert_importance(torch.cat(batches[1:]), G, k_g, scale, renormalize)
    torch.testing.assert_close((a + b).score, state.score, atol=1e-12, rtol=1e-12)
    # the keep set: per group the highest scores, ties to the lower id, ascending
    top = state.top_experts(2)
    assert top.dtype == torch.int64 and top.shape == (2 * G,)
    for g in range(G):
        s = score[g * 4:(g + 1) * 4].tolist()
        best = sorted(range(4), key=lambda i: (-s[i], i))[:2]
        assert top[2 * g:2 * g + 2].tolist() == sorted(g * 4 + i for i in best)
    with pytest.raises(ValueError, match="experts_per_group"):
        state.top_experts(5)


# ----------------------------------------------------------------------------- pruning
def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("shared_intermediate_size", IS)
    layer = MoGELayer(H, I, E, G, **kw)
    with torch.no_grad():
        layer.router_scale.copy_(torch.rand(E) + 0.5)
    return layer


def _full_layer_dropped_at_minus_inf(layer, x, kept_ids):
    """The unpruned layer's reference output with every dropped expert's logit at -inf."""
    logits = x @ layer.gate.weight.t()
    dropped = torch.ones(layer.num_experts, dtype=torch.bool)
    dropped[kept_ids] = False
    logits = logits.masked_fill(dropped, float("-inf"))
    return R.moge_forward(x, logits, layer.w_gate_up, layer.w_down, layer.num_groups, layer.topk_per_group,
                          layer.router_scale, layer.renormalize, layer.score_func, layer.shared_w_gate_up,
                          layer.shared_w_down)


KEEPS = {   # (topk_per_group, keep as given by the user)
    "mask_half": (1, torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)),
    "ids_one_per_group": (1, [3, 4, 10, 13]),
    "ids_unsorted_k2": (2, torch.tensor([15, 0, 1, 6, 7, 9, 8, 12, 2, 5, 11, 14])),
}


@pytest.mark.parametrize("name", list(KEEPS))
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_pruned_layer_equals_full_layer_with_dropped_logits_at_minus_inf(name, score_func):
    k_g, keep = KEEPS[name]
    layer = _layer(topk_per_group=k_g, score_func=score_func, renormalize=k_g > 1)
    full = _layer(topk_per_group=k_g, score_func=score_func, renormalize=k_g > 1)
    kept_ids = mk.expert_subsets.kept_expert_ids(keep, E, G)
    assert layer.prune_experts_(keep) is layer
    E2 = len(kept_ids)
    assert layer.num_experts == E2 and layer.gate.weight.shape == (E2, H)
    assert layer.w_gate_up.shape == (E2, 2 * I, H) and layer.w_down.shape == (E2, H, I)
    assert layer.router_scale.shape == (E2,) and layer.kept_expert_ids.tolist() == kept_ids
    assert torch.equal(layer.w_down, full.w_down[kept_ids])
    assert all(p.requires_grad for p in layer.parameters())
    x = torch.randn(13, H)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, _full_layer_dropped_at_minus_inf(full, x, kept_ids), atol=1e-5, rtol=1e-5)
    # still trainable: aux loss and gradients over the smaller tables
    out, aux = layer(x, return_aux_loss=True)
    (out.pow(2).mean() + aux).backward()
    assert layer.w_gate_up.grad.shape == (E2, 2 * I, H) and layer.gate.weight.grad.shape == (E2, H)


def test_prune_packed_weights_and_twice_maps_to_original_ids():
    layer, full = _layer(), _layer()
    layer.pack_weights_(block=4)          # K = 24 (w_gate_up) and 12 (w_down): blocks of 4
    layer.prune_experts_([0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 15])     # 3 of 4 per group
    assert layer.w_gate_up.dim() == 4
    layer.unpack_weights_()
    layer.prune_experts_(torch.tensor([True, False, True] * 4))          # local 0, 2 of each group
    assert layer.kept_expert_ids.tolist() == [0, 2, 5, 7, 9, 11, 12, 15]
    x = torch.randn(6, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _full_layer_dropped_at_minus_inf(full, x, [0, 2, 5, 7, 9, 11, 12, 15]),
                                   atol=1e-5, rtol=1e-5)


def test_pruned_checkpoint_round_trip():
    layer = _layer()
    layer.prune_experts_([0, 3, 4, 6, 9, 10, 12, 13])
    x = torch.randn(7, H)
    with torch.no_grad():
        expected = layer(x)
    sd = layer.state_dict()
    assert sd["kept_expert_ids"].tolist() == [0, 3, 4, 6, 9, 10, 12, 13]
    # into a layer built from the checkpoint (sizes inferred), from either checkpoint layout
    for ckpt in (sd, layer.per_expert_state_dict("m.")):
        loaded = MoGELayer.from_pretrained_state_dict(ckpt, num_groups=G, prefix="m." if "m.gate.weight" in ckpt else "")
        assert loaded.num_experts == 8 and torch.equal(loaded.kept_expert_ids, sd["kept_expert_ids"])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    # into a layer built with num_experts = E' (strict: every key, the ids included, is taken)
    other = MoGELayer(H, I, 8, G, shared_intermediate_size=IS)
    other.load_state_dict(sd)
    assert torch.equal(other.kept_expert_ids, sd["kept_expert_ids"])
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, atol=0, rtol=0)
    # an unpruned checkpoint still loads strictly (no ids key expected)
    _layer(seed=1).load_state_dict(_layer(seed=2).state_dict())


def test_compact_experts_functional():
    gen = torch.Generator().manual_seed(0)
    router_weight, scale = torch.randn(E, H, generator=gen), torch.rand(E, generator=gen)
    w_gate_up, w_down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    out = mk.compact_experts([8, 0, 5, 13], G, router_weight, w_gate_up, w_down, scale)
    assert out.kept_ids.tolist() == [0, 5, 8, 13]
    assert torch.equal(out.router_weight, router_weight[[0, 5, 8, 13]])
    assert torch.equal(out.router_scale, scale[[0, 5, 8, 13]])
    assert torch.equal(out.w_gate_up, w_gate_up[[0, 5, 8, 13]]) and torch.equal(out.w_down, w_down[[0, 5, 8, 13]])
    assert out.w_gate_up.data_ptr() != w_gate_up.data_ptr()
    assert mk.compact_experts([0, 5, 8, 13], G, router_weight, w_gate_up, w_down).router_scale is None


def test_unequal_or_bad_keep_sets_raise():
    layer = _layer(topk_per_group=2)
    with pytest.raises(ValueError, match="same number of experts in every group.*per-group counts \\[2, 2, 2, 1\\]"):
        layer.prune_experts_([0, 1, 4, 5, 8, 9, 12])
    with pytest.raises(ValueError, match="at least 2 expert"):
        layer.prune_experts_([0, 4, 8, 12])
    with pytest.raises(ValueError, match="more than once"):
        layer.prune_experts_([0, 0, 4, 5, 8, 9, 12, 13])
    with pytest.raises(ValueError, match="outside"):
        layer.prune_experts_([0, 1, 4, 5, 8, 9, 12, 16])
    with pytest.raises(ValueError, match="shape \\(16,\\)"):
        layer.prune_experts_(torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer expert ids"):
        layer.prune_experts_(torch.ones(16))
    assert layer.num_experts == E and layer.w_gate_up.shape[0] == E        # a failed prune changes nothing
    with pytest.raises(ValueError, match="w_down holds 3 experts"):
        mk.compact_experts([0], 1, torch.randn(4, H), torch.randn(4, 2, H), torch.randn(3, H, 1))
