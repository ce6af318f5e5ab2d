// Python entry point of fastmod._C.  The ops register themselves with the
// dispatcher (TORCH_LIBRARY_FRAGMENT in csrc/<op>/<op>.cpp); importing this
// module from Python only has to load the shared library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastmod's compiled ops; call them through fastmod.ops.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

#include <torch/library.h>

// Lets Python ask whether the CUDA sources were compiled in.
static bool cuda_compiled() {
#ifdef FASTMOD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(fastmod, m) {
  m.def("cuda_compiled() -> bool", &cuda_compiled);
}
