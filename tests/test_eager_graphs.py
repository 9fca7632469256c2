"""Option eager_graphs: eager layer calls at decode sizes replayed from CUDA graphs (moge_kernels/eager_graphs.py).

On CPU: the option's rule (when a call is replayed) and the key/replay bookkeeping of eager_graphs.run with a
stand-in graph. On a GPU: replays equal the eager calls bit for bit, see in-place weight and mask updates,
and stay out of calls with autograd, above the token limit or inside the user's own capture."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import eager_graphs
from moge_kernels.testing import make_expert_weights, make_routing_inputs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_cache():
    eager_graphs.clear()
    yield
    eager_graphs.clear()


def test_off_by_default_and_never_on_cpu():
    assert mk.get_options()["eager_graphs"] == 0
    hidden = torch.randn(2, 8)
    assert not eager_graphs.applies(hidden)
    with mk.use_options(eager_graphs=16):
        assert not eager_graphs.applies(hidden)          # a CPU tensor: no CUDA graph


def test_run_captures_on_the_second_call_and_replays_new_inputs(graph_stand_in):
    weight = torch.randn(4, 4)
    calls = []

    def fn(x):
        calls.append(x)
        return (x @ weight, x.sum(0))

    xs = [torch.randn(3, 4) for _ in range(4)]
    outs = [eager_graphs.run(fn, (x,), (weight,), "t") for x in xs]
    for x, (y, s) in zip(xs, outs):
        torch.testing.assert_close(y, x @ weight, rtol=0, atol=0)
        torch.testing.assert_close(s, x.sum(0), rtol=0, atol=0)
    assert len(graph_stand_in) == 1 and graph_stand_in[0].replays == 3      # call 1 eager, 2 captures, 2-4 replay
    assert outs[2][0].data_ptr() != graph_stand_in[0].outputs[0].data_ptr()   # a clone, not the graph's buffer
    weight.mul_(2)                                                  # in place: seen by the next replay
    y, _ = eager_graphs.run(fn, (xs[0],), (weight,), "t")
    torch.testing.assert_close(y, xs[0] @ weight, rtol=0, atol=0)
    assert len(graph_stand_in) == 1


def test_run_keys_on_fixed_tensors_layouts_and_tag(graph_stand_in):
    def fn(x, w):
        return (x @ w,)

    w = torch.randn(4, 4)
    for tag, per_call, fixed in [("a", torch.randn(3, 4), w), ("b", torch.randn(3, 4), w),
                                 ("a", torch.randn(5, 4), w), ("a", torch.randn(3, 4), w.clone()),
                                 ("a", torch.randn(3, 4), w.t())]:
        for _ in range(2):
            eager_graphs.run(lambda x: fn(x, fixed), (per_call,), (fixed,), tag)
    assert len(graph_stand_in) == 5 and eager_graphs.num_graphs() == 5


def test_a_failed_capture_warns_once_and_leaves_the_key_eager(graph_stand_in, monkeypatch):
    def failing_capture(fn, per_call):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(eager_graphs, "_capture", failing_capture)
    x = torch.randn(3, 2)
    with pytest.warns(UserWarning, match="could not be captured.*runs eagerly"):
        outs = [eager_graphs.run(lambda x: (x * 2,), (x,), (), "t") for _ in range(2)]
    outs += [eager_graphs.run(lambda x: (x * 2,), (x,), (), "t") for _ in range(2)]   # no second warning
    for (y,) in outs:
        torch.testing.assert_close(y, x * 2, rtol=0, atol=0)
    assert eager_graphs.num_graphs() == 0


def test_run_keeps_at_most_max_graphs(graph_stand_in, monkeypatch):
    monkeypatch.setattr(eager_graphs, "MAX_GRAPHS", 2)
    for n in range(1, 5):
        x = torch.randn(n, 2)
        for _ in range(2):
            eager_graphs.run(lambda x: (x * 2,), (x,), (), "t")
    assert eager_graphs.num_graphs() == 2 and len(graph_stand_in) == 4


def test_applies_stays_out_of_torch_compile_and_empty_batches(monkeypatch):
    """The rule itself (a stand-in for a CUDA tensor): never while dynamo traces (the transformers experts
    ask before anything else, and is_current_stream_capturing is no call to trace), never at T = 0."""
    hidden = type("CudaLike", (), {"is_cuda": True, "shape": (2, 8)})()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with mk.use_options(eager_graphs=16):
        assert eager_graphs.applies(hidden)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not eager_graphs.applies(hidden)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        hidden.shape = (0, 8)
        assert not eager_graphs.applies(hidden)


def test_run_keys_on_the_backend_and_kernel_options(graph_stand_in):
    """What selects the kernels is in the key: a graph captured with one backend or config is not
    replayed with another."""
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    for opts in ({}, {"triton_mlp_streams": False}, {"cuda_gemm_tile": "big"},
                 {"triton_gemm_config": "16,32,32,4,2"}, {"triton_autotune": True}, {"backend": "cpu"},
                 {"shared_expert_stream": False}, {"fp8_fast_accum": True}, {}):
        with mk.use_options(**opts):
            for _ in range(2):
                eager_graphs.run(lambda x: (x @ w,), (x,), (w,), "t")
    assert eager_graphs.num_graphs() == 8 and [g.replays for g in graph_stand_in] == [3] + [1] * 7


def test_run_never_captures_what_the_reference_backend_runs(graph_stand_in):
    """The reference's ops sync with the host (tolist, bincount), which a capture cannot hold: a key whose
    ops would run there (backend "reference", a dtype only the reference takes) stays eager."""
    E, H, I, G = 8, 16, 8, 2
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=3)
    hidden, logits = make_routing_inputs(3, E, H, seed=0)
    with torch.no_grad():
        want = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
        with mk.use_backend("reference"):
            got = [mk.moge_forward(hidden, logits, w_gate_up, w_down, G) for _ in range(3)]
        got64 = [mk.moge_forward(hidden.double(), logits.double(), w_gate_up.double(), w_down.double(), G)
                 for _ in range(3)]
    assert eager_graphs.num_graphs() == 0 and not graph_stand_in
    for out in got:
        torch.testing.assert_close(out, want)
    for out in got64:
        torch.testing.assert_close(out, want.double())


def test_compose_layer_replays_through_run(graph_stand_in):
    """moge_forward and MoGELayer hand their per-call tensors and the rest to eager_graphs.run (here on CPU,
    with the stand-in graph): the same outputs as without the option, one graph per layer signature."""
    E, H, I, G = 8, 16, 8, 2
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=3)
    inputs = [make_routing_inputs(3, E, H, seed=s) for s in range(3)]
    layer = mk.MoGELayer(H, I, E, G, 1, shared_intermediate_size=8).eval()
    with torch.no_grad():
        got = [mk.moge_forward(h, l, w_gate_up, w_down, G) for h, l in inputs]
        got_layer = [layer(h) for h, _ in inputs]
        assert eager_graphs.num_graphs() == 2 and [g.replays for g in graph_stand_in] == [2, 2]
        eager_graphs.clear()
        with mk.use_options(eager_direct=False):    # the per-op path: never a graph
            want = [mk.moge_forward(h, l, w_gate_up, w_down, G) for h, l in inputs]
            want_layer = [layer(h) for h, _ in inputs]
        assert eager_graphs.num_graphs() == 0
    for a, b in zip(got + got_layer, want + want_layer):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp8_layers_replay_through_run(graph_stand_in):
    """A layer with FP8 expert weights (the per-op path: MoGELayer after quantize_, moge_forward given
    QuantizedExpertWeights) replays too, keyed on the FP8 tensors: the same outputs as without the option,
    an in-place change of an FP8 weight seen by the next replay, no graph with eager_direct off."""
    E, H, I, G = 8, 128, 64, 2
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=3)
    gu, dn = mk.quantize_expert_weights(w_gate_up, parts=2), mk.quantize_expert_weights(w_down)
    inputs = [make_routing_inputs(3, E, H, seed=s) for s in range(3)]
    torch.manual_seed(0)
    layer = mk.MoGELayer(H, I, E, G, 1, shared_intermediate_size=64).eval().quantize_("fp8_block")
    with torch.no_grad():
        got = [mk.moge_forward(h, l, gu, dn, G) for h, l in inputs]
        got_layer = [layer(h) for h, _ in inputs]
        assert eager_graphs.num_graphs() == 2 and [g.replays for g in graph_stand_in] == [2, 2]
        layer.w_down_scale.mul_(2)                       # in place: seen by the next replay
        doubled = layer(inputs[0][0])
        assert eager_graphs.num_graphs() == 2
        eager_graphs.clear()
        with mk.use_options(eager_direct=False):
            want_doubled = layer(inputs[0][0])
            layer.w_down_scale.div_(2)
            want = [mk.moge_forward(h, l, gu, dn, G) for h, l in inputs]
            want_layer = [layer(h) for h, _ in inputs]
        assert eager_graphs.num_graphs() == 0
    for a, b in zip(got + got_layer + [doubled], want + want_layer + [want_doubled]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_replays_copy_out_expert_offsets_only_where_the_caller_reads_them(graph_stand_in):
    """moge_forward drops expert_offsets: its graph's only output is the layer's; MoGELayer asked for the
    auxiliary loss gets expert_offsets from its own graph, and the loss of the eager call."""
    E, H, I, G = 8, 16, 8, 2
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=3)
    inputs = [make_routing_inputs(3, E, H, seed=s) for s in range(3)]
    layer = mk.MoGELayer(H, I, E, G, 1).eval()
    with torch.no_grad():
        for h, l in inputs:
            mk.moge_forward(h, l, w_gate_up, w_down, G)
        got = [layer(h, return_aux_loss=True) for h, _ in inputs]
        assert [len(g.outputs) for g in graph_stand_in] == [1, 2]
        eager_graphs.clear()
        with mk.use_options(eager_direct=False):
            want = [layer(h, return_aux_loss=True) for h, _ in inputs]
    for (out, aux), (want_out, want_aux) in zip(got, want):
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(aux, want_aux, rtol=0, atol=0)
    out, offsets = mk.ops.compose_layer(inputs[0][0], inputs[0][1], w_gate_up, w_down, G, 1, None, False,
                                         "softmax", None, None, need_offsets=False)
    assert offsets is None and out.shape == inputs[0][0].shape


# ------------------------------------------------------------------------------------------ GPU
def _layer_inputs(T, seed, E=16, H=256):
    return make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=seed)


@gpu
@pytest.mark.parametrize("T", [1, 16])
def test_gpu_fp8_layer_replays_equal_eager(T):
    """An FP8 MoGELayer (bf16 shared expert) at decode sizes: replays equal the eager calls bit for bit."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 kernels need sm_89+")
    torch.manual_seed(0)
    E, H, I, G = 16, 256, 128, 4
    layer = mk.MoGELayer(H, I, E, G, 1, shared_intermediate_size=192).to("cuda", torch.bfloat16).eval()
    layer.quantize_("fp8_block")
    inputs = [_layer_inputs(T, seed)[0] for seed in range(4)]
    with torch.no_grad():
        want = [layer(h) for h in inputs]
        with mk.use_options(eager_graphs=16):
            got = [layer(h) for h in inputs]
            assert eager_graphs.num_graphs() == 1
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("T", [1, 4, 16])
def test_gpu_moge_forward_replays_equal_eager(T):
    E, H, I, G = 16, 256, 128, 4
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=1)
    shared_gu, shared_dn = make_expert_weights(1, H, 192, torch.bfloat16, "cuda", seed=2)
    scale = torch.rand(E, device="cuda") + 0.5
    args = dict(expert_scale=scale, shared_w_gate_up=shared_gu[0], shared_w_down=shared_dn[0])
    inputs = [_layer_inputs(T, seed) for seed in range(4)]
    with torch.no_grad():
        want = [mk.moge_forward(h, l, w_gate_up, w_down, G, **args) for h, l in inputs]
        with mk.use_options(eager_graphs=16):
            got = [mk.moge_forward(h, l, w_gate_up, w_down, G, **args) for h, l in inputs]
            assert eager_graphs.num_graphs() == 1
            w_down.mul_(0.5)                                   # in place: the next replay sees it
            got_half = mk.moge_forward(*inputs[0], w_gate_up, w_down, G, **args)
        want_half = mk.moge_forward(*inputs[0], w_gate_up, w_down, G, **args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(got_half, want_half)


@gpu
def test_gpu_layer_replays_equal_eager_and_follow_the_mask():
    layer = mk.MoGELayer(256, 128, 16, 4, 1, shared_intermediate_size=192, device="cuda",
                         dtype=torch.bfloat16).eval()
    mask = torch.ones(16, dtype=torch.bool, device="cuda")
    xs = [torch.randn(2, 256, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    with torch.inference_mode():
        want = [layer(x, expert_mask=mask) for x in xs]
        with mk.use_options(eager_graphs=8):
            got = [layer(x, expert_mask=mask) for x in xs]
            mask[::4] = False                                   # new values, same tensor: data
            got_masked = layer(xs[0], expert_mask=mask)
            assert eager_graphs.num_graphs() == 1
        want_masked = layer(xs[0], expert_mask=mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(got_masked, want_masked)


@gpu
def test_gpu_no_graph_for_grad_large_batches_or_inside_a_capture():
    layer = mk.MoGELayer(256, 128, 16, 4, 1, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with mk.use_options(eager_graphs=2):
        for _ in range(3):
            layer(x).float().sum().backward()                   # autograd records: the per-op path
        with torch.no_grad():
            for _ in range(3):
                layer(x)                                        # T=4 above the limit of 2
        assert eager_graphs.num_graphs() == 0
        with torch.no_grad():
            y = x[:2].clone()
            layer(y), layer(y)                                  # warm-up, then this key's capture
            assert eager_graphs.num_graphs() == 1
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):                       # the user's capture: no nested graph
                out = layer(y)
            graph.replay()
            assert eager_graphs.num_graphs() == 1
            torch.testing.assert_close(out, layer(y), rtol=0, atol=0)


@gpu
def test_gpu_reference_backend_stays_eager():
    """The reference's host syncs cannot be captured: with it selected, every call runs eagerly."""
    E, H, I, G = 16, 256, 128, 4
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda", seed=1)
    hidden, logits = _layer_inputs(2, seed=0)
    with torch.no_grad(), mk.use_backend("reference"):
        want = mk.moge_forward(hidden, logits, w_gate_up, w_down, G)
        with mk.use_options(eager_graphs=8):
            got = [mk.moge_forward(hidden, logits, w_gate_up, w_down, G) for _ in range(3)]
        assert eager_graphs.num_graphs() == 0
    for out in got:
        assert torch.equal(out, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_layer_on_another_gpu_replays_there():
    """A layer on cuda:1 called with cuda:0 current (device_map="auto"): captured and replayed on cuda:1."""
    layer = mk.MoGELayer(256, 128, 16, 4, 1, device="cuda:1", dtype=torch.bfloat16).eval()
    xs = [torch.randn(2, 256, device="cuda:1", dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad(), torch.cuda.device(0):
        want = [layer(x) for x in xs]
        with mk.use_options(eager_graphs=8):
            got = [layer(x) for x in xs]
        assert eager_graphs.num_graphs() == 1
    for a, b in zip(got, want):
        assert torch.equal(a, b)
