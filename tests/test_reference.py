"""The reference against cases computed by hand: it is the specification every backend is held to."""
import math

import pytest
import torch
import torch.nn.functional as F

from moge_kernels import reference as R

LN = math.log


def _hand_case():
    # T=3, E=4, G=2 (group size 2), k_g=1 -> K=2. Softmax rows are exact fractions:
    #   token 0: [1, 2, 3, 1] / 7   token 1: [4, 1, 1, 2] / 8   token 2: all 1/4 (ties -> lower index)
    logits = torch.tensor([[0.0, LN(2), LN(3), 0.0],
                           [LN(4), 0.0, 0.0, LN(2)],
                           [0.0, 0.0, 0.0, 0.0]])
    hidden = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    return hidden, logits


def test_route_hand_computed():
    _, logits = _hand_case()
    weights, ids = R.route(logits, num_groups=2)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.tolist() == [[1, 2], [0, 3], [0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[2 / 7, 3 / 7], [4 / 8, 2 / 8], [1 / 4, 1 / 4]]))


def test_route_renormalize_and_expert_scale():
    _, logits = _hand_case()
    weights, _ = R.route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, torch.tensor([[2 / 5, 3 / 5], [2 / 3, 1 / 3], [0.5, 0.5]]))
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights, _ = R.route(logits, 2, expert_scale=scale)
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 9 / 7], [4 / 8, 8 / 8], [1 / 4, 3 / 4]]))


def test_route_two_per_group_descending_within_group():
    _, logits = _hand_case()
    weights, ids = R.route(logits, num_groups=2, topk_per_group=2)
    assert ids.tolist() == [[1, 0, 2, 3], [0, 1, 3, 2], [0, 1, 2, 3]]
    torch.testing.assert_close(weights[0], torch.tensor([2 / 7, 1 / 7, 3 / 7, 1 / 7]))


def test_route_sigmoid():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    weights, ids = R.route(logits, 2, score_func="sigmoid")
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[1.0, 2.0]])))


def test_score_func_names_and_values():
    assert [f.name for f in R.ScoreFunc] == ["SOFTMAX", "SIGMOID"]
    assert [int(f) for f in R.ScoreFunc] == [0, 1]      # the values every kernel switches on
    assert R.score_func_code("softmax") == R.ScoreFunc.SOFTMAX and R.score_func_code("sigmoid") == 1
    assert R.score_func_code(1) == 1 and type(R.score_func_code(R.ScoreFunc.SIGMOID)) is int
    for bad in ("relu", "Softmax", "SOFTMAX", 2, -1, True, None, 0.0):
        with pytest.raises(ValueError, match="score_func must be one of"):
            R.score_func_code(bad)


def test_router_scores_and_their_backward():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 8, generator=g, dtype=torch.float64)
    for name, fn in (("softmax", lambda x: torch.softmax(x, -1)), ("sigmoid", torch.sigmoid)):
        scores = R.router_scores(logits, name)
        assert scores.dtype == torch.float64            # computed in the dtype it is given
        torch.testing.assert_close(scores, fn(logits), atol=0, rtol=0)
        (expected,) = torch.autograd.grad(fn(logits), logits, grad)
        got = R.router_scores_backward(grad, scores.detach(), R.score_func_code(name))
        torch.testing.assert_close(got, expected, atol=1e-14, rtol=1e-12)
    with pytest.raises(ValueError, match="score_func must be one of"):
        R.router_scores(logits, "tanh")


def test_permute_hand_computed():
    hidden, logits = _hand_case()
    permuted, weights, ids, offsets, row_index = R.grouped_dispatch(hidden, logits, 2)
    # flat (t, k) -> expert: (0,0)->1 (0,1)->2 (1,0)->0 (1,1)->3 (2,0)->0 (2,1)->2
    assert offsets.tolist() == [0, 2, 3, 5, 6]
    assert row_index.tolist() == [[2, 3], [0, 5], [1, 4]]
    torch.testing.assert_close(permuted, hidden[[1, 2, 0, 0, 2, 1]])
    # MoGE: group g owns exactly rows [g*T*k_g, (g+1)*T*k_g)
    assert offsets[2].item() == 3


