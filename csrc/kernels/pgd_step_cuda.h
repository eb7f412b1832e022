// Launcher of the fused in-place PGD step (pgd_step.cu): raw pointers to
// contiguous [B, D] tensors on the current device, int64 sizes, the element
// type and the stream.  Returns cudaSuccess or the launch error
// (cudaGetLastError); cudaErrorInvalidValue for an unknown dtype.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype_cuda.h"

namespace memdisc {
namespace cuda {

// x [B, D] in place from g [B, D] and x0 [B, D]; active [B] or nullptr (all rows).
// step, eps, lo, hi are rounded to the accumulation type as on the CPU.
cudaError_t pgd_step(DType dtype, void* x, const void* g, const void* x0, const bool* active, int64_t B, int64_t D,
                     double step, double eps, double lo, double hi, bool descent, cudaStream_t stream);

}  // namespace cuda
}  // namespace memdisc
