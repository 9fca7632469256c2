// grouped_gemm / grouped_mlp on CPU: one ATen matmul per expert slice of the expert-sorted rows, or, when
// most experts have a few rows each (decode), one batched matmul over every expert's rows padded to the
// largest slice: a small matmul costs the BLAS call tens of microseconds, which E calls then pay E times
// (bench/results/cpu_batched_gemm.txt). ATen's CPU matmul parallelises inside each product, so the expert
// loop itself stays sequential.
#include <algorithm>

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

// The batched path: at most this many rows in every expert's slice, and at least half the experts with
// rows (the batch reads every expert's weights).
constexpr int64_t kMaxBatchedRows = 32;

// Every expert's rows as one [E, R, *] batch, R the largest slice: gather[e*R + r] is row bounds[e] + r
// of the sorted rows, or the zero row M past the slice; scatter[m] is the batch row of sorted row m.
struct Batch {
  int64_t rows = 0;          // R
  at::Tensor gather;         // [E*R] int64
  at::Tensor scatter;        // [offsets[E]] int64
};

std::optional<Batch> plan_batch(const std::vector<int64_t>& bounds) {
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  int64_t max_rows = 0, active = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    max_rows = std::max(max_rows, rows);
    active += rows > 0;
  }
  if (max_rows == 0 || max_rows > kMaxBatchedRows || 2 * active < E) return std::nullopt;
  Batch batch;
  batch.rows = max_rows;
  batch.gather = at::empty({E * max_rows}, at::kLong);
  batch.scatter = at::empty({bounds.back()}, at::kLong);
  int64_t* gather = batch.gather.data_ptr<int64_t>();
  int64_t* scatter = batch.scatter.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = 0; r < max_rows; ++r) {
      const int64_t row = bounds[e] + r;
      const bool in_slice = row < bounds[e + 1];
      gather[e * max_rows + r] = in_slice ? row : bounds.back();
      if (in_slice) scatter[row] = e * max_rows + r;
    }
  }
  return batch;
}

// x's sorted rows as the [E, R, K] batch (padding rows zero).
at::Tensor gather_batch(const at::Tensor& x, const Batch& batch, int64_t num_rows) {
  const int64_t E = batch.gather.size(0) / batch.rows;
  auto padded = at::cat({x.narrow(0, 0, num_rows), at::zeros({1, x.size(1)}, x.options())});
  return padded.index_select(0, batch.gather).view({E, batch.rows, x.size(1)});
}

// out's rows [0, offsets[E]) from the [E, R, N] batch result.
void scatter_batch(at::Tensor& out, const at::Tensor& batched, const Batch& batch) {
  const int64_t n = batch.scatter.size(0);
  out.narrow(0, 0, n).copy_(batched.reshape({-1, batched.size(2)}).index_select(0, batch.scatter));
}

// [E, R, 2I] gate_up -> silu(gate) * up in float32, rounded to dtype (the per-expert path's rule).
at::Tensor swiglu_rows(const at::Tensor& gate_up, int64_t I, at::ScalarType dtype) {
  auto g = gate_up.to(at::kFloat);
  return (at::silu(g.narrow(-1, 0, I)) * g.narrow(-1, I, I)).to(dtype);
}

}  // namespace

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  check_gemm_args(x, w, expert_offsets);
  auto bounds = read_offsets(expert_offsets, x.size(0));
  auto y = at::empty({x.size(0), w.size(1)}, x.options());         // [M, N]
  if (auto batch = plan_batch(bounds)) {
    auto xb = gather_batch(x, *batch, bounds.back());              // [E, R, K]
    scatter_batch(y, at::bmm(xb, w.transpose(1, 2)), *batch);      // [E, R, N] -> rows of y
    zero_rows_past_experts(y, bounds);
    return y;
  }
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
  if (auto batch = plan_batch(bounds)) {
    auto xb = gather_batch(x, *batch, bounds.back());                                  // [E, R, H]
    auto h = swiglu_rows(at::bmm(xb, w_gate_up.transpose(1, 2)), I, x.scalar_type());  // [E, R, I]
    scatter_batch(y, at::bmm(h, w_down.transpose(1, 2)), *batch);                     // [E, R, H]
    if (row_scale.has_value()) {
      const int64_t n = bounds.back();
      auto y_kept = y.narrow(0, 0, n);
      y_kept.copy_(y_kept.to(at::kFloat) * row_scale->narrow(0, 0, n).to(at::kFloat).unsqueeze(1));
    }
    zero_rows_past_experts(y, bounds);
    return y;
  }
  for (int64_t e = 0; e < w_gate_up.size(0); ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) continue;
    auto h = swiglu_rows(at::mm(x.narrow(0, bounds[e], rows), w_gate_up[e].t()), I, x.scalar_type());
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
