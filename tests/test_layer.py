"""MoGELayer: forward = the reference composition, checkpoints (per-expert keys), the auxiliary loss,
torch.compile(fullgraph=True) forward + backward, and a few training steps on CPU."""
import copy

import pytest
import torch

import moge_kernels as mk
from moge_kernels import MoGELayer, ops
from moge_kernels import reference as R
from moge_kernels.testing import relative_error

from conftest import requires_cuda

H, I, E, G, IS = 24, 12, 8, 4, 20      # hidden, expert intermediate, experts, groups, shared intermediate


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("shared_intermediate_size", IS)
    layer = MoGELayer(H, I, E, G, **kw)
    with torch.no_grad():   # a non-trivial router_scale, so that its gradient and loading are tested
        layer.router_scale.copy_(torch.rand(E) + 0.5)
    return layer


def _reference_forward(layer, x):
    """reference.moge_forward on the layer's tensors (shared expert as a stacked [2Is, H] weight)."""
    logits = x @ layer.gate.weight.t()
    return R.moge_forward(x, logits, layer.w_gate_up, layer.w_down, layer.num_groups, layer.topk_per_group,
                          layer.router_scale, layer.renormalize, layer.score_func, layer.shared_w_gate_up,
                          layer.shared_w_down)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_forward_matches_reference(recompute, shared):
    layer = _layer(recompute=recompute, shared_intermediate_size=IS if shared else 0)
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        out = layer(x)
        exp = _reference_forward(layer, x.reshape(-1, H)).reshape(2, 9, H)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def _per_expert_checkpoint(prefix, seed=3, shared=True):
    """A checkpoint as Pangu Pro MoE stores one MoE block: per-expert Linear weights, [1, E] scale."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"{prefix}gate.weight": torch.randn(E, H, generator=g) / H ** 0.5,
          f"{prefix}router_scale": torch.rand(1, E, generator=g) + 0.5}
    for e in range(E):
        sd[f"{prefix}experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g) / H ** 0.5
        sd[f"{prefix}experts.{e}.up_proj.weight"] = torch.randn(I, H, generator=g) / H ** 0.5
        sd[f"{prefix}experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g) / I ** 0.5
    if shared:
        sd[f"{prefix}shared_expert.gate_proj.weight"] = torch.randn(IS, H, generator=g) / H ** 0.5
        sd[f"{prefix}shared_expert.up_proj.weight"] = torch.randn(IS, H, generator=g) / H ** 0.5
        sd[f"{prefix}shared_expert.down_proj.weight"] = torch.randn(H, IS, generator=g) / IS ** 0.5
    return sd


def _reference_from_checkpoint(sd, prefix, x):
    """The reference layer computed straight from the checkpoint tensors."""
    w_gate_up = torch.stack([torch.cat([sd[f"{prefix}experts.{e}.gate_proj.weight"],
                                        sd[f"{prefix}experts.{e}.up_proj.weight"]]) for e in range(E)])
    w_down = torch.stack([sd[f"{prefix}experts.{e}.down_proj.weight"] for e in range(E)])
    shared_gate_up = torch.cat([sd[f"{prefix}shared_expert.gate_proj.weight"],
                                sd[f"{prefix}shared_expert.up_proj.weight"]])
    logits = x @ sd[f"{prefix}gate.weight"].t()
    return R.moge_forward(x, logits, w_gate_up, w_down, G, 1, sd[f"{prefix}router_scale"].reshape(-1),
                          False, "softmax", shared_gate_up, sd[f"{prefix}shared_expert.down_proj.weight"])


def test_checkpoint_round_trip():
    prefix = "model.layers.3.mlp."
    sd = _per_expert_checkpoint(prefix)
    sd["model.layers.3.self_attn.o_proj.weight"] = torch.randn(4, 4)    # other keys are ignored
    layer = MoGELayer.from_pretrained_state_dict(sd, num_groups=G, prefix=prefix)
    assert (layer.hidden_size, layer.intermediate_size, layer.num_experts) == (H, I, E)
    assert layer.shared_intermediate_size == IS and layer.shared_w_gate_up.shape == (2 * IS, H)
    assert layer.shared_w_down.shape == (H, IS)
    assert all(p.requires_grad and p.device.type == "cpu" for p in layer.parameters())
    x = torch.randn(13, H)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_from_checkpoint(sd, prefix, x), atol=1e-5, rtol=1e-5)
    # and back: the checkpoint layout, bit for bit
    back = layer.per_expert_state_dict(prefix)
    assert set(back) == {k for k in sd if k.startswith(prefix)}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    # load_state_dict into an existing layer accepts the per-expert keys (strict), and its own keys
    other = _layer(seed=7)
    other.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)
    third = _layer(seed=8)
    third.load_state_dict(other.state_dict())
    assert torch.equal(third.w_gate_up, layer.w_gate_up)


def test_checkpoint_bf16_and_errors():
    sd = _per_expert_checkpoint("", shared=False)
    sd = {k: v.bfloat16() for k, v in sd.items()}
    layer = MoGELayer.from_pretrained_state_dict(sd, num_groups=G)
    assert layer.w_gate_up.dtype == torch.bfloat16 and layer.shared_w_gate_up is None
    assert layer.w_gate_up.shape == (E, 2 * I, H) and layer.router_scale.shape == (E,)
    incomplete = dict(sd)
    del incomplete["experts.5.up_proj.weight"]
    with pytest.raises(RuntimeError, match="per-expert checkpoint keys incomplete"):
        _layer(shared_intermediate_size=0).load_state_dict(incomplete)
    with pytest.raises(KeyError, match="gate.weight"):
        MoGELayer.from_pretrained_state_dict({}, num_groups=G)


def test_aux_loss_value_and_gradient():
    layer = _layer(aux_loss_coef=0.01)
    x = torch.randn(40, H)
    out, aux = layer(x, return_aux_loss=True)
    assert layer.aux_loss is aux
    # by hand: coef * sum_i f_i P_i, f from the routing, P the mean softmax score
    logits = x @ layer.gate.weight.t()
    scores = torch.softmax(logits, -1)
    _, ids = R.route(logits, G, 1)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).float()
    expected = 0.01 * ((counts * E / (G * 40)) * scores.mean(0)).sum()
    torch.testing.assert_close(aux, expected)
    # a uniform router gives the minimum, coef * 1 (f and P both uniform)
    assert aux.item() >= 0.01 * 0.99
    layer.zero_grad()
    aux.backward()
    assert layer.gate.weight.grad.abs().sum() > 0 and layer.w_gate_up.grad is None
    # eval mode records nothing unless asked
    layer.eval()
    layer.aux_loss = None
    layer(x)
    assert layer.aux_loss is None


def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces forward and backward (AOTAutograd over the fake kernels and
    the registered backward formulas); aot_eager keeps the CI time low: Inductor adds C++ codegen only."""
    layer = _layer()
    x = torch.randn(20, H, requires_grad=True)

    def step(fn):
        layer.zero_grad()
        x.grad = None
        out, aux = fn(x, return_aux_loss=True)
        (out.square().mean() + aux).backward()
        return [out.detach(), aux.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]

    expected = step(layer)
    torch._dynamo.reset()
    got = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def _train(backend, steps=20, recompute=False):
    """Student MoGE layer regressing a fixed random teacher (outputs x4) on 4 cycled batches of 64
    tokens; Adam, loss = MSE + the auxiliary loss. Returns the MSE of every step."""
    torch.manual_seed(11)
    teacher = MoGELayer(H, I, E, G, shared_intermediate_size=IS)
    student = MoGELayer(H, I, E, G, shared_intermediate_size=IS, recompute=recompute)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    data = torch.randn(4, 64, H, generator=torch.Generator().manual_seed(12))
    losses = []
    with mk.use_backend(backend):
        for step in range(steps):
            x = data[step % 4]
            with torch.no_grad():
                target = 4 * teacher(x)
            out, aux = student(x, return_aux_loss=True)
            mse = (out - target).square().mean()
            opt.zero_grad()
            (mse + aux).backward()
            opt.step()
            losses.append(mse.item())
    return losses


