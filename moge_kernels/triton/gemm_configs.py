"""Launch configurations of the grouped-GEMM kernels (moge_kernels/triton/grouped_gemm.py).

A config is chosen by heuristics, never by timing in the hot path: the key is the regime (rows per
expert, M / E), the kind of GEMM (fused gate_up + SwiGLU, or plain), the dtype and the device. The tables
below were tuned on an H100 80GB HBM3 with the Pangu Pro MoE expert shapes (H=5120, I=1344, E=64) by
`python bench/bench_experts.py --sweep`; the H200 table is the H100 one with the two entries its own sweep
changed (same SM count and shared memory, more bandwidth: the same tile shapes stay right elsewhere).

Escape hatches (moge_kernels/options.py; in code `set_options(...)` / `use_options(...)`):
  triton_gemm_config, MOGE_TRITON_GEMM_CONFIG="BM,BN,BK,warps,stages[,tma[,split_m[,split_n[,persistent
                           [,tail_m]]]]]": force one config for every launch (flags 0/1; persistent:
                           programs per SM, plain GEMMs only; tail_m: rows of the split tail tile)
  triton_autotune, MOGE_TRITON_AUTOTUNE=1: time the candidate list of a key on its first call (host sync:
                           never under CUDA-graph capture, where the table's choice is used); off: tables only.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import options


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int            # rows of one expert per tile (power of two >= 16: tl.dot's minimum)
    block_n: int            # output columns per tile (with SwiGLU: gate and up columns each)
    block_k: int            # reduction slice per pipeline stage
    num_warps: int
    num_stages: int         # cp.async / TMA pipeline depth
    tma: bool = False       # load x and w through host-built TMA descriptors (Hopper+)
    split_m: bool = False   # an expert's last row tile with <= block_m/2 rows runs a half-height loop
    split_n: bool = False   # a last column tile with <= block_n/2 columns runs a half-width loop
    persistent: int = 0     # programs per SM walking tiles (0: one per tile); TMA, plain GEMM, no tails
    tail_m: int = 0         # split_m with this height (a power of two >= 16, < block_m) instead of half

    def tail_rows(self) -> int:
        """Height of the tail tile's main loop, 0 when tails are not split."""
        if self.tail_m:
            return self.tail_m
        return self.block_m // 2 if self.split_m else 0

    def __str__(self):
        pers = "" if not self.persistent else " pers" if self.persistent == 1 else f" pers{self.persistent}"
        tail = f" tailM{self.tail_m}" if self.tail_m else " tailM" if self.split_m else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
                f"{' tma' if self.tma else ''}{tail}"
                f"{' tailN' if self.split_n else ''}{pers}")


C = GemmConfig

# Regimes by average rows per expert (M / E). Decode streams weights: small block_m (the tokens of an
# expert fit one tile), narrow block_n so that enough programs stream in parallel, deep k slices so each
# stage moves many bytes. Prefill is matrix-bound: 128-row tiles (wgmma's 2 x m64), 256 output columns
# (gate+up 2 x 128, or 256 plain) so that each operand byte fetched from L2 feeds enough FLOPs.
REGIMES = ((2.0, "decode"), (32.0, "small"), (192.0, "medium"), (1024.0, "prefill"),
           (float("inf"), "large"))

