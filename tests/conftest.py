"""Test set-up. Without a GPU, Triton kernels run through Triton's CPU interpreter: the variable must be
set before anything imports triton, so it is set here, before moge_kernels is imported."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moge_kernels  # noqa: E402  (after TRITON_INTERPRET)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _has_backend(name):
    return moge_kernels.backends()[name]["available"]


requires_triton = pytest.mark.skipif(not _has_backend("triton"),
                                     reason=f"triton backend: {moge_kernels.backends()['triton']['reason']}")


@pytest.fixture(autouse=True)
def _restore_options():
    """A test that switches backends or sets options (mk.set_options) never leaks them into the next one."""
    before = moge_kernels.get_options()
    yield
    moge_kernels.set_options(**before)


class _StandInGraph:
    """A CUDA graph's replay without CUDA: calls the captured function again on the graph's input buffers
    and writes the graph's output buffers."""

    def __init__(self, fn, inputs, outputs):
        self.fn, self.inputs, self.outputs, self.replays = fn, inputs, outputs, 0

    def replay(self):
        self.replays += 1
        for out, new in zip(self.outputs, self.fn(*self.inputs)):
            out.copy_(new)


@pytest.fixture
def graph_stand_in(monkeypatch):
    """moge_kernels.eager_graphs on CPU tensors: every call eligible, captures made with _StandInGraph;
    returns the list of graphs captured. The cache starts and ends empty."""
    from moge_kernels import eager_graphs
    captures = []

    def capture(fn, per_call):
        inputs = tuple(t.clone() for t in per_call)
        outputs = tuple(fn(*inputs))
        captures.append(_StandInGraph(fn, inputs, outputs))
        return eager_graphs._Entry(captures[-1], inputs, outputs)

    eager_graphs.clear()
    monkeypatch.setattr(eager_graphs, "_capture", capture)
    monkeypatch.setattr(eager_graphs, "applies", lambda hidden: True)
    yield captures
    eager_graphs.clear()


def pytest_report_header(config):
    rows = [f"{name}={'yes' if r['available'] else 'no (' + r['reason'][:60] + ')'}"
            for name, r in moge_kernels.backends().items()]
    return ["moge_kernels backends: " + ", ".join(rows),
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}, cuda={HAS_CUDA}"]