def test_training_loss_falls_and_matches_reference():
    backend = "cpu" if mk.backends()["cpu"]["available"] else "reference"
    losses = _train(backend)
    assert losses[-1] < 0.5 * losses[0], losses
    ref = _train("reference")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=1e-6, rtol=1e-4)
    # recompute (grouped_mlp's backward) follows the same curve as saving gate_up
    torch.testing.assert_close(torch.tensor(_train(backend, steps=6, recompute=True)),
                               torch.tensor(losses[:6]), atol=1e-6, rtol=1e-4)


@requires_cuda
@pytest.mark.parametrize("recompute", [False, True])
def test_cuda_bf16_layer_backward(recompute):
    """bf16 on the GPU (Triton / torch._grouped_mm): output and gradients against an fp32 copy of the same
    layer, within 2x the error of the reference backend in bf16."""
    base = _layer(recompute=recompute)
    x32 = torch.randn(512, H)
    exact = copy.deepcopy(base).cuda()
    with mk.use_backend("reference"):
        out32 = exact(x32.cuda())
        out32.square().sum().backward()

    def run(backend):
        layer = copy.deepcopy(base).cuda().bfloat16()
        x = x32.cuda().bfloat16()
        with mk.use_backend(backend):
            out = layer(x)
            out.float().square().sum().backward()
        return out, {n: p.grad for n, p in layer.named_parameters()}

    out, grads = run("auto")
    ref_out, ref_grads = run("reference")
    assert relative_error(out, out32) <= 2 * relative_error(ref_out, out32) + 1e-3
    for name, p in exact.named_parameters():
        err, ref_err = relative_error(grads[name], p.grad), relative_error(ref_grads[name], p.grad)
        assert err <= 2 * ref_err + 2e-3, f"{name}: {err:.2e} vs reference bf16 {ref_err:.2e}"


