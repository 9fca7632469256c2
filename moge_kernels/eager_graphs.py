"""CUDA-graph replays of eager layer calls at decode sizes (option `eager_graphs`).

An eager MoGE layer call at decode sizes costs the host more than its kernels cost the GPU
(bench/results/eager_gaps_h200_bc54ef3.txt, H200: about 0.20 ms of host time per moge_forward at T=1 against
0.094 ms of kernels), so a decode loop runs at the host's pace. With `eager_graphs = N > 0`, a layer call
of at most N tokens on a GPU that nothing records (ops.compose_layer's direct path: no grad, no compile,
no mode) is captured once per key in a CUDA graph and replayed from then on: its two per-call inputs
(hidden, router_logits) are copied into the graph's input buffers, the graph is replayed on the current
stream, and its outputs are cloned (the graph's own buffers are overwritten by the next replay).

The key holds the layer signature (shapes, strides, dtypes, device, the other arguments' values), the
data pointer, shape, strides and dtype of every other tensor argument (expert weights, expert_scale,
shared-expert weights, expert_mask), the grad/inference/autocast state and the current stream's device.
A replay reads those tensors where they were at capture: an in-place update (an optimizer step,
load_state_dict, new mask values) is what the next replay computes with; a new tensor is a new key. A key is
captured on its second call: the first runs as usual, compiling the kernels and checking the arguments,
so errors are raised eagerly, never inside a capture. A model has one key per layer and batch size: at
most MAX_GRAPHS graphs are kept (least recently used out; a decode loop cycling through more keys than
that would capture on every call, so raise it for deep models served at many batch sizes). Each graph
holds its inputs, outputs and intermediates in its own memory pool (a few MB at decode sizes), so graphs
of different layers may also be replayed on different streams.

The kernels and their order are those of the eager call, so a replay's outputs equal the eager call's bit
for bit (the Triton grouped_mlp's two-stream split, on under capture, computes every row as one stream
does).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import options

MAX_GRAPHS = 512
_MAX_SEEN = 4096     # keys called once and not captured yet (bounded when keys never repeat)


class _Entry(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple        # the graph's input buffers, one per per-call input
    outputs: tuple       # the graph's outputs, overwritten by each replay


_graphs: "OrderedDict[tuple, _Entry]" = OrderedDict()
_seen: dict[tuple, bool] = {}


def applies(hidden: Tensor) -> bool:
    """Whether a layer call on `hidden` ([T, H]) is replayed from a graph: the option on and T within it,
    a CUDA tensor, no capture already under way (a graph inside the user's own capture is theirs), and
    no value checks (MOGE_VALIDATE reads values on the host, which a capture cannot)."""
    limit = options.current.eager_graphs
    return (limit > 0 and hidden.is_cuda and hidden.shape[0] <= limit and not options.current.validate
            and not torch.cuda.is_current_stream_capturing())


def _describe(value):
    if isinstance(value, Tensor):
        return (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, value.device)
    return value


def run(fn: Callable[..., tuple], per_call: tuple, fixed: tuple, tag) -> tuple:
    """fn(*per_call) -> a tuple of tensors, replayed from a graph once this key has been seen.

    per_call: the tensors that change between calls (copied into the graph's buffers); fixed: every other
    argument fn's result depends on (tensors by pointer and layout, others by value); tag: anything else
    that tells two fns apart (hashable)."""
    key = (tag, tuple(_describe(v) for v in fixed), tuple(_describe(t)[1:] for t in per_call),
           torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
           torch.get_autocast_dtype("cuda"), torch.cuda.current_device())
    entry = _graphs.get(key)
    if entry is None:
        if key not in _seen:              # first call: as usual (compiles, checks), then capture next time
            if len(_seen) >= _MAX_SEEN:
                _seen.clear()
            _seen[key] = True
            return fn(*per_call)
        del _seen[key]
        entry = _graphs[key] = _capture(fn, per_call)
        if len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
    for buffer, t in zip(entry.inputs, per_call):
        buffer.copy_(t)
    entry.graph.replay()
    return tuple(out.clone() for out in entry.outputs)


def _capture(fn: Callable[..., tuple], per_call: tuple) -> _Entry:
    inputs = tuple(t.clone() for t in per_call)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):         # (synchronises, then captures on a side stream)
        outputs = tuple(fn(*inputs))
    return _Entry(graph, inputs, outputs)


def clear() -> None:
    """Drop every captured graph (their memory pools go with them) and every key seen once."""
    _graphs.clear()
    _seen.clear()


def num_graphs() -> int:
    return len(_graphs)
