// The op schemas of structlik (namespace torch.ops.structlik_cpu) and the Python
// module stub (limited API: one abi3 build for every CPython >= 3.9).
// Importing structlik._C loads this library, whose static
// initialisers register the schemas here and the CPU kernels in each op's file.
// `offsets` is the stencil flattened as [dy0, dx0, dy1, dx1, ...].
#include <Python.h>

#include "torch_api.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(structlik_cpu, m) {
  m.def("apply_upper(Tensor r, Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("apply_upper_t(Tensor y, Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("solve_upper(Tensor z, Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("solve_upper_t(Tensor g, Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("weight_grad(Tensor a, Tensor b, int[] offsets) -> Tensor");
  m.def("precision_diagonal(Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("nll(Tensor x, Tensor loc, Tensor log_diag, Tensor off_diag, int[] offsets) -> Tensor");
  m.def("nll_backward(Tensor grad, Tensor x, Tensor loc, Tensor log_diag, Tensor off_diag, int[] offsets)"
        " -> (Tensor, Tensor, Tensor)");
  // loc, log_diag and off_diag as adjacent channel slices of one decoder head, from channel c0
  m.def("nll_head(Tensor x, Tensor head, int c0, int[] offsets) -> Tensor");
  m.def("nll_head_backward(Tensor grad, Tensor x, Tensor head, int c0, int[] offsets) -> Tensor");
  // z ~ N(0, I) of the given size for sampling, from a seed drawn from torch's generator
  m.def("standard_normal(int[] size, int seed, ScalarType dtype) -> Tensor");
  m.def("nll_basis(Tensor x, Tensor loc, Tensor log_diag, Tensor coeffs, Tensor basis, int[] offsets) -> Tensor");
  m.def("nll_basis_backward(Tensor grad, Tensor x, Tensor loc, Tensor log_diag, Tensor coeffs, Tensor basis,"
        " int[] offsets) -> (Tensor, Tensor, Tensor, Tensor)");
}
