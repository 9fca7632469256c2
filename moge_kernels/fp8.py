"""FP8 (e4m3) expert weights and activation quantization: the formats and their exact semantics.

Formats (`quantize_expert_weights(w, fmt)`):

    "fp8_block"    weights in 128x128 blocks, one scale each (DeepSeek-V3's format; HF FP8 checkpoints
                   store it as `weight_scale_inv [ceil(N/128), ceil(K/128)]` beside each projection);
                   activations per token in groups of 128 along K
    "fp8_channel"  one scale per output channel (weight row); activations one scale per token

Stored as `QuantizedExpertWeights`: `weight [E, N, K] float8_e4m3fn` and `scale [E, P, NB, KB] fp32`
with w ~= weight * scale blockwise (a checkpoint's `weight_scale_inv` is this multiplier, despite its
name). P is the number of projections stacked along N, each blocked on its own as checkpoints store them:
P = 2 for w_gate_up (gate rows [0, I), then up rows [I, 2I)), 1 otherwise; NB = ceil(N/P / block_n),
KB = ceil(K / block_k). Blocks at the edges are partial (Pangu's I = 1344 is 10.5 blocks of 128: gate
and up rows 1280-1343 and down's last 64 columns of K are half blocks); nothing is padded.
block_n = 1 and block_k = 0 ("the whole K") describe the per-channel format.

Activation quantization (the reference and every kernel compute exactly this, in fp32 IEEE arithmetic):
for each row and each group of `group` columns along K (the last group may be partial; group = 0: the
whole row),

    amax  = max(max |x| over the group, 1e-12)
    scale = amax / 448                      # fp32 [M, ceil(K/group)]: x ~= q * scale
    q     = e4m3(clamp(x * (448 / amax), -448, 448))   # round to nearest even

with both divisions correctly rounded in fp32 (IEEE), not multiplications by a reciprocal. e4m3 overflow saturates: values are clamped to +-448 (the largest finite e4m3) before the cast, never
NaN. A NaN (or inf, which gives inf * 0) in a group makes that token's outputs NaN, as NaN propagates
through the bf16 path. The SwiGLU output h = silu(gate) * up of the gate_up GEMM (fp32 accumulators) is
rounded to the activation dtype, as the bf16 path stores it, then quantized the same way (groups along
I) for the down GEMM. Weights are quantized blockwise the same way, with w / scale (offline, so there
is no kernel to match); scale_format="e8m0" rounds each weight scale up to a power of two (so the
dequantization is exact scaling; also what UE8M0 checkpoints hold). Scales are positive, at least
MIN_SCALE = 1e-12 / 448 (the amax floor; the checkpoint loader raises a 0 scale to it).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0           # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-12         # an all-zero group gets this amax (a finite scale, q = 0)
MIN_SCALE = AMAX_FLOOR / E4M3_MAX   # every scale is at least this (the Triton GEMMs divide by scales)
BLOCK = 128
FORMATS = {"fp8_block": (BLOCK, BLOCK), "fp8_channel": (1, 0)}   # name -> (block_n, block_k)
SCALE_FORMATS = ("fp32", "e8m0")


@dataclasses.dataclass
class QuantizedExpertWeights:
    """FP8 expert weights: one object the ops take wherever they take expert weights
    (mk.grouped_gemm / grouped_mlp / moge_forward, MoGELayer). See the module docstring for the layout.

    weight [E, N, K] float8_e4m3fn, scale [E, P, NB, KB] fp32, block_n (1: per channel), block_k
    (0: per channel, whole K), scale_format "fp32" or "e8m0" (powers of two, stored as fp32)."""
    weight: Tensor
    scale: Tensor
    block_n: int = BLOCK
    block_k: int = BLOCK
    scale_format: str = "fp32"

    def __post_init__(self):
        check_quantized_weight("weight", self.weight, self.scale, self.block_n, self.block_k)

    @property
    def format(self) -> str:
        return format_name(self.block_n, self.block_k)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def parts(self) -> int:
        return self.scale.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, dtype=torch.float32) -> Tensor:
        """[E, N, K] in `dtype`: weight * scale, blockwise."""
        return dequantize_weight(self.weight, self.scale, self.block_n, self.block_k).to(dtype)

    def to(self, *args, **kwargs) -> "QuantizedExpertWeights":
        """Moves both tensors (a device); dtypes stay e4m3 / fp32."""
        device = torch.empty(0).to(*args, **kwargs).device
        return dataclasses.replace(self, weight=self.weight.to(device), scale=self.scale.to(device))

    def __repr__(self) -> str:
        return (f"QuantizedExpertWeights({self.format}, shape={tuple(self.weight.shape)}, "
                f"parts={self.parts}, scale_format={self.scale_format!r}, device={self.device})")


def format_name(block_n: int, block_k: int) -> str:
    for name, blocks in FORMATS.items():
        if blocks == (block_n, block_k):
            return name
    return f"fp8 blocks {block_n}x{block_k or 'K'}"


def same_blocks(w_gate_up, w_down) -> tuple[int, int]:
    """(block_n, block_k) shared by the two weights of an FP8 MLP; a clear error for mixed inputs."""
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(w, QuantizedExpertWeights):
            raise TypeError(f"{name} must be QuantizedExpertWeights like the other expert weight "
                            f"(quantize both with quantize_expert_weights), got {type(w).__name__}")
    blocks = (w_gate_up.block_n, w_gate_up.block_k)
    if (w_down.block_n, w_down.block_k) != blocks:
        raise ValueError(f"w_gate_up ({w_gate_up.format}) and w_down ({w_down.format}) must be quantized "
                         "in the same format")
    return blocks


def scale_shape(E: int, N: int, K: int, parts: int, block_n: int, block_k: int) -> tuple:
    """[E, P, ceil(N/P / block_n), ceil(K / block_k)] (block_k = 0: one scale along K)."""
    kb = 1 if block_k == 0 else math.ceil(K / block_k)
    return (E, parts, math.ceil(N // parts / block_n), kb)


def check_quantized_weight(name: str, weight, scale, block_n: int, block_k: int) -> None:
    """Shape / dtype checks of one quantized expert weight; errors name `name` (the user's argument)."""
    if not isinstance(weight, Tensor) or not isinstance(scale, Tensor):
        raise TypeError(f"{name}: weight and scale must be Tensors")
    if weight.dtype != E4M3:
        raise TypeError(f"{name} must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() != 3:
        raise ValueError(f"{name} must be [E, N, K], got shape {tuple(weight.shape)}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}_scale must be float32, got {scale.dtype}")
    if scale.device != weight.device:
        raise ValueError(f"{name}_scale is on {scale.device} but {name} is on {weight.device}")
    if block_n < 1 or block_k < 0:
        raise ValueError(f"{name}: block sizes must be block_n >= 1, block_k >= 0 (0: the whole K), "
                         f"got block_n={block_n}, block_k={block_k}")
    E, N, K = weight.shape
    if scale.dim() != 4 or scale.shape[0] != E or scale.shape[1] < 1 or N % scale.shape[1]:
        raise ValueError(f"{name}_scale must be [E={E}, P, ceil(N/P / {block_n}), "
                         f"{'1' if block_k == 0 else f'ceil(K / {block_k})'}] with P projections "
                         f"dividing N={N}, got shape {tuple(scale.shape)}")
    want = scale_shape(E, N, K, scale.shape[1], block_n, block_k)
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}_scale must have shape {want} for {name} {tuple(weight.shape)} in "
                         f"{scale.shape[1]} projection(s) of {block_n}x{block_k or 'K'} blocks, got "
                         f"{tuple(scale.shape)}")


