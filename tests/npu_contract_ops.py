"""Torch implementations of the documented semantics of the torch_npu operators the Ascend adapter calls.

They stand in for torch_npu in tests/test_ascend_contract.py (and, as a fake `torch_npu` package, in its
registration test), so that moge_kernels/ascend/adapter.py runs on CPU. Each follows its documentation
as closely as it states things: signature (keyword names and defaults, so a misspelt or positional
argument fails), input constraints (a call outside them raises, as the NPU op would or might), index
conventions, count modes, output dtypes, and precision where the kernel source or Huawei's own accuracy
golden says it. Rows the docs call undefined are filled with garbage so that nothing can rely on them.
Only the unquantised, dropless configurations are implemented: the adapter uses no others.

Sources (all public):
  npu_moe_init_routing_v2  torch_npu API reference (op-plugin docs/context/torch_npu-npu_moe_init_routing_v2.md);
                           op-plugin MoeInitRoutingV2 wrapper (aclnnMoeInitRoutingV3, or aclnnMoeInitRoutingV2
                           when expert_num=128, range [0,128], H=2048, count mode, no quant); ops-transformer
                           aclnnMoeInitRoutingV2/V3 docs and the V3 golden generator (tests/ut/.../gen_data.py)
  npu_grouped_matmul       torch_npu API reference (torch_npu-npu_grouped_matmul.md), op-plugin wrapper
  npu_swiglu               torch_npu API reference; msprobe's accuracy golden for npu_swiglu
  npu_moe_token_unpermute  ops-transformer aclnnMoeTokenUnpermute doc and kernel (moe_token_unpermute.h)
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1
FAKE_OPERATORS = ("npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_moe_token_unpermute")


class NpuContractError(RuntimeError):
    """A call outside what the operator's documentation allows."""


def _require(condition, message):
    if not condition:
        raise NpuContractError(message)


