"""Expert parallelism (moge_kernels.parallel) on gloo, CPU, 2 and 4 processes.

Each world size runs ONE process group that executes every case below in the same order on all
ranks (process start-up dominates on a 2-core CI box) and writes per-case outcomes to a file; each case is
then reported as its own pytest item. Every case compares the EP result with the single-process layer
(`moge_kernels.moge_forward`, or `moge_kernels.reference.moge_forward` for gradients) on the gathered batch.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moge_kernels
from moge_kernels import parallel, reference, testing

WORLD_SIZES = (2, 4)
RUN_TIMEOUT_S = 150          # whole spawned battery; a hung collective fails the test instead of CI
COLLECTIVE_TIMEOUT_S = 40
# fp32 EP vs single process: same kernels, but GEMMs see different row counts per call, so summation
# blocking may differ in the last bits.
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=5e-5, rtol=5e-5)


# ----------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name, case in CASES.items():
            try:
                outcome = case(rank, world_size)
                results[name] = outcome if isinstance(outcome, str) else "ok"
            except Exception:   # record and go on: the other cases still run on every rank
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


# fork: the children inherit the imported torch/moge_kernels. "spawn" re-imports torch in every child,
# which took ~35 s for 4 processes on a 2-core sandbox; the children use one thread each and the parent
# holds no process group, which is what makes forking after `import torch` safe here.
# Where CUDA is present, an earlier test may have run a backward pass, whose autograd device threads make
# a forked child unusable ("Unable to handle autograd's threading ..."): spawn there.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_available() else "spawn"


def run_battery(world_size, out_dir, timeout=RUN_TIMEOUT_S):
    ctx = mp.start_processes(_entry, args=(world_size, _free_port(), str(out_dir)), nprocs=world_size,
                             join=False, start_method=START_METHOD)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"EP battery with {world_size} ranks exceeded {timeout} s")
    per_rank = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


_BATTERIES = {}


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    def get(world_size):
        if world_size not in _BATTERIES:
            _BATTERIES[world_size] = run_battery(world_size, tmp_path_factory.mktemp(f"ep{world_size}"))
        return _BATTERIES[world_size]
    return get


# ----------------------------------------------------------------------------- inputs
def _global_inputs(tokens_per_rank, E, H, I, dtype=torch.float32, seed=0, dead_experts=0):
    """The whole batch (tokens rank-major) and the full expert weights, identical on every rank."""
    hidden, logits = testing.make_routing_inputs(sum(tokens_per_rank), E, H, dtype=dtype, seed=seed,
                                                 dead_experts=dead_experts)
    w_gate_up, w_down = testing.make_expert_weights(E, H, I, dtype=dtype, seed=seed + 1)
    return hidden, logits, w_gate_up, w_down


def _token_slice(tokens_per_rank, rank):
    start = sum(tokens_per_rank[:rank])
    return slice(start, start + tokens_per_rank[rank])


def _check_moge_forward(rank, D, tokens_per_rank, E, G, k_g, H=24, I=20, ragged=None, dead_experts=0,
                        noncontig=False, options=None, shared=False, seed=0):
    options = options or {}
    hidden, logits, w_gate_up, w_down = _global_inputs(tokens_per_rank, E, H, I, seed=seed,
                                                       dead_experts=dead_experts)
    shared_kw = {}
    if shared:
        g = testing.generator(7)
        shared_kw = dict(shared_w_gate_up=torch.randn(2 * 12, H, generator=g) / H ** 0.5,
                         shared_w_down=torch.randn(H, 12, generator=g) / 12 ** 0.5)
    expected = moge_kernels.moge_forward(hidden, logits, w_gate_up, w_down, G, k_g, **options, **shared_kw)
    mine = _token_slice(tokens_per_rank, rank)
    h, lg = hidden[mine], logits[mine]
    if noncontig:   # same values, strided storage
        h = h.t().contiguous().t()
        lg = torch.cat([lg, lg], dim=1)[:, :E]
    wg, wd = parallel.shard_experts(w_gate_up, w_down, rank, D)
    kw = dict(return_info=True, validate=False)
    if ragged == "flag":
        kw.update(ragged_tokens=True)
    elif ragged == "list":
        kw.update(tokens_per_rank=tokens_per_rank)
    out, info = parallel.ep_moge_forward(h, lg, wg, wd, G, k_g, **options, **shared_kw, **kw)
    torch.testing.assert_close(out, expected[mine], **FP32_TOL)

    # The splits are static: T_self*k_g*G/D rows to every rank, and each source's received per-expert
    # counts add up to exactly that source's static split.
    rows = [T * k_g * G // D for T in tokens_per_rank]
    assert info["send_splits"] == (rows[rank],) * D, info["send_splits"]
    assert info["recv_splits"] == tuple(rows), info["recv_splits"]
    assert info["recv_expert_counts"].shape == (D, E // D)
    assert info["recv_expert_counts"].sum(1).tolist() == rows
    assert info["host_sync"] == (ragged == "flag"), info["host_sync"]
    return out, info


# ----------------------------------------------------------------------------- cases
def case_forward_basic(rank, D):
    _check_moge_forward(rank, D, [7] * D, E=16, G=4, k_g=1)


def case_forward_pangu_like(rank, D):
    # E=64, G=8, k_g=1 (Pangu Pro MoE's routing) with a tiny H/I
    _check_moge_forward(rank, D, [9] * D, E=64, G=8, k_g=1, H=16, I=8)


def case_forward_kg2_options(rank, D):
    g = testing.generator(3)
    scale = torch.rand(16, generator=g) + 0.5
    _check_moge_forward(rank, D, [5] * D, E=16, G=4, k_g=2, shared=True,
                        options=dict(expert_scale=scale, renormalize=True, score_func="sigmoid"))


def case_forward_one_token(rank, D):
    _check_moge_forward(rank, D, [1] * D, E=8, G=4, k_g=1)


def case_forward_zero_tokens(rank, D):
    _check_moge_forward(rank, D, [0] * D, E=8, G=4, k_g=1)


def case_forward_empty_experts(rank, D):
    _check_moge_forward(rank, D, [6] * D, E=16, G=4, k_g=1, dead_experts=2)


def case_forward_noncontiguous(rank, D):
    _check_moge_forward(rank, D, [4] * D, E=8, G=4, k_g=1, noncontig=True)


def case_forward_ragged_flag(rank, D):
    _check_moge_forward(rank, D, [3 + 2 * r for r in range(D)], E=16, G=4, k_g=1, ragged="flag")


def case_forward_ragged_list(rank, D):
    tokens = [0] + [5] * (D - 1)    # one rank with no tokens still serves its experts
    _check_moge_forward(rank, D, tokens, E=16, G=4, k_g=2, ragged="list")


def case_forward_pruned_layer(rank, D):
    """Experts pruned to 2 of 4 per group (moge_kernels.compact_experts): EP over the E'=8 kept experts
    keeps the static equal splits and equals the full layer with the dropped experts' logits at -inf."""
    tokens, E, G, H, I = [5] * D, 16, 4, 24, 20
    hidden, _, w_gate_up, w_down = _global_inputs(tokens, E, H, I, seed=21)
    router_weight = torch.randn(E, H, generator=testing.generator(22)) / H ** 0.5
    keep = [0, 2, 5, 6, 8, 11, 13, 14]
    pruned = moge_kernels.compact_experts(keep, G, router_weight, w_gate_up, w_down)
    dropped = torch.ones(E, dtype=torch.bool)
    dropped[keep] = False
    expected = moge_kernels.moge_forward(hidden, (hidden @ router_weight.t()).masked_fill(dropped, float("-inf")),
                                         w_gate_up, w_down, G)
    mine = _token_slice(tokens, rank)
    wg, wd = parallel.shard_experts(pruned.w_gate_up, pruned.w_down, rank, D)
    out, info = parallel.ep_moge_forward(hidden[mine], hidden[mine] @ pruned.router_weight.t(), wg, wd, G,
                                         return_info=True, validate=False)
    torch.testing.assert_close(out, expected[mine], **FP32_TOL)
    assert info["send_splits"] == (5 * G // D,) * D and info["recv_splits"] == (5 * G // D,) * D
    assert info["recv_expert_counts"].shape == (D, 8 // D) and not info["host_sync"]


def case_forward_masked(rank, D):
    """An expert_mask (Pangu's vote of the whole batch, replicated): masked experts get no rows, the
    splits stay T*k_g*G/D, the result equals the single-process masked layer."""
    tokens, E, G = [6] * D, 16, 4
    hidden, logits, w_gate_up, w_down = _global_inputs(tokens, E, 24, 20, seed=23)
    mask = moge_kernels.voted_expert_mask(logits, G, 2)
    for k_g in (1, 2):
        _, info = _check_moge_forward(rank, D, tokens, E=E, G=G, k_g=k_g, seed=23,
                                      options=dict(expert_mask=mask))
        masked_here = ~mask.view(D, E // D)[rank]                # this rank's experts that are masked
        assert int(info["recv_expert_counts"][:, masked_here].sum()) == 0


def case_default_validation(rank, D):
    """Default on CPU: token counts are checked (one all-gather), and the path reports the sync."""
    hidden, logits, wg_full, wd_full = _global_inputs([3] * D, 8, 8, 8)
    wg, wd = parallel.shard_experts(wg_full, wd_full, rank, D)
    mine = _token_slice([3] * D, rank)
    _, info = parallel.ep_moge_forward(hidden[mine], logits[mine], wg, wd, 4, return_info=True)
    assert info["host_sync"] is True


def _expect_error(fn, exc, *fragments):
    try:
        fn()
    except exc as err:
        for frag in fragments:
            assert frag in str(err), f"{frag!r} not in {err}"
        return
    raise AssertionError(f"expected {exc.__name__}")


def case_error_mismatched_tokens(rank, D):
    tokens = [4] * D
    tokens[-1] = 5
    hidden, logits, wg_full, wd_full = _global_inputs(tokens, 8, 8, 8)
    wg, wd = parallel.shard_experts(wg_full, wd_full, rank, D)
    mine = _token_slice(tokens, rank)
    _expect_error(lambda: parallel.ep_moge_forward(hidden[mine], logits[mine], wg, wd, 4),
                  ValueError, "tokens per rank differ", "ragged_tokens=True")
    # A wrong tokens_per_rank, the same on every rank: validation (default on CPU) makes all ranks raise.
    _expect_error(lambda: parallel.ep_moge_forward(hidden[mine], logits[mine], wg, wd, 4,
                                                   tokens_per_rank=[4] * D),
                  ValueError, "tokens_per_rank", "does not match")
    _expect_error(lambda: parallel.ep_moge_forward(hidden[mine], logits[mine], wg, wd, 4,
                                                   tokens_per_rank=[4] * (D + 1)),
                  ValueError, "all")


def case_error_groups_not_divisible(rank, D):
    G = D + 1                          # 3 groups on 2 ranks, 5 groups on 4 ranks
    E = 2 * G
    hidden, logits = testing.make_routing_inputs(4, E, 8)
    wg, wd = testing.make_expert_weights(E // G, 8, 8)
    _expect_error(lambda: parallel.ep_moge_forward(hidden, logits, wg, wd, G), ValueError,
                  f"num_groups={G} must be divisible", f"D={D}")
    _expect_error(lambda: parallel.moge_rows_per_rank(4, 1, G, D), ValueError, "divisible")


def case_error_wrong_local_experts(rank, D):
    hidden, logits = testing.make_routing_inputs(4, 8, 8)
    wg, wd = testing.make_expert_weights(8, 8, 8)      # full weights instead of this rank's E/D
    _expect_error(lambda: parallel.ep_moge_forward(hidden, logits, wg, wd, 4), ValueError, "E/D")


def case_topk_dynamic(rank, D):
    tokens = [6 + r for r in range(D)]                  # top-k path takes any T per rank
    E, H, I, k = 16, 24, 20, 4
    hidden, logits, w_gate_up, w_down = _global_inputs(tokens, E, H, I, seed=5)
    logits[:, 0] += 3.0                                 # a hot expert: rank 0 receives more rows
    expected = moge_kernels.moge_forward(hidden, logits, w_gate_up, w_down, 1, k)
    mine = _token_slice(tokens, rank)
    wg, wd = parallel.shard_experts(w_gate_up, w_down, rank, D)
    out, info = parallel.ep_topk_forward(hidden[mine], logits[mine], wg, wd, k, return_info=True)
    torch.testing.assert_close(out, expected[mine], **FP32_TOL)
    assert info["host_sync"] and not info["static"]
    assert sum(info["send_splits"]) == tokens[rank] * k
    assert info["recv_expert_counts"].sum(1).tolist() == list(info["recv_splits"])


def case_phase_hooks_in_order(rank, D):
    """ep_moge_forward and ep_topk_forward run ops.compose_layer: every phase once, in PHASES order."""
    hidden, logits, wg_full, wd_full = _global_inputs([4] * D, 8, 8, 8)
    wg, wd = parallel.shard_experts(wg_full, wd_full, rank, D)
    mine = _token_slice([4] * D, rank)
    for forward, k in ((parallel.ep_moge_forward, 4), (parallel.ep_topk_forward, 2)):
        seen = []
        forward(hidden[mine], logits[mine], wg, wd, k, phase_hook=seen.append)
        assert tuple(seen) == parallel.PHASES, (forward.__name__, seen)


def case_error_shared_expert_shapes(rank, D):
    hidden, logits, wg_full, wd_full = _global_inputs([4] * D, 8, 8, 8)
    wg, wd = parallel.shard_experts(wg_full, wd_full, rank, D)
    _expect_error(lambda: parallel.ep_moge_forward(hidden[:4], logits[:4], wg, wd, 4,
                                                   shared_w_gate_up=torch.randn(6, 8),
                                                   shared_w_down=torch.randn(8, 4)),
                  ValueError, "shared_w_down must have shape (8, 3)")
    _expect_error(lambda: parallel.ep_topk_forward(hidden[:4], logits[:4], wg, wd, 2,
                                                   shared_w_gate_up=torch.randn(6, 8)),
                  ValueError, "given together")


def _check_backward(rank, D, tokens, impl, topk=False):
    E, G, k_g, H, I, Is = 8, 4, 1, 16, 12, 10
    hidden, logits, w_gate_up, w_down = _global_inputs(tokens, E, H, I, seed=11)
    g = testing.generator(12)
    scale = torch.rand(E, generator=g) + 0.5
    shared_gu = torch.randn(2 * Is, H, generator=g) / H ** 0.5
    shared_d = torch.randn(H, Is, generator=g) / Is ** 0.5
    cotangent = torch.randn(sum(tokens), H, generator=g)
    leaves = [hidden, logits, w_gate_up, w_down, scale, shared_gu, shared_d]

    full = [t.clone().requires_grad_() for t in leaves]
    groups, per_group = (1, 4) if topk else (G, k_g)
    out_full = reference.moge_forward(full[0], full[1], full[2], full[3], groups, per_group, full[4],
                                      shared_w_gate_up=full[5], shared_w_down=full[6])
    (out_full * cotangent).sum().backward()

    mine = _token_slice(tokens, rank)
    El = E // D
    ep = [hidden[mine].clone(), logits[mine].clone(), w_gate_up[rank * El:(rank + 1) * El].clone(),
          w_down[rank * El:(rank + 1) * El].clone(), scale.clone(), shared_gu.clone(), shared_d.clone()]
    for t in ep:
        t.requires_grad_()
    common = dict(expert_scale=ep[4], shared_w_gate_up=ep[5], shared_w_down=ep[6], impl=impl)
    if topk:
        out = parallel.ep_topk_forward(ep[0], ep[1], ep[2], ep[3], 4, **common)
    else:
        out = parallel.ep_moge_forward(ep[0], ep[1], ep[2], ep[3], G, k_g, tokens_per_rank=tokens, **common)
    torch.testing.assert_close(out, out_full[mine].detach(), **FP32_TOL)
    (out * cotangent[mine]).sum().backward()

    # Replicated parameters get a partial gradient on each rank (its tokens): their sum is the full one.
    for t in ep[4:]:
        dist.all_reduce(t.grad)
    expected = [full[0].grad[mine], full[1].grad[mine], full[2].grad[rank * El:(rank + 1) * El],
                full[3].grad[rank * El:(rank + 1) * El], full[4].grad, full[5].grad, full[6].grad]
    names = ["hidden", "router_logits", "w_gate_up", "w_down", "expert_scale", "shared_w_gate_up",
             "shared_w_down"]
    for name, t, exp in zip(names, ep, expected):
        torch.testing.assert_close(t.grad, exp, **GRAD_TOL, msg=lambda m, n=name: f"grad of {n}: {m}")


def case_backward_reference(rank, D):
    _check_backward(rank, D, [5] * D, "reference")


def case_backward_reference_ragged(rank, D):
    _check_backward(rank, D, [2 + 3 * r for r in range(D)], "reference")


def case_backward_topk_reference(rank, D):
    _check_backward(rank, D, [4 + r for r in range(D)], "reference", topk=True)


def case_backward_moge_ops(rank, D):
    if not parallel.ops_have_autograd():
        return "skip: torch.ops.moge has no autograd registered yet (moge_kernels/autograd.py)"
    _check_backward(rank, D, [5] * D, "moge")


CASES = {name[len("case_"):]: fn for name, fn in list(globals().items()) if name.startswith("case_")}


# ----------------------------------------------------------------------------- pytest items
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ep_gloo(battery, world_size, case):
    per_rank = battery(world_size)
    for rank, results in enumerate(per_rank):
        outcome = results.get(case, "missing: the battery stopped before this case")
        if outcome.startswith("skip:"):
            pytest.skip(outcome[len("skip:"):].strip())
        assert outcome == "ok", f"rank {rank} of {world_size}:\n{outcome}"


# ----------------------------------------------------------------------------- host-only pieces
def test_static_split_sizes():
    # Pangu Pro MoE: G=8, k_g=1; one group per rank on 8 ranks, two per rank on 4.
    assert parallel.moge_rows_per_rank(4096, 1, 8, 8) == 4096
    assert parallel.moge_rows_per_rank(4096, 1, 8, 4) == 8192
    assert parallel.moge_rows_per_rank(3, 2, 4, 2) == 12
    plan = parallel.plan_moge_exchange([5, 5, 5, 5], 1, 1, 8)
    assert plan.equal and plan.send_splits == (10,) * 4 and plan.recv_splits == (10,) * 4
    plan = parallel.plan_moge_exchange([2, 5], 0, 1, 8)
    assert not plan.equal and plan.send_splits == (8, 8) and plan.recv_splits == (8, 20)
    assert plan.num_recv == 28


@pytest.mark.parametrize("G,D", [(8, 3), (3, 2), (4, 8)])
def test_bad_group_split(G, D):
    with pytest.raises(ValueError, match="divisible"):
        parallel.check_ep_config(G, D)


def test_local_expert_layout_matches_stable_sort():
    """The device-side layout equals a stable sort of the received rows by local expert id."""
    g = testing.generator(0)
    D, El = 3, 5
    counts = torch.randint(0, 4, (D, El), generator=g, dtype=torch.int32)
    counts[1, 2] = 0
    counts[:, 4] = 0                                   # an expert nobody routes to
    ids = torch.cat([torch.repeat_interleave(torch.arange(El), counts[s].long()) for s in range(D)])
    dest, order, offsets = parallel.local_expert_layout(counts, ids.numel())
    expected_order = torch.argsort(ids, stable=True)
    assert torch.equal(order, expected_order)
    assert torch.equal(dest[order], torch.arange(ids.numel()))
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0] + torch.cumsum(counts.sum(0), 0).tolist()
    dest0, order0, offsets0 = parallel.local_expert_layout(torch.zeros(D, El, dtype=torch.int32), 0)
    assert dest0.numel() == 0 and order0.numel() == 0 and offsets0.tolist() == [0] * (El + 1)


def test_permute_rows_backward_is_inverse_gather():
    g = testing.generator(1)
    x = torch.randn(7, 3, generator=g, requires_grad=True)
    index = torch.randperm(7, generator=g)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(7)
    y = parallel.permute_rows(x, index, inverse)
    cot = torch.randn(7, 3, generator=g)
    (y * cot).sum().backward()
    torch.testing.assert_close(x.grad, cot[inverse])
