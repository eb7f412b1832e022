// Device-side element loads and stores for the CUDA kernels: the accumulation
// type of each element type and the conversions (round to nearest even), plus
// the 16-byte packs used for vectorised loads.  Include from .cu files only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace memdisc {
namespace cuda {

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename Acc<scalar_t>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_type<scalar_t> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// z * (1/T) rounded on its own, never fused into the shift that follows (nvcc
// contracts a * b - c into an fma by default): the PyTorch reference rounds z / T
// before shifting, and the row's max element must shift to exactly 0.
__device__ __forceinline__ float scale(float z, float inv_t) { return __fmul_rn(z, inv_t); }
__device__ __forceinline__ double scale(double z, double inv_t) { return __dmul_rn(z, inv_t); }

// V elements loaded or stored as one 16-byte (or smaller) transaction.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// Elements per 16-byte pack.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// True when every pointer is 16-byte aligned and every row start (row_bytes apart) stays so.
__host__ __forceinline__ bool aligned16(int64_t row_bytes, const void* p0, const void* p1 = nullptr,
                                         const void* p2 = nullptr, const void* p3 = nullptr) {
  const auto off = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  return row_bytes % 16 == 0 && off(p0) == 0 && off(p1) == 0 && off(p2) == 0 && off(p3) == 0;
}

}  // namespace cuda
}  // namespace memdisc
