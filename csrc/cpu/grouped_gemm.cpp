// grouped_gemm / grouped_mlp on CPU: one ATen matmul per expert slice of the expert-sorted rows.
// ATen's CPU matmul parallelises inside each product, so the expert loop itself stays sequential.
#include <ATen/ops/silu.h>

#include "../moge.h"

namespace moge {

namespace {

// Host copy of expert_offsets, checked: starts at 0, non-decreasing, ends at most at num_rows (rows past
// offsets[E] belong to no expert: grouped_permute's dropped slots).
std::vector<int64_t> read_offsets(const at::Tensor& expert_offsets, int64_t num_rows) {
  auto offsets = expert_offsets.to(at::kLong).contiguous();
  const int64_t* p = offsets.data_ptr<int64_t>();
  std::vector<int64_t> bounds(p, p + offsets.numel());
  MOGE_CHECK_VALUE(bounds.front() == 0 && bounds.back() >= 0 && bounds.back() <= num_rows,
                    "expert_offsets must start at 0 and end at most at the row count ", num_rows);
  for (size_t e = 1; e < bounds.size(); ++e) {
    MOGE_CHECK_VALUE(bounds[e] >= bounds[e - 1], "expert_offsets must be non-decreasing");
  }
  return bounds;
}

// Rows of no expert, [offsets[E], M), are zero in every output.
void zero_rows_past_experts(at::Tensor& y, const std::vector<int64_t>& bounds) {
  if (bounds.back() < y.size(0)) y.narrow(0, bounds.back(), y.size(0) - bounds.back()).zero_();
}

}  // namespace

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  check_gemm_args(x, w, expert_offsets);
  auto bounds = read_offsets(expert_offsets, x.size(0));
  auto y = at::empty({x.size(0), w.size(1)}, x.options());         // [M, N]
  for (int64_t e = 0; e < w.size(0); ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) continue;
    auto y_e = y.narrow(0, bounds[e], rows);
    at::mm_out(y_e, x.narrow(0, bounds[e], rows), w[e].t());
  }
  zero_rows_past_experts(y, bounds);
  return y;
}

at::Tensor grouped_mlp_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           const at::Tensor& expert_offsets, const std::optional<at::Tensor>& row_scale) {
  check_gemm_args(x, w_gate_up, expert_offsets);
  MOGE_CHECK_VALUE(w_down.dim() == 3 && w_down.size(0) == w_gate_up.size(0) &&
                        w_down.size(1) == x.size(1) && 2 * w_down.size(2) == w_gate_up.size(1) &&
                        w_down.scalar_type() == x.scalar_type() && w_down.device() == x.device(),
                    "w_down must be [E, H, I] with x's dtype, given w_gate_up [E, 2I, H]");
  if (row_scale.has_value()) {
    MOGE_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == x.size(0) && row_scale->device() == x.device(),
                      "row_scale must be a tensor of shape [M] on x's device");
  }
  auto bounds = read_offsets(expert_offsets, x.size(0));
  const int64_t I = w_down.size(2);
  auto y = at::empty({x.size(0), w_down.size(1)}, x.options());    // [M, H]
  for (int64_t e = 0; e < w_gate_up.size(0); ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) continue;
    auto gate_up = at::mm(x.narrow(0, bounds[e], rows), w_gate_up[e].t()).to(at::kFloat);  // [rows, 2I]
    auto h = (at::silu(gate_up.narrow(1, 0, I)) * gate_up.narrow(1, I, I)).to(x.scalar_type());
    auto y_e = y.narrow(0, bounds[e], rows);
    at::mm_out(y_e, h, w_down[e].t());
    if (row_scale.has_value()) {
      auto scale = row_scale->narrow(0, bounds[e], rows).to(at::kFloat).unsqueeze(1);
      y_e.copy_(y_e.to(at::kFloat) * scale);
    }
  }
  zero_rows_past_experts(y, bounds);
  return y;
}

}  // namespace moge
