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
    with pytest.raises(ValueError, match="score_func"):
        mk.voted_expert_mask(logits, G, 1, score_func="tanh")


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
    quantized = _layer(seed=1, shared_intermediate_size=0)
    quantized.quantize_()
    with pytest.raises(RuntimeError, match="prune before quantize_"):
        quantized.prune_experts_([0, 4, 8, 12])
    with pytest.raises(ValueError, match="w_down holds 3 experts"):
        mk.compact_experts([0], 1, torch.randn(4, H), torch.randn(4, 2, H), torch.randn(3, H, 1))


# ----------------------------------------------------------------------------- expert_mask in routing
from moge_kernels import testing                                         # noqa: E402
from moge_kernels.testing import assert_dispatch_equal, make_routing_inputs   # noqa: E402

from conftest import HAS_CUDA, requires_cuda                              # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [b for b in ("reference", "cpu", "triton", "cuda")
            if mk.backends()[b]["available"] and (b != "cuda" or HAS_CUDA)]
DISPATCH_SHAPES = [   # T, E, G, k_g, H: no tokens, decode, k_g=2, Pangu routing, nothing a power of two,
    (0, 8, 2, 1, 12), (1, 64, 8, 1, 40), (5, 16, 4, 2, 20), (33, 64, 8, 1, 36), (12, 20, 4, 2, 5),
    (131, 64, 8, 1, 24)]                                                  # past one Triton routing block


def _weight_tol(backend):
    """topk_weights against the reference: the cuda backend's expf and division round differently from
    torch's (test_cuda_backend.py's tolerance); the others match it to 1e-6."""
    return dict(rtol=1e-5, atol=1e-6) if backend == "cuda" else dict(rtol=1e-6, atol=1e-12)


def _backend_device(backend):
    return "cuda" if backend in ("cuda", "triton") and HAS_CUDA else "cpu"


def _masks(E, G, k_g, seed):
    """{name: [E] bool}: all kept, the fewest allowed (k_g per group, at the group's last positions),
    and random masks keeping k_g .. S per group."""
    S = E // G
    g = torch.Generator().manual_seed(seed)
    last = torch.zeros(G, S, dtype=torch.bool)
    last[:, S - k_g:] = True
    per_group = torch.randint(k_g, S + 1, (G, 1), generator=g)
    random = torch.rand(G, S, generator=g).argsort(-1).argsort(-1) < per_group
    return {"all_kept": torch.ones(E, dtype=torch.bool), "k_g_per_group": last.reshape(E),
            "random": random.reshape(E)}


def _dispatch(backend, *args, **kwargs):
    with mk.use_backend(backend):
        assert mk.resolve("grouped_dispatch", args[0].device.type)[0] == backend
        return mk.grouped_dispatch(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,G,k_g,H", DISPATCH_SHAPES)
def test_masked_dispatch_matches_reference(backend, T, E, G, k_g, H):
    device = _backend_device(backend)
    dtypes = [torch.float32] + ([torch.float16] if backend == "triton" else []) + \
        ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        hidden, logits = make_routing_inputs(T, E, H, dtype, device, seed=T + E, dead_experts=3)
        scale = (torch.rand(E, generator=torch.Generator().manual_seed(E)) + 0.5).to(device)
        options = dict(expert_scale=scale, renormalize=k_g > 1)
        unmasked = _dispatch(backend, hidden, logits, G, k_g, **options)
        for name, mask in _masks(E, G, k_g, seed=T).items():
            mask = mask.to(device)
            out = _dispatch(backend, hidden, logits, G, k_g, **options, expert_mask=mask)
            assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, **options, expert_mask=mask),
                                  **_weight_tol(backend))
            assert bool(mask[out[2].long()].all()), f"{name}: a masked expert was chosen"
            if name == "all_kept":   # identical to no mask, bit for bit (weights included)
                for a, b in zip(out, unmasked):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_masked_weights_are_the_full_scores(backend, score_func):
    """The weights of a masked routing are the score function over all E (softmax over all of them, as
    Pangu does), not over the kept experts."""
    T, E, G = 9, 16, 4
    device = _backend_device(backend)
    hidden, logits = make_routing_inputs(T, E, 8, device=device, seed=1)
    mask = _masks(E, G, 1, seed=2)["k_g_per_group"].to(device)
    _, weights, ids, _, _ = _dispatch(backend, hidden, logits, G, 1, score_func=score_func, expert_mask=mask)
    scores = torch.softmax(logits.float(), -1) if score_func == "softmax" else torch.sigmoid(logits.float())
    torch.testing.assert_close(weights, scores.gather(1, ids.long()), **_weight_tol(backend))
    assert torch.equal(ids.long() % (E // G), torch.full_like(ids.long(), E // G - 1))


def test_masked_dispatch_nan_logits_stay_in_kept_experts():
    T, E, G, k_g = 6, 16, 4, 2
    hidden, logits = make_routing_inputs(T, E, 4, seed=3)
    logits[1, :] = float("nan")
    logits[2, 5] = float("nan")
    mask = _masks(E, G, k_g, seed=4)["random"]
    for backend in BACKENDS:
        if _backend_device(backend) != "cpu":
            continue
        out = _dispatch(backend, hidden, logits, G, k_g, expert_mask=mask)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, expert_mask=mask))
        assert bool(mask[out[2].long()].all())