def check_fp8_device(name: str, device: torch.device) -> None:
    """FP8 tensor-core kernels need compute capability >= 8.9 (Ada, Hopper) on CUDA."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise RuntimeError(
                f"{name}: float8_e4m3fn kernels need a GPU of compute capability >= 8.9, {device} is "
                f"{cap[0]}.{cap[1]}; run the fp8 ops on the reference backend "
                f"(moge_kernels.use_backend('reference'): fp32 dequantization) or keep bf16 weights")


# ----------------------------------------------------------------------------- quantization
def _blocks(t: Tensor, block_n: int, block_k: int) -> tuple[Tensor, int, int]:
    """[B, N, K] fp32 -> [B, NB, bn, KB, bk] zero-padded view of the blocks (padding never raises amax)."""
    B, N, K = t.shape
    bn, bk = block_n, (K if block_k == 0 else block_k)
    nb, kb = math.ceil(N / bn), (1 if block_k == 0 else math.ceil(K / bk))
    padded = torch.nn.functional.pad(t, (0, kb * bk - K, 0, nb * bn - N))
    return padded.view(B, nb, bn, kb, bk), nb, kb


def _expand(scale: Tensor, N: int, K: int, block_n: int, block_k: int) -> Tensor:
    """[B, NB, KB] block scales -> [B, N, K] (each block's scale over its elements)."""
    bk = K if block_k == 0 else block_k
    return scale.repeat_interleave(block_n, 1)[:, :N].repeat_interleave(max(bk, 1), 2)[:, :, :K]


def quantize_expert_weights(w: Tensor, fmt: str = "fp8_block", scale_format: str = "fp32",
                            parts: int = 1) -> QuantizedExpertWeights:
    """[E, N, K] expert weights (any float dtype) -> QuantizedExpertWeights in `fmt` ("fp8_block":
    128x128 blocks; "fp8_channel": per output row). parts: projections stacked along N, each blocked on
    its own (2 for w_gate_up: gate rows, then up rows; what HF checkpoints hold per projection).
    scale_format "e8m0": power-of-two scales."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_expert_weights: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"quantize_expert_weights: scale_format must be one of {SCALE_FORMATS}, "
                         f"got {scale_format!r}")
    if not isinstance(w, Tensor) or w.dim() != 3 or not w.is_floating_point() or w.dtype == E4M3:
        raise ValueError("quantize_expert_weights: w must be a floating [E, N, K] tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    E, N, K = w.shape
    if parts < 1 or N % parts:
        raise ValueError(f"quantize_expert_weights: parts={parts} must divide N={N} (w {tuple(w.shape)})")
    block_n, block_k = FORMATS[fmt]
    n = N // parts
    wf = w.detach().float().reshape(E * parts, n, K)
    blocks, nb, kb = _blocks(wf, block_n, block_k)
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(AMAX_FLOOR)                  # [E*P, NB, KB]
    scale = amax / E4M3_MAX
    if scale_format == "e8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (wf / _expand(scale, n, K, block_n, block_k)).clamp(-E4M3_MAX, E4M3_MAX)
    return QuantizedExpertWeights(_to_e4m3("w", q).reshape(E, N, K), scale.reshape(E, parts, nb, kb),
                                  block_n, block_k, scale_format)


def _to_e4m3(name: str, t: Tensor) -> Tensor:
    try:
        return t.to(E4M3)
    except (RuntimeError, TypeError) as err:   # e.g. a backend without float8 support
        raise RuntimeError(f"{name}: this device ({t.device}) cannot hold float8_e4m3fn: {err}") from err


def dequantize_weight(weight: Tensor, scale: Tensor, block_n: int, block_k: int) -> Tensor:
    """[E, N, K] e4m3 with [E, P, NB, KB] scales -> [E, N, K] fp32."""
    E, N, K = weight.shape
    P = scale.shape[1]
    s = _expand(scale.reshape(E * P, *scale.shape[2:]), N // P, K, block_n, block_k)
    return (weight.float().reshape(E * P, N // P, K) * s).reshape(E, N, K)


def quantize_activations(x: Tensor, group: int = BLOCK) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/group)] fp32), per token in groups of `group`
    columns (0: the whole row); the exact rule is in the module docstring."""
    M, K = x.shape
    blocks, _, kb = _blocks(x.float().reshape(1, M, K), 1, group)               # [1, M, 1, KB, g]
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(AMAX_FLOOR).reshape(M, kb)
    # Two IEEE divisions by a full tensor, as the kernels compute them (div_rn): a Python-scalar operand
    # would not do, since CUDA turns `t / 448` into `t * (1/448)` and `448 / t` is `t.reciprocal() * 448`
    # (each an ulp off now and then).
    e4m3_max = torch.full_like(amax, E4M3_MAX)
    inv = torch.div(e4m3_max, amax)
    q = (x.float() * _expand(inv.reshape(1, M, kb), M, K, 1, group)[0]).clamp(-E4M3_MAX, E4M3_MAX)
    return _to_e4m3("x", q), torch.div(amax, e4m3_max)


def new_scales(like: Tensor, M: int, K: int, group: int = BLOCK) -> Tensor:
    """An empty [M, ceil(K/group)] ([M, 1] for group 0) fp32 activation-scale tensor on like's device,
    stored k-major (strides (1, M)): a GEMM's k-step reads its rows' scales as one contiguous vector."""
    kb = 1 if group == 0 else math.ceil(K / group)
    return like.new_empty(kb, M, dtype=torch.float32).t()


@dataclasses.dataclass
class QuantizedActivations:
    """Expert-sorted activations already in e4m3 (grouped_permute_fp8 / grouped_dispatch_fp8): what
    grouped_mlp takes in place of x with FP8 weights, skipping its own quantization.

    data [M, K] float8_e4m3fn, scale [M, ceil(K/group)] fp32 (quantize_activations' rule; stored
    k-major), group (the weights' block_k; 0: one scale per row), dtype: the activations' dtype before
    quantization, in which the MLP returns its output."""
    data: Tensor
    scale: Tensor
    group: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self) -> Tensor:
        return dequantize_activations(self.data, self.scale, self.group).to(self.dtype)