def _garbage(shape, dtype):
    """Values for rows the documentation leaves undefined."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, -7777, dtype=dtype)


# ----------------------------------------------------------------------------- npu_moe_init_routing_v2
def _uses_init_routing_v2_kernel(H, expert_num, active_expert_range, expert_tokens_num_type, quant_mode):
    """op-plugin's CheckV2Case: these calls go to aclnnMoeInitRoutingV2 instead of V3."""
    return (expert_num == 128 and list(active_expert_range) == [0, 128] and H == 2048
            and quant_mode == -1 and expert_tokens_num_type == 1)


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                            expert_tokens_num_flag=False, quant_mode=0, active_expert_range=[],
                            row_idx_type=0):
    """-> (expanded_x [N*K, H], expanded_row_idx [N*K] int32, expert_token_cumsum_or_count, expanded_scale).

    sorted_row_idx = stable argsort of the flattened (row-major: n*K + k) expert ids, ids below the active
    range moved to the end; available = #ids inside the range.
      expanded_x[i] = x[sorted_row_idx[i] // K]                      for i < available
      row_idx_type 0: expanded_row_idx[sorted_row_idx[i]] = i        (-1 for ids outside the range)
      row_idx_type 1: expanded_row_idx[i] = sorted_row_idx[i]        for i < available
      expert_tokens_num_type 1: per-expert counts over the range, int64 [end - start]
      expert_tokens_num_type 2: (expert, count) pairs of the non-empty experts first, int64 [expert_num, 2]
    On the aclnnMoeInitRoutingV2 path the counts are int32 [expert_num] and row_idx_type is not passed
    (that kernel always returns the row_idx_type 0 map)."""
    _require(x.dim() == 2 and x.dtype in FLOAT_DTYPES, "x must be a 2-D float16/bfloat16/float32 tensor")
    _require(expert_idx.dim() == 2 and expert_idx.dtype == torch.int32 and expert_idx.shape[0] == x.shape[0],
             "expert_idx must be an int32 tensor (NUM_ROWS, K)")
    N, H = x.shape
    K = expert_idx.shape[1]
    _require(scale is None and offset is None, "stand-in: the unquantised call has no scale/offset")
    _require(quant_mode in (-1, 1), "quant_mode: only 1 (dynamic quant) and -1 (no quant) are supported")
    _require(quant_mode == -1, "stand-in: only quant_mode=-1 is implemented")
    _require(drop_pad_mode == 0, "drop_pad_mode: only 0 (dropless) is supported")
    _require(expert_tokens_num_type in (1, 2), "expert_tokens_num_type: only 1 (count) and 2 (key_value)")
    _require(expert_tokens_num_flag is True, "expert_tokens_num_flag: only True is supported")
    _require(row_idx_type in (0, 1), "row_idx_type must be 0 (gather) or 1 (scatter)")
    _require(expert_capacity is not None, "expert_capacity is checked to be set")
    limit = 5120 if expert_tokens_num_type == 2 else 10240
    _require(0 <= expert_num <= limit, f"expert_num must be in [0, {limit}]")
    _require(len(active_expert_range) == 2, "active_expert_range must be [expert_start, expert_end]")
    start, end = (int(v) for v in active_expert_range)
    _require(0 <= start < end <= expert_num, "active_expert_range needs 0 <= start < end <= expert_num")
    flat = expert_idx.reshape(-1).long()
    _require(flat.numel() == 0 or (int(flat.min()) >= 0 and int(flat.max()) < expert_num),
             "expert ids must lie in [0, expert_num)")
    v2_kernel = _uses_init_routing_v2_kernel(H, expert_num, active_expert_range, expert_tokens_num_type,
                                             quant_mode)
    if v2_kernel:
        _require(active_num >= 0, "activeNum must be >= 0")
    else:
        _require(active_num == N * K, "active_num is unused but validated to equal NUM_ROWS*K")

    keys = torch.where(flat < start, INT32_MAX, flat)
    sorted_row_idx = torch.argsort(keys, stable=True)
    sorted_expert_idx = keys[sorted_row_idx]
    available = int(((flat >= start) & (flat < end)).sum())

    expanded_x = _garbage((N * K, H), x.dtype)
    expanded_x[:available] = x[sorted_row_idx[:available] // K]
    if row_idx_type == 0 or v2_kernel:
        expanded_row_idx = torch.full((N * K,), -1, dtype=torch.int32)
        expanded_row_idx[sorted_row_idx[:available]] = torch.arange(available, dtype=torch.int32)
    else:
        expanded_row_idx = _garbage((N * K,), torch.int32)
        expanded_row_idx[:available] = sorted_row_idx[:available].to(torch.int32)

    counts = torch.bincount(sorted_expert_idx[:available] - start, minlength=end - start)
    if v2_kernel:
        return expanded_x, expanded_row_idx, counts.to(torch.int32), _garbage((expert_num,), torch.int32)
    if expert_tokens_num_type == 1:
        tokens = counts.to(torch.int64)
    else:
        tokens = _garbage((expert_num, 2), torch.int64)
        nonzero = torch.nonzero(counts).reshape(-1)
        tokens[:nonzero.numel(), 0] = nonzero + start
        tokens[:nonzero.numel(), 1] = counts[nonzero]
    return expanded_x, expanded_row_idx, tokens, _garbage((N * K,), torch.float32)


# ----------------------------------------------------------------------------- npu_grouped_matmul
def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0,
                       group_type=None, group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
    """y_i = x_i @ weight_i; the unquantised single-tensor form ("单单单"): x [M, K], weight [E, K, N],
    y [M, N], rows grouped along M by group_list. Products accumulate in fp32 and round once to the
    output dtype (the dtype of x)."""
    _require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "x and weight are lists")
    _require(all(v is None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
                                     activation_input, activation_quant_scale, activation_quant_offset,
                                     tuning_config)), "stand-in: the unquantised call only")
    _require(act_type == 0, "stand-in: no fused activation")
    _require(len(x) == 1 and len(weight) == 1 and x[0].dim() == 2 and weight[0].dim() == 3,
             "stand-in: only x=[M,K] with a single 3-D weight [E,K,N] is implemented")
    _require(split_item in (2, 3), "a single output tensor needs split_item 2 or 3")
    _require(group_type == 0, "group_type must be 0 (group along M) for a grouped weight; None means -1")
    rows, w = x[0], weight[0]
    M, E = rows.shape[0], w.shape[0]
    _require(rows.dtype in FLOAT_DTYPES and w.dtype == rows.dtype, "x and weight: same float dtype")
    _require(output_dtype in (None, rows.dtype), "non-quantised output_dtype must be None or x's dtype")
    _require(rows.is_contiguous(), "x does not support transposition (must be row-major)")
    _require(w.is_contiguous() or w.transpose(1, 2).is_contiguous(),
             "weight must be contiguous or transposed (last two strides swapped)")
    _require(w.shape[1] == rows.shape[1], "weight must be [E, K, N] with K = x.shape[1]")
    inner = w.shape[1] if not w.is_contiguous() else w.shape[2]
    _require(rows.shape[1] < 65536 and inner < 65536, "last dimensions must be below InnerLimit 65536")
    _require(M > 0, "stand-in: an empty x is undocumented; callers must not rely on it")
    _require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64
             and group_list.dim() == 1, "group_list must be a 1-D int64 tensor")
    _require(group_list.shape[0] == E and E <= 1024, "group_list: one entry per weight group, at most 1024")
    _require(group_list_type in (0, 1), "stand-in: group_list_type 0 (cumsum) or 1 (counts)")
    if group_list_type == 0:
        ends = group_list.clone()
        _require(bool((ends >= 0).all()) and bool((ends[1:] >= ends[:-1]).all()),
                 "cumsum group_list must be non-negative and non-decreasing")
        _require(int(ends[-1]) == M, "the last group_list value must equal x.shape[0]")
    else:
        _require(bool((group_list >= 0).all()) and int(group_list.sum()) == M,
                 "count group_list must be non-negative and sum to x.shape[0]")
        ends = torch.cumsum(group_list, 0)
    y = _garbage((M, w.shape[2]), rows.dtype)
    lo = 0
    for e, hi in enumerate(ends.tolist()):
        y[lo:hi] = (rows[lo:hi].float() @ w[e].float()).to(rows.dtype)
        lo = hi
    return [y]


