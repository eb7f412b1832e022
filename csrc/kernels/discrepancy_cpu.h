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
// (both backward lines times the upstream grad g[k,i]; d/da is summed over k).
//
// Numerics: every row is shifted by its own max before the exp (ma = max a,
// mb = max b), and the KL is assembled from the shifted values,
//   KL(p_h||p_t) = sum_c e_c (xb_c - xa_c) / s_b + log s_a - log s_b,
//   xa = a - ma, xb = b - mb, e = exp(xb), s = sum exp(x),
// so no term carries the magnitude of the logits (logits of +-1e4 keep full
// float32 accuracy).  Accumulation in acc_t: float for float/half/bfloat16,
// double for double.  The forward saves lse(a) [B] and lse(b) [K, B]; the
// backward recomputes the softmaxes from them (one exp per element).
//
// Schedule (C > W, W = lanes per 64-byte vector): one sample row i at a time,
// its current row staged once in a per-thread scratch (shifted logits, and p_t
// for reverse) and reused for the K snapshot rows.  Each snapshot row takes two
// branch-free passes over 64-byte vectors: a max pass, then one exp pass that
// accumulates s and the weighted sum (the row is L1/L2-resident for the second
// pass).  The last partial vector of a row is loaded with a fill value and
// masked.
// Schedule (C <= W, e.g. 10 classes): classes in the lanes would leave lanes
// idle and pay three horizontal reductions per row, so the W sample rows of a
// block go in the lanes instead: each [W, C] tile is staged transposed in the
// scratch (tile[c][lane]), every per-row quantity (max, sum, log, KL) is one
// vector op for W rows, and the [K, B] outputs are stored a vector at a time.
//
// Byte model, per forward call:  read (K + 1) * B * C * s (s = sizeof(scalar_t)),
//   write K * B * 4 (kl) + (K + 1) * B * 4 (lse)            -> ~ (K+1)·B·C·s bytes.
// Per backward call: read (K + 1) * B * C * s (logits), write (K + 1) * B * C * s
//   (gradients), plus the small [K, B] tensors               -> ~ 2·(K+1)·B·C·s bytes.
// Exps: (K + 1) * B * C (+ B * C for reverse) forward, (K + 1) * B * C backward.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/simd_cpu.h"

