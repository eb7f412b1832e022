// The Python module memdisc._C: importing it runs the TORCH_LIBRARY_IMPL
// registrations of the kernels.  It also defines memdisc::build_info, the
// trivial op that proves the extension path end to end.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace {
std::string build_info() {
  std::string info = "torch=" TORCH_VERSION;
#ifdef MEMDISC_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  return info;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(memdisc, m) { m.def("build_info() -> str", &build_info); }

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "memdisc compiled kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
