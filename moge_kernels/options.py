"""Runtime options of moge_kernels: every switch typed, validated, read from the environment once.

Each option starts from its environment variable, read when this module is first imported (with
`import moge_kernels`); code overrides it afterwards:

    moge_kernels.set_options(validate=True)              # from now on
    with moge_kernels.use_options(cuda_gemm_tile="big"):  # for a block; restored on exit, also on error
        ...
    moge_kernels.get_options()                           # {"validate": True, ...}: the current values

An unknown value raises ValueError naming the option, its variable and the allowed values: from the
environment at import, from code at the call. The one exception is MOGE_BACKEND, which names a backend
that may not be built on this machine: an unknown or unavailable backend warns and selects "auto", so
`import moge_kernels` never fails because of it. Hot-path code reads `options.current.<name>`, an
attribute of a plain object: no environment access and no parsing per call.

| option             | variable                 | values                                          | default |
|--------------------|--------------------------|-------------------------------------------------|---------|
| backend            | MOGE_BACKEND             | "auto" or a name of registry.BACKENDS           | "auto"  |
| validate           | MOGE_VALIDATE            | bool: also check values (offsets, row_index) of GPU tensors (synchronises) | False |
| triton_gemm_config | MOGE_TRITON_GEMM_CONFIG  | None, or "BM,BN,BK,warps,stages[,tma[,split_m[,split_n[,persistent[,tail_m]]]]]" (a string, a sequence of ints or a GemmConfig): one Triton grouped-GEMM config for every launch | None |
| triton_autotune    | MOGE_TRITON_AUTOTUNE     | bool: time the candidate configs of a key on its first call (never under graph capture) | False |
| triton_mlp_streams | MOGE_TRITON_MLP_STREAMS  | "auto" (from 32 rows per expert) or bool: Triton grouped_mlp's expert halves on two streams | "auto" |
| triton_pdl         | MOGE_TRITON_PDL          | bool: the Triton permute, dispatch, grouped_mlp, combine and FP8 mlp launch their later kernels, and grouped_mlp, combine and the FP8 mlp their first, with programmatic dependent launch on sm_90+ (each starts while the launch before it finishes, the previous op's too, and waits for it before reading its outputs) | True |
| cuda_gemm_tile     | MOGE_CUDA_GEMM_TILE      | CUDA_GEMM_TILES: the cuda backend's many-rows GEMM tile | "auto" |
| bwd_gemm           | MOGE_BWD_GEMM            | "auto" (torch._grouped_mm where it applies) or "triton" | "auto" |
| ascend_impl        | MOGE_ASCEND_IMPL         | "python" (torch_npu operators) or "cpp" (the CANN extension) | "python" |
| eager_direct       | MOGE_EAGER_DIRECT        | bool: a public op called eagerly with nothing to record calls its kernel without torch.ops' dispatcher (ops.direct_call_allowed) | True |
| eager_graphs       | MOGE_EAGER_GRAPHS        | int >= 0: eager layer calls (moge_forward, MoGELayer, transformers' "moge" experts) of at most this many tokens on a GPU replay a CUDA graph captured per signature (moge_kernels/eager_graphs.py); 0 = off | 0 |
| shared_expert_stream | MOGE_SHARED_EXPERT_STREAM | "auto" (under CUDA-graph capture, and eager calls of at least 1024 tokens) or bool: a layer's shared expert runs on a side stream beside its dispatch and routed experts (CUDA, nothing recording gradients; ops.shared_expert_side_stream) | "auto" |
| bench_flush        | MOGE_BENCH_FLUSH         | "read" or "write": how the benchmarks' timer evicts the L2 before each sample (moge_kernels/bench/timing.py: a read leaves it clean; a memset, as triton.testing.do_bench, leaves it dirty) | "read" |
| fp8_fast_accum     | MOGE_FP8_FAST_ACCUM      | bool: the Triton per-channel FP8 GEMMs (fp8_channel) keep the tensor cores' FP8 accumulation over all of K, fp32 only in the epilogue (CUTLASS's FastAccum); off: promoted to fp32 every 128 k. On the H200 it is 1-10% faster but its mlp is 1.6e-2 from the reference (off: 5e-3; bench/results/fp8_channel_fast_h200_effca01.txt). The block format always promotes per 128-k block | False |

Booleans: True/False in code; "1"/"true"/"yes"/"on" and "0"/"false"/"no"/"off" (any case) in the
environment. An empty variable is the same as an unset one.

`backend` is the registry's selection (`set_backend` / `use_backend` are the same switch): the registry
keeps it, these functions forward to it. Modules that cache a choice depending on an option subscribe with
`on_change(name, callback)`: `set_options` calls `callback(value)` after a change (the cuda backend passes
its tile to the C++ launcher this way; C++ reads no environment variable).

Read-only facts from the environment, also read here once: `TRITON_INTERPRET` (Triton's own variable,
parsed as Triton parses it: True for 1/true/yes/on) and `BENCH_COMMIT` (MOGE_BENCH_COMMIT: the commit a
benchmark report names when the tree has no .git).

Build-time variables (MOGE_BUILD_CUDA, MOGE_BUILD_ASCEND, MOGE_DEBUG_BUILD, TORCH_CUDA_ARCH_LIST) choose
what gets compiled, not what runs: setup.py and build_ascend.py read them, not this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Callable

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# MOGE_TRITON_GEMM_CONFIG's fields, in the order of triton/gemm_configs.GemmConfig (tests check the two
# agree); the first five are required.
GEMM_CONFIG_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "tma", "split_m",
                      "split_n", "persistent", "tail_m")
_GEMM_CONFIG_FLAGS = frozenset(("tma", "split_m", "split_n"))

# MOGE_CUDA_GEMM_TILE: "auto" / "wgmma" (the wgmma kernel where it runs: an sm_90 device and a 9.0a
# build, else mma.sync "big"); "wgmma96" / "wgmma128" the same with the SwiGLU tile width forced (96 or
# 128 output columns; default 96 when it divides I and 128 does not); "big": the mma.sync tile.
CUDA_GEMM_TILES = ("auto", "wgmma", "wgmma96", "wgmma128", "big")
# MOGE_BENCH_FLUSH: how moge_kernels.bench.timing evicts the L2 before a sample
BENCH_FLUSH_MODES = ("read", "write")


class _Invalid(ValueError):
    """A value outside the allowed ones; _Option adds which option and variable it was for."""


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Invalid("True/False (environment: " + "/".join(_TRUE) + " or " + "/".join(_FALSE) + ")")


def _choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in allowed:
            raise _Invalid("one of " + ", ".join(repr(a) for a in allowed))
        return text
    return parse


def _auto_or_bool(value) -> bool | None:
    """None: decided per call ("auto"); True / False: always on / off."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return _bool(value)
    except _Invalid:
        raise _Invalid("'auto' or True/False (environment: auto, " + "/".join(_TRUE) + " or "
                       + "/".join(_FALSE) + ")") from None