def grouped_permute_fp8(hidden: Tensor, topk_ids: Tensor, num_experts: int, group: int = BLOCK):
    """grouped_permute with the permuted rows written in e4m3 (per-row scales in groups of `group`
    columns, the FP8 weights' block_k): (QuantizedActivations [M, H], expert_offsets, row_index). The
    permutation runs on a zero-width view of hidden (no bf16 rows are written), then moge::permute_fp8
    reads each hidden row once, quantizes it and writes its K copies."""
    from . import ops
    _, expert_offsets, row_index = ops.grouped_permute(hidden[:, :0], topk_ids, num_experts)
    q, s = ops._run("permute_fp8", hidden, row_index, expert_offsets, group)   # direct where allowed
    return QuantizedActivations(q, s, group, hidden.dtype), expert_offsets, row_index


def grouped_dispatch_fp8(hidden: Tensor, router_logits: Tensor, num_groups: int, topk_per_group: int = 1,
                         expert_scale=None, renormalize: bool = False, score_func: str = "softmax",
                         expert_mask=None, group: int = BLOCK):
    """grouped_dispatch with the permuted rows in e4m3 (as grouped_permute_fp8): (QuantizedActivations,
    topk_weights, topk_ids, expert_offsets, row_index)."""
    from . import ops
    _, topk_weights, topk_ids, expert_offsets, row_index = ops.grouped_dispatch(
        hidden[:, :0], router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
        expert_mask)
    q, s = ops._run("permute_fp8", hidden, row_index, expert_offsets, group)   # direct where allowed
    return QuantizedActivations(q, s, group, hidden.dtype), topk_weights, topk_ids, expert_offsets, row_index


