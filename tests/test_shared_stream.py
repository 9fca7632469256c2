"""The layer's shared expert on a side stream beside the dispatch and the routed experts (option
shared_expert_stream, ops.shared_expert_side_stream): when it applies ("auto": graph capture, or eager calls
of at least SHARED_STREAM_EAGER_MIN_TOKENS tokens; never on CPU, in training, or while tracing), and on the
GPU the same bits as one stream: eager, graph replays, eager_graphs, FP8 routed experts, back-to-back calls
of changing sizes (the side stream's buffers must not be reused early)."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import ops

H, I, E, G, IS = 256, 128, 16, 4, 384
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer_args(T, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype)
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dtype)
    s_gate_up = (torch.randn(2 * IS, H, generator=g) * H ** -0.5).to(device, dtype)
    s_down = (torch.randn(H, IS, generator=g) * IS ** -0.5).to(device, dtype)
    return hidden, logits, w_gate_up, w_down, s_gate_up, s_down


def _forward(hidden, logits, w_gate_up, w_down, s_gate_up, s_down):
    return mk.moge_forward(hidden, logits, w_gate_up, w_down, G, 1, None, False, "softmax", s_gate_up, s_down)


def test_never_on_cpu():
    hidden, _, _, _, s_gate_up, s_down = _layer_args(4, "cpu")
    with mk.use_options(shared_expert_stream=True):
        assert ops.shared_expert_side_stream(hidden, s_gate_up, s_down) is None


@gpu
def test_when_the_side_stream_applies():
    hidden, _, _, _, s_gate_up, s_down = _layer_args(8, "cuda")
    big = torch.randn(ops.SHARED_STREAM_EAGER_MIN_TOKENS, H, device="cuda", dtype=torch.bfloat16)
    side = ops.shared_expert_side_stream
    with torch.no_grad():
        assert side(hidden, s_gate_up, s_down) is None                      # auto, eager, few tokens
        assert side(big, s_gate_up, s_down) is not None                     # auto, eager, many tokens
        assert side(hidden[:0], s_gate_up, s_down) is None                  # no tokens
        with mk.use_options(shared_expert_stream=True):
            assert side(hidden, s_gate_up, s_down) is not None
        with mk.use_options(shared_expert_stream=False):
            assert side(big, s_gate_up, s_down) is None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = side(hidden, s_gate_up, s_down)                      # auto, under capture
            hidden.add_(0)                                                  # (a graph of something)
        assert captured is not None
    w = s_gate_up.clone().requires_grad_()
    with mk.use_options(shared_expert_stream=True):
        assert side(hidden, w, s_down) is None                              # autograd records: one stream


@gpu
@pytest.mark.parametrize("T", [1, 16, 300])
def test_same_bits_eager_and_graph(T):
    args = _layer_args(T, "cuda", seed=T)
    with torch.no_grad():
        with mk.use_options(shared_expert_stream=False):
            want = _forward(*args)
        with mk.use_options(shared_expert_stream=True):
            got = _forward(*args)
            static = [a.clone() for a in args[:2]]
            _forward(*static, *args[2:])                      # warm up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = _forward(*static, *args[2:])
        for t, a in zip(static, args[:2]):
            t.copy_(a)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert torch.equal(replayed, want)


@gpu
def test_side_stream_is_used_and_layer_matches(monkeypatch):
    """MoGELayer (the direct path) and an FP8 layer (the per-op path) fork their shared expert when the
    option says so, with the same bits as one stream."""
    forks = []
    real = ops._fork_shared
    monkeypatch.setattr(ops, "_fork_shared", lambda *a: forks.append(1) or real(*a))
    torch.manual_seed(0)
    layer = mk.MoGELayer(H, I, E, G, shared_intermediate_size=IS).to("cuda", torch.bfloat16).eval()
    layer8 = mk.MoGELayer(H, I, E, G, shared_intermediate_size=IS).to("cuda", torch.bfloat16).eval()
    layer8.load_state_dict(layer.state_dict())
    layer8.quantize_("fp8_block")
    x = torch.randn(33, H, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for module in (layer, layer8):
            with mk.use_options(shared_expert_stream=False):
                want = module(x)
            assert not forks
            with mk.use_options(shared_expert_stream=True):
                got = module(x)
            assert forks, module
            forks.clear()
            assert torch.equal(got, want)


@gpu
def test_eager_graphs_replay_matches():
    args = _layer_args(4, "cuda", seed=9)
    with torch.no_grad():
        with mk.use_options(shared_expert_stream=False):
            want = _forward(*args)
        with mk.use_options(eager_graphs=16):
            outs = [_forward(*args) for _ in range(3)]         # capture (auto: side stream), then replays
    for out in outs:
        assert torch.equal(out, want)


@gpu
def test_back_to_back_calls_of_changing_sizes():
    """Eager calls with the side stream, sizes changing every call and nothing synchronising between them:
    each output equals its one-stream result (a side-stream buffer reused before the main stream read it
    would show here)."""
    sizes = [1, 700, 3, 1500, 64, 1100, 2]
    inputs = [_layer_args(T, "cuda", seed=T) for T in sizes]
    with torch.no_grad():
        with mk.use_options(shared_expert_stream=False):
            want = [_forward(*a) for a in inputs]
        torch.cuda.synchronize()
        with mk.use_options(shared_expert_stream=True):
            got = [_forward(*a) for a in inputs for _ in range(3)][::3]
        torch.cuda.synchronize()
    for g, w in zip(got, want):
        assert torch.equal(g, w)
