// fp16 instantiations of the grouped GEMM kernels (csrc/cuda/grouped_gemm.cuh); one file per dtype so
// that the build compiles them in parallel.
#include "grouped_gemm.cuh"

namespace moge {
namespace cuda {

cudaError_t launch_grouped_gemm_fp16(const GemmArgs& args, cudaStream_t stream) {
  return gemm::launch_tensor_core<__half>(args, stream);
}

}  // namespace cuda
}  // namespace moge