# ----------------------------------------------------------------------------- npu_swiglu
def npu_swiglu(input, dim=-1):
    """swish(A) * B, A and B the first and second halves of `input` along `dim`. In float16/bfloat16 the
    swish result is rounded to the input dtype before the product (msprobe's accuracy golden)."""
    _require(input.dtype in FLOAT_DTYPES, "input must be float16/bfloat16/float32")
    _require(input.is_contiguous() and input.numel() > 0, "no non-contiguous and no empty input")
    _require(input.shape[dim] % 2 == 0, "the split dimension must be even")
    a, b = input.chunk(2, dim=dim)
    if input.dtype == torch.float32:
        return torch.sigmoid(a) * a * b
    swish = torch.nn.functional.silu(a.float()).to(input.dtype).float()
    return (swish * b.float()).to(input.dtype)


# ----------------------------------------------------------------------------- npu_moe_token_unpermute
def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[i] = sum_{j<topK} probs[i, j] * permuted_tokens[sorted_indices[i*topK + j]], topK = probs.shape[1]
    (1 without probs). The kernel casts tokens and probs to fp32, accumulates in j order, skips a slot whose
    prob is exactly 0, and rounds once (round-to-nearest-even) to permuted_tokens' dtype."""
    _require(padded_mode is False and restore_shape is None, "paddedMode: only false is supported")
    _require(permuted_tokens.dim() == 2 and permuted_tokens.dtype in FLOAT_DTYPES,
             "permuted_tokens must be a 2-D float16/bfloat16/float32 tensor")
    rows, H = permuted_tokens.shape
    _require(sorted_indices.dtype == torch.int32 and sorted_indices.dim() == 1
             and sorted_indices.numel() == rows, "sorted_indices must be int32 [tokens_num * topK]")
    top_k = 1 if probs is None else probs.shape[1]
    _require(probs is None or (probs.dim() == 2 and probs.dtype in FLOAT_DTYPES
                               and probs.shape[0] * top_k == rows), "probs must be [tokens_num, topK]")
    _require(top_k <= 512, "topK_num <= 512")
    _require(rows > 0, "zero rows are rejected by the tiling (error 561002)")
    indices = sorted_indices.long()
    _require(int(indices.min()) >= 0 and int(indices.max()) < rows, "indices must lie in [0, rows)")
    _require(torch.unique(indices).numel() == rows, "sorted_indices must not repeat an index")
    tokens = rows // top_k
    indices = indices.view(tokens, top_k)
    acc = torch.zeros(tokens, H, dtype=torch.float32)
    for j in range(top_k):
        slot = permuted_tokens[indices[:, j]].float()
        if probs is None:
            acc = acc + slot
        else:
            p = probs[:, j].float()
            acc = torch.where((p != 0)[:, None], acc + slot * p[:, None], acc)
    return acc.to(permuted_tokens.dtype)
