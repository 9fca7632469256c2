// bf16 instantiations of the grouped GEMM kernels (csrc/cuda/grouped_gemm.cuh); one file per dtype so
// that the build compiles them in parallel.
#include "grouped_gemm.cuh"

namespace moge {
namespace cuda {

cudaError_t launch_grouped_gemm_bf16(const GemmArgs& args, cudaStream_t stream) {
  return gemm::launch_tensor_core<__nv_bfloat16>(args, stream);
}

}  // namespace cuda
}  // namespace moge