@functools.lru_cache(maxsize=None)
def layer_ops(group: int):
    """The ops of an FP8 MoGELayer (ops.compose_layer's LayerOps): grouped_dispatch_fp8 writes the
    permuted rows in e4m3 (groups of the weights' block_k), which grouped_mlp takes as they are."""
    from . import ops
    return ops.MOGE_OPS._replace(dispatch=functools.partial(grouped_dispatch_fp8, group=group))


def activation_args(x, block_k: int) -> tuple:
    """(x, x_scale, out_dtype) as moge::grouped_mlp_fp8 takes them, from a float tensor or from
    QuantizedActivations (whose group must be the weights' block_k)."""
    if not isinstance(x, QuantizedActivations):
        return x, None, None
    if x.group != block_k:
        raise ValueError(f"x is quantized in groups of {x.group} columns but the weights' k-blocks are "
                         f"{block_k}: quantize the activations with group={block_k}")
    return x.data, x.scale, x.dtype


def dequantize_activations(q: Tensor, scale: Tensor, group: int = BLOCK) -> Tensor:
    M, K = q.shape
    return q.float() * _expand(scale.reshape(1, *scale.shape), M, K, 1, group)[0]


# ----------------------------------------------------------------------------- MoGELayer support
# A quantized MoGELayer keeps its expert weights as buffers (w_gate_up and w_down become None):
#   w_gate_up_fp8 [E, 2I, H] e4m3, w_gate_up_scale [E, 2, NB, KB], w_down_fp8 [E, H, I] e4m3,
#   w_down_scale [E, 1, NB', KB'], fp8_block_size [2] int64 (block_n, block_k; 0: whole K)
# so its state dict round-trips; HF FP8 checkpoints (experts.{e}.{gate,up,down}_proj.weight in e4m3 with
# weight_scale_inv [ceil(N/128), ceil(K/128)], or a per-channel weight_scale [N, 1]) load into it; their
# FP8 shared expert (same keys under shared_expert.) loads into an FP8 shared expert as it is, else
# dequantized into the bf16 shared parameters.
_CKPT_SCALES = ("weight_scale_inv", "weight_scale")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _scale_kind(state_dict, key: str):
    """Which of a checkpoint weight's scale keys (key + "weight_scale_inv" / "weight_scale") is present,
    or None."""
    return next((k for k in _CKPT_SCALES if key + k in state_dict), None)


