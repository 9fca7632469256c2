// Argument checks for the C++ entry points. The Python router checks first with the same rules; these
// stay so that a direct call of torch.ops.moge_C.* can never index out of bounds.
#include "moge.h"

namespace moge {

namespace {
bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}
}  // namespace

void check_dispatch_args(const at::Tensor& hidden, const at::Tensor& router_logits, int64_t num_groups,
                         int64_t topk_per_group, const std::optional<at::Tensor>& expert_scale,
                         const std::optional<at::Tensor>& expert_mask) {
  MOGE_CHECK_VALUE(hidden.dim() == 2 && is_float(hidden), "hidden must be a 2-D float tensor [T, H]");
  MOGE_CHECK_VALUE(router_logits.dim() == 2 && is_float(router_logits),
                    "router_logits must be a 2-D float tensor [T, E]");
  MOGE_CHECK_VALUE(hidden.size(0) == router_logits.size(0),
                    "hidden and router_logits must have the same number of tokens");
  MOGE_CHECK_VALUE(hidden.device() == router_logits.device(), "router_logits must be on hidden's device");
  const int64_t E = router_logits.size(1);
  MOGE_CHECK_VALUE(num_groups >= 1 && E % num_groups == 0, "num_groups=", num_groups,
                    " must be >= 1 and divide the number of experts E=", E);
  MOGE_CHECK_VALUE(topk_per_group >= 1 && topk_per_group <= E / num_groups, "topk_per_group=",
                    topk_per_group, " must be in [1, E/num_groups=", E / num_groups, "]");
  if (expert_scale.has_value()) {
    MOGE_CHECK_VALUE(expert_scale->dim() == 1 && expert_scale->size(0) == E && is_float(*expert_scale),
                      "expert_scale must be a float tensor of shape [E]");
    MOGE_CHECK_VALUE(expert_scale->device() == hidden.device(), "expert_scale must be on hidden's device");
  }
  if (expert_mask.has_value()) {
    MOGE_CHECK_VALUE(expert_mask->dim() == 1 && expert_mask->size(0) == E &&
                          expert_mask->scalar_type() == at::kBool,
                      "expert_mask must be a bool tensor of shape [E]");
    MOGE_CHECK_VALUE(expert_mask->device() == hidden.device(), "expert_mask must be on hidden's device");
    if (expert_mask->is_cpu()) {   // values: host memory only (reading device memory would synchronise)
      const int64_t fewest = expert_mask->view({num_groups, E / num_groups}).sum(-1).min().item<int64_t>();
      MOGE_CHECK_VALUE(fewest >= topk_per_group, "expert_mask must keep at least topk_per_group=",
                        topk_per_group, " experts in every group, one group keeps ", fewest);
    }
  }
  MOGE_CHECK_VALUE(router_logits.size(0) * num_groups * topk_per_group <= INT32_MAX,
                    "grouped_dispatch T*K overflows the int32 row indices");
}

void check_permute_args(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts) {
  MOGE_CHECK_VALUE(hidden.dim() == 2 && is_float(hidden), "hidden must be a 2-D float tensor [T, H]");
  MOGE_CHECK_VALUE(topk_ids.dim() == 2 && (topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong),
                    "topk_ids must be an int32 or int64 tensor [T, K]");
  MOGE_CHECK_VALUE(topk_ids.size(0) == hidden.size(0), "hidden and topk_ids must have the same number of tokens");
  MOGE_CHECK_VALUE(topk_ids.device() == hidden.device(), "topk_ids must be on hidden's device");
  MOGE_CHECK_VALUE(num_experts >= 1, "num_experts must be >= 1");
  MOGE_CHECK_VALUE(topk_ids.numel() <= INT32_MAX, "grouped_permute T*K overflows the int32 row indices");
}

void check_combine_args(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                        const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out) {
  MOGE_CHECK_VALUE(expert_out.dim() == 2 && is_float(expert_out), "expert_out must be a 2-D float tensor");
  MOGE_CHECK_VALUE(row_index.dim() == 2 && row_index.scalar_type() == at::kInt,
                    "row_index must be an int32 tensor [T, K]");
  MOGE_CHECK_VALUE(topk_weights.sizes() == row_index.sizes() && is_float(topk_weights),
                    "topk_weights must be a float tensor shaped like row_index");
  MOGE_CHECK_VALUE(expert_out.size(0) == row_index.numel(), "expert_out must have T*K rows");
  MOGE_CHECK_VALUE(topk_weights.device() == expert_out.device() && row_index.device() == expert_out.device(),
                    "topk_weights and row_index must be on expert_out's device");
  if (shared_out.has_value()) {
    MOGE_CHECK_VALUE(shared_out->dim() == 2 && shared_out->size(0) == row_index.size(0) &&
                          shared_out->size(1) == expert_out.size(1) && is_float(*shared_out),
                      "shared_out must be a float tensor [T, H]");
    MOGE_CHECK_VALUE(shared_out->device() == expert_out.device(), "shared_out must be on expert_out's device");
  }
}

void check_gemm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  MOGE_CHECK_VALUE(x.dim() == 2 && is_float(x), "x must be a 2-D float tensor [M, K]");
  MOGE_CHECK_VALUE(w.dim() == 3 && w.scalar_type() == x.scalar_type() && w.size(2) == x.size(1),
                    "w must be [E, N, K] with x's dtype and K = x.shape[1]");
  MOGE_CHECK_VALUE(expert_offsets.dim() == 1 && expert_offsets.size(0) == w.size(0) + 1 &&
                        expert_offsets.scalar_type() == at::kInt,
                    "expert_offsets must be an int32 tensor of shape [E+1]");
  MOGE_CHECK_VALUE(w.device() == x.device() && expert_offsets.device() == x.device(),
                    "w and expert_offsets must be on x's device");
}

}  // namespace moge
