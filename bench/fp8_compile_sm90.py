"""Compile the FP8 grouped GEMM for sm_90 without a GPU and report what each config costs in registers.

For every FP8 candidate of moge_kernels/triton/gemm_configs.py (the TMA ones of the row-quantized path:
gate_up with its SwiGLU + e4m3 epilogue, down with its zero-tail programs; Pangu's E = 64), Triton
compiles the kernel for an H100/H200 target and cuobjdump reads the cubin: registers, spill stack and
shared memory of the kernel, and inside the k loop (the instructions between its back-branch and its
target) the local-memory loads and stores (spills on the critical path), FP32 multiplies, wgmma
instructions, warpgroup waits and CTA barriers, and the CTAs an SM holds at once (registers, shared
memory): Triton 3.6 waits for each FP8 wgmma before its scale FMAs, so the tensor cores stay busy only
while another resident CTA has a wgmma to run. No device needed: a check of a kernel change before the
device sweep (bench/bench_fp8.py --sweep) times it.

    python bench/fp8_compile_sm90.py                 # every TMA candidate (~5 s each)
    python bench/fp8_compile_sm90.py --gemm down
    python bench/fp8_compile_sm90.py --decode        # the 16-row tiles that quantize x in their loads
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moge_kernels.triton import fp8_gemm, gemm_configs  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_config(gemm: str, cfg, E: int = 64, decode: bool = False, channel: bool = False):
    """decode: the 16-row quantize-in-load path (bf16 x quantized in the load, h in bf16 between the
    GEMMs); channel: the per-channel format with fast accumulation (h in bf16, scales in the epilogue);
    else the row-quantized block path (e4m3 x, gate_up's e4m3 epilogue)."""
    swiglu = gemm == "gate_up"
    quant_out = swiglu and not decode and not channel
    two = swiglu or cfg.block_n > 128
    bn = cfg.block_n // 2 if two and not swiglu else cfg.block_n
    kernel = fp8_gemm._fp8_gemm_kernel
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*bf16" if decode else "*fp8e4nv", x_scale_ptr="*fp32", w_ptr="*fp8e4nv",
               w_scale_ptr="*fp32", y_ptr="*fp8e4nv" if quant_out else "*bf16",
               y_scale_ptr="*fp32", offsets_ptr="*i32",
               row_scale_ptr="*fp32", x_desc=f"tensordesc<fp8e4nv[{cfg.block_m}, 128]>",
               w_desc=f"tensordesc<fp8e4nv[{bn}, 128]>")
    consts = dict(E=E, E_POW2=triton.next_power_of_2(E), BM=cfg.block_m, BN=bn, BK=128, BLOCK_N=128,
                  BLOCK_K=0 if channel else 128, PER_K=not channel, SWIGLU=swiglu, TWO=two,
                  SCALAR_COLS=not channel, QUANT_X=decode, QUANT_OUT=quant_out, HAS_ROW_SCALE=False,
                  ROUND=2, EXPLICIT_ROUND=False, USE_TMA=cfg.tma and not decode, ZERO_TAIL=not swiglu,
                  TILE_N=bn * 2 if two and not swiglu else bn, FAST_ACC=channel, SWAP_AB=cfg.swap,
                  USE_GDC=True)
    sig.update({name: "constexpr" for name in consts})
    # what a launch at Pangu's shape specializes on: 16-byte aligned pointers, sizes and row strides
    # that are multiples of 16 (without these the pointer loads compile scalar and spill)
    div16 = [n for n, t in sig.items() if t.startswith("*")] + [
        "K", "N_OUT", "W_ROWS", "PART_ROWS", "stride_xm", "stride_we", "stride_wn", "stride_ym", "stride_wse"]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg))


def cubin_report(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    is_mma = lambda t: re.search(r"MMA\b", t) is not None  # noqa: E731  wgmma or mma.sync
    last_mma = max(i for i, (_, t) in enumerate(ins) if is_mma(t))
    start = end = None
    for a, t in ins[last_mma:]:          # the k loop: the back-branch after its last wgmma
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            start, end = int(m.group(1), 16), a
            break
    body = [t for a, t in ins if start is not None and start <= a <= end]
    count = lambda *ops: sum(any(re.search(rf"\b{op}\b", t) for op in ops) for t in body)  # noqa: E731
    return dict(regs=int(res.get("REG", 0)), stack=int(res.get("STACK", 0)),
                loop_spills=count("STL", "LDL"), loop_fp32=count("FMUL", "FFMA", "FADD"),
                loop_mma=sum(is_mma(t) for t in body), loop_waits=count("WARPGROUP.DEPBAR.LE"),
                loop_bars=count("BAR.SYNC", "BAR"))


def ctas_per_sm(regs: int, num_warps: int, smem_bytes: int) -> int:
    """Resident CTAs an SM (Hopper: 64K registers in 256-register warp allocations, 228 KB of shared
    memory with 1 KB reserved a CTA, 64 warps, 32 CTAs): the occupancy the k-step interleaving gets."""
    warp_regs = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (warp_regs * num_warps)
    by_smem = (228 * 1024) // (smem_bytes + 1024)
    return max(0, min(by_regs, by_smem, 64 // num_warps, 32))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemm", choices=("gate_up", "down"), default=None)
    ap.add_argument("--decode", action="store_true",
                    help="the 16-row quantize-in-load candidates instead of the TMA ones")
    ap.add_argument("--channel", action="store_true",
                    help="the per-channel format with fast accumulation (FP8_CHANNEL_CANDIDATES)")
    args = ap.parse_args()
    seen = []
    pool = gemm_configs.FP8_CHANNEL_CANDIDATES if args.channel else gemm_configs.FP8_CANDIDATES
    for (reg, gemm), cands in pool.items():
        for cfg in cands:
            wanted = cfg.block_m <= 16 and not cfg.swap if args.decode else cfg.tma
            if wanted and (gemm, cfg) not in seen and args.gemm in (None, gemm):
                seen.append((gemm, cfg))
    print("| gemm | config | regs | spill stack B | k loop: spill ld/st | fp32 ops | wgmma | waits | barriers "
          "| smem KB | CTAs an SM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for gemm, cfg in seen:
        try:
            ck = compile_config(gemm, cfg, decode=args.decode, channel=args.channel)
            r = cubin_report(ck.asm["cubin"])
            print(f"| {gemm} | {cfg} | {r['regs']} | {r['stack']} | {r['loop_spills']} | {r['loop_fp32']} | "
                  f"{r['loop_mma']} | {r['loop_waits']} | {r['loop_bars']} | {ck.metadata.shared // 1024} | "
                  f"{ctas_per_sm(r['regs'], cfg.num_warps, ck.metadata.shared)} |", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"| {gemm} | {cfg} | failed: {type(err).__name__}: {str(err)[:120]} |", flush=True)


if __name__ == "__main__":
    main()