def test_pangu_300i_duo_routing_reproduced():
    """vllm-ascend's pangu_moe.py routing with num_voted_experts=5, restated here in plain torch:
    softmax over all 64, per-group vote of each token's best expert, the 5 most-voted positions kept
    (equal counts: the lower position), the other scores zeroed, per-group max, times router_scale."""
    T, E, G, n = 37, 64, 8, 5
    S = E // G
    hidden, logits = make_routing_inputs(T, E, 16, seed=9)
    router_scale = torch.rand(E, generator=torch.Generator().manual_seed(1)) + 0.5
    scores = torch.softmax(logits.float(), dim=1).view(T, G, S)
    votes = torch.zeros(G, S, dtype=torch.long)
    for t in range(T):
        for g in range(G):
            votes[g, int(scores[t, g].argmax())] += 1
    keep = torch.zeros(G, S, dtype=torch.bool)
    for g in range(G):
        for s in sorted(range(S), key=lambda s: (-int(votes[g, s]), s))[:n]:
            keep[g, s] = True
    weights, pos = torch.where(keep, scores, torch.zeros(())).max(dim=2)
    ids = pos + torch.arange(G) * S
    weights = weights * router_scale[ids]

    mask = mk.voted_expert_mask(logits, G, n)
    assert torch.equal(mask, keep.reshape(E))
    for backend in [b for b in BACKENDS if _backend_device(b) == "cpu"]:
        _, w, i, _, _ = _dispatch(backend, hidden, logits, G, 1, router_scale, expert_mask=mask)
        assert torch.equal(i.long(), ids), backend
        torch.testing.assert_close(w, weights, rtol=1e-6, atol=1e-7)


