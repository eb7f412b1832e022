// Fused PGD step, in place: CPU kernel (torch-free).
//
//   x <- clip_[lo,hi]( clip_[x0 - eps, x0 + eps]( x - dir * step * sign(g) ) )
//   dir = +1 for descent (the DSC correction), -1 for ascent (an attack);
//   sign(0) = 0; rows whose active flag is 0 are left bit-for-bit unchanged.
// Shapes: x, g, x0 are [B, D] (D = product of the per-sample dims);
// active is [B] (uint8/bool) or null for "all rows active".
// Arithmetic in acc_t, rounded once per intermediate exactly as the PyTorch
// reference rounds it (x - step*s, x0 - eps, x0 + eps, then the clamps), so the
// float32 result is bit-equal to the reference.
//
// Byte model per call: read 3 * B * D * s (x, g, x0), write B * D * s (x) for
// active rows -> 4·B·D·s bytes at full activity.
#pragma once
#include <cstdint>

namespace memdisc {
namespace cpu {

template <typename scalar_t, typename acc_t>
void pgd_step(scalar_t* x, const scalar_t* g, const scalar_t* x0, const bool* active, int64_t D,
              acc_t step, acc_t eps, acc_t lo, acc_t hi, bool descent, int64_t row_begin,
              int64_t row_end) {
  const acc_t signed_step = descent ? step : -step;
  for (int64_t i = row_begin; i < row_end; ++i) {
    if (active != nullptr && !active[i]) continue;
    scalar_t* xr = x + i * D;
    const scalar_t* gr = g + i * D;
    const scalar_t* x0r = x0 + i * D;
    for (int64_t j = 0; j < D; ++j) {
      const acc_t gv = static_cast<acc_t>(gr[j]);
      const acc_t s = static_cast<acc_t>((gv > 0) - (gv < 0));
      acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(xr[j]) - signed_step * s));
      const acc_t x0v = static_cast<acc_t>(x0r[j]);
      const acc_t low = static_cast<acc_t>(static_cast<scalar_t>(x0v - eps));
      const acc_t high = static_cast<acc_t>(static_cast<scalar_t>(x0v + eps));
      v = v < low ? low : v;
      v = v > high ? high : v;
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      xr[j] = static_cast<scalar_t>(v);
    }
  }
}

}  // namespace cpu
}  // namespace memdisc