def _checkpoint_blocks(scale: Tensor, rows: int) -> tuple[int, int]:
    """(block_n, block_k) of a checkpoint's scale for a weight of `rows` rows: [rows, 1] per channel,
    else 128x128 blocks."""
    return (1, 0) if tuple(scale.shape) == (rows, 1) else (BLOCK, BLOCK)


def layer_weights(layer) -> tuple[QuantizedExpertWeights, QuantizedExpertWeights] | None:
    """The FP8 expert weights of a quantized MoGELayer, or None."""
    blocks = getattr(layer, "_fp8_blocks", None)    # a Python copy of fp8_block_size: no device read
    if blocks is None:
        return None
    block_n, block_k = blocks
    return (QuantizedExpertWeights(layer.w_gate_up_fp8, layer.w_gate_up_scale, block_n, block_k),
            QuantizedExpertWeights(layer.w_down_fp8, layer.w_down_scale, block_n, block_k))


def _to_fp8_mode(layer, block_n: int, block_k: int, device) -> None:
    """Replace the bf16 expert parameters by (empty) FP8 buffers of the layer's sizes."""
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    layer.register_parameter("w_gate_up", None)
    layer.register_parameter("w_down", None)
    layer.register_buffer("w_gate_up_fp8", torch.empty(E, 2 * I, H, dtype=E4M3, device=device))
    layer.register_buffer("w_gate_up_scale", torch.empty(scale_shape(E, 2 * I, H, 2, block_n, block_k),
                                                         device=device))
    layer.register_buffer("w_down_fp8", torch.empty(E, H, I, dtype=E4M3, device=device))
    layer.register_buffer("w_down_scale", torch.empty(scale_shape(E, H, I, 1, block_n, block_k),
                                                      device=device))
    layer.register_buffer("fp8_block_size", torch.tensor([block_n, block_k], device=device))
    layer._fp8_blocks = (block_n, block_k)


# An FP8 shared expert is a grouped MLP of one expert over all T rows (grouped_mlp_fp8's kernels, no
# second FP8 GEMM to keep): buffers shared_w_gate_up_fp8 [1, 2Is, H], shared_w_gate_up_scale
# [1, 2, NB, KB], shared_w_down_fp8 [1, H, Is], shared_w_down_scale, fp8_shared_block_size [2];
# shared_w_gate_up / shared_w_down become None.
def layer_shared_weights(layer) -> tuple:
    """(shared gate_up, shared down) as shared_expert_mlp takes them: the bf16 parameters, or the FP8
    weights of an FP8 shared expert."""
    blocks = layer._fp8_shared_blocks            # a Python copy of fp8_shared_block_size: no device read
    if blocks is None:
        return layer.shared_w_gate_up, layer.shared_w_down
    block_n, block_k = blocks
    return (QuantizedExpertWeights(layer.shared_w_gate_up_fp8, layer.shared_w_gate_up_scale, block_n, block_k),
            QuantizedExpertWeights(layer.shared_w_down_fp8, layer.shared_w_down_scale, block_n, block_k))


