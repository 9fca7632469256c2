"""Load-balance metrics (moge_kernels.metrics): loads, the paper's imbalance score, MoGE vs top-k."""
import pytest
import torch

from moge_kernels import metrics, reference


def test_expert_and_device_load_by_hand():
    topk_ids = torch.tensor([[0, 5], [1, 5], [7, 2]], dtype=torch.int32)
    e_load = metrics.expert_load(topk_ids, 8)
    assert e_load.tolist() == [1, 1, 1, 0, 0, 2, 0, 1]
    assert metrics.device_load(e_load, 2).tolist() == [3, 3]
    assert metrics.device_load(e_load, 4).tolist() == [2, 1, 2, 1]
    # IS = (max - min) / |X| with |X| = 3 tokens
    assert metrics.imbalance_score(metrics.device_load(e_load, 4), 3) == pytest.approx(1 / 3)
    assert metrics.imbalance_score(torch.tensor([0, 0]), 0) == 0.0


def test_device_load_rejects_uneven_split():
    with pytest.raises(ValueError, match="num_devices=3"):
        metrics.device_load(torch.zeros(8, dtype=torch.int64), 3)


@pytest.mark.parametrize("G,k_g,D", [(8, 1, 8), (8, 1, 4), (8, 1, 2), (4, 2, 4), (4, 2, 2)])
def test_moge_is_balanced_by_construction(G, k_g, D):
    """Every device gets exactly T*k_g*G/D rows whatever the logits: IS = 0, straggler factor 1."""
    E, T = 32, 257
    logits = metrics.skewed_logits(T, E, skew=2.0, seed=3)
    stats = metrics.compare_routing(logits, G, k_g, D)
    moge = stats["moge"]
    assert moge.device_load.tolist() == [T * k_g * G // D] * D
    assert moge.imbalance_score == 0.0 and moge.max_over_mean == 1.0
    assert moge.expert_load.sum().item() == T * G * k_g


def test_topk_is_imbalanced_on_skewed_logits():
    E, T, G, D = 64, 1024, 8, 8
    logits = metrics.skewed_logits(T, E, skew=1.0, seed=0)
    stats = metrics.compare_routing(logits, G, 1, D)
    topk = stats["topk"]
    assert topk.expert_load.sum().item() == T * G
    assert topk.imbalance_score > 0.1
    assert topk.max_over_mean > 1.1
    # the same numbers from the definitions
    ids = reference.route(logits, 1, G)[1]
    d_load = torch.bincount(ids.view(-1).long(), minlength=E).view(D, -1).sum(1)
    assert topk.device_load.tolist() == d_load.tolist()
    assert topk.imbalance_score == pytest.approx((d_load.max() - d_load.min()).item() / T)
    assert topk.max_over_mean == pytest.approx(d_load.max().item() / d_load.float().mean().item())


def test_skew_increases_topk_imbalance():
    scores = [metrics.compare_routing(metrics.skewed_logits(2048, 64, skew=s, seed=1), 8, 1, 8)["topk"]
              .imbalance_score for s in (0.0, 0.5, 2.0)]
    assert scores[0] < scores[1] < scores[2]


def test_route_options_pass_through():
    logits = metrics.skewed_logits(64, 16, seed=2)
    scale = torch.linspace(0.5, 2.0, 16)
    a = metrics.moge_route_ids(logits, 4, 1, score_func="sigmoid", expert_scale=scale)
    b = reference.route(logits, 4, 1, scale, False, "sigmoid")[1]
    assert torch.equal(a, b)
    stats = metrics.load_stats(a, 16, 4)
    assert stats.as_dict()["device_load"] == [64] * 4
