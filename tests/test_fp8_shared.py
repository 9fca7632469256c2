"""An FP8 shared expert (MoGELayer.quantize_(..., shared_expert=True), ops.shared_expert_mlp with FP8
weights of one expert): against a dequantize-then-matmul oracle with the activation quantization rule,
the layer against the bf16 layer, T = 0 / 1, state-dict round trips, checkpoint keys (e4m3 with their
scales, or float) loading into it, bad inputs; on the reference, cpu and triton backends (the
interpreter here: fp32 / fp16), bf16 on the GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

import moge_kernels as mk
from moge_kernels import fp8, ops

from triton_testing import HAS_CUDA, RUNS_HERE

H, I, E, G, IS = 256, 128, 8, 4, 256
BACKENDS = ["reference", "cpu"] + (["triton"] if RUNS_HERE else [])


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _oracle(x, gu: fp8.QuantizedExpertWeights, dn: fp8.QuantizedExpertWeights):
    """The FP8 shared expert by hand: x quantized per 1x128 group, dequantized weights, fp32 matmuls, h
    rounded to x's dtype and quantized again."""
    def quantized(t):
        q, s = fp8.quantize_activations(t, gu.block_k)
        return fp8.dequantize_activations(q, s, gu.block_k)
    w_gu = gu.dequantize()[0]
    w_dn = dn.dequantize()[0]
    gate_up = quantized(x.float()) @ w_gu.T
    h = (F.silu(gate_up[:, :IS]) * gate_up[:, IS:]).to(x.dtype).float()
    return (quantized(h) @ w_dn.T).to(x.dtype)


def _layer(dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return mk.MoGELayer(H, I, E, G, shared_intermediate_size=IS).to(device, dtype).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_fp8_shared_expert_against_oracle(backend, T):
    layer = _layer()
    gu = mk.quantize_expert_weights(layer.shared_w_gate_up.detach()[None], "fp8_block", parts=2)
    dn = mk.quantize_expert_weights(layer.shared_w_down.detach()[None], "fp8_block")
    x = torch.randn(T, H)
    with torch.no_grad(), mk.use_backend(backend):
        y = ops.shared_expert_mlp(x, gu, dn)
    assert y.shape == (T, H) and y.dtype == x.dtype
    if T:
        assert rel_err(y, _oracle(x, gu, dn)) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_channel"])
def test_fp8_shared_layer_against_bf16_layer(backend, fmt):
    """The FP8 layer with an FP8 shared expert against the unquantized layer: within the FP8 mlp's own
    error on random weights (about 6%: both operands in e4m3), 1e-1 here; the bf16-shared default stays
    far closer (the shared expert dominates the output)."""
    layer = _layer()
    fp8_shared = copy.deepcopy(layer).quantize_(fmt, shared_expert=True)
    bf16_shared = copy.deepcopy(layer).quantize_(fmt)
    assert fp8_shared.shared_w_gate_up is None and fp8_shared._fp8_shared_blocks is not None
    assert bf16_shared.shared_w_gate_up is not None and bf16_shared._fp8_shared_blocks is None
    x = torch.randn(29, H)
    with torch.no_grad(), mk.use_backend(backend):
        want = layer(x)
        assert rel_err(fp8_shared(x), want) <= 1e-1
        assert rel_err(bf16_shared(x), want) <= 4e-2
        assert fp8_shared(x[:0]).shape == (0, H) and fp8_shared(x[:1]).shape == (1, H)


def test_fp8_shared_layer_state_dict_round_trip():
    layer = _layer().quantize_("fp8_block", shared_expert=True)
    sd = layer.state_dict()
    assert {"shared_w_gate_up_fp8", "shared_w_gate_up_scale", "shared_w_down_fp8", "shared_w_down_scale",
            "fp8_shared_block_size"} <= set(sd)
    assert "shared_w_gate_up" not in sd and sd["shared_w_gate_up_fp8"].shape == (1, 2 * IS, H)
    x = torch.randn(11, H)
    fresh = _layer(seed=1)
    fresh.load_state_dict(sd)                 # a bf16 layer switches to FP8 experts and shared expert
    rebuilt = mk.MoGELayer.from_pretrained_state_dict(sd, G)
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(fresh(x), want) and torch.equal(rebuilt(x), want)


def _checkpoint_keys(layer, e4m3: bool):
    """shared_expert.{gate,up,down}_proj.* as checkpoints store them: e4m3 + weight_scale_inv (128x128
    blocks), or float weights."""
    gate, up = layer.shared_w_gate_up.detach()[:IS], layer.shared_w_gate_up.detach()[IS:]
    out = {}
    for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", layer.shared_w_down.detach())):
        if e4m3:
            q = mk.quantize_expert_weights(w[None], "fp8_block")
            out[f"shared_expert.{name}.weight"] = q.weight[0]
            out[f"shared_expert.{name}.weight_scale_inv"] = q.scale[0, 0]
        else:
            out[f"shared_expert.{name}.weight"] = w.clone()
    return out


@pytest.mark.parametrize("e4m3", [True, False], ids=["e4m3_keys", "float_keys"])
def test_checkpoint_shared_keys_load_into_fp8_shared_expert(e4m3):
    """A layer quantized before loading keeps its shared expert FP8: e4m3 keys load as they are (the
    same bytes as quantizing the float weights), float keys are quantized in the layer's format."""
    src = _layer(seed=3)
    want = copy.deepcopy(src).quantize_("fp8_block", shared_expert=True)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("shared_w")}
    sd.update(_checkpoint_keys(src, e4m3))
    dst = _layer(seed=4).quantize_("fp8_block", shared_expert=True)
    sd = {k: v for k, v in sd.items() if k not in ("w_gate_up", "w_down")}
    sd.update({k: v for k, v in want.state_dict().items() if k.startswith(("w_", "fp8_block"))})
    dst.load_state_dict(sd)
    assert torch.equal(dst.shared_w_gate_up_fp8.view(torch.uint8), want.shared_w_gate_up_fp8.view(torch.uint8))
    assert torch.equal(dst.shared_w_down_scale, want.shared_w_down_scale)
    x = torch.randn(5, H)
    with torch.no_grad():
        assert torch.equal(dst(x), want(x))