def _to_fp8_shared_mode(layer, block_n: int, block_k: int, device, scale_format: str = "fp32") -> None:
    """Replace the bf16 shared-expert parameters by (empty) FP8 buffers of the layer's sizes; scale_format:
    what float shared-expert checkpoint weights loaded later are quantized with (_take_shared_fp8_keys)."""
    H, Is = layer.hidden_size, layer.shared_intermediate_size
    layer.register_parameter("shared_w_gate_up", None)
    layer.register_parameter("shared_w_down", None)
    layer.register_buffer("shared_w_gate_up_fp8", torch.empty(1, 2 * Is, H, dtype=E4M3, device=device))
    layer.register_buffer("shared_w_gate_up_scale",
                          torch.empty(scale_shape(1, 2 * Is, H, 2, block_n, block_k), device=device))
    layer.register_buffer("shared_w_down_fp8", torch.empty(1, H, Is, dtype=E4M3, device=device))
    layer.register_buffer("shared_w_down_scale",
                          torch.empty(scale_shape(1, H, Is, 1, block_n, block_k), device=device))
    layer.register_buffer("fp8_shared_block_size", torch.tensor([block_n, block_k], device=device))
    layer._fp8_shared_blocks = (block_n, block_k)
    layer._fp8_shared_scale_format = scale_format


def keep_checkpoint_shared_expert_fp8(layer, state_dict) -> None:
    """from_pretrained_state_dict(shared_expert_fp8=True): the layer's shared expert becomes FP8 in the
    checkpoint's format (read from its gate_proj scale key: [N, 1] per channel, else 128x128 blocks), so
    that its e4m3 keys load as they are (take_fp8_checkpoint_keys) instead of dequantized."""
    if "shared_w_gate_up_fp8" in state_dict:       # a quantized layer's own state dict: FP8 already
        return
    key = "shared_expert.gate_proj."
    weight = state_dict.get(key + "weight")
    kind = _scale_kind(state_dict, key)
    if weight is None or weight.dtype != E4M3 or kind is None:
        found = "absent" if weight is None else f"{weight.dtype}" + ("" if kind else " without a scale key")
        raise ValueError("from_pretrained_state_dict: shared_expert_fp8=True needs the checkpoint's shared "
                         f"expert in e4m3 with its {' or '.join(_CKPT_SCALES)} ({key}weight is {found}); "
                         "for float weights use quantize_(fmt, shared_expert=True)")
    block_n, block_k = _checkpoint_blocks(state_dict[key + kind], weight.shape[0])
    _to_fp8_shared_mode(layer, block_n, block_k, layer.router_scale.device)


def shared_expert_mlp(hidden: Tensor, gate_up: QuantizedExpertWeights, down: QuantizedExpertWeights) -> Tensor:
    """An FP8 shared expert over hidden [T, H]: grouped_mlp with one expert owning all T rows ->
    [T, H] in hidden's dtype. Its expert_offsets [0, T] are made on the device (no host copy)."""
    from . import ops
    T = hidden.shape[0]
    if T == 0:
        return hidden.new_zeros(0, hidden.shape[1])
    offsets = torch.arange(0, 2 * T, T, dtype=torch.int32, device=hidden.device)
    return ops.grouped_mlp(hidden, gate_up, down, offsets)


def quantize_layer_(layer, fmt: str, scale_format: str, shared_expert: bool = False):
    """MoGELayer.quantize_: the expert weights (and the shared expert's, with shared_expert) to FP8 in
    place (inference only)."""
    if layer_weights(layer) is not None:
        raise RuntimeError("quantize_: the layer's expert weights are FP8 already")
    if shared_expert and layer.shared_w_gate_up is not None:
        sgu = quantize_expert_weights(layer.shared_w_gate_up.detach()[None], fmt, scale_format, parts=2)
        sdn = quantize_expert_weights(layer.shared_w_down.detach()[None], fmt, scale_format)
        _to_fp8_shared_mode(layer, sgu.block_n, sgu.block_k, sgu.weight.device, scale_format)
        layer.shared_w_gate_up_fp8, layer.shared_w_gate_up_scale = sgu.weight, sgu.scale
        layer.shared_w_down_fp8, layer.shared_w_down_scale = sdn.weight, sdn.scale
    w_gate_up = layer.w_gate_up.detach()
    w_gate_up = w_gate_up.flatten(2) if w_gate_up.dim() == 4 else w_gate_up     # packed -> [E, N, K]
    w_down = layer.w_down.detach()
    w_down = w_down.flatten(2) if w_down.dim() == 4 else w_down
    gu = quantize_expert_weights(w_gate_up, fmt, scale_format, parts=2)
    dn = quantize_expert_weights(w_down, fmt, scale_format)
    _to_fp8_mode(layer, gu.block_n, gu.block_k, w_gate_up.device)
    layer.w_gate_up_fp8, layer.w_gate_up_scale = gu.weight, gu.scale
    layer.w_down_fp8, layer.w_down_scale = dn.weight, dn.scale
    return layer


