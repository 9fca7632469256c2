"""`moge::grouped_permute` (given expert ids, -1 = dropped slot) on every backend against the reference,
and the composition permute -> grouped_mlp -> grouped_combine against plain torch, forward and backward.

On CPU the triton backend runs through Triton's interpreter (tests/conftest.py): small fp32/fp16 shapes.
On a GPU the same tests run on CUDA tensors for the triton and cuda backends (bf16 too)."""
import pytest
import torch

import moge_kernels as mk
from moge_kernels import reference as R
from moge_kernels.testing import (TOLERANCES, assert_error_within, generator, make_expert_weights, make_topk_ids,
                                  relative_error, sample_inputs)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
AVAILABLE = mk.backends()


def _runs_on(backend, device):
    info = AVAILABLE[backend]
    return info["available"] and "grouped_permute" in info["ops"] and \
        ("*" in info["devices"] or device in info["devices"])


# (backend, device) pairs that can run here; the reference on both
CASES = [(b, d) for d in (["cpu"] + (["cuda"] if HAS_CUDA else []))
         for b in ("reference", "cpu", "triton", "cuda") if _runs_on(b, d)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def run(backend, *args):
    with mk.use_backend(backend):
        assert mk.resolve("grouped_permute", args[0].device.type)[0] == backend
        return mk.grouped_permute(*args)


def assert_permute_equal(out, ref):
    """Every output bit for bit (a permutation copies rows), with its shape, dtype and device."""
    for name, a, b in zip(("permuted_hidden", "expert_offsets", "row_index"), out, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, \
            f"{name}: {tuple(a.shape)} {a.dtype} {a.device} != {tuple(b.shape)} {b.dtype} {b.device}"
        assert torch.equal(a, b), f"{name} differs from the reference"


# ------------------------------------------------------------------------------------ the reference
def test_reference_hand_computed():
    """5 tokens, K=2, E=3. Flat ids [0,2, 1,-1, 2,2, -1,-1, 0,1]: expert 0 gets slots (0,0), (4,0);
    expert 1: (1,0), (4,1); expert 2: (0,1), (2,0), (2,1) (a token may repeat an expert); dropped:
    (1,1), (3,0), (3,1) after every expert, zero rows."""
    hidden = torch.arange(5.0)[:, None].repeat(1, 2) + 1          # row t holds t + 1
    ids = torch.tensor([[0, 2], [1, -1], [2, 2], [-1, -1], [0, 1]])
    permuted, offsets, row_index = R.permute(hidden, ids, 3)
    assert offsets.tolist() == [0, 2, 4, 7]
    assert row_index.tolist() == [[0, 4], [2, 7], [5, 6], [8, 9], [1, 3]]
    assert permuted[:, 0].tolist() == [1, 5, 2, 5, 1, 3, 3, 0, 0, 0]
    assert offsets.dtype == row_index.dtype == torch.int32


def test_reference_equals_dispatch_order():
    """On ids from grouped_dispatch (no -1), grouped_permute reproduces dispatch's permutation exactly."""
    g = generator(3)
    hidden, logits = torch.randn(37, 12, generator=g), torch.randn(37, 16, generator=g)
    permuted, _, ids, offsets, row_index = R.grouped_dispatch(hidden, logits, 4, 2)
    assert_permute_equal(R.permute(hidden, ids, 16), (permuted, offsets, row_index))
    assert_permute_equal(R.permute(hidden, ids.long(), 16), (permuted, offsets, row_index))


# ------------------------------------------------------------------------------------ every backend
SHAPES = [   # (T, K, E, H, drop)
    (0, 2, 4, 8, 0.25),       # no tokens
    (1, 1, 1, 5, 0.0),        # one token, one expert
    (1, 4, 8, 12, 0.5),       # decode, some dropped
    (7, 2, 3, 1, 0.25),       # H = 1
    (33, 8, 64, 20, 0.25),    # E = 64 top-8, T not a power of two
    (50, 3, 5, 10, 1.0),      # every slot dropped: expert_offsets all zero
    (70, 4, 16, 6, 0.0),      # nothing dropped
    (131, 2, 10, 9, 0.3),     # several count blocks at the triton default tiling on a GPU
]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("T,K,E,H,drop", SHAPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_matches_reference(backend, device, T, K, E, H, drop, id_dtype):
    g = generator(T * 7 + E)
    hidden = torch.randn(T, H, generator=g).to(device)
    ids = make_topk_ids(T, K, E, seed=T + K, dtype=id_dtype, device=device, drop=drop)
    out = run(backend, hidden, ids, E)
    assert_permute_equal(out, R.permute(hidden, ids, E))
    # the contract every consumer relies on
    permuted, offsets, row_index = out
    kept = int((ids >= 0).sum())
    assert int(offsets[-1]) == kept and int(offsets[0]) == 0
    assert sorted(row_index.flatten().tolist()) == list(range(T * K))
    assert not permuted[kept:].any()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_noncontiguous(backend, device, dtype):
    """fp16 (bf16 on a GPU) rows copied bit for bit; ids as a transposed view and hidden with a row stride
    (columns of a wider tensor); repeated experts in one token; every expert but one empty."""
    T, K, E, H = 19, 3, 6, 10
    g = generator(11)
    wide = torch.randn(T, 2 * H + 3, generator=g).to(dtype).to(device)
    hidden = wide[:, 3:3 + H]                                        # row stride 2H+3
    ids_t = make_topk_ids(T, K, E, seed=2, device=device).t().contiguous().t()   # strides (1, T)
    assert not ids_t.is_contiguous()
    assert_permute_equal(run(backend, hidden, ids_t, E), R.permute(hidden.contiguous(), ids_t.contiguous(), E))
    repeated = torch.tensor([[4, 4, -1]] * T, dtype=torch.int64, device=device)
    assert_permute_equal(run(backend, hidden, repeated, E), R.permute(hidden, repeated, E))


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("count_block_t,copy_config,fused_counts", [
    (1, (16, 16, 1), 0),              # 45 count blocks: the scan launch
    (1, (16, 16, 1, True), None),     # 45 blocks, a table of 585 counts: scanned by the copy programs
    (2, (1, 16, 1), 0),               # 23 blocks: scan launch
    (2, (1, 4, 1, True), 0),          # scan launch; H split in 3, the H blocks of a token block adjacent
    (4, (2, 4, 1), None),             # 12 blocks: the scan fused into the copy programs, H split in 3
    (8, (16, 32, 2), None),           # fused; copy tile clamped to the count block
    (64, (2, 128, 4), None),          # one block, most of it past T
])
@pytest.mark.parametrize("rank_in_copy", [False, True])
def test_triton_tilings(backend, device, count_block_t, copy_config, fused_counts, rank_in_copy):
    """Each tiling, the slots ranked by the rank launch's sort or by the copy programs."""
    from moge_kernels.triton import permute as tp
    T, K, E, H = 45, 3, 12, 10
    hidden = torch.randn(T, H, generator=generator(4)).to(device)
    ids = make_topk_ids(T, K, E, seed=4, device=device)
    kwargs = dict(count_block_t=count_block_t, copy_config=copy_config, fused_counts=fused_counts,
                  rank_in_copy=rank_in_copy)
    num_blocks = -(-T // count_block_t)
    assert (tp._plan(T, K, E, H, count_block_t, copy_config, False, fused_counts)[3] is None) == \
        tp._fused_scan(num_blocks, E, fused_counts)
    out = tp.grouped_permute(hidden, ids, E, **kwargs)
    assert_permute_equal(out, R.permute(hidden, ids, E))
    # a token repeating an expert and dropped slots in every block, ids as a transposed int64 view
    repeated = torch.stack([ids[:, 0], ids[:, 0], torch.full_like(ids[:, 0], -1)], 1).long().t().contiguous().t()
    out = tp.grouped_permute(hidden, repeated, E, **kwargs)
    assert_permute_equal(out, R.permute(hidden, repeated, E))


def _id_cases(T, K, E, device):
    """Ids with dropped slots, and (K >= 2) the same with slot 1 repeating slot 0's expert, as a
    transposed int64 view."""
    ids = make_topk_ids(T, K, E, seed=T, device=device, drop=0.3)
    cases = [ids]
    if K >= 2:
        repeated = ids.clone().long()
        repeated[:, 1] = repeated[:, 0]
        cases.append(repeated.t().contiguous().t())
    return cases


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("T,K,E,H,one_pass", [
    (1, 8, 128, 64, True),      # decode, top-8 of 128
    (16, 8, 128, 33, True),     # 16 x 8 = 128 slots: the largest one-pass call of K = 8
    (17, 8, 128, 33, False),    # one token more: the rank and copy launches
    (64, 2, 8, 20, True),       # top-2: 64 tokens in one pass
    (5, 3, 12, 300, True),      # K not a power of two, H past one copy block
    (128, 1, 4, 7, True),       # one slot a token, 128 tokens
])
def test_triton_one_pass(backend, device, T, K, E, H, one_pass, monkeypatch):
    """Decode sizes in one launch (every program compares all slots with all): dropped slots, a token
    repeating an expert, ids as a transposed int64 view, hidden with a row stride; and that the size
    picks the path."""
    from moge_kernels.triton import permute as tp
    launched = []
    real = tp._one_pass.launch
    monkeypatch.setattr(tp._one_pass, "launch", lambda *a: (launched.append(a), real(*a)))
    wide = torch.randn(T, H + 5, generator=generator(T + H)).to(device)
    hidden = wide[:, 5:]
    cases = _id_cases(T, K, E, device)
    for case in cases:
        assert_permute_equal(run(backend, hidden, case, E), R.permute(hidden.contiguous(), case.contiguous(), E))
    assert len(launched) == (len(cases) if one_pass else 0)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("drop", [0.0, 0.4])
def test_triton_scan_in_chunks(backend, device, drop, monkeypatch):
    """The scan launch over several chunks of count blocks (the last block partial) and several programs
    of bucket columns (the last partial), E a power of two (E+1 buckets) and not."""
    from moge_kernels.triton import permute as tp
    monkeypatch.setattr(tp, "SCAN_TILE_ELEMS", 16)       # 16 // SCAN_COLS blocks a chunk
    monkeypatch.setattr(tp, "SCAN_COLS", 4)              # 17 / 13 buckets: 5 / 4 programs
    tp._plan.cache_clear()
    try:
        for T, K, E in ((53, 3, 16), (41, 2, 12)):
            hidden = torch.randn(T, 5, generator=generator(T)).to(device)
            ids = make_topk_ids(T, K, E, seed=T, device=device, drop=drop)
            for count_block_t in (1, 2):                 # 53 / 27 blocks: 14 / 7 chunks of 4
                for rank_in_copy in (False, True):
                    out = tp.grouped_permute(hidden, ids, E, count_block_t=count_block_t, copy_config=(4, 8, 1),
                                             fused_counts=0, rank_in_copy=rank_in_copy)
                    assert_permute_equal(out, R.permute(hidden, ids, E))
    finally:
        tp._plan.cache_clear()


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("T,K,E,block_t", [
    (70, 2, 16, 2),      # 35 blocks: the scan launch (fused_counts=0) or the copy programs' scan
    (9, 8, 128, 16),     # one block, most of it past T; E a power of two (its bins pow2(E+2))
    (1, 1, 3, 1),        # one slot
])
def test_triton_rank_blocks(backend, device, T, K, E, block_t):
    """The sort ranking at its default blocks and at one of its own: dropped slots, a token repeating
    an expert, empty experts, ids as a transposed int64 view."""
    from moge_kernels.triton import permute as tp
    hidden = torch.randn(T, 6, generator=generator(T)).to(device)
    for case in _id_cases(T, K, E, device):
        for count_block_t, fused_counts, rank_in_copy in ((None, None, None), (block_t, 0, False),
                                                           (block_t, 0, True), (block_t, None, False)):
            out = tp.grouped_permute(hidden, case, E, count_block_t=count_block_t, fused_counts=fused_counts,
                                     rank_in_copy=rank_in_copy)
            assert_permute_equal(out, R.permute(hidden, case.contiguous(), E))


@pytest.mark.parametrize("backend,device", CASES)
def test_same_rows_as_dispatch(backend, device):
    """Fed grouped_dispatch's ids, every backend's grouped_permute gives dispatch's outputs."""
    g = generator(9)
    hidden, logits = torch.randn(40, 8, generator=g).to(device), torch.randn(40, 32, generator=g).to(device)
    permuted, _, ids, offsets, row_index = R.grouped_dispatch(hidden, logits, 8, 1)
    assert_permute_equal(run(backend, hidden, ids, 32), (permuted, offsets, row_index))


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu"])
@pytest.mark.parametrize("bad", [4, -2, 1000, -(2**40)])
def test_bad_ids_raise_on_cpu(backend, bad):
    hidden = torch.randn(3, 4)
    ids = torch.tensor([[0, 1], [2, 3], [-1, 0]], dtype=torch.int64)
    ids[1, 1] = bad
    with mk.use_backend(backend), pytest.raises(ValueError, match=r"topk_ids values must lie in \[-1, num_experts=4\)"):
        mk.grouped_permute(hidden, ids, 4)


@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu"])
@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(3, 4, 1), torch.zeros(3, 2, dtype=torch.int32), 4), ValueError, "hidden must have 2 dimensions"),
    ((torch.randn(3, 4).int(), torch.zeros(3, 2, dtype=torch.int32), 4), TypeError, "hidden must have dtype"),
    ((torch.randn(3, 4), torch.zeros(3, 2), 4), TypeError, "topk_ids must have dtype"),
    ((torch.randn(3, 4), torch.zeros(6, dtype=torch.int32), 4), ValueError, "topk_ids must have 2 dimensions"),
    ((torch.randn(3, 4), torch.zeros(2, 2, dtype=torch.int32), 4), ValueError, "hidden has 3 tokens but topk_ids has 2"),
    ((torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32), 0), ValueError, "num_experts must be"),
    ((torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32, device="meta"), 4), ValueError, "topk_ids is on meta"),
])
def test_bad_arguments(backend, args, exc, match):
    with mk.use_backend(backend), pytest.raises(exc, match=match):
        mk.grouped_permute(*args)


