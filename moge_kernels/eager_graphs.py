"""CUDA-graph replays of eager layer calls at decode sizes (option `eager_graphs`).

An eager MoGE layer call at decode sizes costs the host more than its kernels cost the GPU
(bench/results/eager_gaps_h200_bc54ef3.txt, H200: about 0.20 ms of host time per moge_forward at T=1 against
0.094 ms of kernels), so a decode loop runs at the host's pace. With `eager_graphs = N > 0`, a layer call
of at most N tokens on a GPU that nothing records (no grad, no compile, no mode: ops.compose_layer's
direct path, and its per-op path for FP8 expert weights, keyed on their tensors and blocks) is captured
once per key in a CUDA graph and replayed from then on: its two per-call inputs
(hidden, router_logits) are copied into the graph's input buffers, the graph is replayed on the current
stream, and its outputs are cloned (the graph's own buffers are overwritten by the next replay).

The key holds the layer signature (shapes, strides, dtypes, device, the other arguments' values), the
data pointer, shape, strides and dtype of every other tensor argument (expert weights, expert_scale,
shared-expert weights, expert_mask), the grad/inference/autocast state, and what selects the kernels: the
backend (registry.get_backend()) and the options that change a kernel or its config (_selection).
A replay reads those tensors where they were at capture: an in-place update (an optimizer step,
load_state_dict, new mask values) is what the next replay computes with; a new tensor is a new key. A key is
captured on its second call: the first runs as usual, compiling the kernels and checking the arguments,
so errors are raised eagerly, never inside a capture (a capture that fails anyway warns once and leaves
its key eager); a key whose ops would run on the reference backend
(float64, backend "reference", no GPU backend: host syncs, which a capture cannot hold) is never captured.
A model has one key per layer and batch size: at most MAX_GRAPHS graphs are kept (least recently used out;
a decode loop cycling through more keys than that would capture on every call, so raise it for deep models
served at many batch sizes).

Capture and replay run on the per-call tensors' GPU (made current, as the eager ops do for a layer on
another GPU). The graphs of one GPU share one memory pool (a private pool per graph would hold at least a
2 MB segment each, 20 MB once an intermediate passes 1 MB: GBs for 512 graphs): each replay's
intermediates are dead once its outputs are cloned, and each graph's outputs stay allocated while it is
kept. So the replays of one GPU must run one after another, as on one stream; a graph replayed on two
streams at once (or graphs of one GPU on different streams) would race on the shared buffers.

The kernels and their order are those of the eager call, so a replay's outputs equal the eager call's bit
for bit: the capture makes the choices the eager call made (the Triton grouped_mlp's stream split
(grouped_gemm._two_streams) as outside a capture; with triton_autotune, the config tuned eagerly), so it
also compiles nothing the first call did not. One choice differs and changes no bit: the layer's shared
expert takes its side stream in every capture, this one too (ops.shared_expert_side_stream: the same
kernels, forked and joined; faster as a graph at every T, slower only as small eager calls); the autocast
cache is off during a capture (a cached cast of a weight is freed when autocast exits: the graph must cast,
as the eager call does on a cache miss).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import options, registry

MAX_GRAPHS = 512
_MAX_SEEN = 4096     # keys called once and not captured yet (bounded when keys never repeat)
# The ops of a captured layer (ops.compose_layer) or transformers experts step whose reference kernels
# sync with the host (permute's bincount, expert_slices' tolist()): none of them may fall to the reference
# backend (its swiglu and combine are plain tensor ops, capturable)
_SYNCING_REFERENCE_OPS = ("grouped_dispatch", "grouped_permute", "grouped_mlp")
capturing = False    # an eager_graphs capture is under way (the kernels choose as for the eager call)


class _Entry(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple        # the graph's input buffers, one per per-call input
    outputs: tuple       # the graph's outputs, overwritten by each replay
    device: int = -1     # the GPU it was captured on (its memory pool's)


_graphs: "OrderedDict[tuple, _Entry]" = OrderedDict()
_seen: dict[tuple, bool] = {}      # key called once -> whether it may be captured
_capture_streams: dict[int, "torch.cuda.Stream"] = {}   # device index -> the stream its captures run on
_pools: dict[int, tuple] = {}      # device index -> the memory pool its graphs share


def applies(hidden: Tensor) -> bool:
    """Whether a layer call on `hidden` ([T, H]) is replayed from a graph: the option on and 1 <= T <= it,
    a CUDA tensor, no torch.compile tracing (its graph is compiled, not captured here), no capture already
    under way (a graph inside the user's own capture is theirs), and no value checks (MOGE_VALIDATE reads
    values on the host, which a capture cannot)."""
    limit = options.current.eager_graphs
    return (limit > 0 and not torch.compiler.is_compiling() and hidden.is_cuda
            and 0 < hidden.shape[0] <= limit and not options.current.validate
            and not torch.cuda.is_current_stream_capturing())


def _fixed_key(value):
    """A fixed argument in the key: a tensor by pointer and layout (its device: the per-call tensors' one,
    which the key holds, or a pointer no other GPU has), any other value as it is."""
    if isinstance(value, Tensor):
        return (value.data_ptr(), value.shape, value.stride(), value.dtype)
    return value


def _selection() -> tuple:
    """What chooses the kernels a call runs besides its arguments: the backend and the options that change
    a kernel, its config or its streams (bwd_gemm only orders backward kernels; eager_direct off and
    validate keep calls out of the graphs; ascend_impl is for NPUs)."""
    o = options.current
    return (registry.get_backend(), o.triton_gemm_config, o.triton_autotune, o.triton_mlp_streams,
            o.triton_pdl, o.cuda_gemm_tile, o.shared_expert_stream, o.fp8_fast_accum)


def _capturable(first: Tensor) -> bool:
    """Whether the ops that would sync on the reference backend run on another one for `first`'s device
    type and dtype (every op's first tensor has hidden's dtype)."""
    return all(registry.candidates(op, first.device.type, first.dtype)[0].backend != "reference"
               for op in _SYNCING_REFERENCE_OPS)


def run(fn: Callable[..., tuple], per_call: tuple, fixed: tuple, tag) -> tuple:
    """fn(*per_call) -> a tuple of tensors, replayed from a graph once this key has been seen.

    per_call: the tensors that change between calls (copied into the graph's buffers); fixed: every other
    argument fn's result depends on (tensors by pointer and layout, others by value); tag: anything else
    that tells two fns apart (hashable). Captured and replayed on per_call[0]'s GPU, made current."""
    device = per_call[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return run(fn, per_call, fixed, tag)
    key = (tag, tuple([_fixed_key(v) for v in fixed]),
           tuple([(t.shape, t.stride(), t.dtype) for t in per_call]), device,
           torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None, _selection())
    entry = _graphs.get(key)
    if entry is None:
        capturable = _seen.get(key)
        if capturable is None:            # first call: as usual (compiles, checks), then capture next time
            if len(_seen) >= _MAX_SEEN:
                _seen.clear()
            _seen[key] = _capturable(per_call[0])
            return fn(*per_call)
        if not capturable:
            return fn(*per_call)
        try:
            entry = _capture(fn, per_call)
        except Exception as err:   # noqa: BLE001  the call still runs: eagerly, from now on always
            _seen[key] = False
            warnings.warn(f"eager_graphs: a {tag} call could not be captured in a CUDA graph "
                          f"({type(err).__name__}: {str(err)[:200]}); its key runs eagerly from now on",
                          stacklevel=3)
            return fn(*per_call)
        del _seen[key]
        _graphs[key] = entry
        if len(_graphs) > MAX_GRAPHS:
            _, evicted = _graphs.popitem(last=False)
            if all(e.device != evicted.device for e in _graphs.values()):
                # a pool no graph holds is freed (torch.cuda.graph empties the cache); a capture may not
                # name a released pool that still holds memory: the next one there gets a new pool
                _pools.pop(evicted.device, None)
    else:
        _graphs.move_to_end(key)
    for buffer, t in zip(entry.inputs, per_call):
        buffer.copy_(t)
    entry.graph.replay()
    return tuple([out.clone() for out in entry.outputs])


def _capture(fn: Callable[..., tuple], per_call: tuple) -> _Entry:
    global capturing
    index = per_call[0].get_device()      # the current device (run made it so)
    if index not in _capture_streams:
        # torch.cuda.graph's default capture stream is one for the process, on the device current when
        # it was made: a capture for another GPU would switch to that one
        _capture_streams[index] = torch.cuda.Stream(device=index)
    if index not in _pools:
        _pools[index] = torch.cuda.graph_pool_handle()
    inputs = tuple(t.clone() for t in per_call)
    graph = torch.cuda.CUDAGraph()
    cache_enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    capturing = True
    try:
        with torch.cuda.graph(graph, pool=_pools[index], stream=_capture_streams[index]):   # (synchronises)
            outputs = tuple(fn(*inputs))
    finally:
        capturing = False
        torch.set_autocast_cache_enabled(cache_enabled)
    return _Entry(graph, inputs, outputs, index)


def clear() -> None:
    """Drop every captured graph (the memory of their pools goes with them) and every key seen once."""
    _graphs.clear()
    _seen.clear()
    _pools.clear()


def num_graphs() -> int:
    return len(_graphs)
