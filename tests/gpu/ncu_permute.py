"""Two grouped_permute calls of the triton backend at a model's routing width (bench/bench_permute.py's
MODELS), for Nsight Compute:
    ncu --kernel-name regex:_copy_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats python tests/gpu/ncu_permute.py gpt-oss-20b 4096
(the first call compiles; the second call's launches are the profiled ones)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from bench_permute import MODELS  # noqa: E402
import moge_kernels as mk  # noqa: E402
from moge_kernels.testing import make_topk_ids  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "gpt-oss-20b"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
H, E, K = MODELS[model]
hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
ids = make_topk_ids(T, K, E, seed=T, device="cuda", drop=0.0, empty_every=0)
with mk.use_backend("triton"):
    for _ in range(2):
        mk.grouped_permute(hidden, ids, E)
torch.cuda.synchronize()
