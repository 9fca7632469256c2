"""Launching a @triton.jit kernel with Triton's per-call host work done once per specialisation.

`kernel[grid](*args, **meta)` (Triton's JITFunction.run) binds the signature, specialises every argument
(dtype, 16-byte alignment of pointers, ints equal to 1 or divisible by 16), builds a cache-key string
and fills launch metadata for the hook chain on every call: about 10 us of Python per launch, more than
the GPU time of a decode-size kernel. `Kernel.launch` keeps the CompiledKernel that the first call of a
specialisation returned and then calls its launcher directly,

    compiled.run(grid0, grid1, grid2, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *all_args)

(what JITFunction.run itself does, in Triton 3.6 and 3.9 alike). The specialisation key is `meta`, the
tuple of the constexprs and launch options (num_warps, num_stages) named when the Kernel is made (it
must also determine which arguments are tensors), the dtype and 16-byte alignment of every tensor and the value of every int argument that Triton specialises (all ints but the
kernel's `do_not_specialize` ones, whose values vary freely): the same classes Triton distinguishes, or
finer, so a cached kernel is always the one Triton would pick.

Every call goes through `kernel[grid](...)` instead under TRITON_INTERPRET=1 (the interpreter launches
nothing compiled), while a launch hook is installed (a profiler such as proton), and for a handle without
that interface (another Triton). The launch is on the current stream, as Triton's: CUDA-graph capture
and torch.compile see the same kernels.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

from triton.runtime import driver

from .. import options
from .gemm_configs import device_index

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - Triton without knobs: always the plain launch
    _knobs = None

try:  # grid dependency control (Triton >= 3.4): programmatic dependent launch on sm_90+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL off
    gdc_launch_dependents = gdc_wait = None

_INTERPRET = options.TRITON_INTERPRET
MAX_ENTRIES = 4096      # per kernel; past it the cache starts over (bounds memory when shapes never repeat)


def _hooks_idle() -> bool:
    """No launch hook installed (Triton 3.6/3.9 keep them as HookChain objects with a `calls` list)."""
    if _knobs is None:
        return False
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: in Triton 3.6 that is a constexpr function, a few us of Python a call."""
    return (a + b - 1) // b


def pow2(n: int) -> int:
    """triton.next_power_of_2 for host code (also a constexpr function there): the least power of two
    >= n, 1 for n <= 1."""
    return 1 << max(int(n) - 1, 0).bit_length()


class _ThreadState(threading.local):
    record = None      # a list while `recording` collects this thread's launches


_thread = _ThreadState()