def test_int32_overflow_is_caught_before_allocation():
    hidden = torch.empty(2**28, 8, device="meta")
    ids = torch.empty(2**28, 8, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="overflow the int32 row indices"):
        mk.grouped_permute(hidden, ids, 64)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_bad_ids_raise_on_gpu_with_validation():
    ids = torch.tensor([[0, 7]], device="cuda")
    with mk.use_options(validate=True), pytest.raises(ValueError, match="topk_ids values must lie"):
        mk.grouped_permute(torch.randn(1, 4, device="cuda"), ids, 4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cuda" and b != "reference"])
def test_gpu_out_of_range_ids_without_validation_are_dropped(backend):
    """Without MOGE_VALIDATE nothing reads the ids on the host: an id >= E or < -1 must still never write
    outside the output; the kernels treat it as dropped."""
    hidden = torch.randn(4, 8, device="cuda")
    ids = torch.tensor([[0, 9], [-5, 1], [1, 2], [3, -1]], device="cuda")
    out = run(backend, hidden, ids, 4)
    assert_permute_equal(out, R.permute(hidden, torch.where((ids >= 0) & (ids < 4), ids, -1), 4))


# ------------------------------------------------------------------------------------ surface
@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu"])
def test_opcheck(backend):
    with mk.use_backend(backend):
        for args, kwargs in sample_inputs("cpu")["grouped_permute"]:
            torch.library.opcheck(torch.ops.moge.grouped_permute.default, args, kwargs)


def _torch_experts(hidden, ids, weights, w_gate_up, w_down):
    """Plain torch: out[t] = sum over kept slots k of weights[t,k] * SwiGLU_{ids[t,k]}(hidden[t])."""
    # zeros that depend on every input, so that each gets a (zero) gradient even when T = 0
    out = 0 * (hidden.float() + weights.sum() + w_gate_up.sum() + w_down.sum())
    I = w_down.shape[2]
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gate_up = hidden[t].float() @ w_gate_up[e].float().t()
            h = torch.nn.functional.silu(gate_up[:I]) * gate_up[I:]
            out[t] = out[t] + weights[t, k].float() * (h @ w_down[e].float().t())
    return out


def _moge_experts(hidden, ids, weights, w_gate_up, w_down):
    E = w_gate_up.shape[0]
    permuted, offsets, row_index = mk.grouped_permute(hidden, ids, E)
    return mk.grouped_combine(mk.grouped_mlp(permuted, w_gate_up, w_down, offsets), weights, row_index)


@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu"])
@pytest.mark.parametrize("T,K,E", [(1, 2, 4), (13, 4, 8), (0, 2, 3)])
def test_experts_composition_forward_backward(backend, T, K, E):
    """permute -> grouped_mlp -> grouped_combine with -1 ids equals the plain torch loop, and so do the
    gradients of hidden, the routing weights and both expert weights (fp32). The dropped slots carry
    large weights: they must contribute exactly 0."""
    H, I = 12, 6
    g = generator(T + 100)
    hidden = torch.randn(T, H, generator=g)
    ids = make_topk_ids(T, K, E, seed=T, dtype=torch.int64, drop=0.3)
    weights = torch.rand(T, K, generator=g)
    weights = torch.where(ids < 0, 1e4, weights)
    w_gate_up, w_down = make_expert_weights(E, H, I, seed=T)
    leaves = [t.clone().requires_grad_() for t in (hidden, weights, w_gate_up, w_down)]
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weights, w_gate_up, w_down)]
    with mk.use_backend(backend):
        out = _moge_experts(leaves[0], ids, *leaves[1:])
        grad_out = torch.randn(out.shape, generator=g)
        out.backward(grad_out)
    ref = _torch_experts(ref_leaves[0], ids, *ref_leaves[1:])
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("hidden", "topk_weights", "w_gate_up", "w_down"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu"])
def test_permute_backward_against_torch(backend):
    """grad_hidden[t] = sum over kept slots of grad_permuted[row_index[t, k]]; dropped rows (zeros, not
    copies of hidden) give no gradient whatever gradient they receive."""
    T, K, E, H = 11, 3, 5, 7
    g = generator(5)
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    ids = make_topk_ids(T, K, E, seed=5, drop=0.3)
    with mk.use_backend(backend):
        permuted, _, row_index = mk.grouped_permute(hidden, ids, E)
    grad = torch.randn(T * K, H, generator=g)
    (grad_hidden,) = torch.autograd.grad(permuted, hidden, grad)
    # the same gradient through torch autograd of the reference's gather formula
    hidden_ref = hidden.detach().clone().requires_grad_()
    slot_of_row = torch.empty(T * K, dtype=torch.long)
    slot_of_row[row_index.flatten().long()] = torch.arange(T * K)
    gathered = hidden_ref[slot_of_row // K] * (ids.flatten() >= 0)[slot_of_row, None]
    (expected,) = torch.autograd.grad(gathered, hidden_ref, grad)
    torch.testing.assert_close(grad_hidden, expected, atol=1e-6, rtol=1e-6)


def test_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True) of the experts composition, forward and backward."""
    T, K, E, H, I = 9, 2, 4, 8, 4
    g = generator(2)
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    ids = make_topk_ids(T, K, E, seed=2, drop=0.3)
    weights = torch.rand(T, K, generator=g)
    w_gate_up, w_down = make_expert_weights(E, H, I)
    compiled = torch.compile(_moge_experts, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, ids, weights, w_gate_up, w_down)
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    hidden_ref = hidden.detach().clone().requires_grad_()
    ref = _torch_experts(hidden_ref, ids, weights, w_gate_up, w_down)
    (grad_ref,) = torch.autograd.grad(ref.sum(), hidden_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ rows of no expert
def _serves(backend, op, device):
    info = AVAILABLE[backend]
    return info["available"] and op in info["ops"] and ("*" in info["devices"] or device in info["devices"])


GEMM_CASES = [(b, d) for d in (["cpu"] + (["cuda"] if HAS_CUDA else []))
              for b in ("reference", "cpu", "triton", "cuda") if _serves(b, "grouped_mlp", d)]


@pytest.mark.parametrize("backend,device", GEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_and_mlp_zero_rows_past_offsets(backend, device, dtype):
    """expert_offsets[E] < M: the rows past it belong to no expert and are zero in grouped_gemm's and
    grouped_mlp's outputs (NaN inputs there included), and in their input gradients."""
    M, E, H, I = 23, 3, 8, 4
    g = generator(8)
    x = torch.randn(M, H, generator=g).to(dtype)
    x[15:] = float("nan")                                           # rows of no expert are never read
    offsets = torch.tensor([0, 4, 4, 15], dtype=torch.int32)
    w_gate_up, w_down = make_expert_weights(E, H, I, dtype)
    row_scale = torch.rand(M, generator=g)
    if device == "cuda":
        torch.empty(1 << 24, device="cuda").fill_(float("nan"))     # freed blocks poisoned: unwritten rows show
        x, offsets, w_gate_up, w_down, row_scale = (t.cuda() for t in (x, offsets, w_gate_up, w_down, row_scale))
    tol = TOLERANCES[dtype]
    with mk.use_backend(backend):
        y = mk.grouped_gemm(x, w_gate_up, offsets)
        z = mk.grouped_mlp(x, w_gate_up, w_down, offsets, row_scale)
    assert not y[15:].any() and not z[15:].any()
    torch.testing.assert_close(y[:15], R.grouped_gemm(x[:15], w_gate_up, offsets), **tol)
    torch.testing.assert_close(z[:15], R.grouped_mlp(x[:15], w_gate_up, w_down, offsets, row_scale[:15]), **tol)
    if dtype != torch.float16:
        xs = x.nan_to_num().requires_grad_()
        with mk.use_backend(backend):
            out = mk.grouped_mlp(xs, w_gate_up, w_down, offsets)
        (grad,) = torch.autograd.grad(out, xs, torch.randn(out.shape, generator=g).to(out))
        assert not grad[15:].any()


# ------------------------------------------------------------------------------------ GPU only
GPU_BACKENDS = [b for b, d in CASES if d == "cuda" and b != "reference"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T,K,E,H", [(1, 8, 128, 2048), (4096, 8, 128, 2048), (4096, 2, 8, 4096),
                                     (20000, 4, 32, 72), (3000, 8, 384, 64), (70000, 8, 128, 16),
                                     (40000, 1, 8, 16)])
