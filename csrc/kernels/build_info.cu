// What nvcc compiled the CUDA kernels with, for memdisc::build_info (module.cpp):
// its C++ standard, the CUDA runtime headers' version and the architectures of
// this build (nvcc defines __CUDA_ARCH_LIST__ on the host pass too, e.g. 800,900).
#include <cuda_runtime_api.h>

#include <string>

#define MEMDISC_STR_(...) #__VA_ARGS__
#define MEMDISC_STR(...) MEMDISC_STR_(__VA_ARGS__)

namespace memdisc {

std::string cuda_build_info() {
  std::string info = "cuda_cxx=" + std::to_string(__cplusplus) + ";cudart=" + std::to_string(CUDART_VERSION);
#ifdef __CUDA_ARCH_LIST__
  info += ";cuda_arch=" MEMDISC_STR(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace memdisc
