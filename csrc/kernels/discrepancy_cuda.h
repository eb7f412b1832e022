// Launchers of the CUDA discrepancy kernels (discrepancy.cu): raw pointers to
// contiguous row-major tensors on the current device, int64 sizes, the
// element type, and the stream to launch on.  They return cudaSuccess or the
// launch error (cudaGetLastError); cudaErrorInvalidValue for an unknown dtype.
// Formulas and byte model: discrepancy.cu.  acc_t below is double for
// DType::kFloat64 and float otherwise.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype_cuda.h"

namespace memdisc {
namespace cuda {

// current [B, C], snapshots [K, B, C] (dtype) -> kl [K, B], lse_current [B],
// lse_snapshots [K, B] (acc_t).  inv_t = 1 / temperature.  C >= 1.
cudaError_t discrepancy_forward(DType dtype, const void* current, const void* snapshots, int64_t K, int64_t B,
                                int64_t C, double inv_t, bool reverse, void* kl, void* lse_current,
                                void* lse_snapshots, cudaStream_t stream);

// grad_kl, kl, lse_snapshots [K, B] and lse_current [B] (acc_t); current [B, C],
// snapshots [K, B, C] (dtype) -> grad_current [B, C], grad_snapshots [K, B, C] (dtype).
cudaError_t discrepancy_backward(DType dtype, const void* grad_kl, const void* current, const void* snapshots,
                                 const void* lse_current, const void* lse_snapshots, const void* kl, int64_t K,
                                 int64_t B, int64_t C, double inv_t, bool reverse, void* grad_current,
                                 void* grad_snapshots, cudaStream_t stream);

}  // namespace cuda
}  // namespace memdisc