# (regime, swiglu) -> config, for 16-bit inputs on H100/H200. From three `bench_experts.py --sweep` runs on
# an H100 80GB HBM3 (triton 3.6), Pangu shapes; bench/results/experts_h100.txt has the table they give,
# experts_h100_sweep*.txt the sweeps.
#   decode  (T<=16):   weight streaming at 86-93% of the copy bandwidth, one row tile per expert;
#                      deeper k slices, wider n tiles, TMA or persistent streaming (1 or 2 programs per
#                      SM) move the time by < 1% or lose
#   small   (T~128):   32-row tiles hold an expert's ~16 rows
#   medium  (T~1024):  ~128 rows per expert: 128-row tiles plus a half-height tail tile (-9% gate_up);
#                      tails of 16 or 32 rows time the same
#   prefill (T~4096) and large (T>=16k): gate_up through TMA (-10% against cp.async loads) with a
#                      half-width last column tile (1344 = 10.5 x 128; -2% at T=4096); split row tails
#                      of 64, 32 or 16 rows do not pay here (a tail tile still streams the full weight
#                      tile, and the loads bound it); 256x64 tiles (no column waste) are 15-25% slower
#                      (n64 wgmma); the persistent gate_up is 40% slower (two accumulators leave it no
#                      registers); Triton 3.6's warp specialization on Hopper compiles at 8 warps but
#                      gains nothing (-2..0%) and fails to compile at 4. Down persistent (K = 1344 is
#                      only 21 k-steps, so hiding the epilogue behind the next tile's loads gains 6-8%)
#   gate_up through TMA is always "wide": gate and up rows as one [2, 128, 64] TMA box and one m64n256
#                      wgmma instead of two m64n128 (A read once from shared memory per k-step): whole
#                      MLP -0.3..-0.7% at T=1024, -0.6% at 4096, -1.6% at 16384 against two boxes,
#                      bit-identical output (bench/results/experts_h100_wide.txt); as a persistent
#                      kernel it tied at T=1024 and 4096 and lost 1.6% at 16384. Neither the two-box TMA
#                      gate_up nor a persistent gate_up is kept (git history and bench/results have them)
H100_TABLE = {
    ("decode", True): C(16, 32, 128, 4, 4),
    ("decode", False): C(16, 64, 128, 4, 4),
    ("small", True): C(32, 64, 128, 4, 4),
    ("small", False): C(32, 32, 128, 4, 4),
    ("medium", True): C(128, 128, 64, 8, 4, tma=True, split_m=True, split_n=True),
    ("medium", False): C(128, 256, 64, 8, 4, tma=True, split_m=True),
    ("prefill", True): C(128, 128, 64, 8, 4, tma=True, split_n=True),
    ("prefill", False): C(128, 256, 64, 8, 4, tma=True, persistent=True),
    ("large", True): C(128, 128, 64, 8, 4, tma=True, split_n=True),
    ("large", False): C(128, 256, 64, 8, 4, tma=True, persistent=True),
}
# H200 (same SMs and shared memory, 1.4x the bandwidth): the H100 table but for the two entries that an
# H200 sweep (bench/results/experts_h200_sweep.txt) found > 2% faster at T=128: down 32x128x64 (-7%)
# and gate_up with 3 stages (-2%); every other H100 entry was best or within 1% there.
# A second H200 sweep (bench/results/experts_h200_sweep2.txt, extra candidates at T = 1024 and 4096)
# found gate_up with 64-row split tails 2.1% faster at T = 4096 (prefill); at T = 1024 no candidate beat
# the table by more than 0.8% (64-row tiles, narrower n, deeper or wider k slices: all slower).
H200_TABLE = {**H100_TABLE,
              ("small", True): C(32, 64, 128, 4, 3),
              ("small", False): C(32, 128, 64, 4, 4),
              ("prefill", True): C(128, 128, 64, 8, 4, tma=True, tail_m=64, split_n=True)}
TABLES = {"H100": H100_TABLE, "H200": H200_TABLE}

# grouped_mlp splits the experts over two streams in these regimes (one half's down GEMM beside the
# other half's gate_up): 2.5-3% faster at T = 1024 / 4096 / 16384 on an H100 (Pangu shapes), 0.5% at
# T = 128, graph replays; the fork and join cost the host ~20 us a call, hidden behind >= 0.3 ms of GPU
# work in these regimes. Not in decode and small, where host time is the whole cost of an eager call.
TWO_STREAM_REGIMES = ("medium", "prefill", "large")
# Eager calls (no CUDA-graph capture) pay the fork and join on the host, and on the H200 machine they cost
# more than the overlap gains unless the GPU work is long (bench/results/host_overhead_h200_b79113c.txt,
# eager ms with two streams / one): Qwen3-30B experts T=1024 0.459 / 0.349, T=4096 0.683 / 0.686; Pangu
# T=1024 0.843 / 0.860, T=4096 2.387 / 2.401. So an eager call splits only where streaming the expert
# weights alone takes ~0.5 ms (Pangu 2.6 GB: yes; Qwen3-30B 1.2 GB: no); a captured one always does.
EAGER_TWO_STREAM_MIN_WEIGHT_BYTES = 2e9

