// grouped_permute on CPU: a stable counting sort of the T*K (token, slot) pairs by the given expert ids
// (bucket E: dropped slots, id -1, after every expert), then the copy of each hidden row to its K rows.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../moge.h"

namespace moge {

namespace {

template <typename Id>
void bucket_ids(const at::Tensor& topk_ids, int64_t E, std::vector<int32_t>& buckets) {
  auto ids = topk_ids.contiguous();
  const Id* p = ids.data_ptr<Id>();
  for (size_t i = 0; i < buckets.size(); ++i) {
    MOGE_CHECK_VALUE(p[i] >= -1 && p[i] < E, "topk_ids values must lie in [-1, num_experts=", E,
                      ") (-1: a dropped slot), got ", static_cast<int64_t>(p[i]));
    buckets[i] = p[i] < 0 ? static_cast<int32_t>(E) : static_cast<int32_t>(p[i]);
  }
}

}  // namespace

PermuteOutputs grouped_permute_cpu(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts) {
  check_permute_args(hidden, topk_ids, num_experts);
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), H = hidden.size(1), E = num_experts;
  std::vector<int32_t> buckets(T * K);                                 // expert of each slot, E if dropped
  if (topk_ids.scalar_type() == at::kLong) {
    bucket_ids<int64_t>(topk_ids, E, buckets);
  } else {
    bucket_ids<int32_t>(topk_ids, E, buckets);
  }

  auto int_options = hidden.options().dtype(at::kInt);
  auto expert_offsets = at::empty({E + 1}, int_options);                // [E+1] int32
  auto row_index = at::empty({T, K}, int_options);                      // [T, K] int32
  std::vector<int64_t> starts(E + 2, 0);                                // bucket starts, E+1 buckets
  for (int32_t b : buckets) starts[b + 1] += 1;
  for (int64_t e = 0; e <= E; ++e) starts[e + 1] += starts[e];
  int32_t* offsets_ptr = expert_offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e <= E; ++e) offsets_ptr[e] = static_cast<int32_t>(starts[e]);
  int32_t* row_ptr = row_index.data_ptr<int32_t>();
  for (int64_t i = 0; i < T * K; ++i) row_ptr[i] = static_cast<int32_t>(starts[buckets[i]]++);

  auto src = hidden.contiguous();
  auto permuted_hidden = at::empty({T * K, H}, src.options());          // [T*K, H]
  const int64_t row_bytes = H * static_cast<int64_t>(src.element_size());
  const char* src_ptr = static_cast<const char*>(src.data_ptr());
  char* dst_ptr = static_cast<char*>(permuted_hidden.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        char* dst = dst_ptr + row_ptr[t * K + k] * row_bytes;
        if (buckets[t * K + k] == E) {
          std::memset(dst, 0, row_bytes);   // a dropped slot's row is zero
        } else {
          std::memcpy(dst, src_ptr + t * row_bytes, row_bytes);
        }
      }
    }
  });
  return {permuted_hidden, expert_offsets, row_index};
}

}  // namespace moge