def test_combine_hand_computed():
    expert_out = torch.arange(1.0, 7.0).view(6, 1)          # row r holds r + 1
    row_index = torch.tensor([[2, 3], [0, 5], [1, 4]], dtype=torch.int32)
    weights = torch.tensor([[2 / 7, 3 / 7], [0.5, 0.25], [0.25, 0.25]])
    out = R.grouped_combine(expert_out, weights, row_index)
    torch.testing.assert_close(out, torch.tensor([[18 / 7], [0.5 + 1.5], [0.5 + 1.25]]))
    shared = torch.ones(3, 1)
    torch.testing.assert_close(R.grouped_combine(expert_out, weights, row_index, shared), out + 1)


def test_grouped_gemm_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = torch.stack([torch.eye(2), torch.full((2, 2), 9.0), torch.tensor([[1.0, 1.0], [0.0, 2.0]])])
    offsets = torch.tensor([0, 1, 1, 3], dtype=torch.int32)  # expert 1 gets no rows
    y = R.grouped_gemm(x, w, offsets)
    torch.testing.assert_close(y, torch.tensor([[1.0, 2.0], [7.0, 8.0], [11.0, 12.0]]))
    # a bias row per expert; the row past offsets[E] (a dropped slot) stays zero
    bias = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    x4 = torch.cat([x, torch.ones(1, 2)])
    y = R.grouped_gemm(x4, w, offsets, bias)
    torch.testing.assert_close(y, torch.tensor([[11.0, 22.0], [57.0, 68.0], [61.0, 72.0], [0.0, 0.0]]))
    torch.testing.assert_close(R.add_expert_bias(R.grouped_gemm(x4, w, offsets), bias, offsets), y)
    assert R.expert_of_rows(offsets, 4).tolist() == [0, 2, 2, 3]


def test_grouped_mlp_hand_computed():
    x = torch.tensor([[1.0]])
    w_gate_up = torch.tensor([[[1.0], [2.0]]])     # gate weight 1, up weight 2
    w_down = torch.tensor([[[3.0]]])
    offsets = torch.tensor([0, 1], dtype=torch.int32)
    y = R.grouped_mlp(x, w_gate_up, w_down, offsets)
    silu_1 = 1.0 / (1.0 + math.exp(-1.0))
    torch.testing.assert_close(y, torch.tensor([[3.0 * 2.0 * silu_1]]))
    y_scaled = R.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale=torch.tensor([0.5]))
    torch.testing.assert_close(y_scaled, y * 0.5)


def test_moge_forward_equals_dense_sum_over_selected_experts():
    torch.manual_seed(0)
    T, E, G, H, I = 5, 8, 4, 6, 3
    hidden, logits = torch.randn(T, H), torch.randn(T, E)
    w_gate_up, w_down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    out = R.moge_forward(hidden, logits, w_gate_up, w_down, G)
    weights, ids = R.route(logits, G)
    expected = torch.zeros(T, H)
    for t in range(T):
        for k in range(G):
            e = ids[t, k]
            gate, up = (w_gate_up[e] @ hidden[t]).chunk(2)
            expected[t] += weights[t, k] * (w_down[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_nan_policy_ids_stay_in_group():
    logits = torch.tensor([[0.0, float("nan"), 1.0, 2.0],      # softmax row -> all NaN
                           [1.0, 2.0, 3.0, 4.0]])
    weights, ids = R.route(logits, 2)
    assert ids.tolist() == [[0, 2], [1, 3]]                 # NaN ties -> lowest index of each group
    assert torch.isnan(weights[0]).all() and torch.isfinite(weights[1]).all()
    weights, ids = R.route(logits, 2, score_func="sigmoid")   # sigmoid: NaN only where the logit is
    assert ids.tolist() == [[0, 3], [1, 3]]
    assert torch.isfinite(weights).all()
