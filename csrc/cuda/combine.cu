// grouped_combine on CUDA: a gather, no atomics. Block (t, column chunk) reads the K expert rows of
// token t, row_index[t, k], and accumulates w[t,k] * row in fp32 in slot order k = 0..K-1, then adds
// shared_out[t] and rounds once to the output dtype.
//
// The multiply and the add are rounded separately (__fmul_rn / __fadd_rn, no FMA contraction), as the
// eager reference does them, so the fp32 sums match the reference's bit for bit.
#include "common.cuh"

namespace moge {
namespace cuda {

namespace {

constexpr int kCombineThreads = 128;
// Rows loaded before the first accumulate: the K = 8 of Pangu in one batch of independent loads.
constexpr int kRowBatch = 8;

template <typename scalar_t, typename shared_t, int VEC>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const CombineArgs p) {
  const int64_t t = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x) * VEC;
  if (col >= p.H) return;
  using row_vec = Vec<scalar_t, VEC>;
  const scalar_t* rows = static_cast<const scalar_t*>(p.expert_out);
  const int32_t* row_index = p.row_index + t * p.K;
  const float* weights = p.topk_weights + t * p.K;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  for (int k0 = 0; k0 < p.K; k0 += kRowBatch) {
    row_vec v[kRowBatch];
    float w[kRowBatch];
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      if (k0 + j < p.K) {
        w[j] = weights[k0 + j];
        v[j] = *reinterpret_cast<const row_vec*>(rows + static_cast<int64_t>(row_index[k0 + j]) * p.H + col);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowBatch; ++j) {
      if (k0 + j < p.K) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[j], to_float(v[j].v[i])));
      }
    }
  }
  if (p.shared_out != nullptr) {
    const auto s = *reinterpret_cast<const Vec<shared_t, VEC>*>(static_cast<const shared_t*>(p.shared_out) +
                                                                 t * p.H + col);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], to_float(s.v[i]));
  }
  row_vec out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = from_float<scalar_t>(acc[i]);
  *reinterpret_cast<row_vec*>(static_cast<scalar_t*>(p.out) + t * p.H + col) = out;
}

template <typename scalar_t, typename shared_t, int VEC>
cudaError_t launch_combine_vec(const CombineArgs& p, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div(ceil_div(p.H, VEC), kCombineThreads);
  if (col_blocks > 65535 || p.T > 2147483647) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>(col_blocks));
  combine_kernel<scalar_t, shared_t, VEC><<<grid, kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename scalar_t, typename shared_t>
cudaError_t launch_combine_typed(const CombineArgs& p, cudaStream_t stream) {
  // 16-byte rows of expert_out / out (8 bf16, 4 fp32) when H and every base address allow it.
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool vec_ok = p.H % VEC == 0 && aligned(p.expert_out, 16) && aligned(p.out, 16) &&
                      (p.shared_out == nullptr || aligned(p.shared_out, sizeof(shared_t) * VEC));
  if (vec_ok) return launch_combine_vec<scalar_t, shared_t, VEC>(p, stream);
  return launch_combine_vec<scalar_t, shared_t, 1>(p, stream);
}

template <typename scalar_t>
cudaError_t launch_combine_dtype(const CombineArgs& p, cudaStream_t stream) {
  if (p.shared_out != nullptr && p.shared_is_fp32) return launch_combine_typed<scalar_t, float>(p, stream);
  return launch_combine_typed<scalar_t, scalar_t>(p, stream);
}

}  // namespace

cudaError_t launch_grouped_combine(const CombineArgs& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_combine_dtype<float>(p, stream);
    case DType::kFloat16: return launch_combine_dtype<__half>(p, stream);
    case DType::kBFloat16: return launch_combine_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moge
