// An empty Python module, so that the library setuptools builds as `model._cpu_kernels` also imports as one
// (tools that walk the package import every module). model/cpu_matmul.py loads it with ctypes for the
// FFI handlers in matmul.cc, attention.cc and greedy.cc.
#include <Python.h>

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                                 "Native CPU kernels (matmuls, attention, the greedy choice); see model/cpu_matmul.py.",
                                 -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__cpu_kernels() { return PyModule_Create(&module_def); }
