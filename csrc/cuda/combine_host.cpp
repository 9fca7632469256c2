// grouped_combine's CUDA entry point: argument checks, output allocation, launch on the current stream
// (kernel in csrc/cuda/combine.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../moge.h"
#include "host_utils.h"
#include "kernels.h"

namespace moge {

at::Tensor grouped_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                                const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out) {
  check_combine_args(expert_out, topk_weights, row_index, shared_out);
  MOGE_CHECK_VALUE(expert_out.is_cuda(), "expert_out must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(expert_out.device());
  const int64_t T = row_index.size(0), K = row_index.size(1), H = expert_out.size(1);
  auto rows = expert_out.contiguous();                            // [T*K, H]
  auto out = at::empty({T, H}, rows.options());                   // [T, H]
  if (T == 0 || H == 0) return out;
  auto weights = topk_weights.to(at::kFloat).contiguous();        // [T, K] fp32
  auto index = row_index.contiguous();                            // [T, K] int32
  // shared_out in expert_out's dtype is read as is; any other dtype is widened to fp32 (exact).
  at::Tensor shared;                                              // [T, H]
  bool shared_is_fp32 = false;
  if (shared_out.has_value()) {
    if (shared_out->scalar_type() == rows.scalar_type()) {
      shared = shared_out->contiguous();
    } else {
      shared = shared_out->to(at::kFloat).contiguous();
      shared_is_fp32 = true;
    }
  }

  cuda::CombineArgs args;
  args.expert_out = rows.data_ptr();
  args.dtype = cuda_dtype(rows);
  args.topk_weights = weights.data_ptr<float>();
  args.row_index = index.data_ptr<int32_t>();
  args.shared_out = shared.defined() ? shared.data_ptr() : nullptr;
  args.shared_is_fp32 = shared_is_fp32;
  args.out = out.data_ptr();
  args.T = T;
  args.H = H;
  args.K = static_cast<int>(K);
  C10_CUDA_CHECK(cuda::launch_grouped_combine(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace moge
