"""What the Triton op tests (test_triton_dispatch.py, test_triton_combine.py) share: the device they run on
and their skip marks. On CPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which has no bf16."""
import pytest
import torch

import moge_kernels as mk

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = mk.backends()["triton"]["available"]
DEVICE = "cuda" if HAS_CUDA else "cpu"
if HAS_TRITON:
    from moge_kernels import triton as mk_triton
RUNS_HERE = HAS_TRITON and DEVICE in mk_triton.DEVICES
runs_here = pytest.mark.skipif(not RUNS_HERE, reason="needs the triton backend on a GPU, or "
                               "TRITON_INTERPRET=1 (tests/conftest.py) on CPU")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