def _count(value) -> int:
    """An int >= 0 (a bool is not one: False / "off" would read as 0 where a count was meant)."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Invalid("an integer >= 0")


def _gemm_config(value) -> tuple | None:
    """None, or the config's fields as a tuple (ints; flags as bools) ready for GemmConfig(*fields)."""
    expected = ('None or "BM,BN,BK,warps,stages[,' + ",".join(GEMM_CONFIG_FIELDS[5:]) + ']" (5 to '
                f"{len(GEMM_CONFIG_FIELDS)} comma-separated integers, the flags "
                f"{'/'.join(f for f in GEMM_CONFIG_FIELDS if f in _GEMM_CONFIG_FLAGS)} 0 or 1)")
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.astuple(value)
    if isinstance(value, str):
        if not value.strip():
            return None
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, (tuple, list)) or not 5 <= len(value) <= len(GEMM_CONFIG_FIELDS):
        raise _Invalid(expected)
    fields = []
    for name, part in zip(GEMM_CONFIG_FIELDS, value):
        try:
            if name in _GEMM_CONFIG_FLAGS:
                if isinstance(part, int) and part in (0, 1):
                    fields.append(bool(part))
                elif isinstance(part, str) and part.lower() in _TRUE + _FALSE:
                    fields.append(part.lower() in _TRUE)
                else:
                    raise ValueError
            else:
                if isinstance(part, (bool, float)):
                    raise ValueError
                number = int(part)
                if number < 0 or (number == 0 and name not in ("persistent", "tail_m")):
                    raise ValueError
                fields.append(number)
        except (TypeError, ValueError):
            raise _Invalid(f"{expected}; {name}={part!r} is not valid") from None
    return tuple(fields)


@dataclasses.dataclass(frozen=True)
class _Option:
    name: str
    env: str
    parse: Callable[[Any], Any]
    default: Any

    def check(self, value, source: str):
        try:
            return self.parse(value)
        except _Invalid as err:
            raise ValueError(f"{source}: {value!r} is not a valid value of option {self.name!r} "
                             f"({self.env}); expected {err}") from None


