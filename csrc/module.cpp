// The Python module stub of the CPU kernels (limited API: one abi3 build for every
// CPython >= 3.9). Importing structlik._C loads this library, whose static initialisers
// register each op's CPU kernel, in its own file, for the key CPU of torch.ops.structlik
// (STABLE_TORCH_LIBRARY_IMPL). The schemas are defined in Python (structlik/ops/_<op>.py),
// so the ops exist without this build; `offsets` is the stencil flattened as
// [dy0, dx0, dy1, dx1, ...] for images, and for a volume seen as its (B, K, D*H, W) tall view
// [-H, dz0, dy0, dx0, dz1, ...] (the slice height negated, then the triples: csrc/stencil.h's
// parse_offsets, structlik.Stencil.op_offsets). The NLL ops also take `bound` (0: the weights as
// given; in (0, 1): raw weights bounded inside the sweep, csrc/nll.cpp).
#include <Python.h>

#include "torch_api.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