def test_masked_dispatch_backward():
    """Masked experts are never selected; the gradient through the scores is the reference's."""
    T, E, G, k_g, H = 11, 16, 4, 2, 8
    hidden, logits = make_routing_inputs(T, E, H, seed=5)
    scale = torch.rand(E, generator=torch.Generator().manual_seed(6)) + 0.5
    mask = _masks(E, G, k_g, seed=7)["random"]
    cot_rows = torch.randn(T * G * k_g, H)
    cot_w = torch.randn(T, G * k_g)
    grads = []
    for fn in (torch.ops.moge.grouped_dispatch, R.grouped_dispatch):
        leaves = [t.clone().requires_grad_() for t in (hidden, logits, scale)]
        permuted, weights, ids, _, _ = fn(leaves[0], leaves[1], G, k_g, leaves[2], True, "softmax", mask)
        assert bool(mask[ids.long()].all())
        ((permuted * cot_rows).sum() + (weights * cot_w).sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_is_data_no_recompile():
    """A mask change between calls recompiles nothing (fullgraph, dynamic shapes off)."""
    from torch._dynamo.testing import CompileCounter
    T, E, G, H = 7, 16, 4, 8
    hidden, logits = make_routing_inputs(T, E, H, seed=8)
    counter = CompileCounter()
    fn = torch.compile(mk.grouped_dispatch, backend=counter, fullgraph=True)
    for seed in range(3):
        mask = _masks(E, G, 1, seed=seed)["random"]
        assert_dispatch_equal(fn(hidden, logits, G, 1, expert_mask=mask),
                              R.grouped_dispatch(hidden, logits, G, 1, expert_mask=mask))
    assert counter.frame_count == 1
    # and through Inductor: the whole op under fullgraph
    compiled = torch.compile(mk.moge_forward, fullgraph=True)
    w_gate_up, w_down = testing.make_expert_weights(E, H, 6)
    mask = _masks(E, G, 1, seed=9)["random"]
    torch.testing.assert_close(compiled(hidden, logits, w_gate_up, w_down, G, expert_mask=mask),
                               R.moge_forward(hidden, logits, w_gate_up, w_down, G, expert_mask=mask),
                               atol=1e-5, rtol=1e-5)


def test_layer_forward_with_mask():
    layer = _layer(topk_per_group=2, renormalize=True)
    x = torch.randn(3, 5, H)
    mask = _masks(E, G, 2, seed=3)["random"]
    with torch.no_grad():
        out = layer(x, expert_mask=mask)
        assert torch.equal(layer(x, expert_mask=torch.ones(E, dtype=torch.bool)), layer(x))
        xf = x.reshape(-1, H)
        exp = R.moge_forward(xf, xf @ layer.gate.weight.t(), layer.w_gate_up, layer.w_down, G, 2,
                             layer.router_scale, True, "softmax", layer.shared_w_gate_up,
                             layer.shared_w_down, expert_mask=mask)
    torch.testing.assert_close(out, exp.reshape(3, 5, H), atol=1e-5, rtol=1e-5)
    # with the batch's vote (Pangu on 300I Duo), and trainable through the kept experts
    out, aux = layer(x, return_aux_loss=True, expert_mask=mk.voted_expert_mask(layer.gate(xf), G, 3))
    (out.pow(2).mean() + aux).backward()
    assert layer.gate.weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_masks_raise_naming_expert_mask(backend):
    T, E, G, k_g = 4, 16, 4, 2
    device = _backend_device(backend)
    hidden, logits = make_routing_inputs(T, E, 8, device=device, seed=0)
    ok = _masks(E, G, k_g, seed=0)["k_g_per_group"].to(device)
    too_few = ok.clone()
    too_few[E - 1] = False                        # the last group keeps k_g - 1
    cases = [(ok[:-1], ValueError, r"expert_mask must have shape \(16,\)"),
             (ok.view(G, -1), ValueError, "expert_mask must have 1 dimensions"),
             (ok.to(torch.uint8), TypeError, "expert_mask must have dtype"),
             (ok.float(), TypeError, "expert_mask must have dtype"),
             (ok.to("meta"), ValueError, "expert_mask is on meta"),
             ("not a tensor", RuntimeError, "for argument 'expert_mask'")]   # the schema's own check
    if device == "cpu":   # values are checked on CPU always (on GPUs with MOGE_VALIDATE=1)
        cases.append((too_few, ValueError, r"expert_mask must keep at least topk_per_group=2 experts in every "
                                           r"group, got \[2, 2, 2, 1\]"))
    for mask, exc, match in cases:
        with pytest.raises(exc, match=match):
            _dispatch(backend, hidden, logits, G, k_g, expert_mask=mask)
    with pytest.raises(ValueError, match="expert_mask must keep at least"):
        mk.moge_forward(hidden.cpu(), logits.cpu(), *testing.make_expert_weights(E, 8, 4), G, k_g,
                        expert_mask=too_few.cpu())


def test_cpp_entry_point_checks_the_mask():
    """A direct call of the C++ op (past the Python checks) still rejects a bad mask."""
    if not mk.backends()["cpu"]["available"]:
        pytest.skip("cpu backend not built")
    hidden, logits = make_routing_inputs(4, 16, 8, seed=0)
    few = torch.zeros(16, dtype=torch.bool)
    few[::4] = True
    with pytest.raises(ValueError, match="expert_mask must keep at least topk_per_group=2"):
        torch.ops.moge_C.grouped_dispatch(hidden, logits, 4, 2, None, False, int(R.ScoreFunc.SOFTMAX), few)
    with pytest.raises(ValueError, match="expert_mask must be a bool tensor"):
        torch.ops.moge_C.grouped_dispatch(hidden, logits, 4, 1, None, False, int(R.ScoreFunc.SOFTMAX), few[:8])


def test_too_few_kept_without_validation_gives_valid_ids():
    """Where values are not checked (GPU without MOGE_VALIDATE), a group with fewer than k_g kept experts
    fills its picks from its masked experts, as the reference orders them: every id a distinct expert of
    its group, never an out-of-range row."""
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not available")
    from moge_kernels.triton import dispatch as triton_dispatch
    T, E, G, k_g = 9, 16, 4, 3
    hidden, logits = make_routing_inputs(T, E, 8, device=_backend_device("triton"), seed=2)
    mask = torch.zeros(E, dtype=torch.bool, device=hidden.device)
    mask[[0, 5, 6, 9, 10, 11]] = True             # 1, 2, 3 and 0 kept per group
    for fused in (True, False):   # the one-launch path of small T, and route + permute launches
        out = triton_dispatch.grouped_dispatch(hidden, logits, G, k_g, expert_mask=mask, fused=fused)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, expert_mask=mask))