_OPTIONS = {opt.name: opt for opt in (
    _Option("validate", "MOGE_VALIDATE", _bool, False),
    _Option("triton_gemm_config", "MOGE_TRITON_GEMM_CONFIG", _gemm_config, None),
    _Option("triton_autotune", "MOGE_TRITON_AUTOTUNE", _bool, False),
    _Option("triton_mlp_streams", "MOGE_TRITON_MLP_STREAMS", _auto_or_bool, None),
    _Option("triton_pdl", "MOGE_TRITON_PDL", _bool, True),
    _Option("cuda_gemm_tile", "MOGE_CUDA_GEMM_TILE", _choice(CUDA_GEMM_TILES), "auto"),
    _Option("bwd_gemm", "MOGE_BWD_GEMM", _choice(("auto", "triton")), "auto"),
    _Option("ascend_impl", "MOGE_ASCEND_IMPL", _choice(("python", "cpp")), "python"),
    _Option("eager_direct", "MOGE_EAGER_DIRECT", _bool, True),
    _Option("eager_graphs", "MOGE_EAGER_GRAPHS", _count, 0),
    _Option("fp8_fast_accum", "MOGE_FP8_FAST_ACCUM", _bool, False),
    _Option("bench_flush", "MOGE_BENCH_FLUSH", _choice(BENCH_FLUSH_MODES), "read"),
    _Option("shared_expert_stream", "MOGE_SHARED_EXPERT_STREAM", _auto_or_bool, None),
)}
BACKEND_ENV = "MOGE_BACKEND"
NAMES = ("backend",) + tuple(_OPTIONS)


class _Current:
    """The current value of every option but `backend` (registry.get_backend()): read as attributes."""
    __slots__ = tuple(_OPTIONS)

    def __setattr__(self, name, value):
        raise AttributeError("options are set with moge_kernels.set_options(...) or use_options(...)")

    def __repr__(self):
        return "options(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def _read_env(name: str) -> str | None:
    text = os.environ.get(name)
    return text if text is not None and text.strip() else None


def _from_env(opt: _Option):
    text = _read_env(opt.env)
    return opt.default if text is None else opt.check(text, f"environment variable {opt.env}")


current = _Current()
for _opt in _OPTIONS.values():
    object.__setattr__(current, _opt.name, _from_env(_opt))

_ENV_BACKEND = (_read_env(BACKEND_ENV) or "auto").strip().lower()
TRITON_INTERPRET: bool = (_read_env("TRITON_INTERPRET") or "").strip().lower() in _TRUE
BENCH_COMMIT: str = (_read_env("MOGE_BENCH_COMMIT") or "").strip()

_listeners: dict[str, list[Callable[[Any], None]]] = {name: [] for name in _OPTIONS}


def initial_backend() -> str:
    """MOGE_BACKEND as a backend name, or "auto" (with a warning) when it names no known backend."""
    from .registry import BACKENDS
    if _ENV_BACKEND == "auto" or _ENV_BACKEND in BACKENDS:
        return _ENV_BACKEND
    warnings.warn(f"environment variable {BACKEND_ENV}={_ENV_BACKEND!r} is not 'auto' or one of "
                  f"{', '.join(BACKENDS)}; using 'auto'", stacklevel=2)
    return "auto"


def parse(name: str, value):
    """Option `name`'s value as set_options would store it (ValueError naming the allowed values)."""
    if name not in _OPTIONS:
        raise ValueError(f"unknown option {name!r}; expected one of {', '.join(_OPTIONS)}")
    return _OPTIONS[name].check(value, "parse")


def on_change(name: str, callback: Callable[[Any], None]) -> None:
    """Call `callback(new_value)` whenever set_options / use_options change option `name`."""
    if name not in _OPTIONS:
        raise ValueError(f"unknown option {name!r}; expected one of {', '.join(_OPTIONS)}")
    _listeners[name].append(callback)


def get_options() -> dict[str, Any]:
    from .registry import get_backend
    return {"backend": get_backend(), **{name: getattr(current, name) for name in _OPTIONS}}


def set_options(**values) -> None:
    """Set options by name (see the module docstring for names and values). All values are validated
    before any is set; `backend` forwards to registry.set_backend."""
    unknown = [name for name in values if name not in NAMES]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; expected one of {', '.join(NAMES)}")
    parsed = {name: _OPTIONS[name].check(value, "set_options") for name, value in values.items()
              if name != "backend"}
    if "backend" in values:
        from .registry import set_backend
        set_backend(values["backend"])
    for name, value in parsed.items():
        if getattr(current, name) == value:
            continue
        object.__setattr__(current, name, value)
        for callback in _listeners[name]:
            callback(value)


@contextlib.contextmanager
def use_options(**values):
    """`with use_options(validate=True): ...`: set options for the block, restore them on exit."""
    previous = {name: value for name, value in get_options().items() if name in values}
    set_options(**values)
    try:
        yield
    finally:
        set_options(**previous)