namespace memdisc {
namespace cpu {

template <typename scalar_t, typename acc_t>
struct DiscrepancyForwardArgs {
  const scalar_t* current;    // [B, C]
  const scalar_t* snapshots;  // [K, B, C]
  int64_t K, B, C;
  acc_t inv_t;                // 1 / temperature
  bool reverse;
  acc_t* kl;                  // [K, B] out
  acc_t* lse_cur;             // [B] out, lse(current / T)
  acc_t* lse_snap;            // [K, B] out, lse(snapshot / T)
};

template <typename scalar_t, typename acc_t>
struct DiscrepancyBackwardArgs {
  const acc_t* grad_kl;       // [K, B] upstream gradient
  const scalar_t* current;    // [B, C]
  const scalar_t* snapshots;  // [K, B, C]
  const acc_t* lse_cur;       // [B]
  const acc_t* lse_snap;      // [K, B]
  const acc_t* kl;            // [K, B]
  int64_t K, B, C;
  acc_t inv_t;
  bool reverse;
  scalar_t* grad_current;     // [B, C] out (sum over k)
  scalar_t* grad_snapshots;   // [K, B, C] out
};

// Scratch one thread needs for a row range: regions of C acc_t values, each
// padded to whole vectors so every scratch load is a full vector load.
template <typename acc_t>
inline int64_t padded_row(int64_t C) { return (C + Simd<acc_t>::W - 1) / Simd<acc_t>::W * Simd<acc_t>::W; }
template <typename acc_t>
inline int64_t discrepancy_forward_scratch(int64_t C) {
  return C <= Simd<acc_t>::W ? 3 * C * Simd<acc_t>::W : 2 * padded_row<acc_t>(C);
}
template <typename acc_t>
inline int64_t discrepancy_backward_scratch(int64_t C) { return 3 * padded_row<acc_t>(C); }

namespace detail {

// max_c v_c over one row of n >= 1 values (end: end of the readable buffer).
template <typename scalar_t, typename acc_t>
MEMDISC_INLINE acc_t row_max(const scalar_t* v, int64_t n, const scalar_t* end) {
  using V = typename Simd<acc_t>::V;
  constexpr int W = Simd<acc_t>::W;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  V m = splat(ninf);
  for (int64_t c = 0; c < n; c += W) m = vmax<acc_t>(m, load<acc_t>(v + c, std::min<int64_t>(W, n - c), ninf, end));
  return hmax(m);
}

// One vector of a snapshot row: xb = b/T - mb for lanes < n.  Accumulates
// s += exp(xb) and w += e (xb - xa) (forward) or w += p_t (xa - xb) (reverse).
template <typename acc_t>
MEMDISC_INLINE void forward_chunk(typename Simd<acc_t>::V xb, int64_t n, const acc_t* xa, const acc_t* pt,
                                  const acc_t* xa_end, bool reverse, typename Simd<acc_t>::V& s,
                                  typename Simd<acc_t>::V& w) {
  const typename Simd<acc_t>::V e = select_lanes<acc_t>(n, exp_vec(xb), acc_t(0));
  s += e;
  const typename Simd<acc_t>::V va = load<acc_t>(xa, n, acc_t(0), xa_end);
  if (reverse) {
    w += load<acc_t>(pt, n, acc_t(0), xa_end + (pt - xa)) * (va - xb);
  } else {
    w += e * (xb - va);
  }
}

// Stage n <= W rows of C <= W logits (row stride C), times inv_t, transposed:
// tile[c * W + l] = src[l * C + c] * inv_t; lanes l >= n get 0.
template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void stage_tile(const scalar_t* src, int64_t n, int64_t C, acc_t inv_t, acc_t* tile) {
  constexpr int W = Simd<acc_t>::W;
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t c = 0; c < C; ++c) tile[c * W + l] = static_cast<acc_t>(src[l * C + c]) * inv_t;
  }
  for (int64_t l = n; l < W; ++l) {
    for (int64_t c = 0; c < C; ++c) tile[c * W + l] = acc_t(0);
  }
}

// Per-lane max over the C vectors of a staged tile.
template <typename acc_t>
MEMDISC_INLINE typename Simd<acc_t>::V tile_max(const acc_t* tile, int64_t C) {
  typename Simd<acc_t>::V m = splat(-std::numeric_limits<acc_t>::infinity());
  for (int64_t c = 0; c < C; ++c) m = vmax<acc_t>(m, load_full<acc_t>(tile + c * Simd<acc_t>::W));
  return m;
}

// The forward for C <= W: blocks of W sample rows in the lanes (see Schedule).
template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void forward_rows_small_c(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                         int64_t row_end, acc_t* scratch) {
  using V = typename Simd<acc_t>::V;
  constexpr int W = Simd<acc_t>::W;
  const int64_t K = p.K, B = p.B, C = p.C;
  const V zero = splat(acc_t(0));
  acc_t* xa = scratch;              // [C][W] a/T - max(a/T)
  acc_t* pt = scratch + C * W;      // [C][W] p_t (reverse only)
  acc_t* xb = scratch + 2 * C * W;  // [C][W] b/T, then b/T - max(b/T)
  for (int64_t i0 = row_begin; i0 < row_end; i0 += W) {
    const int64_t n = std::min<int64_t>(W, row_end - i0);
    stage_tile<scalar_t, acc_t>(p.current + i0 * C, n, C, p.inv_t, xa);
    const V ma = tile_max<acc_t>(xa, C);
    V sa = zero;
    for (int64_t c = 0; c < C; ++c) {
      const V x = load_full<acc_t>(xa + c * W) - ma;
      store<acc_t, acc_t>(xa + c * W, x, W);
      sa += exp_vec(x);
    }
    const V log_sa = log_vec(sa);
    store<acc_t, acc_t>(p.lse_cur + i0, ma + log_sa, n);
    if (p.reverse) {
      for (int64_t c = 0; c < C; ++c) store<acc_t, acc_t>(pt + c * W, exp_vec(load_full<acc_t>(xa + c * W) - log_sa), W);
    }
    for (int64_t k = 0; k < K; ++k) {
      stage_tile<scalar_t, acc_t>(p.snapshots + (k * B + i0) * C, n, C, p.inv_t, xb);
      const V mb = tile_max<acc_t>(xb, C);
      V s = zero, w = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V x = load_full<acc_t>(xb + c * W) - mb;
        const V e = exp_vec(x);
        const V va = load_full<acc_t>(xa + c * W);
        s += e;
        w += p.reverse ? load_full<acc_t>(pt + c * W) * (va - x) : e * (x - va);
      }
      const V log_sb = log_vec(s);
      store<acc_t, acc_t>(p.lse_snap + k * B + i0, mb + log_sb, n);
      store<acc_t, acc_t>(p.kl + k * B + i0, p.reverse ? (w + log_sb - log_sa) : (w / s + log_sa - log_sb), n);
    }
  }
}

