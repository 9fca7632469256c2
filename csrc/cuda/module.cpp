// The `moge_kernels._cuda_C` extension: registers the CUDA kernels (csrc/cuda/) as the CUDA
// implementations of the private `moge_C` ops, whose schemas live in csrc/registration.cpp (`_C`).
// moge_kernels/_cuda.py imports `_C` first, then this module, and exposes the kernels as the "cuda"
// backend.
#include <Python.h>
#include <torch/library.h>

#include "../moge.h"

extern "C" {
// A module with no methods: importing it only has to load the library (no pybind surface).
PyObject* PyInit__cuda_C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_IMPL(moge_C, CUDA, m) {
  m.impl("grouped_dispatch", &moge::grouped_dispatch_cuda);
  m.impl("grouped_permute", &moge::grouped_permute_cuda);
  m.impl("grouped_gemm", &moge::grouped_gemm_cuda);
  m.impl("grouped_mlp", &moge::grouped_mlp_cuda);
  m.impl("grouped_combine", &moge::grouped_combine_cuda);
}
