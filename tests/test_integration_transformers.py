"""experts_implementation="moge" (moge_kernels/integrations/transformers.py) against transformers' "eager"
experts on tiny random models of several MoE architectures with different expert layouts: logits and
every parameter gradient, fp32 (tolerances: 1e-5 relative / 1e-6 absolute on logits, 1e-4 / 1e-5 on
gradients, whose reduction order differs). Skipped when transformers does not import."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
moge_tf = pytest.importorskip("moge_kernels.integrations.transformers")

from conftest import requires_cuda, requires_triton  # noqa: E402

import moge_kernels as mk  # noqa: E402

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64)


def _configs():
    """(name, config, layout the experts declare, path moge takes)."""
    t = transformers
    return {
        "qwen3_moe": (t.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
                      "fused_swiglu"),
        "mixtral": (t.MixtralConfig(**COMMON, intermediate_size=24, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2), "fused_swiglu"),
        "olmoe": (t.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=3),
                  "fused_swiglu"),
        # shared expert with a sigmoid gate beside the routed experts
        "qwen2_moe": (t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, num_experts=6,
                                       num_experts_per_tok=2), "fused_swiglu"),
        # grouped (n_group / topk_group) sigmoid routing, routed_scaling_factor, shared expert, MLA
        "deepseek_v3": (t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
                                           n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                           n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
                                           q_lora_rank=24, qk_rope_head_dim=4, v_head_dim=8,
                                           qk_nope_head_dim=8), "fused_swiglu"),
        # transposed [E, H, 2I] weights, interleaved gate/up columns, biases, clamped SwiGLU
        "gpt_oss": (t.GptOssConfig(**COMMON, intermediate_size=16, head_dim=8, num_local_experts=4,
                                   num_experts_per_tok=2, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"]), "gemm_gate"),
    }


ARCHS = list(_configs())


def _model(name, seed=0, layers=None):
    config, path = _configs()[name]
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    return model, path


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


def _logits_and_grads(model, input_ids, impl):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    (logits.pow(2).mean() + logits.mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(got, want):
    (logits, grads), (logits_ref, grads_ref) = got, want
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_and_every_gradient_match_eager(name):
    model, path = _model(name)
    experts = _experts_modules(model)
    assert experts and all(moge_tf.experts_path(m) == path for m in experts)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits_and_grads(model, input_ids, "eager")
    got = _logits_and_grads(model, input_ids, "moge")
    _assert_same(got, want)
    expert_grads = [n for n in want[1] if "experts.gate_up_proj" in n or "experts.down_proj" in n]
    assert expert_grads, "no expert weight received a gradient"


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_inference_matches_eager(name):
    """no_grad: the fused grouped_mlp path (qwen3) and the GEMM + model gate path (gpt-oss)."""
    model, _ = _model(name)
    input_ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        want = model(input_ids).logits
        model.set_experts_implementation("moge")
        got = model(input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_from_pretrained_with_moge(tmp_path):
    model, _ = _model("mixtral")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moge")
    assert loaded.config._experts_implementation == "moge"
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = loaded(input_ids).logits
        model.set_experts_implementation("eager")
        want = model(input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_transposed_weights_relaid_out_once_and_trained_in_place():
    """gpt-oss stores [E, H, 2I]: the first moge forward re-lays the parameter out in place (same object,
    shape and values); later forwards, an optimizer step and the gradients all use that one storage."""
    model, _ = _model("gpt_oss")
    experts = _experts_modules(model)[0]
    param = experts.gate_up_proj
    before = param.detach().clone()
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    model.set_experts_implementation("moge")
    model(input_ids).logits.sum().backward()
    assert experts.gate_up_proj is param and param.shape == before.shape
    torch.testing.assert_close(param.detach(), before, rtol=0, atol=0)
    assert param.transpose(1, 2).is_contiguous() and experts.down_proj.transpose(1, 2).is_contiguous()
    assert param.grad is not None and param.grad.stride() == param.stride()
    ptr = param.data_ptr()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert param.data_ptr() == ptr
    # after the step both implementations still see the same (updated) weights
    want = _logits_and_grads(model, input_ids, "eager")
    got = _logits_and_grads(model, input_ids, "moge")
    assert param.data_ptr() == ptr
    _assert_same(got, want)
    # what save_pretrained writes is unchanged by the storage order
    assert moge_tf.relayout_experts_(model) == model.config.num_hidden_layers


@requires_triton
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_no_per_call_copy_of_the_expert_weights(name):
    """After the first call, a forward copies no tensor of an expert weight's size (the profiler's record
    of every aten op's input shapes): nn.Linear-layout weights run as they are, transposed ones were
    re-laid out once. On the Triton kernels, which need unit stride along K (the CPU backend's ATen
    matmuls take any strides)."""
    model, _ = _model(name, layers=1)
    model.set_experts_implementation("moge")
    experts = _experts_modules(model)[0]
    weight_numels = {experts.gate_up_proj.numel(), experts.down_proj.numel()}
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), mk.use_backend("triton"):
        model(input_ids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            model(input_ids)
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
              and any(shape and torch.Size(shape).numel() in weight_numels for shape in e.input_shapes)]
    assert not copies, copies


def _experts_module(cls_path, config):
    module_name, cls_name = cls_path.rsplit(".", 1)
    import importlib
    cls = getattr(importlib.import_module(module_name), cls_name)
    torch.manual_seed(0)
    m = cls(config).float()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _experts_call(module, impl, T=11, K=2, E=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    E = E or module.down_proj.shape[0]
    H = module.down_proj.shape[2] if module.is_transposed else module.down_proj.shape[1]
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    out = module(x, ids, w)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, w.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("cls_path,config_fn,path", [
    # ungated experts: up_proj -> relu2 -> down_proj
    ("transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts",
     lambda t: t.NemotronHConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=4,
                                 mlp_hidden_act="relu2"), "gemm_gate"),
    # transposed, concatenated, biases, clamped SwiGLU
    ("transformers.models.openai_privacy_filter.modeling_openai_privacy_filter.OpenAIPrivacyFilterExperts",
     lambda t: t.OpenAIPrivacyFilterConfig(hidden_size=16, intermediate_size=8, num_local_experts=4),
     "gemm_gate"),
    # default gate with a GELU activation
    ("transformers.models.gemma4.modeling_gemma4.Gemma4TextExperts",
     lambda t: t.Gemma4TextConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, top_k_experts=2,
                                  enable_moe_block=True), "gemm_gate"),
])
def test_experts_module_layouts_match_eager(cls_path, config_fn, path):
    module = _experts_module(cls_path, config_fn(transformers))
    assert moge_tf.experts_path(module) == path
    want = _experts_call(module, "eager")
    got = _experts_call(module, "moge")
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for n in want[3]:
        torch.testing.assert_close(got[3][n], want[3][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("cls_path,config_fn", [
    ("transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
     lambda t: t.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4)),
    ("transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts",
     lambda t: t.GptOssConfig(hidden_size=16, intermediate_size=8, num_local_experts=4)),
])
def test_expert_parallel_sentinel_ids_contribute_nothing(cls_path, config_fn, monkeypatch):
    """Under expert parallelism transformers marks slots of other ranks' experts with id E (and weight 0):
    they become -1 for grouped_permute and add nothing, biases included; same result as grouped_mm."""
    monkeypatch.setattr(moge_tf, "_ep_sentinels_possible", lambda: True)
    module = _experts_module(cls_path, config_fn(transformers))
    E = module.down_proj.shape[0]
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 16, generator=g)
    ids = torch.tensor([[0, E], [E, E], [2, 1], [E, 3], [1, 0], [E, 2]])
    w = torch.rand(6, 2, generator=g).masked_fill(ids == E, 0)
    module.config._experts_implementation = "moge"
    got = module(x, ids, w)
    module.config._experts_implementation = "grouped_mm"
    want = module(x, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[1].abs().max() == 0          # both slots dropped


def test_unsupported_weights_fall_back_to_grouped_mm_with_one_warning():
    """Experts whose two weights disagree in dtype are not a moge layout: transformers' grouped_mm runs them,
    with one warning naming the weight and its dtype however many calls."""
    config = transformers.Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4)
    module = _experts_module("transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts", config)
    module.down_proj.data = module.down_proj.data.bfloat16()
    assert moge_tf.experts_path(module) == "grouped_mm (has down_proj of dtype torch.bfloat16)"
    moge_tf._warned.clear()
    x = torch.randn(5, 16)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    w = torch.rand(5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.config._experts_implementation = "moge"
        got = [module(x, ids, w) for _ in range(3)]
    module.config._experts_implementation = "grouped_mm"
    want = module(x, ids, w)
    ours = [c for c in caught if "experts_implementation='moge'" in str(c.message)]
    assert len(ours) == 1, [str(c.message) for c in caught]
    assert "Qwen3MoeExperts has down_proj of dtype torch.bfloat16" in str(ours[0].message)
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_generate_matches_eager(name):
    """model.generate (greedy, KV cache: a prefill then one-token decode steps) with "moge" gives the
    tokens of "eager"."""
    model, _ = _model(name)
    input_ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for impl in ("eager", "moge"):
        model.set_experts_implementation(impl)
        tokens[impl] = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert tokens["moge"].shape == (2, 11)
    assert torch.equal(tokens["moge"], tokens["eager"])


def test_torch_compile_fullgraph_forward_and_backward():
    """One Qwen3-MoE sparse block compiled with fullgraph=True (aot_eager on CPU: AOTAutograd over the
    fake kernels), forward and backward, against the uncompiled block."""
    model, _ = _model("qwen3_moe")
    model.set_experts_implementation("moge")
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))

    def run(fn):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.pow(2).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]

    want = run(block)
    got = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@requires_triton
def test_triton_backend_through_the_interpreter():
    """The same comparison with every moge op on the Triton kernels (CPU interpreter, fp32, tiny)."""
    model, _ = _model("olmoe", layers=1)
    input_ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    want = _logits_and_grads(model, input_ids, "eager")
    with mk.use_backend("triton"):
        got = _logits_and_grads(model, input_ids, "moge")
    _assert_same(got, want)


def test_eager_graphs_replay_the_fused_experts(graph_stand_in):
    """With the option eager_graphs, the experts step goes through eager_graphs.run (on CPU with a stand-in
    graph), the fused SwiGLU (Qwen3-MoE) and the GEMMs around the module's own gate with biases (gpt-oss):
    the same logits as without it."""
    from moge_kernels import eager_graphs
    if not eager_graphs._capturable(torch.zeros(1)):
        pytest.skip("the experts ops on CPU fall to the reference backend (no C++ cpu backend built), "
                    "whose calls eager_graphs never captures")
    input_ids = [torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for name, graphs in (("qwen3_moe", 2), ("gpt_oss", 2)):    # one per layer: its weights are the key
        model, _ = _model(name)
        model.set_experts_implementation("moge")
        with torch.no_grad():
            want = [model(ids).logits for ids in input_ids]
            with mk.use_options(eager_graphs=16):
                got = [model(ids).logits for ids in input_ids]
        assert len(graph_stand_in) == graphs, name
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        graph_stand_in.clear()
        eager_graphs.clear()


def _close_to_scale(got, want, frac):
    """bf16: |got - want| <= frac * max |want| (elementwise tolerances mean little at 8 mantissa bits)."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= frac * max(scale, 1e-30), f"max error {err:.3e} vs max value {scale:.3e}"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
