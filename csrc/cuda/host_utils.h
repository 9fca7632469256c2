// Small helpers of the ATen glue (csrc/cuda/*_host.cpp).
#pragma once

#include <ATen/ATen.h>

#include "../moge.h"
#include "kernels.h"

namespace moge {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  MOGE_CHECK_TYPE(false, "expected a float32, float16 or bfloat16 tensor, got ", t.scalar_type());
  return cuda::DType::kFloat32;
}

}  // namespace moge
