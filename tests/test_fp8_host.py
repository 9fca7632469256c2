"""Host side of the FP8 grouped MLP (moge_kernels/triton/fp8_gemm.py): the plan cache of repeated calls
(_plan_key, _MlpPlan: a call's launches recorded once, replayed with the next call's data pointers) and
the one scratch allocation of its intermediates. The replay runs only through compiled launchers, so
its launches are checked under bench/host_overhead.py's simulation (Triton's launcher a recording no-op,
in a process of its own), against the same call through _mlp_launches."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moge_kernels as mk
from moge_kernels import fp8
from triton_testing import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if HAS_TRITON:
    from moge_kernels.triton import fp8_gemm


def _problem(M=24, E=4, H=256, I=192, fmt="fp8_block", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g)
    gu = mk.quantize_expert_weights(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, fmt, parts=2)
    dn = mk.quantize_expert_weights(torch.randn(E, H, I, generator=g) * I ** -0.5, fmt)
    counts = torch.tensor([M // 2, 0, M // 4, M - M // 2 - M // 4])[:E]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    return x, gu, dn, offsets


def _key(x, gu, dn, offsets, row_scale=None, x_scale=None, out_dtype=None):
    tensors = (x, x_scale, gu.weight, gu.scale, dn.weight, dn.scale, offsets, row_scale)
    ptrs = [0 if t is None else t.data_ptr() for t in tensors]
    return fp8_gemm._plan_key(tensors, ptrs, gu.block_n, gu.block_k, out_dtype)


def test_plan_keys_separate_what_changes_the_launches(monkeypatch):
    """Two calls share a plan only when everything but their data pointers is the same: shapes, strides,
    dtypes, 16-byte alignment, blocks (format), row_scale, quantized x, forced configs."""
    monkeypatch.setattr(fp8_gemm, "_INTERPRET", False)   # the interpreter keeps no plans
    x, gu, dn, offsets = _problem()
    base = _key(x, gu, dn, offsets)
    assert base is not None and base == _key(x.clone(), gu, dn, offsets.clone())
    x2, gu2, dn2, offsets2 = _problem(M=40, seed=1)
    assert _key(x2, gu2, dn2, offsets2) != base                                   # rows
    xc, guc, dnc, _ = _problem(fmt="fp8_channel")
    assert _key(xc, guc, dnc, offsets) != base                                    # format
    assert _key(x.half(), gu, dn, offsets) != base                                # dtype
    assert _key(torch.randn(48, 257)[::2, 1:], gu, dn, offsets) != base           # strides, alignment
    assert _key(x, gu, dn, offsets, row_scale=torch.rand(24)) != base
    xq, xs = fp8.quantize_activations(x)
    assert _key(xq, gu, dn, offsets, x_scale=xs, out_dtype=torch.float32) != base
    forced = fp8_gemm.Fp8Config(16, 64, 4, 1)
    monkeypatch.setitem(fp8_gemm._forced, "gate_up", forced)
    assert _key(x, gu, dn, offsets) != base
    monkeypatch.delitem(fp8_gemm._forced, "gate_up")
    monkeypatch.setitem(fp8_gemm._forced, "down", forced)
    assert _key(x, gu, dn, offsets) != base
    monkeypatch.setattr(fp8_gemm, "_INTERPRET", True)
    assert _key(x, gu, dn, offsets) is None


def test_scratch_views_are_aligned_disjoint_and_k_major():
    x = torch.empty(8, 8)
    parts = [(fp8.E4M3, 5, 136), (torch.float32, 5, 136, 128), (torch.bfloat16, 5, 72),
             (torch.float32, 5, 200, 0)]
    views = fp8_gemm._scratch(x, parts)
    assert [tuple(v.shape) for v in views] == [(5, 136), (5, 2), (5, 72), (5, 1)]
    assert [v.dtype for v in views] == [fp8.E4M3, torch.float32, torch.bfloat16, torch.float32]
    assert views[1].stride() == fp8.new_scales(x, 5, 136, 128).stride() == (1, 5)
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views)
    assert all(a % fp8_gemm.SCRATCH_ALIGN == spans[0][0] % fp8_gemm.SCRATCH_ALIGN for a, _ in spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1


@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_channel"])
def test_repeated_calls_are_bit_identical(fmt):
    """The interpreter (CPU): a first call, a repeated one and one with REPLAY off give the same bits,
    with the scratch buffers of _mlp_launches (rows path and the forced decode path)."""
    x, gu, dn, offsets = _problem(fmt=fmt, seed=3)
    row_scale = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1))
    with mk.use_backend("triton"):
        first = mk.grouped_mlp(x, gu, dn, offsets, row_scale)
        again = mk.grouped_mlp(x, gu, dn, offsets, row_scale)
        with mk.use_backend("reference"):
            want = mk.grouped_mlp(x, gu, dn, offsets, row_scale)
    assert torch.equal(first, again)
    assert ((first - want).norm() / want.norm()).item() <= 1e-2


_SIMULATION_CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, "bench")
    import host_overhead as h
    torch, mk = h._simulated_gpu_path()
    from moge_kernels import fp8
    from moge_kernels.triton import fp8_gemm
    from moge_kernels.triton.grouped_gemm import TensorDescriptor

    # steady state: every launch of these rows from a cached handle
    names = ["mlp fp8", "mlp fp8c", "permute fp8", "dispatch fp8", "MoGELayer fp8"]
    slow = h.simulated_steady_state(names, [1, 4096])
    assert all(v == 0 for v in slow.values()), slow

    def record(fn):
        h.LAUNCHES = []
        y = fn()
        launches, h.LAUNCHES = h.LAUNCHES, None
        return y, launches

    def same_launches(a, b):
        # equal but for the data pointers of the fresh allocations (y, the scratch buffer): at most two
        # distinct pointer shifts
        assert len(a) == len(b) and a, (len(a), len(b))
        shifts = set()
        for la, lb in zip(a, b):
            assert len(la) == len(lb)
            for va, vb in zip(la, lb):
                if isinstance(va, TensorDescriptor):
                    fa, fb = dict(vars(va)), dict(vars(vb))
                    pa, pb = fa.pop("base").data_ptr(), fb.pop("base").data_ptr()
                    assert fa == fb, (fa, fb)
                    if pa != pb:
                        shifts.add(pa - pb)
                elif va != vb:
                    assert type(va) is int and type(vb) is int, (va, vb)
                    shifts.add(va - vb)
        assert len(shifts) <= 2, shifts

    torch.manual_seed(0)
    H, I, E = 128, 64, 64
    cases = []
    for T in (1, 4096):
        x = torch.randn(T * 8, H).to(torch.bfloat16)
        offsets = torch.linspace(0, T * 8, E + 1).to(torch.int32)
        w_gu = torch.randn(E, 2 * I, H).to(torch.bfloat16)
        w_dn = torch.randn(E, H, I).to(torch.bfloat16)
        for fmt in ("fp8_block", "fp8_channel"):
            gu = mk.quantize_expert_weights(w_gu, fmt, parts=2)
            dn = mk.quantize_expert_weights(w_dn, fmt)
            rs = torch.rand(T * 8)
            qa = fp8.QuantizedActivations(*fp8.quantize_activations(x, gu.block_k), gu.block_k, x.dtype)
            cases += [(f"T={T} {fmt}", lambda x=x, gu=gu, dn=dn, o=offsets: mk.grouped_mlp(x, gu, dn, o)),
                      (f"T={T} {fmt} row_scale", lambda x=x, gu=gu, dn=dn, o=offsets, rs=rs:
                       mk.grouped_mlp(x, gu, dn, o, rs)),
                      (f"T={T} {fmt} e4m3 x", lambda qa=qa, gu=gu, dn=dn, o=offsets: mk.grouped_mlp(qa, gu, dn, o))]
    with torch.no_grad():
        for name, fn in cases:
            fn()
            n_plans = len(fp8_gemm._mlp_plans)
            y_replay, replayed = record(fn)
            assert len(fp8_gemm._mlp_plans) == n_plans, name
            fp8_gemm.REPLAY = False
            y_plain, plain = record(fn)
            fp8_gemm.REPLAY = True
            assert y_replay.shape == y_plain.shape and y_replay.dtype == y_plain.dtype, name
            same_launches(replayed, plain)
        # a forced config makes a plan of its own and takes effect (16-row gate_up tiles: the decode path,
        # x and h quantized in the GEMMs' loads: two launches)
        name, fn = cases[0]
        fp8_gemm._forced["gate_up"] = fp8_gemm.Fp8Config(16, 64, 4, 4)
        fn()
        _, forced = record(fn)
        fp8_gemm._forced.clear()
        _, table = record(fn)
        assert len(forced) == 2 and len(table) == 4, (len(forced), len(table))
        bm = fp8_gemm._gemm.constexpr_names.index("BM")
        assert forced[0][-len(fp8_gemm._gemm.constexpr_names) + bm] == 16
    print("SIMULATION OK")
""")


