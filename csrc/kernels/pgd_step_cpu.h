// Fused PGD step, in place: CPU kernel (torch-free).
//
//   x <- clip_[lo,hi]( clip_[x0 - eps, x0 + eps]( x - dir * step * sign(g) ) )
//   dir = +1 for descent (the DSC correction), -1 for ascent (an attack);
//   sign(0) = sign(NaN) = 0 (as torch.sign); rows whose active flag is 0 are left
//   bit-for-bit unchanged.
// Non-finite values, as the PyTorch reference: a NaN in x or x0 makes that
// element NaN (the ball clamp propagates NaN like torch.maximum/minimum, the box
// clamp like torch.clamp); a NaN gradient moves nothing (sign 0), the element is
// only projected; +-inf go through the clamps (x0 = +inf gives hi).
// Shapes: x, g, x0 are [B, D] (D = product of the per-sample dims);
// active is [B] (bool) or null for "all rows active".
// Arithmetic in acc_t, rounded once per intermediate exactly as the PyTorch
// reference rounds it (x - step*s, x0 - eps, x0 + eps, then the clamps), so the
// float32 result is bit-equal to the reference.  The inner loop is branch-free
// (the sign as a difference of two compares, the clamps as selects) so GCC
// vectorises it (a nested ?: sign kept it scalar on AVX2); it is instantiated
// for AVX-512, AVX2 and baseline x86-64 and picked at run time (simd_cpu.h).
//
// Byte model per call: read 3 * B * D * s (x, g, x0), write B * D * s (x) for
// active rows -> 4·B·D·s bytes at full activity (s = sizeof(scalar_t)).
#pragma once
#include <cstdint>

#include "kernels/simd_cpu.h"

namespace memdisc {
namespace cpu {

template <typename scalar_t, typename acc_t>
struct PgdStepArgs {
  scalar_t* x;          // [B, D] in/out
  const scalar_t* g;    // [B, D] gradient (only its sign is used)
  const scalar_t* x0;   // [B, D] centre of the eps-ball
  const bool* active;   // [B] or nullptr
  int64_t D;
  acc_t step, eps, lo, hi;
  bool descent;
};

namespace detail {

// max(v, b) and min(v, b) that return NaN when either is NaN (torch.maximum/minimum).
template <typename T>
MEMDISC_INLINE T max_nan(T v, T b) { return (v < b || b != b) ? b : v; }
template <typename T>
MEMDISC_INLINE T min_nan(T v, T b) { return (v > b || b != b) ? b : v; }

template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void pgd_rows(const PgdStepArgs<scalar_t, acc_t>& p, int64_t row_begin, int64_t row_end) {
  const acc_t signed_step = p.descent ? p.step : -p.step;
  const acc_t eps = p.eps, lo = p.lo, hi = p.hi;
  const int64_t D = p.D;
  for (int64_t i = row_begin; i < row_end; ++i) {
    if (p.active != nullptr && !p.active[i]) continue;
    scalar_t* __restrict__ xr = p.x + i * D;
    const scalar_t* __restrict__ gr = p.g + i * D;
    const scalar_t* __restrict__ x0r = p.x0 + i * D;
    for (int64_t j = 0; j < D; ++j) {
      const acc_t gv = static_cast<acc_t>(gr[j]);
      const acc_t s = acc_t(gv > 0) - acc_t(gv < 0);
      acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[j]) - signed_step * s));
      const acc_t x0v = static_cast<acc_t>(x0r[j]);
      const acc_t low = static_cast<acc_t>(static_cast<scalar_t>(x0v - eps));
      const acc_t high = static_cast<acc_t>(static_cast<scalar_t>(x0v + eps));
      v = min_nan(max_nan(v, low), high);
      v = v < lo ? lo : v;  // lo, hi are finite: a NaN v stays NaN
      v = v > hi ? hi : v;
      xr[j] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX512 void pgd_avx512(const PgdStepArgs<scalar_t, acc_t>& p, int64_t b, int64_t e) {
  pgd_rows<scalar_t, acc_t>(p, b, e);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX2 void pgd_avx2(const PgdStepArgs<scalar_t, acc_t>& p, int64_t b, int64_t e) {
  pgd_rows<scalar_t, acc_t>(p, b, e);
}
template <typename scalar_t, typename acc_t>
void pgd_default(const PgdStepArgs<scalar_t, acc_t>& p, int64_t b, int64_t e) {
  pgd_rows<scalar_t, acc_t>(p, b, e);
}

}  // namespace detail

// The step over rows [row_begin, row_end).
template <typename scalar_t, typename acc_t>
void pgd_step(const PgdStepArgs<scalar_t, acc_t>& p, int64_t row_begin, int64_t row_end) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return detail::pgd_avx512<scalar_t, acc_t>(p, row_begin, row_end);
    case Isa::kAvx2: return detail::pgd_avx2<scalar_t, acc_t>(p, row_begin, row_end);
    default: return detail::pgd_default<scalar_t, acc_t>(p, row_begin, row_end);
  }
}

}  // namespace cpu
}  // namespace memdisc
