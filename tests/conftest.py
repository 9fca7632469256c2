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


def pytest_report_header(config):
    rows = [f"{name}={'yes' if r['available'] else 'no (' + r['reason'][:60] + ')'}"
            for name, r in moge_kernels.backends().items()]
    return ["moge_kernels backends: " + ", ".join(rows),
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}, cuda={HAS_CUDA}"]