def test_replayed_launches_under_the_simulation():
    """Under the simulation (a process of its own: it installs a stand-in driver): the FP8 rows have no
    launch outside a cached handle after warm-up; a replayed mlp call launches what the same call
    through _mlp_launches launches (kernels, grids, arguments, TMA descriptor fields), but for the
    pointers of its fresh y and scratch allocations; a forced config gets a plan of its own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SIMULATION_CHECK], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "SIMULATION OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_channel"])
@pytest.mark.parametrize("M", [8, 1024], ids=["decode", "rows"])
def test_gpu_replayed_calls_equal_the_plain_path(M, fmt, monkeypatch):
    """On the GPU: the second call of a key records a plan and later calls replay it (new tensors, so new
    data pointers, each time), bit-identical to the same calls with REPLAY off."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 kernels need sm_89+")
    monkeypatch.setattr(fp8_gemm, "_mlp_plans", {})
    E, H, I = 16, 512, 200
    _, gu, dn, _ = _problem(M=M, E=E, H=H, I=I, fmt=fmt, seed=5)
    gu, dn = gu.to("cuda"), dn.to("cuda")
    counts = torch.full((E,), M // E)
    counts[0] += M - counts.sum()
    counts[3] = 0
    counts[1] += M // E
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).cuda()
    inputs = [torch.randn(M, H, generator=torch.Generator().manual_seed(s)).to("cuda", torch.bfloat16)
              for s in range(4)]
    replays = []
    real_replay = fp8_gemm._MlpPlan.replay
    monkeypatch.setattr(fp8_gemm._MlpPlan, "replay",
                        lambda self, *a: replays.append(1) or real_replay(self, *a))
    with torch.no_grad(), mk.use_backend("triton"):
        replayed = [mk.grouped_mlp(x.clone(), gu, dn, offsets.clone()) for x in inputs]
        plans = [p for p in fp8_gemm._mlp_plans.values() if isinstance(p, fp8_gemm._MlpPlan)]
        assert len(plans) == 1 and plans[0].ready() and len(replays) >= 2
        monkeypatch.setattr(fp8_gemm, "REPLAY", False)
        plain = [mk.grouped_mlp(x, gu, dn, offsets) for x in inputs]
    for a, b in zip(replayed, plain):
        assert torch.equal(a, b)
    assert not torch.equal(replayed[0], replayed[1])
