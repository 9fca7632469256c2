// Kernel entry points of the private `moge_C` op namespace; public ops live in moge_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "score_func.h"

namespace moge {

// Error messages are joined here, without iostreams, and handed to TORCH_CHECK as one std::string (which
// c10 passes through unformatted). On the H200 machine (torch 2.11 wheel, extension built by gcc 13.3) a
// TORCH_CHECK whose message c10::str formats through an ostringstream, i.e. any message with a number in
// it, killed the process with SIGSEGV instead of raising; one string argument never reaches that stream.
inline std::string error_part(const char* text) { return text; }
inline std::string error_part(const std::string& text) { return text; }
inline std::string error_part(c10::ScalarType dtype) { return c10::toString(dtype); }
template <typename Int, std::enable_if_t<std::is_integral_v<Int>, int> = 0>
std::string error_part(Int value) { return std::to_string(value); }
template <typename... Parts>
std::string error_text(const Parts&... parts) {
  std::string text;
  ((text += error_part(parts)), ...);
  return text;
}
}  // namespace moge

// TORCH_CHECK_VALUE / TORCH_CHECK / TORCH_CHECK_TYPE with the message joined by moge::error_text (evaluated
// only when the check fails).
#define MOGE_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::moge::error_text(__VA_ARGS__))
#define MOGE_CHECK(cond, ...) TORCH_CHECK(cond, ::moge::error_text(__VA_ARGS__))
#define MOGE_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::moge::error_text(__VA_ARGS__))

namespace moge {

using DispatchOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;   // permuted, offsets, row_index

// CPU kernels (csrc/cpu/)
DispatchOutputs grouped_dispatch_cpu(const at::Tensor& hidden, const at::Tensor& router_logits,
                                     int64_t num_groups, int64_t topk_per_group,
                                     const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                     int64_t score_func,
                                     const std::optional<at::Tensor>& expert_mask);
PermuteOutputs grouped_permute_cpu(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts);
at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets);
at::Tensor grouped_mlp_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale);
at::Tensor grouped_combine_cpu(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                               const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out);

// CUDA kernels (csrc/cuda/), built into moge_kernels._cuda_C when a CUDA toolkit is present
DispatchOutputs grouped_dispatch_cuda(const at::Tensor& hidden, const at::Tensor& router_logits,
                                      int64_t num_groups, int64_t topk_per_group,
                                      const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                      int64_t score_func,
                                      const std::optional<at::Tensor>& expert_mask);
PermuteOutputs grouped_permute_cuda(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts);
at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets);
at::Tensor grouped_mlp_cuda(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                            const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale);
at::Tensor grouped_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                                const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out);

// Shared argument checks (csrc/checks.cpp): same rules and messages as moge_kernels/checks.py.
void check_dispatch_args(const at::Tensor& hidden, const at::Tensor& router_logits, int64_t num_groups,
                         int64_t topk_per_group, const std::optional<at::Tensor>& expert_scale,
                         const std::optional<at::Tensor>& expert_mask);
void check_permute_args(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts);
void check_combine_args(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                        const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out);
void check_gemm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets);

}  // namespace moge
