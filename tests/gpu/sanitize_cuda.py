"""Small cases of every kernel of the `cuda` backend, for compute-sanitizer (tests/gpu/run_cuda_checks.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tests/gpu/sanitize_cuda.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_cuda.py

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees its exact bounds.
Covers: dispatch (16-byte and 4-byte row copies, strided rows, k_g=2, several chunks), combine (vector and
scalar paths, shared_out), grouped GEMM on the skinny and the big tensor-core tile (wgmma and mma.sync) and on the SIMT kernel,
grouped MLP (SwiGLU epilogue, row_scale). Each result is checked against the reference as well.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import moge_kernels as mk  # noqa: E402
from moge_kernels import reference as R  # noqa: E402
from moge_kernels.testing import make_expert_weights, make_routing_inputs, random_offsets  # noqa: E402

DEV = "cuda"


def check(name, out, ref, atol, rtol):
    torch.cuda.synchronize()
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, equal_nan=True)
    print(f"ok  {name}")


def main():
    mk.set_backend("cuda")
    assert mk.resolve("grouped_mlp", "cuda")[0] == "cuda", mk.backends()["cuda"]
    for T, E, G, k_g, H, dtype in [(70, 64, 8, 1, 72, torch.bfloat16), (9, 16, 4, 2, 5, torch.float32),
                                   (200, 8, 2, 2, 24, torch.float16)]:
        hidden, logits = make_routing_inputs(T, E, H, dtype, DEV, seed=T, dead_experts=3)
        check(f"dispatch T={T} E={E} k_g={k_g} H={H} {dtype}", mk.grouped_dispatch(hidden, logits, G, k_g),
              R.grouped_dispatch(hidden, logits, G, k_g), 1e-6, 1e-5)
    wide = torch.randn(33, 80, device=DEV)
    hidden, logits = wide[:, 3:67], torch.randn(64, 33, device=DEV).t()
    check("dispatch strided rows", mk.grouped_dispatch(hidden, logits, 8), R.grouped_dispatch(hidden, logits, 8),
          1e-6, 1e-5)

    for T, K, H, dtype in [(33, 8, 72, torch.bfloat16), (9, 3, 5, torch.float32)]:
        expert_out = torch.randn(T * K, H, device=DEV).to(dtype)
        weights = torch.rand(T, K, device=DEV)
        row_index = torch.randperm(T * K, device=DEV).to(torch.int32).view(T, K)
        shared = torch.randn(T, H, device=DEV).to(dtype)
        check(f"combine T={T} K={K} H={H} {dtype}", mk.grouped_combine(expert_out, weights, row_index, shared),
              R.grouped_combine(expert_out, weights, row_index, shared), 2e-2, 2e-2)

    for M, E, Kd, N, dtype, what in [(37, 8, 64, 72, torch.bfloat16, "skinny tile"),
                                     (300, 4, 136, 264, torch.bfloat16, "big tile"),
                                     (300, 4, 136, 264, torch.float16, "big tile mma.sync"),
                                     (300, 4, 136, 264, torch.bfloat16, "big tile wgmma128"),
                                     (50, 3, 20, 33, torch.bfloat16, "SIMT fallback"),
                                     (50, 3, 24, 33, torch.float32, "SIMT fp32")]:
        # "big tile": the wgmma kernel on an sm_90 device with a 9.0a build; "wgmma128": its 128-column
        # SwiGLU tile; "mma.sync": the Ampere-style kernel
        mk.set_options(cuda_gemm_tile={"mma.sync": "big", "wgmma128": "wgmma128"}.get(what.split()[-1], "wgmma"))
        x = torch.randn(M, Kd, device=DEV).to(dtype)
        w = (torch.randn(E, N, Kd, device=DEV) / Kd ** 0.5).to(dtype)
        offsets = random_offsets(M, E, seed=M, device=DEV)
        check(f"grouped_gemm {what} M={M} Kd={Kd} N={N}", mk.grouped_gemm(x, w, offsets),
              R.grouped_gemm(x.float(), w.float(), offsets), 5e-2, 5e-2)
        w_gate_up, w_down = make_expert_weights(E, Kd, 40, dtype, DEV)
        scale = torch.rand(M, device=DEV)
        check(f"grouped_mlp {what} M={M} H={Kd} I=40",
              mk.grouped_mlp(x, w_gate_up, w_down, offsets, scale),
              R.grouped_mlp(x.float(), w_gate_up.float(), w_down.float(), offsets, scale), 5e-2, 5e-2)
    print("all kernels ran")


if __name__ == "__main__":
    main()