def test_gpu_large_shapes(backend, T, K, E, H):
    """Model widths (Qwen3-30B-A3B, Mixtral, gpt-oss-like, Kimi-like E=384) with dropped slots, bf16; the
    triton rank's largest sorts (T=70000, K=8: count blocks of 1024 tokens, 8192 slots; T=40000, K=1)."""
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = make_topk_ids(T, K, E, seed=T, device="cuda", drop=0.1)
    torch.empty(1 << 26, device="cuda").fill_(float("nan"))
    assert_permute_equal(run(backend, hidden, ids, E), R.permute(hidden, ids, E))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_capture(backend):
    """permute -> mlp -> combine captured once and replayed on new ids (other -1 pattern): no host sync.
    The replay equals an eager call on the new ids bit for bit, and its error against the fp32 reference
    is within flash-attention's rule (twice the bf16 reference's: a bf16 chain rounds h and each expert
    row, so a fixed elementwise bound fails at an output near zero now and then)."""
    T, K, E, H, I = 96, 4, 16, 64, 32
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    weights = torch.rand(T, K, device="cuda", generator=g)
    ids = make_topk_ids(T, K, E, seed=1, dtype=torch.int64, device="cuda")
    with mk.use_backend(backend):
        _moge_experts(hidden, ids, weights, w_gate_up, w_down)            # compile / warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _moge_experts(hidden, ids, weights, w_gate_up, w_down)
        ids.copy_(make_topk_ids(T, K, E, seed=2, dtype=torch.int64, device="cuda", drop=0.5))
        graph.replay()
        eager = _moge_experts(hidden, ids, weights, w_gate_up, w_down)
    with mk.use_backend("reference"):
        lowp = _moge_experts(hidden, ids, weights, w_gate_up, w_down)
        exact = _moge_experts(hidden.float(), ids, weights, w_gate_up.float(), w_down.float())
    assert torch.equal(out, eager)
    assert_error_within(out.float(), lowp.float(), exact, what="replayed experts")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_fullgraph_backward(backend):
    """torch.compile(fullgraph=True) (inductor) of the experts composition on CUDA, forward and backward,
    against the reference ops (fp32)."""
    T, K, E, H, I = 50, 4, 8, 32, 16
    hidden = torch.randn(T, H, device="cuda", requires_grad=True)
    ids = make_topk_ids(T, K, E, seed=3, device="cuda")
    weights = torch.rand(T, K, device="cuda")
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.float32, "cuda")
    with mk.use_backend(backend):
        out = torch.compile(_moge_experts, fullgraph=True)(hidden, ids, weights, w_gate_up, w_down)
        (grad,) = torch.autograd.grad(out.sum(), hidden)
    with mk.use_backend("reference"):
        ref = _moge_experts(hidden, ids, weights, w_gate_up, w_down)
        (grad_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(grad, grad_ref, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not AVAILABLE["triton"]["available"], reason="needs triton")
def test_triton_count_config():
    """The tiling rule: decode spreads over <= 16 blocks (scan fused into the copy); past that, a count
    table of at most FUSED_SCAN_MAX_COUNTS entries from blocks of at most FUSED_SCAN_MAX_BLOCK_SLOTS slots
    (also scanned by the copy programs), else at most MAX_COUNT_BLOCKS blocks of MIN_BLOCK_SLOTS to
    MAX_BLOCK_SLOTS slots (more blocks only past that), scanned by the scan launch."""
    from moge_kernels.triton import permute as tp
    for T in (1, 7, 100, 256, 257, 4096, 16384, 65536, 1 << 20):
        for K in (1, 2, 6, 8):
            for E in (8, 32, 128):
                block_t = tp._count_config(T, K, E)
                num_blocks = -(-T // block_t)
                assert block_t == tp.pow2(block_t) and block_t * tp.pow2(K) <= max(tp.MAX_BLOCK_SLOTS, tp.pow2(K))
                if num_blocks <= tp.FUSED_SCAN_MAX_BLOCKS:
                    continue
                assert block_t * tp.pow2(K) >= tp.MIN_BLOCK_SLOTS
                if tp._fused_scan(num_blocks, E):
                    assert num_blocks * (E + 1) <= tp.FUSED_SCAN_MAX_COUNTS
                else:
                    assert num_blocks <= tp.MAX_COUNT_BLOCKS or block_t * tp.pow2(K) == tp.MAX_BLOCK_SLOTS
                unfused = tp._count_config(T, K, E, fused_counts=0)
                assert -(-T // unfused) <= tp.MAX_COUNT_BLOCKS or unfused * tp.pow2(K) == tp.MAX_BLOCK_SLOTS
    # the shapes it is for: Mixtral (E=8, K=2) and gpt-oss (E=32, K=4) at T=4096 skip the scan launch
    for K, E in ((2, 8), (4, 32)):
        assert tp._fused_scan(-(-4096 // tp._count_config(4096, K, E)), E)
    assert not tp._fused_scan(-(-4096 // tp._count_config(4096, 8, 128)), 128)


@pytest.mark.skipif(not AVAILABLE["triton"]["available"], reason="needs triton")
def test_triton_copy_config_compiled(monkeypatch):
    """The compiled copy tile (the interpreter's is 16 tokens): one token a program at decode, 4 past
    1024 tokens, 2 where H leaves a partly masked 1024-column block (gpt-oss's 2880); and where the copy
    programs rank the slots: up to RANK_IN_COPY_MAX_COMPARES compares (gpt-oss-20b T=4096: the sort)."""
    from moge_kernels.triton import permute as tp
    monkeypatch.setattr(tp, "_INTERPRET", False)
    assert tp.copy_config(512, 2880) == (1, 1024, 4, True)
    assert tp.copy_config(4096, 2880) == (2, 1024, 4, True)
    for H in (2048, 4096, 5120):
        assert tp.copy_config(4096, H) == (4, 1024, 4, True)
    assert tp.copy_config(4096, 64) == (4, 64, 1, True)
    tp._plan.cache_clear()
    assert not tp._plan(4096, 4, 32, 2880, None, None, True)[1]    # gpt-oss-20b: 2 x 4 x 256 compares
    assert tp._plan(4096, 2, 8, 4096, None, None, True)[1]         # Mixtral: 4 x 2 x 128
    tp._plan.cache_clear()


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("copy_config", [None, (4, 8, 1, True), (4, 8, 1, False)])
def test_triton_no_columns(backend, device, copy_config):
    """H = 0: no copy work, but one H block of programs still writes row_index (both copy grids)."""
    from moge_kernels.triton import permute as tp
    for T, K, E in ((40, 2, 8), (300, 8, 8), (5, 3, 4)):
        hidden = torch.randn(T, 0, device=device)
        ids = make_topk_ids(T, K, E, seed=T, device=device)
        assert_permute_equal(tp.grouped_permute(hidden, ids, E, copy_config=copy_config), R.permute(hidden, ids, E))


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_triton_copy_scans_small_tables(backend, device, drop):
    """More count blocks than decode's FUSED_SCAN_MAX_BLOCKS but a small table (few experts): the copy
    programs scan it (no scan launch), with the same rows as through the scan launch and the reference;
    the last count block partial, an expert with no rows."""
    from moge_kernels.triton import permute as tp
    T, K, E, H = 300, 8, 8, 5
    hidden = torch.randn(T, H, generator=generator(T)).to(device)
    ids = make_topk_ids(T, K, E, seed=11, device=device, drop=drop)
    num_blocks = -(-T // tp._count_config(T, K, E))
    assert num_blocks > tp.FUSED_SCAN_MAX_BLOCKS and tp._fused_scan(num_blocks, E)
    assert tp._plan(T, K, E, H, None, None, False)[3] is None           # no scan launch
    assert tp._plan(T, K, E, H, None, None, False, 0)[3] is not None    # fused_counts=0: the scan launch
    ref = R.permute(hidden, ids, E)
    assert_permute_equal(tp.grouped_permute(hidden, ids, E), ref)
    assert_permute_equal(tp.grouped_permute(hidden, ids, E, fused_counts=0), ref)
    assert_permute_equal(tp.grouped_permute(hidden, ids, E, rank_in_copy=False), ref)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b, d in GEMM_CASES if d == "cuda" and b != "reference"])
@pytest.mark.parametrize("M,E,H,I,kept", [(8192, 8, 1024, 512, 5000), (32768, 128, 2048, 768, 30000),
                                          (64, 16, 256, 128, 17)])
def test_gpu_gemm_and_mlp_zero_rows_past_offsets_at_scale(backend, M, E, H, I, kept):
    """The prefill/decode configs (TMA, persistent, two streams, wgmma) with rows of no expert, bf16,
    forward and the input gradient; freed memory poisoned with NaN so an unwritten row shows."""
    g = generator(M)
    counts = torch.bincount(torch.randint(0, E, (kept,), generator=g), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    x = torch.randn(M, H, generator=g).to(torch.bfloat16)
    x[kept:] = 0
    w_gate_up, w_down = make_expert_weights(E, H, I, torch.bfloat16, "cuda")
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))
    x, offsets = x.cuda().requires_grad_(), offsets.cuda()
    with mk.use_backend(backend):
        y = mk.grouped_gemm(x, w_gate_up, offsets)
        z = mk.grouped_mlp(x, w_gate_up, w_down, offsets)
        (grad,) = torch.autograd.grad(z, x, torch.randn_like(z))
    assert not y[kept:].any() and not z[kept:].any() and not grad[kept:].any()
    assert torch.isfinite(y).all() and torch.isfinite(z).all() and torch.isfinite(grad).all()
    with mk.use_backend("reference"):
        ref = mk.grouped_mlp(x.detach(), w_gate_up, w_down, offsets)[:kept]
    assert relative_error(z[:kept], ref) < 1e-2          # bf16 GEMMs: a norm-wise check, not elementwise


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("T", [5, 300, 4096])
def test_gpu_pdl_on_and_off_agree(T):
    """The triton permute's launch chain with programmatic dependent launch (the default on sm_90+) and
    without it: the same outputs, eagerly and replayed from a CUDA graph on new ids; T = 5 is one launch
    (no chain), 300 skips the scan launch (the copy scans), 4096 runs it."""
    from moge_kernels.triton import permute as tp
    K, E, H = 8, 128, 2048
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = make_topk_ids(T, K, E, seed=T, device="cuda", drop=0.1)
    ref = R.permute(hidden, ids, E)
    for pdl in (True, False):
        torch.empty(1 << 26, device="cuda").fill_(float("nan"))
        assert_permute_equal(tp.grouped_permute(hidden, ids, E, pdl=pdl), ref)
    from moge_kernels.bench.timing import capture_graph
    outputs = []
    with mk.use_options(triton_pdl=True), mk.use_backend("triton"):
        replay = capture_graph(lambda: outputs.append(mk.grouped_permute(hidden, ids, E)))
    for seed in (1, 2):
        ids.copy_(make_topk_ids(T, K, E, seed=seed, device="cuda", drop=0.2))
        hidden.copy_(torch.randn_like(hidden))
        replay()
        assert_permute_equal(outputs[-1], R.permute(hidden, ids, E))   # the captured call's outputs
