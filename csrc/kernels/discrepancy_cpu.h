// Memorization Discrepancy against K snapshots: CPU kernels (torch-free).
//
// Inputs (row-major, contiguous):
//   current   [B, C]     logits of the current model f_t
//   snapshots [K, B, C]  logits of K historical models f_h
// With a = current / T, b = snapshot / T, lse(v) = log sum_c exp(v_c):
//   forward  (reverse = false)  kl[k,i] = KL(p_h || p_t) = sum_c p_h,c (b_c - a_c) + lse(a) - lse(b)
//   forward  (reverse = true)   kl[k,i] = KL(p_t || p_h) = sum_c p_t,c (a_c - b_c) + lse(b) - lse(a)
//   backward (reverse = false)  d/da = (p_t - p_h) / T,                 d/db = p_h (log p_h - log p_t - kl) / T
//   backward (reverse = true)   d/da = p_t (log p_t - log p_h - kl) / T, d/db = (p_h - p_t) / T
// The forward reads every snapshot row once (online max / sum-exp / weighted
// sum, rescaled when the running max grows) and saves lse(a) [B] and
// lse(b) [K, B]; the backward recomputes the softmaxes from them.
// All arithmetic is in acc_t (float for float/half/bfloat16, double for double).
//
// Byte model, per forward call:  read (K + 1) * B * C * sizeof(scalar_t),
//   write K * B * 4 (kl) + (K + 1) * B * 4 (lse)       -> ~ (K+1)·B·C·s bytes.
// Per backward call: read 2 * (K + 1) * B * C * s (logits in, grads out) plus the
//   small per-row tensors.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace memdisc {
namespace cpu {

// Log-sum-exp of one row of n values scaled by inv_t, in acc_t; -inf for n == 0.
template <typename scalar_t, typename acc_t>
inline acc_t row_lse(const scalar_t* v, int64_t n, acc_t inv_t) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < n; ++c) m = std::fmax(m, static_cast<acc_t>(v[c]) * inv_t);
  acc_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += std::exp(static_cast<acc_t>(v[c]) * inv_t - m);
  return m + std::log(s);
}

// Forward over sample rows [row_begin, row_end) of all K snapshots.
//   kl       [K, B]  out
//   lse_cur  [B]     out, lse(current / T)
//   lse_snap [K, B]  out, lse(snapshot / T)
template <typename scalar_t, typename acc_t>
void discrepancy_forward(const scalar_t* current, const scalar_t* snapshots, int64_t K, int64_t B,
                         int64_t C, acc_t inv_t, bool reverse, acc_t* kl, acc_t* lse_cur,
                         acc_t* lse_snap, int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = current + i * C;
    const acc_t la = row_lse<scalar_t, acc_t>(a, C, inv_t);
    lse_cur[i] = la;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* b = snapshots + (k * B + i) * C;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t s = 0;  // sum_c exp(b_c - m)
      acc_t w = 0;  // reverse ? sum_c p_t,c (a_c - b_c) : sum_c exp(b_c - m) (b_c - a_c)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t bc = static_cast<acc_t>(b[c]) * inv_t;
        const acc_t ac = static_cast<acc_t>(a[c]) * inv_t;
        if (reverse) {
          w += std::exp(ac - la) * (ac - bc);
        }
        if (bc > m) {  // rescale the running sums to the new max
          const acc_t r = std::exp(m - bc);
          s *= r;
          if (!reverse) w *= r;
          m = bc;
        }
        const acc_t e = std::exp(bc - m);
        s += e;
        if (!reverse) w += e * (bc - ac);
      }
      const acc_t lb = m + std::log(s);
      lse_snap[k * B + i] = lb;
      kl[k * B + i] = reverse ? (w + lb - la) : (w / s + la - lb);
    }
  }
}

// Backward over sample rows [row_begin, row_end).
//   grad_kl       [K, B]     upstream gradient
//   grad_current  [B, C]     out (sums over K)
//   grad_snapshots[K, B, C]  out
template <typename scalar_t, typename acc_t>
void discrepancy_backward(const acc_t* grad_kl, const scalar_t* current, const scalar_t* snapshots,
                          const acc_t* lse_cur, const acc_t* lse_snap, const acc_t* kl, int64_t K,
                          int64_t B, int64_t C, acc_t inv_t, bool reverse, scalar_t* grad_current,
                          scalar_t* grad_snapshots, int64_t row_begin, int64_t row_end,
                          acc_t* scratch /* [C] */) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = current + i * C;
    const acc_t la = lse_cur[i];
    for (int64_t c = 0; c < C; ++c) scratch[c] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* b = snapshots + (k * B + i) * C;
      scalar_t* gb = grad_snapshots + (k * B + i) * C;
      const acc_t lb = lse_snap[k * B + i];
      const acc_t g = grad_kl[k * B + i] * inv_t;
      const acc_t d = kl[k * B + i];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t log_pt = static_cast<acc_t>(a[c]) * inv_t - la;
        const acc_t log_ph = static_cast<acc_t>(b[c]) * inv_t - lb;
        const acc_t pt = std::exp(log_pt);
        const acc_t ph = std::exp(log_ph);
        if (reverse) {
          scratch[c] += g * pt * (log_pt - log_ph - d);
          gb[c] = static_cast<scalar_t>(g * (ph - pt));
        } else {
          scratch[c] += g * (pt - ph);
          gb[c] = static_cast<scalar_t>(g * ph * (log_ph - log_pt - d));
        }
      }
    }
    scalar_t* ga = grad_current + i * C;
    for (int64_t c = 0; c < C; ++c) ga[c] = static_cast<scalar_t>(scratch[c]);
  }
}

}  // namespace cpu
}  // namespace memdisc