def test_inference_runs_the_fused_mlp(monkeypatch):
    """Without recorded gradients the layer runs grouped_mlp (no [T*K, 2I] intermediate) even with
    recompute=False; with them it keeps the unfused, activation-saving path."""
    layer = _layer(recompute=False)
    x = torch.randn(11, H)
    calls = []

    run_kernel = ops._run_kernel

    def counting(op_name, args):
        calls.append(op_name)
        return run_kernel(op_name, args)
    # every route to a backend kernel (torch.ops, the op's device kernel, the layer's direct composition)
    monkeypatch.setattr(ops, "_run_kernel", counting)
    with torch.no_grad():
        out = layer(x)
    assert calls.count("grouped_mlp") == 1 and "grouped_gemm" not in calls
    torch.testing.assert_close(out, _reference_forward(layer, x), atol=1e-5, rtol=1e-5)
    calls.clear()
    layer(x).sum().backward()
    assert "grouped_mlp" not in calls and "grouped_gemm" in calls and layer.w_gate_up.grad is not None


def test_packed_weights_forward_backward_and_back():
    from moge_kernels import packing
    layer = _layer()
    packed = copy.deepcopy(layer).pack_weights_(block=4)        # H = 24, I = 12: blocks of 4
    assert packing.pack_block(packed.w_gate_up) == 4 and packing.pack_block(packed.w_down) == 4
    assert isinstance(packed.w_gate_up, torch.nn.Parameter) and packed.w_gate_up.requires_grad
    x = torch.randn(13, H)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), atol=1e-5, rtol=1e-5)
    for m in (layer, packed):
        m(x).square().sum().backward()
    for name in ("w_gate_up", "w_down"):
        torch.testing.assert_close(packing.unpack(getattr(packed, name).grad), getattr(layer, name).grad,
                                   atol=1e-5, rtol=1e-5)
    packed.unpack_weights_()
    assert packed.w_gate_up.shape == layer.w_gate_up.shape and packed.w_gate_up.is_contiguous()
    assert torch.equal(packed.w_gate_up, layer.w_gate_up) and torch.equal(packed.w_down, layer.w_down)


# ------------------------------------------------------------------------------------ one composition
def test_layer_and_moge_forward_share_weights_and_composition():
    """The layer's stacked shared expert is what moge_forward takes: same tensors, same result."""
    layer = _layer()
    x = torch.randn(10, H)
    with torch.no_grad():
        out = layer(x)
        functional = mk.moge_forward(x, layer.gate(x), layer.w_gate_up, layer.w_down, G, 1, layer.router_scale,
                                     False, "softmax", layer.shared_w_gate_up, layer.shared_w_down)
    assert torch.equal(out, functional)


