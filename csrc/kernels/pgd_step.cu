// Fused PGD step, in place: CUDA kernel (torch-free).
//
//   x <- clip_[lo,hi]( clip_[x0 - eps, x0 + eps]( x - dir * step * sign(g) ) )
//   dir = +1 for descent (the DSC correction), -1 for ascent (an attack);
//   sign(0) = sign(NaN) = 0 (as torch.sign); rows whose active flag is 0 are
//   neither read nor written.
// Non-finite values as pgd_step_cpu.h and the PyTorch reference: a NaN in x or
// x0 makes that element NaN (NaN-propagating ball clamp, like torch.maximum /
// minimum), a NaN gradient only projects; +-inf go through the clamps.
// Shapes: x, g, x0 are [B, D] (D = product of the per-sample dims);
// active is [B] (bool) or null for "all rows active".
// Arithmetic in acc_t, rounded once per intermediate exactly as pgd_step_cpu.h
// and the PyTorch reference round it (x - step*s, x0 - eps, x0 + eps, then the
// clamps), so the float32 result is bit-equal to both.  step * s is exact
// (s in {-1, 0, 1}), so a contracted fma(-step, s, x) rounds like x - step*s.
// One thread per element, or per 16-byte pack when D and the pointers allow;
// grid-stride loop, int64 indices.
//
// Byte model per call: read 3·B·D·s (x, g, x0) + B (active), write B·D·s (x)
// for active rows -> 4·B·D·s bytes at full activity.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/pgd_step_cuda.h"
#include "kernels/scalar_cuda.h"

namespace memdisc {
namespace cuda {
namespace {

constexpr int kThreads = 256;                     // threads per block
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond this the grid strides

// max(v, b) and min(v, b) that return NaN when either is NaN (torch.maximum/minimum).
template <typename T>
__device__ __forceinline__ T max_nan(T v, T b) { return (v < b || b != b) ? b : v; }
template <typename T>
__device__ __forceinline__ T min_nan(T v, T b) { return (v > b || b != b) ? b : v; }

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    pgd_step_kernel(scalar_t* __restrict__ x,          // [B, D] in/out
                    const scalar_t* __restrict__ g,    // [B, D]
                    const scalar_t* __restrict__ x0,   // [B, D]
                    const bool* __restrict__ active,   // [B] or nullptr
                    int64_t B, int64_t D, acc_type<scalar_t> signed_step, acc_type<scalar_t> eps,
                    acc_type<scalar_t> lo, acc_type<scalar_t> hi) {
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  const int64_t packs_per_row = D / V;
  const int64_t packs = B * packs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  P* xp = reinterpret_cast<P*>(x);
  const P* gp = reinterpret_cast<const P*>(g);
  const P* x0p = reinterpret_cast<const P*>(x0);
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < packs; u += stride) {
    if (active != nullptr && !active[u / packs_per_row]) continue;
    const P gv = gp[u], x0v = x0p[u];
    P xv = xp[u];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const acc_t gf = to_acc(gv.v[e]);
      const acc_t s = static_cast<acc_t>((gf > 0) - (gf < 0));
      acc_t v = to_acc(from_acc<scalar_t>(to_acc(xv.v[e]) - signed_step * s));
      const acc_t x0f = to_acc(x0v.v[e]);
      const acc_t low = to_acc(from_acc<scalar_t>(x0f - eps));
      const acc_t high = to_acc(from_acc<scalar_t>(x0f + eps));
      v = min_nan(max_nan(v, low), high);
      v = v < lo ? lo : v;  // lo, hi are finite: a NaN v stays NaN
      v = v > hi ? hi : v;
      xv.v[e] = from_acc<scalar_t>(v);
    }
    xp[u] = xv;
  }
}

template <typename scalar_t>
void launch(void* x, const void* g, const void* x0, const bool* active, int64_t B, int64_t D, double step,
            double eps, double lo, double hi, bool descent, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = pack_width<scalar_t>();
  const bool packed = aligned16(D * static_cast<int64_t>(sizeof(scalar_t)), x, g, x0);
  const int64_t units = packed ? B * (D / V) : B * D;
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  const auto grid = static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  const acc_t signed_step = descent ? static_cast<acc_t>(step) : -static_cast<acc_t>(step);
  auto* xs = static_cast<scalar_t*>(x);
  const auto* gs = static_cast<const scalar_t*>(g);
  const auto* x0s = static_cast<const scalar_t*>(x0);
  if (packed) {
    pgd_step_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
        xs, gs, x0s, active, B, D, signed_step, static_cast<acc_t>(eps), static_cast<acc_t>(lo),
        static_cast<acc_t>(hi));
  } else {
    pgd_step_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
        xs, gs, x0s, active, B, D, signed_step, static_cast<acc_t>(eps), static_cast<acc_t>(lo),
        static_cast<acc_t>(hi));
  }
}

}  // namespace

cudaError_t pgd_step(DType dtype, void* x, const void* g, const void* x0, const bool* active, int64_t B, int64_t D,
                     double step, double eps, double lo, double hi, bool descent, cudaStream_t stream) {
  if (B < 0 || D < 0) return cudaErrorInvalidValue;
  if (B == 0 || D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      launch<float>(x, g, x0, active, B, D, step, eps, lo, hi, descent, stream);
      break;
    case DType::kFloat64:
      launch<double>(x, g, x0, active, B, D, step, eps, lo, hi, descent, stream);
      break;
    case DType::kFloat16:
      launch<__half>(x, g, x0, active, B, D, step, eps, lo, hi, descent, stream);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(x, g, x0, active, B, D, step, eps, lo, hi, descent, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memdisc
