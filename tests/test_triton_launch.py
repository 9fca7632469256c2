"""moge_kernels.triton.launch: the cached-handle launch of a Triton kernel, against a stand-in for
Triton's JITFunction / CompiledKernel (CI has no GPU to launch on; the GPU suite runs every op through
the real fast path and compares it with the plain `kernel[grid](...)` launch)."""
import pytest
import torch

from triton_testing import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

if HAS_TRITON:
    import triton
    from triton.runtime.jit import JITFunction

    from moge_kernels.triton import launch


def _kernel_fn(x_ptr, y_ptr, T, n, stride, BLOCK, FLAG):
    pass


def _misordered_fn(a, B, c):
    pass


def _jit():
    fn = JITFunction(_kernel_fn, do_not_specialize=["T"])
    for p in fn.params:                      # no annotations here: mark the constexprs by name
        p.is_constexpr = p.name in ("BLOCK", "FLAG")
    return fn


class _Compiled:
    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "fn-handle", ("packed",), log

    def run(self, *args):
        self.log.append(("run", args))


class _FakeJit:
    """kernel[grid](*args, **meta) records the call and returns one compiled handle per call."""

    def __init__(self, log):
        self.params = _jit().params
        self.__name__ = "_kernel_fn"
        self.log = log

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("slow", grid, args, meta))
            return _Compiled(self.log)
        return call


class _Driver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "_INTERPRET", False)
    monkeypatch.setattr(launch, "driver", _Driver)
    monkeypatch.setattr(launch, "_hooks_idle", lambda: True)
    log = []
    return launch.Kernel(_FakeJit(log), ("BLOCK", "FLAG", "num_warps")), log


def test_first_call_binds_then_launches_the_cached_handle(fast):
    kernel, log = fast
    x, y = torch.empty(64), torch.empty(64)
    kernel.launch((3, 2), (x, y, 5, 32, 16), (128, True, 4))
    assert log == [("slow", (3, 2), (x, y, 5, 32, 16), dict(BLOCK=128, FLAG=True, num_warps=4))]
    log.clear()
    kernel.launch((7,), (x, y, 9, 32, 16), (128, True, 4))      # T is do_not_specialize: same kernel
    # tensors reach the launcher as their data pointers (no data_ptr() / pointer query in the launcher)
    assert log == [("run", (7, 1, 1, 1234, "fn-handle", ("packed",), None, None, None,
                            x.data_ptr(), y.data_ptr(), 9, 32, 16, 128, True))]
    assert kernel.slow_launches == 1


@pytest.mark.parametrize("change", ["alignment", "dtype", "int", "meta"])
def test_a_new_specialisation_goes_through_triton(fast, change):
    kernel, log = fast
    x, y = torch.empty(64), torch.empty(64)
    kernel.launch((1,), (x, y, 5, 32, 16), (128, True, 4))
    args, meta = (x, y, 5, 32, 16), (128, True, 4)
    if change == "alignment":
        args = (x[1:], y, 5, 32, 16)                 # 4 bytes off: not 16-byte aligned
    elif change == "dtype":
        args = (x.half(), y, 5, 32, 16)
    elif change == "int":
        args = (x, y, 5, 1, 16)                      # an int Triton specialises (1 becomes a constant)
    else:
        meta = (64, True, 4)
    log.clear()
    kernel.launch((1,), args, meta)
    assert [entry[0] for entry in log] == ["slow"]
    log.clear()
    kernel.launch((1,), args, meta)                  # and is cached from then on
    assert [entry[0] for entry in log] == ["run"]


def test_launch_hooks_force_the_plain_path(fast, monkeypatch):
    kernel, log = fast
    x = torch.empty(8)
    kernel.launch((1,), (x, x, 1, 2, 3), (16, False, 1))
    monkeypatch.setattr(launch, "_hooks_idle", lambda: False)
    kernel.launch((1,), (x, x, 1, 2, 3), (16, False, 1))
    assert [entry[0] for entry in log] == ["slow", "slow"]


def test_hooks_idle_reads_triton_hook_chains():
    assert launch._hooks_idle()          # nothing installed by default (Triton 3.6 / 3.9 HookChain)


def test_signature_checks():
    fn = _jit()
    with pytest.raises(TypeError, match="missing from meta_names"):
        launch.Kernel(fn, ("BLOCK", "num_warps"))
    bad = JITFunction(_misordered_fn)
    for p in bad.params:
        p.is_constexpr = p.name == "B"
    with pytest.raises(TypeError, match="before the constexprs"):
        launch.Kernel(bad, ("B",))


def test_every_package_kernel_fits():
    """Each Kernel of the package was built over its jit function (runtime parameters first)."""
    from moge_kernels.triton import combine, dispatch, grouped_gemm
    kernels = [v for m in (combine, dispatch, grouped_gemm) for v in vars(m).values()
               if isinstance(v, launch.Kernel)]
    assert len(kernels) >= 8
    for k in kernels:
        fn = k.fn
        names = [p.name for p in fn.params] if hasattr(fn, "params") else None
        if names is not None:
            assert set(k.constexpr_names) <= set(k.meta_names)


def _package_kernels():
    from moge_kernels.triton import combine, dispatch, grouped_gemm
    return [v for m in (combine, dispatch, grouped_gemm) for v in vars(m).values()
            if isinstance(v, launch.Kernel)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("T", [1, 5, 300, 2048])
def test_cached_launches_match_plain_launches_gpu(T, monkeypatch):
    """Every op of the layer, launched from the cached handles (second and third calls), gives the
    bits of the plain `kernel[grid](...)` launch; at T = 1 and 5 through the one-launch dispatch."""
    import moge_kernels as mk
    from moge_kernels.testing import make_routing_inputs
    E, G, H, I = 64, 8, 512, 192
    hidden, logits = make_routing_inputs(T, E, H, torch.bfloat16, "cuda", seed=T)
    gen = torch.Generator(device="cuda").manual_seed(1)
    w_gate_up = torch.randn(E, 2 * I, H, device="cuda", generator=gen).bfloat16() * H ** -0.5
    w_down = torch.randn(E, H, I, device="cuda", generator=gen).bfloat16() * I ** -0.5

    def layer():
        permuted, weights, ids, offsets, row_index = mk.grouped_dispatch(hidden, logits, G)
        y = mk.grouped_mlp(permuted, w_gate_up, w_down, offsets)
        return permuted, weights, ids, offsets, row_index, y, mk.grouped_combine(y, weights, row_index)

    with mk.use_backend("triton"):
        cached = [layer() for _ in range(3)][-1]
        for k in _package_kernels():
            monkeypatch.setattr(k, "fast", False)
        plain = layer()
    for got, want in zip(cached, plain):
        assert torch.equal(got, want)
