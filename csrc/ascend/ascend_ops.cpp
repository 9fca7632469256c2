// The moge_C ops on Ascend NPUs (PrivateUse1): ATen ops (run on the NPU by torch_npu) plus the CANN aclnn
// operators that torch_npu's Python operators wrap, called through torch_npu's C++ extension support
// (EXEC_NPU_CMD_EXT from npu_cpp_extension.h). Same index conventions as moge_kernels/ascend/adapter.py,
// whose header cites the documentation each one comes from:
//
//   topk_ids         [T, K] int32   expertIdx of aclnnMoeInitRoutingV2
//   permuted_hidden  [T*K, H]       expandedXOut: row i = hidden[sortedRowIdx[i] / K], sortedRowIdx a stable
//                                   sort of the flattened (t*K + k) expert ids
//   row_index        [T, K] int32   expandedRowIdxOut[t*K + k] = the row (t, k) landed in
//   expert_offsets   [E+1] int32    [0] ++ expertTokensCountOrCumsumOut in cumsum mode (flag 1, int32 [E])
//   group_list       [E] int64      aclnnGroupedMatmulV4 group list, cumsum form: expert_offsets[1:]
//   sorted_indices   [T*K] int32    aclnnMoeTokenUnpermute: out[t] = sum_k probs[t,k] * tokens[idx[t*K+k]]
//
// Built only where setup.py finds a CANN toolkit and torch_npu (build_ascend.py). Every shape below comes
// from the inputs' shapes: no host synchronisation.
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "npu_cpp_extension.h"

#include "ascend.h"

namespace moge {

namespace {

// MoGE routing in ATen ops: softmax (or sigmoid) over all E experts in fp32, a stable descending sort inside
// each group (ties -> lower expert; NaN sorts as -inf, so every id stays inside its group; with an
// expert_mask a second stable sort puts the kept experts first), renormalise, expert_scale. Returns
// (topk_weights [T, K] fp32, topk_ids [T, K] int32), ids group-major.
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& router_logits, int64_t G, int64_t k_g,
                                         const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                         int64_t score_func,
                                         const std::optional<at::Tensor>& expert_mask) {
  const int64_t T = router_logits.size(0), E = router_logits.size(1), S = E / G;
  auto logits = router_logits.to(at::kFloat);
  at::Tensor scores;                                                            // [T, E] fp32
  switch (score_func) {
    case kScoreSoftmax: scores = at::softmax(logits, -1); break;
    case kScoreSigmoid: scores = at::sigmoid(logits); break;
    default:
      MOGE_CHECK_VALUE(false, "grouped_dispatch (ascend backend): no kernel for score_func ", score_func,
                        " (a moge_kernels.reference.ScoreFunc value)");
  }
  scores = scores.view({T, G, S});
  auto keys = scores.masked_fill(at::isnan(scores), -std::numeric_limits<float>::infinity());
  auto order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/-1, /*descending=*/true));  // [T, G, S]
  if (expert_mask.has_value()) {
    auto kept = expert_mask->view({1, G, S}).expand({T, G, S}).gather(-1, order).to(at::kByte);
    order = order.gather(-1, std::get<1>(at::sort(kept, /*stable=*/true, /*dim=*/-1, /*descending=*/true)));
  }
  auto picks = order.slice(/*dim=*/-1, 0, k_g);                                 // [T, G, k_g] int64
  auto topk_weights = scores.gather(-1, picks).reshape({T, G * k_g});          // [T, K] fp32
  auto group_base = at::arange(G, picks.options()).view({1, G, 1}) * S;
  auto topk_ids = (picks + group_base).reshape({T, G * k_g});                  // [T, K] int64
  if (renormalize) topk_weights = topk_weights / topk_weights.sum(-1, /*keepdim=*/true);
  if (expert_scale.has_value()) {
    auto scale = expert_scale->to(at::kFloat).index_select(0, topk_ids.reshape({-1}));
    topk_weights = topk_weights * scale.view({T, G * k_g});
  }
  return {topk_weights, topk_ids.to(at::kInt)};
}

// w [E, N, Kd] (nn.Linear layout) as the [E, Kd, N] operand of the grouped matmul: a transposed view of a
// contiguous weight is accepted as is ("weight transposed" mode), any other layout is copied first.
at::Tensor weight_kn(const at::Tensor& w) {
  auto w_kn = w.transpose(1, 2);
  if (w.is_contiguous() || w_kn.is_contiguous()) return w_kn;
  return w.contiguous().transpose(1, 2);
}

constexpr int64_t kMaxGmmGroups = 1024;   // npu_grouped_matmul's single-tensor form: at most 1024 groups

}  // namespace

