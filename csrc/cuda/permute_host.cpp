// grouped_permute's CUDA entry point: argument checks, output allocation, launch on the current stream
// (kernels in csrc/cuda/permute.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../moge.h"
#include "kernels.h"

namespace moge {

PermuteOutputs grouped_permute_cuda(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts) {
  check_permute_args(hidden, topk_ids, num_experts);
  MOGE_CHECK_VALUE(hidden.is_cuda(), "hidden must be a CUDA tensor");
  MOGE_CHECK_VALUE(cuda::permute_smem_bytes(static_cast<int>(std::min<int64_t>(num_experts, INT32_MAX))) <= 48 * 1024,
                    "grouped_permute on CUDA: num_experts=", num_experts, " is more than its 48 KB of shared "
                    "memory per block holds");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), H = hidden.size(1), E = num_experts;
  // Rows may sit apart (a column slice of a wider tensor); only the elements of a row must be adjacent.
  const at::Tensor src = (hidden.stride(1) == 1 || H <= 1) ? hidden : hidden.contiguous();   // [T, H]
  auto permuted_hidden = at::empty({T * K, H}, hidden.options());                             // [T*K, H]
  auto expert_offsets = at::empty({E + 1}, hidden.options().dtype(at::kInt));                // [E+1] int32
  auto row_index = at::empty({T, K}, hidden.options().dtype(at::kInt));                      // [T, K] int32
  if (T == 0 || K == 0) {
    expert_offsets.zero_();
    return {permuted_hidden, expert_offsets, row_index};
  }
  auto workspace = at::empty({cuda::permute_workspace_ints(T, static_cast<int>(K), static_cast<int>(E))},
                             hidden.options().dtype(at::kInt));
  cuda::PermuteArgs args;
  args.hidden = src.data_ptr();
  args.hidden_stride_bytes = src.stride(0) * static_cast<int64_t>(src.element_size());
  args.row_bytes = H * static_cast<int64_t>(src.element_size());
  args.topk_ids = topk_ids.data_ptr();
  args.ids_are_int64 = topk_ids.scalar_type() == at::kLong;
  args.ids_stride_t = topk_ids.stride(0);
  args.ids_stride_k = topk_ids.stride(1);
  args.permuted_hidden = permuted_hidden.data_ptr();
  args.expert_offsets = expert_offsets.data_ptr<int32_t>();
  args.row_index = row_index.data_ptr<int32_t>();
  args.workspace = workspace.data_ptr<int32_t>();
  args.T = T;
  args.K = static_cast<int>(K);
  args.E = static_cast<int>(E);
  C10_CUDA_CHECK(cuda::launch_grouped_permute(args, c10::cuda::getCurrentCUDAStream()));
  return {permuted_hidden, expert_offsets, row_index};
}

}  // namespace moge