# Candidates timed by MOGE_TRITON_AUTOTUNE=1 and by the benchmark's --sweep: tile shapes, depths and
# tails of the kept kernel paths (the sweeps of bench/results/experts_h1*_sweep*.txt also timed the
# paths since removed).
P = dict(tma=True, persistent=1)
T = dict(tma=True)
_big_gate_up = [C(128, 128, 64, 8, 4, **T), C(128, 128, 64, 8, 4, split_n=True, **T),
                C(128, 128, 64, 8, 3, split_n=True, **T), C(128, 128, 64, 8, 4, tail_m=64, split_n=True, **T)]
_big_down = [C(128, 256, 64, 8, 4, **P), C(128, 256, 64, 8, 3, **P), C(128, 256, 64, 8, 4, **T),
             C(128, 256, 64, 8, 3, tma=True, split_m=True), C(128, 256, 64, 8, 4, tma=True, tail_m=32),
             C(256, 128, 64, 8, 4, **P)]
CANDIDATES = {
    ("decode", True): [C(16, 32, 128, 4, 4), C(16, 64, 128, 4, 3), C(16, 16, 256, 4, 4),
                       C(16, 32, 128, 4, 3), C(16, 32, 64, 4, 4), C(16, 16, 128, 4, 6)],
    ("decode", False): [C(16, 64, 128, 4, 4), C(16, 64, 64, 4, 8), C(16, 32, 256, 4, 3),
                        C(16, 64, 64, 4, 8, **P), C(16, 64, 128, 4, 3), C(16, 64, 64, 4, 4),
                        C(16, 32, 128, 4, 4), C(16, 32, 64, 4, 6), C(16, 128, 64, 4, 4)],
    ("small", True): [C(32, 64, 128, 4, 4), C(32, 32, 128, 4, 5), C(32, 64, 128, 4, 3),
                      C(32, 64, 64, 4, 6), C(32, 128, 64, 4, 4)],
    ("small", False): [C(32, 64, 128, 4, 4), C(32, 32, 128, 4, 4), C(32, 128, 64, 4, 4),
                       C(32, 64, 128, 4, 3)],
    ("medium", True): [C(128, 128, 64, 8, 4, split_m=True, split_n=True, **T),
                       C(128, 64, 64, 8, 4, split_m=True, split_n=True, **T),
                       C(128, 128, 64, 8, 4, split_m=True, split_n=True),
                       C(128, 128, 64, 8, 4, tma=True, tail_m=32, split_n=True),
                       C(128, 128, 64, 8, 4, tma=True, tail_m=16, split_n=True),
                       C(128, 128, 64, 8, 4, tma=True, split_n=True)],
    ("medium", False): [C(128, 256, 64, 8, 4, tma=True, split_m=True), C(128, 256, 64, 8, 3, split_m=True),
                        C(128, 256, 64, 8, 4, tma=True, tail_m=32),
                        C(128, 256, 64, 8, 4, tma=True, tail_m=16), C(128, 256, 64, 8, 4, **P),
                        C(64, 256, 64, 4, 4, **P)],
    ("prefill", True): _big_gate_up,
    ("prefill", False): _big_down,
    ("large", True): _big_gate_up,
    ("large", False): _big_down,
}

# Small, safe tiles for the Triton interpreter (CPU, CI): speed there is irrelevant.
INTERPRETER_CONFIG = C(16, 32, 32, 4, 1)

SMEM_LIMIT = 227 * 1024   # Hopper's per-block opt-in maximum; Ampere (A100) has 163 KB


def regime(num_rows: int, num_experts: int) -> str:
    rows_per_expert = num_rows / max(num_experts, 1)
    for bound, name in REGIMES:
        if rows_per_expert <= bound:
            return name
    return "prefill"


