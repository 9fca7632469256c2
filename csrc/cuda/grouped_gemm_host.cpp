// grouped_gemm / grouped_mlp CUDA entry points: argument checks, allocation, launches on the current
// stream (kernels in csrc/cuda/grouped_gemm.cuh). grouped_mlp is two launches: the gate_up product with
// the SwiGLU epilogue writes h [M, I] in x's dtype, then the down product (times row_scale) writes y.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../moge.h"
#include "host_utils.h"
#include "kernels.h"

namespace moge {

namespace {

// y [M, N_out] = grouped product of x [M, Kd] and w [E, N_w, Kd] (SwiGLU: N_out = N_w / 2).
void run_grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                      const at::Tensor& row_scale, const at::Tensor& y, bool swiglu) {
  if (y.numel() == 0) return;
  cuda::GemmArgs args;
  args.x = x.data_ptr();
  args.w = w.data_ptr();
  args.expert_offsets = expert_offsets.data_ptr<int32_t>();
  args.row_scale = row_scale.defined() ? row_scale.data_ptr<float>() : nullptr;
  args.y = y.data_ptr();
  args.dtype = cuda_dtype(x);
  args.M = x.size(0);
  args.Kd = x.size(1);
  args.N_w = w.size(1);
  args.E = static_cast<int>(w.size(0));
  args.swiglu = swiglu;
  const cudaError_t err = cuda::launch_grouped_gemm(args, c10::cuda::getCurrentCUDAStream());
  MOGE_CHECK(err != cudaErrorInvalidConfiguration, "grouped GEMM on CUDA: M=", args.M, " rows and N=",
              args.N_w, " columns need more thread blocks than one launch allows");
  C10_CUDA_CHECK(err);
}

// Rows [expert_offsets[E], M) belong to no expert (grouped_permute's dropped slots): zeros.
void zero_rows_past_experts(const at::Tensor& y, const at::Tensor& expert_offsets) {
  if (y.numel() == 0) return;
  C10_CUDA_CHECK(cuda::launch_zero_rows_past_experts(
      y.data_ptr(), y.size(1) * static_cast<int64_t>(y.element_size()),
      expert_offsets.data_ptr<int32_t>() + (expert_offsets.size(0) - 1), y.size(0),
      c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  check_gemm_args(x, w, expert_offsets);
  MOGE_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  MOGE_CHECK_VALUE(x.size(0) <= INT32_MAX, "grouped_gemm: x has more rows than int32 row indices hold");
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto xc = x.contiguous();                                      // [M, Kd]
  auto wc = w.contiguous();                                      // [E, N, Kd]
  auto offsets = expert_offsets.contiguous();                    // [E+1] int32
  auto y = at::empty({x.size(0), w.size(1)}, x.options());       // [M, N]
  run_grouped_gemm(xc, wc, offsets, at::Tensor(), y, /*swiglu=*/false);
  zero_rows_past_experts(y, offsets);
  return y;
}

at::Tensor grouped_mlp_cuda(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                            const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale) {
  check_gemm_args(x, w_gate_up, expert_offsets);
  MOGE_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) == w_gate_up.size(0) && w_down.size(1) == x.size(1) &&
                        2 * w_down.size(2) == w_gate_up.size(1) && w_down.scalar_type() == x.scalar_type() &&
                        w_down.device() == x.device(),
                    "w_down must be [E, H, I] with x's dtype, given w_gate_up [E, 2I, H]");
  if (row_scale.has_value()) {
    MOGE_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == x.size(0) && row_scale->device() == x.device(),
                      "row_scale must be a tensor of shape [M] on x's device");
  }
  MOGE_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  MOGE_CHECK_VALUE(x.size(0) <= INT32_MAX, "grouped_mlp: x has more rows than int32 row indices hold");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(0), H = w_down.size(1), I = w_down.size(2);
  auto xc = x.contiguous();                                      // [M, H]
  auto offsets = expert_offsets.contiguous();                    // [E+1] int32
  auto h = at::empty({M, I}, x.options());                       // [M, I] silu(gate) * up
  run_grouped_gemm(xc, w_gate_up.contiguous(), offsets, at::Tensor(), h, /*swiglu=*/true);
  at::Tensor scale;                                              // [M] fp32
  if (row_scale.has_value()) scale = row_scale->to(at::kFloat).contiguous();
  auto y = at::empty({M, H}, x.options());                       // [M, H]
  run_grouped_gemm(h, w_down.contiguous(), offsets, scale, y, /*swiglu=*/false);
  zero_rows_past_experts(y, offsets);
  return y;
}

}  // namespace moge
