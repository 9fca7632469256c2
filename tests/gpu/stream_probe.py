"""How fast can one CTA per SM stream a weight tensor into shared memory through TMA boxes, with no MMA?

A diagnostic for the memory-bound expert GEMMs (decode / T ~ 1024): each program streams one
[ROWS, K] slab of a weight tensor in [ROWS, BK] boxes, the way the grouped-GEMM kernel streams its B
operand, and reduces it (so the loads stay live). Layouts:
  rowmajor  the weights as given, [N, K]: a box is ROWS pieces of BK*2 bytes, K*2 bytes apart
  packed    the same bytes stored k-block-major, [K/BK, N, BK]: a box is one contiguous run
  +x        rowmajor, plus a [128, BK] box of an L2-resident x per k-step (the GEMM's A operand)
GB/s count the weight bytes only.
Usage (GPU): python tests/gpu/stream_probe.py
"""
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moge_kernels.bench.timing import Timer


@triton.jit
def _stream(desc, x_desc, out_ptr, N, num_k, ROWS: tl.constexpr, BK: tl.constexpr, PACKED: tl.constexpr,
            WITH_X: tl.constexpr, X_ROWS: tl.constexpr):
    """WITH_X: also load a [X_ROWS, BK] box of x per k-step, x rows of "expert" pid % 64 (an L2 hit after
    the first n-tile), as the grouped GEMM's A operand does."""
    pid = tl.program_id(0)
    acc = tl.zeros((ROWS, BK), dtype=tl.float32)
    acc_x = tl.zeros((X_ROWS, BK), dtype=tl.float32)
    for kk in tl.range(num_k):
        if PACKED:
            b = desc.load([kk * N + pid * ROWS, 0])
        else:
            b = desc.load([pid * ROWS, kk * BK])
        acc += b.to(tl.float32)
        if WITH_X:
            acc_x += x_desc.load([(pid % 64) * X_ROWS, kk * BK]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc) + tl.sum(acc_x))


def main():
    N, K = int(sys.argv[1]) if len(sys.argv) > 1 else 64 * 2688, 5120
    w = torch.randn(N, K, device="cuda").to(torch.bfloat16)
    x = torch.randn(64 * 128, K, device="cuda").to(torch.bfloat16)
    timer = Timer(torch.device("cuda"))      # event-timed calls, each after an L2 flush
    nbytes = w.numel() * 2
    for BK in (64, 128):
        packed = w.view(N, K // BK, BK).transpose(0, 1).contiguous().view(K // BK * N, BK)
        for ROWS, warps, stages in ((256, 8, 4), (256, 8, 3), (128, 4, 4), (64, 4, 4), (32, 4, 6)):
            if (ROWS + 128) * BK * 2 * stages > 220 * 1024:
                continue
            res = []
            for name, t, is_packed, with_x in (("rowmajor", w, False, False), ("packed", packed, True, False),
                                               ("rowmajor+x", w, False, True)):
                if with_x and ROWS != 256:
                    continue
                desc = TensorDescriptor.from_tensor(t, [ROWS, BK])
                x_desc = TensorDescriptor.from_tensor(x, [128, BK])
                out = torch.empty(N // ROWS, device="cuda")

                def run():
                    _stream[(N // ROWS,)](desc, x_desc, out, N, K // BK, ROWS=ROWS, BK=BK, PACKED=is_packed,
                                          WITH_X=with_x, X_ROWS=128, num_warps=warps, num_stages=stages)
                run()
                ms = statistics.median(timer.samples(run, 7))
                res.append(f"{name} {nbytes / ms / 1e6:6.0f} GB/s")
            print(f"box [{ROWS:>3}, {BK:>3}] w{warps} s{stages}: " + "   ".join(res), flush=True)
    # reference: a device-to-device copy of the same bytes (read + write counted)
    dst = torch.empty_like(w)
    ms = statistics.median(timer.samples(lambda: dst.copy_(w), 7))
    print(f"copy: {2 * nbytes / ms / 1e6:.0f} GB/s (read + write)")


if __name__ == "__main__":
    main()
