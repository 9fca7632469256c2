// grouped_dispatch's CUDA entry point: argument checks, output allocation, launch on the current stream
// (kernels in csrc/cuda/dispatch.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../moge.h"
#include "host_utils.h"
#include "kernels.h"

namespace moge {

DispatchOutputs grouped_dispatch_cuda(const at::Tensor& hidden, const at::Tensor& router_logits,
                                      int64_t num_groups, int64_t topk_per_group,
                                      const std::optional<at::Tensor>& expert_scale, bool renormalize,
                                      int64_t score_func,
                                      const std::optional<at::Tensor>& expert_mask) {
  check_dispatch_args(hidden, router_logits, num_groups, topk_per_group, expert_scale, expert_mask);
  MOGE_CHECK_VALUE(hidden.is_cuda(), "hidden must be a CUDA tensor");
  MOGE_CHECK_VALUE(cuda::dispatch_has_score_func(static_cast<int>(score_func)),
                    "grouped_dispatch (cuda backend): no kernel for score_func ", score_func,
                    " (a moge_kernels.reference.ScoreFunc value)");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const int64_t T = router_logits.size(0), E = router_logits.size(1), H = hidden.size(1);
  const int64_t G = num_groups, k_g = topk_per_group, K = G * k_g;

  // Rows may sit apart (a column slice of a wider tensor); only the elements of a row must be adjacent.
  const at::Tensor src = (hidden.stride(1) == 1 || H <= 1) ? hidden : hidden.contiguous();   // [T, H]
  auto permuted_hidden = at::empty({T * K, H}, hidden.options());                             // [T*K, H]
  auto topk_weights = at::empty({T, K}, hidden.options().dtype(at::kFloat));                 // [T, K] fp32
  auto topk_ids = at::empty({T, K}, hidden.options().dtype(at::kInt));                       // [T, K] int32
  auto expert_offsets = at::empty({E + 1}, hidden.options().dtype(at::kInt));                // [E+1] int32
  auto row_index = at::empty({T, K}, hidden.options().dtype(at::kInt));                      // [T, K] int32
  if (T == 0) {
    expert_offsets.zero_();
    return {permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index};
  }
  const int64_t route_smem = cuda::dispatch_route_smem_bytes(static_cast<int>(E), static_cast<int>(K));
  MOGE_CHECK_VALUE(route_smem <= 200 * 1024, "grouped_dispatch on CUDA: E=", E, " experts and K=", K,
                    " slots need ", route_smem, " bytes of shared memory per block (at most 200 KB)");
  at::Tensor scale;                                                                           // [E] fp32
  if (expert_scale.has_value()) scale = expert_scale->to(at::kFloat).contiguous();
  at::Tensor mask;                                                                            // [E] bool
  if (expert_mask.has_value()) mask = expert_mask->contiguous();
  auto workspace = at::empty({cuda::dispatch_workspace_ints(T, static_cast<int>(K), static_cast<int>(E))},
                             hidden.options().dtype(at::kInt));

  cuda::DispatchArgs args;
  args.logits = router_logits.data_ptr();
  args.logits_dtype = cuda_dtype(router_logits);
  args.logits_stride_t = router_logits.stride(0);
  args.logits_stride_e = router_logits.stride(1);
  args.expert_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  args.expert_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  args.hidden = src.data_ptr();
  args.hidden_stride_bytes = src.stride(0) * static_cast<int64_t>(src.element_size());
  args.row_bytes = H * static_cast<int64_t>(src.element_size());
  args.permuted_hidden = permuted_hidden.data_ptr();
  args.topk_weights = topk_weights.data_ptr<float>();
  args.topk_ids = topk_ids.data_ptr<int32_t>();
  args.expert_offsets = expert_offsets.data_ptr<int32_t>();
  args.row_index = row_index.data_ptr<int32_t>();
  args.workspace = workspace.data_ptr<int32_t>();
  args.T = T;
  args.E = static_cast<int>(E);
  args.G = static_cast<int>(G);
  args.k_g = static_cast<int>(k_g);
  args.score_func = static_cast<int>(score_func);
  args.renormalize = renormalize;
  C10_CUDA_CHECK(cuda::launch_grouped_dispatch(args, c10::cuda::getCurrentCUDAStream()));
  return {permuted_hidden, topk_weights, topk_ids, expert_offsets, row_index};
}

}  // namespace moge