def table_notice(device: torch.device) -> str:
    """Which table serves `device`, for explain(): names the fallback when the card has no table."""
    if device.type != "cuda":
        return "interpreter config"
    index = device_index(device)
    family, name = device_family(index), torch.cuda.get_device_name(index)
    if family in name:
        return f"{family} table"
    return f"{family} table (no table for {name}: nearest family)"


@functools.lru_cache(maxsize=None)
def device_family(device_index: int) -> str:
    name = torch.cuda.get_device_name(device_index)
    for family in TABLES:
        if family in name:
            return family
    return "H100"   # nearest table for an unknown card; shared-memory fit is enforced below


@functools.lru_cache(maxsize=None)
def smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT))


def device_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_smem(device: torch.device) -> int:
    """Shared memory a block may use on `device`; Hopper's limit off CUDA (the interpreter)."""
    return smem_limit(device_index(device)) if device.type == "cuda" else SMEM_LIMIT


def stage_bytes(cfg: GemmConfig, swiglu: bool, elem_size: int) -> int:
    b_rows = cfg.block_n * (2 if swiglu else 1)
    return (cfg.block_m + b_rows) * cfg.block_k * elem_size


def fit(cfg: GemmConfig, swiglu: bool, dtype: torch.dtype, smem: int = SMEM_LIMIT) -> GemmConfig:
    """Adapt a 16-bit config to dtype (fp32 halves block_k) and trim stages to the shared memory."""
    elem_size = torch.empty((), dtype=dtype).element_size()
    if elem_size == 4:
        # fp32 runs full-precision (ieee) dots, which are FMA loops rather than wgmma: keep it on the
        # plain cp.async kernel that the fp32 tests cover, with half-depth k slices
        cfg = dataclasses.replace(cfg, block_k=max(16, cfg.block_k // 2),
                                  tma=False, persistent=0)
    return trim_stages(cfg, swiglu, elem_size, smem)


def trim_stages(cfg: GemmConfig, swiglu: bool, elem_size: int, smem: int = SMEM_LIMIT) -> GemmConfig:
    """As many of the config's pipeline stages as fit the shared memory (at least 2)."""
    stages = cfg.num_stages
    # 8 KB headroom: Triton keeps barriers and the epilogue's layout-conversion scratch there too
    while stages > 2 and stages * stage_bytes(cfg, swiglu, elem_size) > smem - 8 * 1024:
        stages -= 1
    return dataclasses.replace(cfg, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _forced(fields: tuple) -> GemmConfig:
    return GemmConfig(*fields)


def _parse_forced(text) -> GemmConfig:
    """A config spelled as MOGE_TRITON_GEMM_CONFIG spells it: "BM,BN,BK,warps,stages[,...]"."""
    return _forced(options.parse("triton_gemm_config", text))


def forced_config() -> GemmConfig | None:
    """The triton_gemm_config option's config (options.py parsed and validated its fields), or None."""
    fields = options.current.triton_gemm_config
    return None if fields is None else _forced(fields)


def options_key() -> tuple:
    """What of the options changes a launch plan (grouped_gemm caches plans by it)."""
    return (options.current.triton_gemm_config, options.current.triton_autotune)


def autotune_enabled() -> bool:
    return options.current.triton_autotune


def table_config(num_rows: int, num_experts: int, swiglu: bool, dtype: torch.dtype,
                 device: torch.device) -> GemmConfig:
    """The committed heuristic: (M/E regime, swiglu, dtype, device) -> config."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    forced = forced_config()
    if forced is not None:
        return fit(forced, swiglu, dtype, device_smem(device))
    table = TABLES[device_family(device_index(device))]
    cfg = table[(regime(num_rows, num_experts), swiglu)]
    return fit(cfg, swiglu, dtype, device_smem(device))


def candidates(num_rows: int, num_experts: int, swiglu: bool, dtype: torch.dtype,
               device: torch.device) -> list[GemmConfig]:
    seen, out = set(), []
    for cfg in CANDIDATES[(regime(num_rows, num_experts), swiglu)]:
        cfg = fit(cfg, swiglu, dtype, device_smem(device))
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


# ----------------------------------------------------------------------------- FP8 (triton/fp8_gemm.py)
@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """A launch of the FP8 grouped GEMM (k-slices are always 128 = one scale block). A tile is one or two
    column sub-tiles of <= 128 columns, each its own accumulator with one weight-scale block per k-step:
    gate_up always two (gate and up, block_n columns each); the plain GEMM one (block_n <= 128) or two
    (block_n = 256: two sub-tiles of 128)."""
    block_m: int
    block_n: int           # gate_up: columns of gate and of up (128: one scale group of h); plain: tile width
    num_warps: int
    num_stages: int
    tma: bool = False      # e4m3 operands through TMA descriptors (Hopper; falls back to pointer loads)
    # register cap a thread (ptxas .maxnreg): ptxas takes up to 255 when nothing asks for fewer, which
    # leaves one CTA of 8 warps per SM; a cap lets a second CTA in, whose k-steps interleave with the
    # first's (one CTA's scale FMAs run while the other's wgmma does)
    maxnreg: int | None = None
    # weight rows on the MMA's M side, x rows on its N side (fp8_gemm._fp8_dot): for tiles of few x rows
    # (block_m 16 or 32); x is quantized by the row kernel first (not in the GEMM's load)
    swap: bool = False

    def __str__(self):
        return (f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{' tma' if self.tma else ''}"
                f"{f' r{self.maxnreg}' if self.maxnreg else ''}{' swap' if self.swap else ''}")


F = Fp8Config
# (regime, gemm) -> config, "gate_up" / "down", Pangu shape on an H200, from the sweeps of
# bench/results/fp8_sweep_h200_aa17213.txt and fp8_sweep_h200_f1fcdf8.txt (graph replays of the whole FP8
# grouped_mlp, the other GEMM at its table entry; every candidate within the 1e-2 accuracy bound; the
# sweep of fp8_sweep_h200_bf7eee6.txt found nothing faster at T = 1, 16, 1024 beyond the noise). The
# tiles that fit two or three CTAs an SM won everywhere but decode's down: 64 gate + 64 up columns, 64x128
# down tiles in 3 stages, or a register cap (Triton 3.6 waits for each FP8 wgmma before its scale FMAs,
# so another CTA's wgmma fills the gap). A 64-column gate_up cannot quantize h in its epilogue (a scale
# group is 128 columns): h goes through the row kernel, which costs less than the wide tile's single CTA.
# At decode the 64-row TMA gate_up (x quantized by the row kernel first) beat the 16-row tiles that
# quantize x in their loads (those are latency-bound: ncu_fp8_h200_aa17213.txt, 5 warps an SM), and the
# swapped 16-row TMA tiles beat both (a quarter of the 64-row tile's accumulator and scale FMAs).
# "medium" takes prefill's down tile, "large" prefill's (neither timed at those T).
FP8_H200_TABLE = {
    # decode: the swapped tiles (fp8_gemm._fp8_dot), bench/results/fp8_swap_h200_698adea.txt (mlp ms, the
    # other GEMM at its former entry): gate_up T=1 0.065 (64x64 tma r168: 0.072), T=16 0.323 (0.362);
    # down T=1 0.068 (16x64 pointer loads: 0.069), T=16 0.328 (0.335). With x and h quantized in these
    # tiles' loads (pointer loads of bf16 x beside the TMA weight tiles; two launches, not four) the mlp
    # was slower: T=1 0.0628 against 0.0536 ms, T=16 0.3165 against 0.3080 (bench/results/
    # pdl_layer_h200_4c6fc06.txt): the row kernel before each GEMM stays
    ("decode", "gate_up"): F(16, 64, 4, 4, tma=True, swap=True),
    ("decode", "down"): F(16, 64, 4, 4, tma=True, swap=True),
    # T=128: 0.355 ms (64x64 tma r168: 0.399; fp8_swap_pdl_h200_f5f4a06.txt, sweep of device call 2)
    ("small", "gate_up"): F(32, 128, 4, 3, tma=True, swap=True),
    ("small", "down"): F(64, 128, 4, 3, tma=True, maxnreg=168),       # T=128: 0.431 ms
    ("medium", "gate_up"): F(64, 64, 4, 3, tma=True, maxnreg=168),    # T=1024: 0.707 ms (128x128: 0.892)
    ("medium", "down"): F(64, 128, 4, 3, tma=True, maxnreg=168),
    ("prefill", "gate_up"): F(128, 64, 8, 3, tma=True, maxnreg=128),  # T=4096: 1.897 ms (128x128: 2.602)
    ("prefill", "down"): F(64, 128, 4, 3, tma=True, maxnreg=168),     # T=4096: 1.828 ms (128x256: 2.580)
    ("large", "gate_up"): F(128, 64, 8, 3, tma=True, maxnreg=128),
    ("large", "down"): F(64, 128, 4, 3, tma=True, maxnreg=168),
}
FP8_TABLES = {"H100": FP8_H200_TABLE, "H200": FP8_H200_TABLE}
# The interpreter (CPU, CI): the decode path up to 8 rows per expert, else the row-quantized path with
# pointer loads.
FP8_INTERPRETER_DECODE = F(16, 64, 4, 1)
FP8_INTERPRETER_ROWS = {"gate_up": F(32, 128, 4, 1), "down": F(32, 64, 4, 1)}

# Candidates of bench/bench_fp8.py --sweep, per regime and GEMM. Decode: pointer loads (x quantized in
# the load); the rest through TMA, 64- / 128-row tiles (bench_fp8 --sweep --twins adds pointer-load
# twins). The register-capped and narrow tiles fit two or three CTAs an SM (bench/fp8_compile_sm90.py:
# Triton 3.6 waits for each FP8 wgmma before its scale FMAs, so only another CTA's wgmma fills the gap).
# Decode also times 64-row TMA tiles (x quantized by the row kernel first): few instructions a k-step
# where the 16-row tiles are latency-bound (ncu at T=1: 5 warps an SM, 0.3 instructions a cycle).
# The swapped tiles (weight rows on the MMA's M side, fp8_gemm._fp8_dot) put 16 x rows, not 64, in each
# wgmma: a decode k-step's accumulator and scale FMAs shrink fourfold.
_FP8_SWAPPED = [F(16, 64, 4, 4, tma=True, swap=True), F(16, 128, 4, 4, tma=True, swap=True),
                F(16, 64, 4, 6, tma=True, swap=True), F(16, 128, 4, 3, tma=True, swap=True)]
_FP8_DECODE = {"gate_up": [F(64, 64, 4, 4, tma=True, maxnreg=168), F(16, 32, 4, 4), F(16, 64, 4, 4),
                           F(64, 32, 4, 4, tma=True), F(64, 32, 4, 6, tma=True),
                           F(64, 64, 4, 6, tma=True, maxnreg=168), *_FP8_SWAPPED],
               "down": [F(16, 64, 4, 4), F(16, 128, 4, 4), F(64, 64, 4, 4, tma=True), F(64, 32, 4, 4, tma=True),
                        F(64, 32, 4, 6, tma=True), F(64, 64, 4, 6, tma=True),
                        F(64, 128, 4, 3, tma=True, maxnreg=168), *_FP8_SWAPPED,
                        F(16, 256, 4, 3, tma=True, swap=True)]}
_FP8_ROWS = {"gate_up": [F(128, 64, 8, 3, tma=True, maxnreg=128), F(64, 64, 4, 3, tma=True, maxnreg=168),
                         F(128, 128, 8, 4, tma=True), F(128, 64, 8, 4, tma=True),
                         F(64, 64, 4, 4, tma=True, maxnreg=168), F(128, 64, 8, 2, tma=True, maxnreg=128),
                         F(64, 64, 4, 2, tma=True, maxnreg=120), F(64, 32, 4, 4, tma=True)],
             "down": [F(64, 128, 4, 4, tma=True), F(128, 256, 8, 3, tma=True), F(64, 128, 8, 4, tma=True),
                      F(64, 128, 4, 3, tma=True, maxnreg=168), F(64, 128, 4, 4, tma=True, maxnreg=168),
                      F(64, 128, 4, 5, tma=True), F(128, 128, 8, 3, tma=True, maxnreg=168),
                      F(64, 64, 4, 4, tma=True, maxnreg=128), F(128, 64, 8, 3, tma=True, maxnreg=128)]}
# small (T=128 at Pangu's shape: ~16 rows an expert): the row tiles, and swapped tiles of 16 and 32 rows
_FP8_SMALL = {g: [*cands, F(16, 64, 4, 4, tma=True, swap=True), F(32, 64, 4, 4, tma=True, swap=True),
                  F(32, 128, 4, 3, tma=True, swap=True)] for g, cands in _FP8_ROWS.items()}
FP8_CANDIDATES = {(r, g): {"decode": _FP8_DECODE, "small": _FP8_SMALL}.get(r, _FP8_ROWS)[g]
                  for _, r in REGIMES for g in ("gate_up", "down")}

# The per-channel format with fast accumulation (options.fp8_fast_accum): its k loop is one chain of
# wgmmas with no fp32 work between them, so the wide single-CTA tiles of a plain FP8 GEMM apply (128 rows,
# 128 gate + 128 up columns or 256 down columns, 8 warps, no register cap). From the sweep of
# bench/results/fp8_channel_fast_h200_effca01.txt (mlp ms, the other GEMM at the block table's entry);
# "small" keeps the block table's (not swept).
FP8_CHANNEL_H200_TABLE = {
    **FP8_H200_TABLE,
    ("decode", "gate_up"): F(16, 32, 4, 4),                  # T=1: 0.099 ms (64x64 tma r168: 0.106)
    ("medium", "gate_up"): F(128, 128, 8, 4, tma=True),      # T=1024: 0.623 ms (64x64 r168: 0.690)
    ("medium", "down"): F(128, 256, 8, 4, tma=True),         # T=1024: 0.649 ms (64x128 r168: 0.657)
    ("prefill", "gate_up"): F(128, 128, 8, 4, tma=True),     # T=4096: 1.684 ms (128x64 r128: 1.766)
    ("prefill", "down"): F(128, 256, 8, 4, tma=True),        # T=4096: 1.712 ms (64x128 r168: 1.783)
    ("large", "gate_up"): F(128, 128, 8, 4, tma=True),       # T=16384: 6.549 ms (128x64 r128: 6.641)
    ("large", "down"): F(128, 256, 8, 4, tma=True),          # T=16384: 6.372 ms (64x128 r168: 6.608)
}
FP8_CHANNEL_TABLES = {"H100": FP8_CHANNEL_H200_TABLE, "H200": FP8_CHANNEL_H200_TABLE}
_FP8_CHANNEL_ROWS = {"gate_up": [F(128, 128, 8, 3, tma=True), F(128, 128, 8, 4, tma=True),
                                 F(64, 128, 4, 4, tma=True), F(128, 64, 8, 4, tma=True),
                                 F(128, 64, 4, 4, tma=True), F(64, 64, 4, 4, tma=True),
                                 F(64, 128, 8, 4, tma=True), F(128, 64, 8, 3, tma=True, maxnreg=128)],
                     "down": [F(128, 256, 8, 3, tma=True), F(128, 256, 8, 4, tma=True),
                              F(128, 128, 8, 4, tma=True), F(128, 128, 4, 4, tma=True),
                              F(64, 256, 8, 4, tma=True), F(64, 128, 4, 4, tma=True),
                              F(64, 128, 4, 3, tma=True, maxnreg=168)]}
FP8_CHANNEL_CANDIDATES = {(r, g): (_FP8_DECODE if r == "decode" else _FP8_CHANNEL_ROWS)[g]
                          for _, r in REGIMES for g in ("gate_up", "down")}


def fp8_table_config(num_rows: int, num_experts: int, gemm: str, device: torch.device,
                     channel: bool = False) -> Fp8Config:
    """The committed FP8 table: (M/E regime, gemm, device family) -> config; channel: the table of the
    per-channel format with fast accumulation."""
    if device.type != "cuda":
        return FP8_INTERPRETER_DECODE if num_rows <= 8 * num_experts else FP8_INTERPRETER_ROWS[gemm]
    tables = FP8_CHANNEL_TABLES if channel else FP8_TABLES
    return tables[device_family(device_index(device))][(regime(num_rows, num_experts), gemm)]
