"""moge_kernels.integrations.pangu: swapping modules with Pangu Pro MoE's MoGE block structure for MoGELayer.

The block below mirrors PanguProMoESparseMoeBlock's parameters (gate [E,H], router_scale [1,E], per-expert
gate/up/down_proj, shared_expert) and computes MoGE routing with plain torch ops (softmax over E, max in
each group, times router_scale), independently of moge_kernels."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moge_kernels as mk
from moge_kernels.integrations.pangu import is_moge_block, moge_layer_from_block, swap_moge_blocks

H, I, IS, E, G = 16, 8, 12, 8, 4


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PanguProMoESparseMoeBlock(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.router_scale = nn.Parameter(torch.rand(1, E) + 0.5)
        self.experts = nn.ModuleList([MLP(H, I) for _ in range(E)])
        self.shared_expert = MLP(H, IS) if shared else None

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        scores = torch.softmax(self.gate(x).float(), dim=-1)
        weights, pos = scores.view(-1, G, E // G).max(dim=-1)                # [T, G]
        ids = pos + torch.arange(0, E, E // G)
        weights = weights * self.router_scale.reshape(-1)[ids]
        out = torch.zeros_like(x)
        for g in range(G):
            for e in range(E):
                rows = ids[:, g] == e
                if rows.any():
                    out[rows] += weights[rows, g, None].to(x.dtype) * self.experts[e](x[rows])
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.reshape(shape)


class Decoder(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.mlp = PanguProMoESparseMoeBlock(shared)
        self.norm = nn.LayerNorm(H)


class Model(nn.Module):
    def __init__(self, layers=2, shared=True):
        super().__init__()
        self.layers = nn.ModuleList([Decoder(shared) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.mlp(layer.norm(x))
        return x


def test_structure_is_recognised():
    block = PanguProMoESparseMoeBlock()
    assert is_moge_block(block) and is_moge_block(PanguProMoESparseMoeBlock(shared=False))
    assert not is_moge_block(MLP(H, I)) and not is_moge_block(nn.Linear(H, E))
    with pytest.raises(ValueError, match="MoGE block structure"):
        moge_layer_from_block(MLP(H, I), num_groups=G)


@pytest.mark.parametrize("shared", [True, False])
def test_swap_keeps_outputs_and_gradients_and_frees_the_old_weights(shared):
    torch.manual_seed(0)
    model = Model(shared=shared)
    x = torch.randn(2, 5, H)
    want = model(x).detach()         # no autograd graph keeping the old weights alive
    old = [weakref.ref(p) for layer in model.layers for p in layer.mlp.experts.parameters()]
    swapped = swap_moge_blocks(model, num_groups=G)
    gc.collect()
    assert swapped == ["layers.0.mlp", "layers.1.mlp"]
    assert all(isinstance(layer.mlp, mk.MoGELayer) for layer in model.layers)
    assert all(r() is None for r in old), "the per-expert weights of a swapped block are still alive"
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_swap_keeps_dtype_device_and_mode_and_reads_the_group_count_from_the_config():
    torch.manual_seed(1)
    model = Model(layers=1).to(torch.float16).eval()
    model.config = type("Config", (), {"num_experts_per_tok": G})()
    swap_moge_blocks(model)
    layer = model.layers[0].mlp
    assert layer.num_groups == G and layer.topk_per_group == 1 and not layer.training
    assert all(p.dtype == torch.float16 for p in layer.parameters())
    with pytest.raises(ValueError, match="num_groups"):
        swap_moge_blocks(Model(layers=1))
