// Ascend (NPU, PrivateUse1) kernels of the private `moge_C` op namespace (csrc/ascend/ascend_ops.cpp).
#pragma once

#include "../moge.h"

namespace moge {

DispatchOutputs grouped_dispatch_npu(const at::Tensor& hidden, const at::Tensor& router_logits,
                                     int64_t num_groups, int64_t topk_per_group,
                                     const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                     int64_t score_func,
                                     const std::optional<at::Tensor>& expert_mask);
at::Tensor grouped_gemm_npu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets);
at::Tensor grouped_mlp_npu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale);
at::Tensor grouped_combine_npu(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                               const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out);

}  // namespace moge