def test_bf16_cuda_matches_eager(name):
    """Device: the same architectures (one layer, so the router sees identical inputs) in bf16 on CUDA with
    the default backend; logits and every gradient within 2% / 5% of their largest value."""
    model, _ = _model(name, layers=1)
    model = model.cuda().bfloat16()
    input_ids = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(8)).cuda()
    logits_ref, grads_ref = _logits_and_grads(model, input_ids, "eager")
    logits, grads = _logits_and_grads(model, input_ids, "moge")
    _close_to_scale(logits, logits_ref, 0.02)
    assert grads.keys() == grads_ref.keys()
    for n in grads_ref:
        _close_to_scale(grads[n], grads_ref[n], 0.05)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_bf16_cuda_eager_graphs_equal_eager_decode(name):
    """Device: decode-sized calls (one token) of a bf16 Qwen3-MoE (fused SwiGLU) and gpt-oss (its own gate,
    biases) with eager_graphs replay the experts from CUDA graphs and give the logits of the plain eager
    calls, bit for bit."""
    from moge_kernels import eager_graphs
    model, _ = _model(name)
    model = model.cuda().bfloat16()
    model.set_experts_implementation("moge")
    steps = [torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(s)).cuda()
             for s in range(4)]
    eager_graphs.clear()
    with torch.no_grad():
        want = [model(ids, use_cache=False).logits for ids in steps]
        with mk.use_options(eager_graphs=8):
            got = [model(ids, use_cache=False).logits for ids in steps]
        assert eager_graphs.num_graphs() == 2          # one per layer
    eager_graphs.clear()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_importing_moge_kernels_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, moge_kernels, moge_kernels.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
