// Registers the Ascend kernels for the NPU (torch_npu's PrivateUse1 dispatch key) under the moge_C schemas,
// which moge_kernels._C defines (csrc/registration.cpp); moge_kernels/ascend/__init__.py loads that first.
// Loading this library as the Python module `moge_kernels._ascend_C` runs the registration.
#include <Python.h>
#include <torch/library.h>

#include "ascend.h"

extern "C" {
// A module with no methods: importing it only has to load the library (no pybind surface).
PyObject* PyInit__ascend_C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_ascend_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_IMPL(moge_C, PrivateUse1, m) {
  m.impl("grouped_dispatch", &moge::grouped_dispatch_npu);
  m.impl("grouped_gemm", &moge::grouped_gemm_npu);
  m.impl("grouped_mlp", &moge::grouped_mlp_npu);
  m.impl("grouped_combine", &moge::grouped_combine_npu);
}
