"""Benchmark problems: the layer shapes, the inputs of one (shape, T), and each op's work and floor.

Index tensors of a problem are those of the op contract (moge_kernels/reference.py):

    hidden          [T, H]    activation dtype   layer input
    router_logits   [T, E]    fp32
    w_gate_up       [E, 2I, H], w_down [E, H, I]  expert weights (nn.Linear layout), shared by every T
    topk_ids        [T, K]    int32 expert of (token t, slot k) (the reference routing; input of permute)
    permuted        [T*K, H]  rows sorted by expert (the reference dispatch of hidden)
    topk_weights    [T, K]    fp32
    expert_offsets  [E+1]     int32 exclusive cumsum of rows per expert
    row_index       [T, K]    int32 permuted row of (token t, slot k)
    expert_out      [T*K, H]  random rows standing in for the expert MLP output (input of combine)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference as R

PANGU = dict(name="pangu", H=5120, I=1344, E=64, G=8, k_g=1)
SHAPES = {
    "pangu": PANGU,                                                     # Pangu Pro MoE
    "qwen_like": dict(name="qwen_like", H=2048, I=768, E=128, G=8, k_g=1),   # DeepSeek/Qwen-like width
    "pangu_tp8": dict(PANGU, name="pangu_tp8", I=336),                  # experts sharded 8 ways (TP)
    # real top-k models' experts, routed as plain top-k (one group of all E experts, k_g = top-k)
    "qwen3_30b": dict(name="qwen3_30b", H=2048, I=768, E=128, G=1, k_g=8),       # Qwen3-30B-A3B
    "mixtral_8x7b": dict(name="mixtral_8x7b", H=4096, I=14336, E=8, G=1, k_g=2),  # Mixtral-8x7B
    "cpu_small": dict(name="cpu_small", H=512, I=128, E=64, G=8, k_g=1),   # CPU timing default
    "tiny": dict(name="tiny", H=64, I=32, E=16, G=4, k_g=1),           # tests of the CLI itself
}
GPU_TOKENS = (1, 16, 128, 1024, 4096, 16384)
CPU_TOKENS = (1, 16, 128, 1024)
OPS = ("dispatch", "permute", "gemm", "mlp", "combine", "layer")
DEFAULT_OPS = ("dispatch", "permute", "mlp", "combine", "layer")
# op of the table -> the torch.ops.moge op(s) it runs
OP_NAMES = {
    "dispatch": ("grouped_dispatch",),
    "permute": ("grouped_permute",),
    "gemm": ("grouped_gemm",),
    "mlp": ("grouped_mlp",),
    "combine": ("grouped_combine",),
    "layer": ("grouped_dispatch", "grouped_mlp", "grouped_combine"),
}


# ------------------------------------------------------------------------------------ weights
CPU_BANK_ABOVE = 1 << 26     # weight elements; above this a CPU stack is built from 8 random experts
def make_weights(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 1):
    """(w_gate_up [E,2I,H], w_down [E,H,I]) in dtype, made on the device in place, std 1/sqrt(fan_in).

    On a GPU every expert is drawn at random (the Pangu stack is 2.6 GB of bf16; normal_ on the device
    takes milliseconds and never builds an fp32 copy). On a CPU, drawing 1.3 G normal samples takes
    ~40 s on 2 cores, so when the stack is large only 8 experts are drawn and expert e is expert e % 8
    with its rows rotated by e // 8: every expert still holds a different matrix, so a kernel that reads
    the wrong expert's weights still fails the self-check."""
    E, H, I = shape["E"], shape["H"], shape["I"]
    gen = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w_down = torch.empty(E, H, I, dtype=dtype, device=device)
    bank = E if device.type != "cpu" or E * 3 * H * I <= CPU_BANK_ABOVE else min(E, 8)
    w_gate_up[:bank].normal_(0, H ** -0.5, generator=gen)
    w_down[:bank].normal_(0, I ** -0.5, generator=gen)
    for e in range(bank, E):
        w_gate_up[e] = w_gate_up[e % bank].roll(e // bank, dims=0)
        w_down[e] = w_down[e % bank].roll(e // bank, dims=0)
    return w_gate_up, w_down


class WeightCache:
    """One shape's weights at a time: reused across every T of the shape, dropped when the shape changes."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.key, self.weights = dtype, device, None, None

    def get(self, shape: dict):
        key = tuple(shape[k] for k in ("E", "H", "I"))
        if key != self.key:
            self.weights = None                 # free the previous stack before making the next
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.weights = make_weights(shape, self.dtype, self.device)
            self.key = key
        return self.weights


# ------------------------------------------------------------------------------------ problem
@dataclass
class Problem:
    shape: dict
    T: int
    dtype: torch.dtype
    device: torch.device
    tensors: dict = field(default_factory=dict)
    active_experts: int = 0

    @property
    def K(self) -> int:
        return self.shape["G"] * self.shape["k_g"]

    @property
    def M(self) -> int:
        return self.T * self.K


def make_problem(shape: dict, T: int, dtype, device, weights=None, seed: int = 0) -> Problem:
    """Inputs of every op at one (shape, T); routing from random logits (std 2) through the reference."""
    device = torch.device(device)
    H, E = shape["H"], shape["E"]
    if weights is None:
        weights = make_weights(shape, dtype, device, seed + 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(T, H, dtype=dtype, device=device).normal_(generator=gen)
    logits = torch.empty(T, E, dtype=torch.float32, device=device).normal_(0, 2, generator=gen)
    permuted, topk_weights, topk_ids, offsets, row_index = R.grouped_dispatch(hidden, logits, shape["G"],
                                                                        shape["k_g"])
    p = Problem(shape, T, dtype, device)
    p.tensors = dict(hidden=hidden, logits=logits, w_gate_up=weights[0], w_down=weights[1], topk_ids=topk_ids,
                     permuted=permuted, weights=topk_weights, offsets=offsets, row_index=row_index,
                     expert_out=torch.empty_like(permuted).normal_(generator=gen))
    p.active_experts = int((offsets.diff() > 0).sum())      # set-up only: a host sync is fine here
    return p


# ------------------------------------------------------------------------------------ work and floor
def work(p: Problem, op: str) -> tuple[float, float]:
    """(useful FLOPs, fewest bytes of device memory traffic) of one call: every input read once, every
    output written once, intermediates that a fused kernel keeps on chip not counted."""
    H, I, E = p.shape["H"], p.shape["I"], p.shape["E"]
    T, K, M, A = p.T, p.K, p.M, p.active_experts
    es = torch.finfo(p.dtype).bits // 8
    logit_bytes = T * E * p.tensors["logits"].element_size()
    idx = 4                                                     # int32 / fp32 index and weight entries
    if op == "dispatch":
        return 0.0, T * H * es + M * H * es + logit_bytes + 3 * T * K * idx + (E + 1) * idx
    if op == "permute":   # read hidden and the ids, write the K copies, row_index and expert_offsets
        return 0.0, T * H * es + M * H * es + 2 * T * K * idx + (E + 1) * idx
    if op == "combine":
        return 2.0 * M * H, M * H * es + T * H * es + 2 * T * K * idx
    if op == "gemm":                                            # the gate_up projection alone
        return 2.0 * M * 2 * I * H, (A * 2 * I * H + M * H + M * 2 * I) * es
    if op == "mlp":
        return 6.0 * M * H * I, (A * 3 * H * I + 2 * M * H) * es
    if op == "layer":                                           # a fully fused layer's floor
        return 6.0 * M * H * I + 2.0 * M * H, (A * 3 * H * I + 2 * T * H) * es + logit_bytes
    raise ValueError(f"unknown op {op!r}")


def floor_ms(flops: float, nbytes: float, bandwidth_gbs: float, matmul_tflops: float) -> tuple[float, str]:
    """(max(FLOPs / matmul rate, bytes / copy bandwidth) in ms, which one binds: 'flop' or 'mem')."""
    flop_ms = flops / (matmul_tflops * 1e9)
    mem_ms = nbytes / (bandwidth_gbs * 1e6)
    return (flop_ms, "flop") if flop_ms > mem_ms else (mem_ms, "mem")
