// Schemas of the private `moge_C` namespace: the C++ backends' entry points, one per public op with
// the same arguments (moge_kernels/ops.py holds the public `moge` schemas and routes to these).
// Loading this library as the Python module `moge_kernels._C` runs the registrations below.
#include <Python.h>
#include <torch/library.h>

#include "moge.h"

extern "C" {
// A module with no methods: importing it only has to load the library (no pybind surface).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(moge_C, m) {
  m.def(
      "grouped_dispatch(Tensor hidden, Tensor router_logits, int num_groups, int topk_per_group, "
      "Tensor? expert_scale, bool renormalize, int score_func, Tensor? expert_mask=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("grouped_permute(Tensor hidden, Tensor topk_ids, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor expert_offsets) -> Tensor");
  m.def("grouped_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor expert_offsets, Tensor? row_scale) -> Tensor");
  m.def("grouped_combine(Tensor expert_out, Tensor topk_weights, Tensor row_index, Tensor? shared_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(moge_C, CPU, m) {
  m.impl("grouped_dispatch", &moge::grouped_dispatch_cpu);
  m.impl("grouped_permute", &moge::grouped_permute_cpu);
  m.impl("grouped_gemm", &moge::grouped_gemm_cpu);
  m.impl("grouped_mlp", &moge::grouped_mlp_cpu);
  m.impl("grouped_combine", &moge::grouped_combine_cpu);
}