@pytest.mark.parametrize("fused", [True, False])
def test_triton_masked_launch_paths(fused):
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not available")
    from moge_kernels.triton import dispatch as triton_dispatch
    T, E, G, k_g, H = 13, 32, 4, 2, 20
    hidden, logits = make_routing_inputs(T, E, H, device=_backend_device("triton"), seed=4, dead_experts=3)
    for name, mask in _masks(E, G, k_g, seed=5).items():
        mask = mask.to(hidden.device)
        out = triton_dispatch.grouped_dispatch(hidden, logits, G, k_g, None, True, expert_mask=mask,
                                               fused=fused)
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, None, True, expert_mask=mask))


# ----------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in BACKENDS])
def test_cuda_mask_values_checked_with_validation(backend):
    """On GPUs the kept-per-group count is read only with validation on (it synchronises)."""
    hidden, logits = make_routing_inputs(8, 16, 8, device="cuda", seed=0)
    few = torch.zeros(16, dtype=torch.bool, device="cuda")
    few[::4] = True                                                     # 1 kept per group, k_g = 2
    with mk.use_options(validate=True), pytest.raises(ValueError, match="expert_mask must keep at least"):
        _dispatch(backend, hidden, logits, 4, 2, expert_mask=few)
    out = _dispatch(backend, hidden, logits, 4, 2, expert_mask=few)     # unchecked: valid ids (fallback)
    assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, 4, 2, expert_mask=few), **_weight_tol(backend))


# ----------------------------------------------------------------------------- GPU: capture
@requires_cuda
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in BACKENDS])
def test_cuda_graph_replay_follows_the_mask(backend):
    """Capture once, change the mask in place, replay: the routing follows the new mask (it is data)."""
    T, E, G, k_g, H = 64, 64, 8, 1, 128
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=0)
    masks = [_masks(E, G, k_g, seed=s)["random"].cuda() for s in range(3)]
    mask = masks[0].clone()
    with mk.use_backend(backend):
        mk.grouped_dispatch(hidden, logits, G, k_g, expert_mask=mask)          # warm-up, compiles
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mk.grouped_dispatch(hidden, logits, G, k_g, expert_mask=mask)
    for m in masks:
        mask.copy_(m)
        graph.replay()
        torch.cuda.synchronize()
        assert_dispatch_equal(out, R.grouped_dispatch(hidden, logits, G, k_g, expert_mask=m),
                              **_weight_tol(backend))
