// grouped_combine on CPU: each token gathers its K expert rows, accumulates in fp32 in slot order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../moge.h"

namespace moge {

at::Tensor grouped_combine_cpu(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                               const at::Tensor& row_index, const std::optional<at::Tensor>& shared_out) {
  check_combine_args(expert_out, topk_weights, row_index, shared_out);
  const int64_t T = row_index.size(0), K = row_index.size(1), H = expert_out.size(1);
  const int64_t R = expert_out.size(0);
  auto rows = expert_out.contiguous();                            // [T*K, H]
  auto weights = topk_weights.to(at::kFloat).contiguous();        // [T, K] fp32
  auto index = row_index.contiguous();                            // [T, K] int32
  at::Tensor shared;                                              // [T, H] fp32
  if (shared_out.has_value()) shared = shared_out->to(at::kFloat).contiguous();
  auto out = at::empty({T, H}, rows.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "grouped_combine_cpu", [&] {
    const scalar_t* rows_ptr = rows.data_ptr<scalar_t>();
    const float* w_ptr = weights.data_ptr<float>();
    const int32_t* idx_ptr = index.data_ptr<int32_t>();
    const float* shared_ptr = shared.defined() ? shared.data_ptr<float>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = idx_ptr[t * K + k];
          MOGE_CHECK_VALUE(r >= 0 && r < R, "row_index[", t, ", ", k, "]=", r, " is outside [0, ", R, ")");
          const float w = w_ptr[t * K + k];
          const scalar_t* row = rows_ptr + r * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += w * static_cast<float>(row[h]);
        }
        if (shared_ptr != nullptr) {
          for (int64_t h = 0; h < H; ++h) acc[h] += shared_ptr[t * H + h];
        }
        for (int64_t h = 0; h < H; ++h) out_ptr[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

}  // namespace moge