def test_shared_expert_runs_on_kernels_not_the_reference(monkeypatch):
    """Forward and backward of the layer and of moge_forward never call reference.swiglu_mlp; the shared
    expert's SwiGLU is the moge.swiglu op, and its gradients equal the reference's (eager autograd)."""
    layer = _layer()
    x = torch.randn(12, H, requires_grad=True)
    params = [layer.shared_w_gate_up, layer.shared_w_down]
    ref_out = _reference_forward(layer, x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [x] + params)

    def forbidden(*args):
        raise AssertionError("reference.swiglu_mlp called in the production path")
    monkeypatch.setattr(R, "swiglu_mlp", forbidden)
    swiglu_calls = []
    swiglu = torch.ops.moge.swiglu
    monkeypatch.setattr(torch.ops.moge, "swiglu", lambda t: swiglu_calls.append(t.shape) or swiglu(t))
    out = layer(x)
    assert (12, 2 * IS) in swiglu_calls
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x] + params)
    for name, g, r in zip(("hidden_states", "shared_w_gate_up", "shared_w_down"), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(
            mk.moge_forward(x, layer.gate(x), layer.w_gate_up, layer.w_down, G, 1, layer.router_scale,
                            shared_w_gate_up=layer.shared_w_gate_up, shared_w_down=layer.shared_w_down),
            ref_out, atol=1e-5, rtol=1e-5)


def test_state_dict_stacked_and_checkpoint_shared_keys():
    layer = _layer()
    sd = layer.state_dict()
    assert "shared_w_gate_up" in sd and "shared_w_down" in sd and not any("shared_expert" in k for k in sd)
    ckpt = layer.per_expert_state_dict()
    assert torch.equal(ckpt["shared_expert.gate_proj.weight"], layer.shared_w_gate_up[:IS])
    assert torch.equal(ckpt["shared_expert.up_proj.weight"], layer.shared_w_gate_up[IS:])
    assert torch.equal(ckpt["shared_expert.down_proj.weight"], layer.shared_w_down)
    # the stacked keys build a layer too, sizes inferred
    again = MoGELayer.from_pretrained_state_dict(sd, num_groups=G)
    assert again.shared_intermediate_size == IS and torch.equal(again.shared_w_gate_up, layer.shared_w_gate_up)
    incomplete = dict(ckpt)
    del incomplete["shared_expert.up_proj.weight"]
    with pytest.raises(RuntimeError, match="shared expert checkpoint keys incomplete"):
        _layer(seed=1).load_state_dict(incomplete)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_groups=0), ValueError, "num_groups must be >= 1, got 0"),
    (dict(num_groups=3), ValueError, "num_groups=3 must divide num_experts=8"),
    (dict(hidden_size=-4), ValueError, "hidden_size must be >= 1, got -4"),
    (dict(intermediate_size=0), ValueError, "intermediate_size must be >= 1"),
    (dict(num_experts=-8), ValueError, "num_experts must be >= 1"),
    (dict(shared_intermediate_size=-1), ValueError, "shared_intermediate_size must be >= 0"),
    (dict(topk_per_group=3), ValueError, r"topk_per_group=3 must be in \[1, num_experts/num_groups=2\]"),
    (dict(topk_per_group=0), ValueError, "topk_per_group must be >= 1"),
    (dict(hidden_size=24.0), TypeError, "hidden_size must be an int"),
    (dict(score_func="relu"), ValueError, "score_func must be one of"),
])
def test_layer_bad_config(kwargs, exc, match):
    args = dict(hidden_size=H, intermediate_size=I, num_experts=E, num_groups=G)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MoGELayer(**args)


def test_layer_bad_input_names_the_layers_arguments():
    layer = MoGELayer(hidden_size=64, intermediate_size=8, num_experts=8, num_groups=4)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[\.\.\., hidden_size=64\], got \(3, 128\)"):
        layer(torch.randn(3, 128))          # 3 x 128 = 6 tokens of 64 if it were reshaped
    with pytest.raises(ValueError, match="hidden_size=64"):
        layer(torch.randn(()))
    with pytest.raises(TypeError, match="hidden_states has dtype torch.float16 but the layer's parameters"):
        layer(torch.randn(3, 64).half())
    with pytest.raises(TypeError, match="hidden_states must be a Tensor"):
        layer([[0.0] * 64])
    assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    assert layer(torch.randn(64)).shape == (64,)
