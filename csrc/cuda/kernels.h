// Launchers of the CUDA kernels in csrc/cuda/*.cu, called by the ATen glue in csrc/cuda/*_host.cpp.
//
// Plain pointers and sizes only: the .cu files include no ATen header, so they compile in seconds and
// also on a box whose torch is a CPU build (tests/test_cuda_compile.py compiles them there). Every
// launcher runs on the given stream, never synchronises, and returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../score_func.h"

namespace moge {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ----------------------------------------------------------------------------- grouped_dispatch
struct DispatchArgs {
  const void* logits;            // [T, E] router logits, any strides
  DType logits_dtype;
  int64_t logits_stride_t, logits_stride_e;  // in elements
  const float* expert_scale;     // [E] fp32, or nullptr
  const bool* expert_mask;       // [E] bool (true = may be chosen), or nullptr
  const void* hidden;            // [T, H] rows of row_bytes contiguous bytes, hidden_stride_bytes apart
  int64_t hidden_stride_bytes;
  int64_t row_bytes;             // H * element size
  void* permuted_hidden;         // [T*K, H] out, contiguous
  float* topk_weights;           // [T, K] fp32 out
  int32_t* topk_ids;             // [T, K] int32 out
  int32_t* expert_offsets;       // [E+1] int32 out
  int32_t* row_index;            // [T, K] int32 out
  int32_t* workspace;            // dispatch_workspace_ints(T, K, E) int32 scratch
  int64_t T;                     // >= 1; T * K <= INT32_MAX (checked by the caller)
  int E, G, k_g;
  int score_func;                // a ScoreFunc value (csrc/score_func.h): dispatch_has_score_func
  bool renormalize;
};
// Whether the routing kernel has a branch for score_func; launch_grouped_dispatch refuses the others.
bool dispatch_has_score_func(int score_func);
int64_t dispatch_workspace_ints(int64_t T, int K, int E);
// Dynamic shared memory the routing kernel needs; the caller rejects E too large for the device.
int64_t dispatch_route_smem_bytes(int E, int K);
cudaError_t launch_grouped_dispatch(const DispatchArgs& args, cudaStream_t stream);

// ----------------------------------------------------------------------------- grouped_permute
struct PermuteArgs {
  const void* hidden;            // [T, H] rows of row_bytes contiguous bytes, hidden_stride_bytes apart
  int64_t hidden_stride_bytes;
  int64_t row_bytes;             // H * element size
  const void* topk_ids;          // [T, K] int32 or int64, strides in elements
  bool ids_are_int64;
  int64_t ids_stride_t, ids_stride_k;
  void* permuted_hidden;         // [T*K, H] out, contiguous
  int32_t* expert_offsets;       // [E+1] int32 out
  int32_t* row_index;            // [T, K] int32 out, contiguous
  int32_t* workspace;            // permute_workspace_ints(T, K, E) int32 scratch
  int64_t T;                     // >= 1; T * K <= INT32_MAX (checked by the caller)
  int K, E;                      // K >= 1; permute_smem_bytes(E) <= 48 KB (checked by the caller)
};
int64_t permute_workspace_ints(int64_t T, int K, int E);
int64_t permute_smem_bytes(int E);
cudaError_t launch_grouped_permute(const PermuteArgs& args, cudaStream_t stream);
// Zeros in rows [*rows_end, M) of y [M, row_bytes] (contiguous): the rows of no expert, past
// expert_offsets[E], of a grouped GEMM's output. rows_end is device memory (no host read).
cudaError_t launch_zero_rows_past_experts(void* y, int64_t row_bytes, const int32_t* rows_end, int64_t M,
                                          cudaStream_t stream);

// ----------------------------------------------------------------------------- grouped_combine
struct CombineArgs {
  const void* expert_out;        // [T*K, H] contiguous, dtype
  DType dtype;
  const float* topk_weights;     // [T, K] fp32 contiguous
  const int32_t* row_index;      // [T, K] int32 contiguous
  const void* shared_out;        // [T, H] contiguous in dtype (or fp32 when shared_is_fp32), or nullptr
  bool shared_is_fp32;
  void* out;                     // [T, H] contiguous, dtype
  int64_t T, H;                  // T >= 1, H >= 1
  int K;
};
cudaError_t launch_grouped_combine(const CombineArgs& args, cudaStream_t stream);

// ----------------------------------------------------------------------------- grouped_gemm / mlp
struct GemmArgs {
  const void* x;                 // [M, Kd] contiguous, dtype
  const void* w;                 // [E, N_w, Kd] contiguous, dtype (nn.Linear layout)
  const int32_t* expert_offsets; // [E+1] int32: rows of expert e are [offsets[e], offsets[e+1])
  const float* row_scale;        // [M] fp32 multiplies each output row, or nullptr
  void* y;                       // [M, N_out] contiguous, dtype
  DType dtype;
  int64_t M, Kd, N_w;            // M >= 1
  int E;
  // false: y = x w[e]^T (N_out = N_w). true: the SwiGLU gate_up product, w[e] = [gate (I rows); up (I
  // rows)], y = silu(x gate^T) * (x up^T) with N_out = I = N_w / 2, gate and up never leave registers.
  bool swiglu;
};
cudaError_t launch_grouped_gemm(const GemmArgs& args, cudaStream_t stream);

// The tile of the many-rows case: option cuda_gemm_tile (MOGE_CUDA_GEMM_TILE) of moge_kernels/options.py,
// which passes it here through moge_cuda_set_gemm_tile (grouped_gemm_sm90.cu) whenever it changes; read
// at every launch, so a benchmark or a test can switch it between calls (a CUDA graph keeps the tile it
// was captured with). kAuto: the Hopper wgmma kernel where it runs (an sm_90 device and a 9.0a build),
// else the mma.sync BigTile; kBig: the mma.sync BigTile.
enum class BigVariant : int { kAuto = 0, kBig = 1 };
struct GemmTileChoice {
  BigVariant variant;
  int sm90_width;     // SwiGLU wgmma tile width: 96 or 128 columns; 0: 96 when it divides I and 128 does not
};
GemmTileChoice gemm_tile_choice();

// Per-dtype launchers (csrc/cuda/grouped_gemm_{bf16,fp16,fp32}.cu), selected by launch_grouped_gemm.
cudaError_t launch_grouped_gemm_bf16(const GemmArgs& args, cudaStream_t stream);
cudaError_t launch_grouped_gemm_fp16(const GemmArgs& args, cudaStream_t stream);
cudaError_t launch_grouped_gemm_fp32(const GemmArgs& args, cudaStream_t stream);
// Hopper wgmma kernel (csrc/cuda/grouped_gemm_sm90.cu) for bf16 / fp16: cudaErrorNotSupported when it
// cannot run here (not an sm_90 device, a build without the 9.0a target, unaligned or odd-sized operands).
cudaError_t launch_grouped_gemm_sm90(const GemmArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace moge
