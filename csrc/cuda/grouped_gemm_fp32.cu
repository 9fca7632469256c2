// fp32 grouped GEMM: the SIMT kernel of csrc/cuda/grouped_gemm.cuh (plain fp32 FMAs, no TF32, so it is
// as exact as torch's default fp32 matmul).
#include "grouped_gemm.cuh"

namespace moge {
namespace cuda {

cudaError_t launch_grouped_gemm_fp32(const GemmArgs& args, cudaStream_t stream) {
  return gemm::launch_simt_any<float>(args, stream);
}

cudaError_t launch_grouped_gemm(const GemmArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return launch_grouped_gemm_fp32(args, stream);
    case DType::kFloat16: return launch_grouped_gemm_fp16(args, stream);
    case DType::kBFloat16: return launch_grouped_gemm_bf16(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moge
