// The Python module memdisc._C: importing it runs the TORCH_LIBRARY_IMPL
// registrations of the kernels.  It also defines memdisc::build_info, the
// trivial op that proves the extension path end to end and says what the
// extension was compiled with: "torch=<version>;cxx=<__cplusplus>;cuda=0", or
// with CUDA "...;cuda=1;cuda_cxx=<nvcc's __cplusplus>;cudart=<CUDART_VERSION>;
// cuda_arch=<compute capabilities, e.g. 800,900>".
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifdef MEMDISC_WITH_CUDA
namespace memdisc {
std::string cuda_build_info();  // kernels/build_info.cu
}
#endif

namespace {
std::string build_info() {
  std::string info = "torch=" TORCH_VERSION ";cxx=" + std::to_string(__cplusplus);
#ifdef MEMDISC_WITH_CUDA
  info += ";cuda=1;" + memdisc::cuda_build_info();
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
