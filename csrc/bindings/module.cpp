// The Python module memdisc._C.  Loading it runs the TORCH_LIBRARY_IMPL
// registrations of the kernels (the op schemas live in memdisc/ops/library.py);
// its two Python functions, bound with pybind11 as torch extensions do, say what
// was built:
//   build_info(): "torch=<version>;cxx=<__cplusplus>;cuda=0", or with CUDA
//     "...;cuda=1;cuda_cxx=<nvcc's __cplusplus>;cudart=<CUDART_VERSION>;
//     cuda_arch=<compute capabilities, e.g. 800,900>";
//   cpu_isa(): the instruction set the CPU kernels run with ("avx512", "avx2" or
//     "default"), picked once per process and capped by MEMDISC_CPU_ISA.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "kernels/simd_cpu.h"

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

std::string cpu_isa() { return memdisc::cpu::isa_name(memdisc::cpu::cpu_isa()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memdisc compiled kernels (registered with torch.ops.memdisc on import)";
  m.def("build_info", &build_info, "What the extension was compiled with (see csrc/bindings/module.cpp)");
  m.def("cpu_isa", &cpu_isa, "The instruction set of the CPU kernels: avx512, avx2 or default");
}