def is_checkpoint_fp8_key(key: str) -> bool:
    """Scale tensors that stay fp32 when a checkpoint is loaded in another dtype."""
    return key.endswith(_CKPT_SCALES + ("w_gate_up_scale", "w_down_scale"))   # shared_w_*_scale too


def _dequantize_shared_keys(state_dict, prefix, error_msgs) -> None:
    """FP8 shared-expert checkpoint keys (shared_expert.{gate,up,down}_proj.weight in e4m3 with its
    weight_scale_inv or weight_scale, as full FP8 checkpoints store them) -> fp32 weights, which the bf16
    hook stacks into shared_w_gate_up / shared_w_down: the shared expert runs in the activation dtype.
    A key it cannot dequantize is an error, and the shared expert's keys are then left out (so the bf16
    hook does not stack e4m3 with float)."""
    errors, dequantized = [], {}
    for p in _PROJ:
        key = f"{prefix}shared_expert.{p}."
        weight = state_dict.get(key + "weight")
        if weight is None or weight.dtype != E4M3:
            continue
        kind = _scale_kind(state_dict, key)
        if kind is None:
            errors.append(f"FP8 checkpoint key {key}weight is e4m3 without its {' or '.join(_CKPT_SCALES)}")
            continue
        scale = state_dict[key + kind].float().clamp_min(MIN_SCALE)
        N, K = weight.shape
        block_n, block_k = _checkpoint_blocks(scale, N)
        want = scale_shape(1, N, K, 1, block_n, block_k)[2:]
        if tuple(scale.shape) != want:
            errors.append(f"FP8 checkpoint key {key}{kind}: shape {tuple(scale.shape)}, expected {want} "
                          f"(128x128 blocks) or {(N, 1)} (per channel) for a weight {(N, K)}")
            continue
        dequantized[key] = kind, dequantize_weight(weight[None], scale.reshape(1, 1, *want), block_n,
                                                   block_k)[0]
    if errors:
        error_msgs.extend(errors)
        for p in _PROJ:
            for k in ("weight",) + _CKPT_SCALES:
                state_dict.pop(f"{prefix}shared_expert.{p}.{k}", None)
        return
    for key, (kind, weight) in dequantized.items():
        state_dict[key + "weight"] = weight
        del state_dict[key + kind]