def ensure_context(device: torch.device) -> None:
    """Make `device`'s primary CUDA context current in this thread where none is. Triton encodes host
    TMA descriptors (cuTensorMapEncodeTiled, a driver call) before its launcher makes a context current,
    and a thread whose first CUDA work is such a launch has none (a new thread's device is 0 without a
    current context, and setting device 0 again is skipped as a no-op): autograd's thread running a
    backward whose first kernel is a TMA GEMM failed with "invalid device context". One driver query per
    thread and device."""
    index = device_index(device)
    done = getattr(_thread, "contexts", None)
    if done is None:
        done = _thread.contexts = set()
    if index in done:
        return
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        ctx = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and not ctx.value:
            dev = ctypes.c_int()
            if cuda.cuDeviceGet(ctypes.byref(dev), index) == 0 and \
                    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0:
                cuda.cuCtxSetCurrent(ctx)
    except OSError:   # no libcuda.so.1 here (not Linux): the launch reports what it finds
        pass
    done.add(index)


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether a chain of kernels on `device` launches its later kernels with programmatic dependent
    launch (launch option launch_pdl, kernel constexpr USE_GDC): option triton_pdl on, a compiled (not
    interpreted) launch, sm_90+. A kernel launched so may start while the one before it still runs; it
    reads that kernel's outputs only after gdc_wait(), which returns once the earlier kernel has finished
    and its writes are visible, so only its prologue (loads of inputs older than the chain) overlaps."""
    return (options.current.triton_pdl and gdc_wait is not None and not _INTERPRET
            and device.type == "cuda" and _sm90(device_index(device)))


class Kernel:
    """A @triton.jit function whose runtime parameters all come before its constexpr ones; `meta_names`
    names the constexprs and launch options that `launch` takes as one tuple."""

    def __init__(self, fn, meta_names: tuple):
        self.fn = fn
        self.meta_names = tuple(meta_names)
        params = getattr(fn, "params", None)      # a JITFunction's (the interpreter's function has none)
        self.fast = not _INTERPRET and params is not None
        if params is not None:
            flags = [p.is_constexpr for p in params]
            if any(flags[i] and not flags[i + 1] for i in range(len(flags) - 1)):
                raise TypeError(f"{fn.__name__}: runtime parameters must come before the constexprs")
            self.constexpr_names = [p.name for p in params if p.is_constexpr]
            self.dynamic = frozenset(i for i, p in enumerate(params) if p.do_not_specialize)
            missing = set(self.constexpr_names) - set(self.meta_names)
            if missing:
                raise TypeError(f"{fn.__name__}: constexprs {sorted(missing)} missing from meta_names")
        self._layouts = {}    # meta -> (tensor positions, specialised int positions)
        self._compiled = {}   # full key -> (launcher, function, packed metadata, constexpr values)
        self.slow_launches = 0   # launches through kernel[grid](...) (first of a key, hooks installed)

    def launch(self, grid, args: tuple, meta: tuple) -> None:
        """self.fn[grid](*args, **dict(zip(meta_names, meta))); `args` are the runtime arguments in
        signature order."""
        record = _thread.record
        if record is not None:
            record.append((self, grid, args, meta))
        if not self.fast:
            self.fn[grid](*args, **dict(zip(self.meta_names, meta)))
            return
        key, launch_args = self._key(args, meta)
        entry = self._compiled.get(key)
        if entry is None or not _hooks_idle():
            self.slow_launches += 1
            named = dict(zip(self.meta_names, meta))
            compiled = self.fn[grid](*args, **named)
            if entry is None and getattr(compiled, "function", None) is not None \
                    and hasattr(compiled, "packed_metadata"):
                if len(self._compiled) >= MAX_ENTRIES:
                    self._compiled.clear()
                self._compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                       tuple(named[name] for name in self.constexpr_names))
            return
        run, function, packed_metadata, constexprs = entry
        stream = driver.active.get_current_stream(key[-1])
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, packed_metadata,
            None, None, None, *launch_args, *constexprs)

    def entry(self, args: tuple, meta: tuple):
        """The cached (launcher, function, packed metadata, constexpr values) that launch(grid, args,
        meta) calls on the current device, or None (not launched yet, or no cached handle)."""
        if not self.fast:
            return None
        return self._compiled.get(self._key(args, meta)[0])

    def _key(self, args: tuple, meta: tuple):
        """(specialisation key, args with tensors as data pointers); the key ends with the device."""
        layout = self._layouts.get(meta)
        if layout is None:
            layout = self._layouts[meta] = (
                tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
                tuple(i for i, a in enumerate(args) if type(a) is int and i not in self.dynamic))
        tensors, ints = layout
        # One pass over the tensors: the key's dtype and 16-byte alignment of each, and its data pointer,
        # which the launcher then takes as it is (an int skips its per-pointer data_ptr() call and
        # cuPointerGetAttribute query; the pointer of a CUDA tensor is already a device pointer).
        launch_args = list(args)
        key = [meta]
        for i in tensors:
            t = args[i]
            ptr = launch_args[i] = t.data_ptr()
            key.append(t.dtype)
            key.append(ptr & 15 == 0)
        for i in ints:
            key.append(args[i])
        key.append(driver.active.get_current_device())
        return tuple(key), launch_args


class recording:
    """`with recording() as launches:` collects the (kernel, grid, args, meta) of every Kernel.launch
    of this thread inside the block, in order (a caller that replays them: fp8_gemm's mlp plans)."""

    def __enter__(self) -> list:
        self._outer = _thread.record
        _thread.record = []
        return _thread.record

    def __exit__(self, *exc) -> None:
        _thread.record = self._outer