DispatchOutputs grouped_dispatch_npu(const at::Tensor& hidden, const at::Tensor& router_logits,
                                     int64_t num_groups, int64_t topk_per_group,
                                     const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                     int64_t score_func,
                                     const std::optional<at::Tensor>& expert_mask) {
  check_dispatch_args(hidden, router_logits, num_groups, topk_per_group, expert_scale, expert_mask);
  const c10::OptionalDeviceGuard device_guard(device_of(hidden));
  const int64_t T = router_logits.size(0), E = router_logits.size(1), H = hidden.size(1);
  const int64_t K = num_groups * topk_per_group;
  auto [topk_weights, topk_ids] =
      route(router_logits, num_groups, topk_per_group, expert_scale, renormalize, score_func,
            expert_mask);
  auto int_options = topk_ids.options();
  if (T == 0) {
    return {hidden.new_empty({0, H}), topk_weights, topk_ids, at::zeros({E + 1}, int_options),
            topk_ids.clone()};
  }
  auto x = hidden.contiguous();
  auto permuted_hidden = at::empty({T * K, H}, x.options());        // [T*K, H]
  auto row_index = at::empty({T * K}, int_options);                 // [T*K] int32
  auto expert_cumsum = at::empty({E}, int_options);                 // [E] int32
  // Dropless (activeNum 0, no capacity), cumulative counts (flag 1); the before-capacity counts are
  // only produced in drop mode, so that output is not requested.
  int64_t active_num = 0, expert_capacity = 0, expert_num = E, drop_pad_mode = 0, cumsum_flag = 1;
  bool before_capacity_flag = false;
  c10::optional<at::Tensor> no_before_capacity = c10::nullopt;
  EXEC_NPU_CMD_EXT(aclnnMoeInitRoutingV2, x, topk_ids, active_num, expert_capacity, expert_num, drop_pad_mode,
                   cumsum_flag, before_capacity_flag, permuted_hidden, row_index, expert_cumsum,
                   no_before_capacity);
  auto expert_offsets = at::cat({at::zeros({1}, int_options), expert_cumsum});   // [E+1] int32
  return {permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index.view({T, K})};
}

at::Tensor grouped_gemm_npu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  check_gemm_args(x, w, expert_offsets);
  const c10::OptionalDeviceGuard device_guard(device_of(x));
  const int64_t M = x.size(0), E = w.size(0), N = w.size(1);
  if (M == 0) return x.new_empty({0, N});
  MOGE_CHECK_VALUE(E <= kMaxGmmGroups, "ascend grouped_gemm: npu_grouped_matmul takes at most ",
                    kMaxGmmGroups, " experts, got w with E=", E);
  // zeros, not empty: the grouped matmul writes only the rows of its groups, and the contract's rows past
  // expert_offsets[E] (dropped slots) are zero; finding them on the host would sync
  std::vector<at::Tensor> xs{x.contiguous()}, weights{weight_kn(w)}, ys{at::zeros({M, N}, x.options())};
  at::TensorList x_list(xs), weight_list(weights), y_list(ys), none;
  auto group_list = expert_offsets.slice(0, 1).to(at::kLong);      // [E] int64 cumulative row ends
  // split_item 2: one output tensor; group_type 0: groups along M; group_list_type 0: cumsum; act_type 0.
  int64_t split_item = 2, group_type = 0, group_list_type = 0, act_type = 0;
  EXEC_NPU_CMD_EXT(aclnnGroupedMatmulV4, x_list, weight_list, none, none, none, none, none, none, group_list,
                   none, none, none, split_item, group_type, group_list_type, act_type, y_list, none, none);
  return ys[0];
}

at::Tensor grouped_mlp_npu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale) {
  check_gemm_args(x, w_gate_up, expert_offsets);
  MOGE_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) == w_gate_up.size(0) &&
                        w_down.size(2) * 2 == w_gate_up.size(1) && w_down.scalar_type() == x.scalar_type(),
                    "w_down must be [E, H, I] with w_gate_up [E, 2I, H] and x's dtype");
  const c10::OptionalDeviceGuard device_guard(device_of(x));
  const int64_t M = x.size(0), H = w_down.size(1);
  if (M == 0) return x.new_empty({0, H});
  auto gate_up = grouped_gemm_npu(x, w_gate_up, expert_offsets);   // [M, 2I], gate columns first
  auto activated = at::empty({M, gate_up.size(1) / 2}, gate_up.options());   // [M, I]
  int64_t dim = -1;                                                 // swish(first half) * second half
  EXEC_NPU_CMD_EXT(aclnnSwiGlu, gate_up, dim, activated);
  auto y = grouped_gemm_npu(activated, w_down, expert_offsets);    // [M, H]
  if (row_scale.has_value()) {
    y = (y.to(at::kFloat) * row_scale->to(at::kFloat).unsqueeze(1)).to(y.scalar_type());
  }
  return y;
}

at::Tensor grouped_combine_npu(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                               const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out) {
  check_combine_args(expert_out, topk_weights, row_index, shared_out);
  const c10::OptionalDeviceGuard device_guard(device_of(expert_out));
  const int64_t T = row_index.size(0), H = expert_out.size(1);
  if (T == 0) return expert_out.new_empty({0, H});   // the unpermute tiling rejects zero rows
  auto tokens = expert_out.contiguous();
  auto sorted_indices = row_index.reshape({-1}).contiguous();      // [T*K] int32
  // fp32 probs: the kernel reads probs in their own dtype, so the weights are not rounded to bf16/fp16.
  auto probs = topk_weights.to(at::kFloat).contiguous();           // [T, K] fp32
  auto out = at::empty({T, H}, tokens.options());
  bool padded_mode = false;
  std::array<int64_t, 1> unused_restore_shape = {1};              // read only in padded mode
  at::IntArrayRef restore_shape(unused_restore_shape);
  EXEC_NPU_CMD_EXT(aclnnMoeTokenUnpermute, tokens, sorted_indices, probs, padded_mode, restore_shape, out);
  if (shared_out.has_value()) {
    out = (out.to(at::kFloat) + shared_out->to(at::kFloat)).to(out.scalar_type());
  }
  return out;
}

}  // namespace moge