def _take_shared_fp8_keys(module, state_dict, prefix, error_msgs) -> None:
    """Into a layer whose shared expert is FP8 already (quantize_ before load_state_dict), checkpoint
    keys shared_expert.{gate,up,down}_proj.weight load as its FP8 buffers: e4m3 ones with their scales as
    they are (the layer's blocks), float ones quantized in the layer's format and scale format."""
    keys = [f"{prefix}shared_expert.{p}." for p in _PROJ]
    if module._fp8_shared_blocks is None or keys[0] + "weight" not in state_dict:
        return
    block_n, block_k = module._fp8_shared_blocks
    parts = []
    try:
        for key in keys:
            weight = state_dict.pop(key + "weight")
            kind = _scale_kind(state_dict, key)
            if weight.dtype != E4M3:
                q = quantize_expert_weights(weight.float()[None], format_name(block_n, block_k),
                                            module._fp8_shared_scale_format)
                parts.append((q.weight[0], q.scale[0, 0]))
                continue
            if kind is None:
                raise ValueError(f"{key}weight is e4m3 without its {' or '.join(_CKPT_SCALES)}")
            scale = state_dict.pop(key + kind).float().clamp_min(MIN_SCALE)
            want = scale_shape(1, *weight.shape, 1, block_n, block_k)[2:]
            if tuple(scale.shape) != want:
                raise ValueError(f"{key}{kind}: shape {tuple(scale.shape)}, expected {want} for the layer's "
                                 f"{format_name(block_n, block_k)} shared expert")
            parts.append((weight, scale))
        (g, gs), (u, us), (d, ds) = parts
        state_dict[prefix + "shared_w_gate_up_fp8"] = torch.cat([g, u])[None]
        state_dict[prefix + "shared_w_gate_up_scale"] = torch.stack([gs, us])[None]
        state_dict[prefix + "shared_w_down_fp8"] = d[None]
        state_dict[prefix + "shared_w_down_scale"] = ds[None, None]
        state_dict[prefix + "fp8_shared_block_size"] = torch.tensor([block_n, block_k])
    except (KeyError, RuntimeError, ValueError) as err:
        error_msgs.append(f"FP8 shared expert checkpoint keys under {prefix}shared_expert.*: {err}")


def take_fp8_checkpoint_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs):
    """load_state_dict pre-hook (before the bf16 one): FP8 per-expert checkpoint keys -> the stacked
    FP8 buffers, switching the layer to FP8 first; a quantized layer's own state dict switches it too
    (and its shared expert, if that is FP8). A checkpoint's e4m3 shared expert loads into an FP8 shared
    expert as it is, else dequantized into the bf16 one (_dequantize_shared_keys)."""
    _take_shared_fp8_keys(module, state_dict, prefix, error_msgs)
    _dequantize_shared_keys(state_dict, prefix, error_msgs)
    if prefix + "fp8_shared_block_size" in state_dict and module._fp8_shared_blocks is None:
        block_n, block_k = (int(v) for v in state_dict[prefix + "fp8_shared_block_size"].tolist())
        _to_fp8_shared_mode(module, block_n, block_k, module.router_scale.device)
    if prefix + "fp8_block_size" in state_dict:
        block_n, block_k = (int(v) for v in state_dict[prefix + "fp8_block_size"].tolist())  # loading: once
        if layer_weights(module) is None:
            _to_fp8_mode(module, block_n, block_k, module.router_scale.device)
        return
    first = prefix + "experts.0.gate_proj."
    kind = _scale_kind(state_dict, first)
    if kind is None or state_dict.get(first + "weight", torch.empty(0)).dtype != E4M3:
        return
    E, I, H = module.num_experts, module.intermediate_size, module.hidden_size
    block_n, block_k = _checkpoint_blocks(state_dict[first + kind], I)
    gate_up, gate_up_scale, down, down_scale = [], [], [], []
    try:
        for e in range(E):
            t = {}
            for p in _PROJ:
                key = f"{prefix}experts.{e}.{p}."
                # a checkpoint's 0 scale (an all-zero block) as the smallest scale quantization gives
                t[p] = state_dict.pop(key + "weight"), state_dict.pop(key + kind).float().clamp_min(MIN_SCALE)
            (g, gs), (u, us), (d, ds) = t["gate_proj"], t["up_proj"], t["down_proj"]
            gate_up.append(torch.cat([g, u]))
            gate_up_scale.append(torch.stack([gs, us]))
            down.append(d)
            down_scale.append(ds[None])
        gu = QuantizedExpertWeights(torch.stack(gate_up), torch.stack(gate_up_scale), block_n, block_k)
        dn = QuantizedExpertWeights(torch.stack(down), torch.stack(down_scale), block_n, block_k)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        error_msgs.append(f"FP8 checkpoint keys under {prefix}experts.*: {err}")
        return
    if layer_weights(module) is None:
        _to_fp8_mode(module, block_n, block_k, module.router_scale.device)
    state_dict[prefix + "w_gate_up_fp8"], state_dict[prefix + "w_gate_up_scale"] = gu.weight, gu.scale
    state_dict[prefix + "w_down_fp8"], state_dict[prefix + "w_down_scale"] = dn.weight, dn.scale
    state_dict[prefix + "fp8_block_size"] = torch.tensor([block_n, block_k])