template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void forward_rows(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                 int64_t row_end, acc_t* scratch) {
  if (p.C <= Simd<acc_t>::W) return forward_rows_small_c<scalar_t, acc_t>(p, row_begin, row_end, scratch);
  using V = typename Simd<acc_t>::V;
  constexpr int W = Simd<acc_t>::W;
  const int64_t K = p.K, B = p.B, C = p.C, Cp = padded_row<acc_t>(C);
  const acc_t inv_t = p.inv_t;
  const V zero = splat(acc_t(0));
  const scalar_t* a_end = p.current + B * C;
  const scalar_t* b_end = p.snapshots + K * B * C;
  acc_t* xa = scratch;       // [C] a/T - max(a/T)
  acc_t* pt = scratch + Cp;  // [C] p_t (reverse only)
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = p.current + i * C;
    const acc_t ma = row_max<scalar_t, acc_t>(a, C, a_end) * inv_t;
    V vs = zero;
    for (int64_t c = 0; c < C; c += W) {
      const int64_t n = std::min<int64_t>(W, C - c);
      const V x = load<acc_t>(a + c, n, acc_t(0), a_end) * inv_t - ma;
      store<acc_t, acc_t>(xa + c, x, W);
      vs += select_lanes<acc_t>(n, exp_vec(x), acc_t(0));
    }
    const acc_t log_sa = std::log(hsum(vs));
    p.lse_cur[i] = ma + log_sa;
    if (p.reverse) {
      for (int64_t c = 0; c < C; c += W) store<acc_t, acc_t>(pt + c, exp_vec(load_full<acc_t>(xa + c) - log_sa), W);
    }
    // Snapshots in blocks of W: the per-row sums land in lanes, so the logs and
    // the final KL assembly are one vector step per block.
    for (int64_t k0 = 0; k0 < K; k0 += W) {
      const int64_t nk = std::min<int64_t>(W, K - k0);
      V mbv = zero, ssv = splat(acc_t(1)), wsv = zero;
      for (int64_t kk = 0; kk < nk; ++kk) {
        const scalar_t* b = p.snapshots + ((k0 + kk) * B + i) * C;
        V s = zero, w = zero;
        const acc_t mb = row_max<scalar_t, acc_t>(b, C, b_end) * inv_t;
        for (int64_t c = 0; c < C; c += W) {
          const int64_t n = std::min<int64_t>(W, C - c);
          forward_chunk<acc_t>(load<acc_t>(b + c, n, acc_t(0), b_end) * inv_t - mb, n, xa + c, pt + c, xa + Cp,
                               p.reverse, s, w);
        }
        mbv[kk] = mb;
        ssv[kk] = hsum(s);
        wsv[kk] = hsum(w);
      }
      const V log_sb = log_vec(ssv);
      const V lse = mbv + log_sb;
      const V klv = p.reverse ? (wsv + log_sb - log_sa) : (wsv / ssv + log_sa - log_sb);
      for (int64_t kk = 0; kk < nk; ++kk) {
        p.lse_snap[(k0 + kk) * B + i] = lse[kk];
        p.kl[(k0 + kk) * B + i] = klv[kk];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void backward_rows(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                  int64_t row_end, acc_t* scratch) {
  using V = typename Simd<acc_t>::V;
  constexpr int W = Simd<acc_t>::W;
  const int64_t K = p.K, B = p.B, C = p.C, Cp = padded_row<acc_t>(C);
  const acc_t inv_t = p.inv_t;
  const V zero = splat(acc_t(0));
  const scalar_t* a_end = p.current + B * C;
  const scalar_t* b_end = p.snapshots + K * B * C;
  acc_t* lpt = scratch;          // [C] log p_t
  acc_t* pt = scratch + Cp;      // [C] p_t
  acc_t* ga = scratch + 2 * Cp;  // [C] d/da accumulated over k
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = p.current + i * C;
    const acc_t la = p.lse_cur[i];
    for (int64_t c = 0; c < C; c += W) {
      const V l = load<acc_t>(a + c, std::min<int64_t>(W, C - c), acc_t(0), a_end) * inv_t - la;
      store<acc_t, acc_t>(lpt + c, l, W);
      store<acc_t, acc_t>(pt + c, exp_vec(l), W);
      store<acc_t, acc_t>(ga + c, zero, W);
    }
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* b = p.snapshots + (k * B + i) * C;
      scalar_t* gb = p.grad_snapshots + (k * B + i) * C;
      const acc_t lb = p.lse_snap[k * B + i];
      const acc_t g = p.grad_kl[k * B + i] * inv_t;
      const acc_t d = p.kl[k * B + i];
      for (int64_t c = 0; c < C; c += W) {
        const int64_t n = std::min<int64_t>(W, C - c);
        const V lph = load<acc_t>(b + c, n, acc_t(0), b_end) * inv_t - lb;
        const V ph = exp_vec(lph);
        const V vpt = load_full<acc_t>(pt + c), vlpt = load_full<acc_t>(lpt + c), vga = load_full<acc_t>(ga + c);
        if (p.reverse) {
          store<acc_t, acc_t>(ga + c, vga + g * vpt * (vlpt - lph - d), W);
          store<scalar_t, acc_t>(gb + c, g * (ph - vpt), n);
        } else {
          store<acc_t, acc_t>(ga + c, vga + g * (vpt - ph), W);
          store<scalar_t, acc_t>(gb + c, g * ph * (lph - vlpt - d), n);
        }
      }
    }
    scalar_t* out = p.grad_current + i * C;
    for (int64_t c = 0; c < C; c += W) store<scalar_t, acc_t>(out + c, load_full<acc_t>(ga + c), std::min<int64_t>(W, C - c));
  }
}

template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX512 void forward_avx512(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                          acc_t* scratch) {
  forward_rows<scalar_t, acc_t>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX2 void forward_avx2(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                      acc_t* scratch) {
  forward_rows<scalar_t, acc_t>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
void forward_default(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e, acc_t* scratch) {
  forward_rows<scalar_t, acc_t>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX512 void backward_avx512(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                           acc_t* scratch) {
  backward_rows<scalar_t, acc_t>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX2 void backward_avx2(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                       acc_t* scratch) {
  backward_rows<scalar_t, acc_t>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
void backward_default(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e, acc_t* scratch) {
  backward_rows<scalar_t, acc_t>(p, b, e, scratch);
}

}  // namespace detail

// Forward over sample rows [row_begin, row_end) of all K snapshots;
// scratch holds discrepancy_forward_scratch(C) acc_t values (one per thread).
template <typename scalar_t, typename acc_t>
void discrepancy_forward(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin, int64_t row_end,
                         acc_t* scratch) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return detail::forward_avx512<scalar_t, acc_t>(p, row_begin, row_end, scratch);
    case Isa::kAvx2: return detail::forward_avx2<scalar_t, acc_t>(p, row_begin, row_end, scratch);
    default: return detail::forward_default<scalar_t, acc_t>(p, row_begin, row_end, scratch);
  }
}

// Backward over sample rows [row_begin, row_end); scratch holds
// discrepancy_backward_scratch(C) acc_t values (one per thread).
template <typename scalar_t, typename acc_t>
void discrepancy_backward(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t row_begin, int64_t row_end,
                          acc_t* scratch) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return detail::backward_avx512<scalar_t, acc_t>(p, row_begin, row_end, scratch);
    case Isa::kAvx2: return detail::backward_avx2<scalar_t, acc_t>(p, row_begin, row_end, scratch);
    default: return detail::backward_default<scalar_t, acc_t>(p, row_begin, row_end, scratch);
  }
}

}  // namespace cpu
}  // namespace memdisc