def test_float_checkpoint_shared_keys_take_the_layers_scale_format():
    """Float shared-expert keys loaded into a layer quantized with e8m0 scales get e8m0 scales too: the
    same bytes and scales as quantizing those weights with quantize_(..., "e8m0")."""
    src = _layer(seed=7)
    want = copy.deepcopy(src).quantize_("fp8_block", "e8m0", shared_expert=True)
    dst = _layer(seed=8).quantize_("fp8_block", "e8m0", shared_expert=True)
    sd = {k: v for k, v in want.state_dict().items() if not k.startswith(("shared_w", "fp8_shared"))}
    sd.update(_checkpoint_keys(src, False))
    dst.load_state_dict(sd)
    scale = dst.shared_w_gate_up_scale
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))       # powers of two
    assert torch.equal(scale, want.shared_w_gate_up_scale)
    assert torch.equal(dst.shared_w_down_fp8.view(torch.uint8), want.shared_w_down_fp8.view(torch.uint8))


def test_checkpoint_shared_keys_bad_scale_is_an_error():
    src = _layer(seed=5)
    dst = _layer(seed=6).quantize_("fp8_block", shared_expert=True)
    sd = {k: v for k, v in dst.state_dict().items() if not k.startswith(("shared_w", "fp8_shared"))}
    sd.update(_checkpoint_keys(src, True))
    sd["shared_expert.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="up_proj.weight_scale_inv: shape"):
        dst.load_state_dict(sd)


def test_fp8_shared_weights_checked_under_their_names():
    layer = _layer()
    gu = mk.quantize_expert_weights(layer.shared_w_gate_up.detach()[None], "fp8_block", parts=2)
    dn = mk.quantize_expert_weights(layer.shared_w_down.detach()[None], "fp8_block")
    x = torch.randn(4, H)
    logits = layer.gate(x)
    with torch.no_grad():
        ref = mk.moge_forward(x, logits, layer.w_gate_up, layer.w_down, G, shared_w_gate_up=gu,
                              shared_w_down=dn)
        assert ref.shape == (4, H)
        with pytest.raises(ValueError, match="shared_w_gate_up and shared_w_down must both be FP8"):
            mk.moge_forward(x, logits, layer.w_gate_up, layer.w_down, G, shared_w_gate_up=gu,
                            shared_w_down=layer.shared_w_down)
        with pytest.raises(ValueError, match="FP8 shared_w_down must have shape"):
            mk.moge_forward(x, logits, layer.w_gate_up, layer.w_down, G, shared_w_gate_up=gu,
                            shared_w_down=gu)


@pytest.mark.skipif(not HAS_CUDA or not RUNS_HERE, reason="needs CUDA and the triton backend")
def test_gpu_fp8_shared_layer_bf16_and_graph():
    """bf16 on the GPU: the FP8-shared layer matches the reference backend's, and replays from a CUDA
    graph (the [0, T] offsets are made on the device)."""
    layer = _layer(torch.bfloat16, "cuda").quantize_("fp8_block", shared_expert=True)
    x = torch.randn(300, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with mk.use_backend("reference"):
            want = layer(x)
        with mk.use_backend("triton"):
            y = layer(x)
            assert rel_err(y, want) <= 1e-2
            layer(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, y)
