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
// Vector width: each variant works on one register of its target, W lanes =
// 16 / 8 / 4 floats (8 / 4 / 2 doubles) for AVX-512 / AVX2 / baseline x86-64
// (simd_cpu.h says why a 64-byte vector on every target was 2-9x slower).
// Schedule (C > 16 floats / 8 doubles, more than one 64-byte block): one sample
// row i at a time, its current row staged once in a per-thread scratch (shifted
// logits, and p_t for reverse) and reused for the K snapshot rows.  Each
// snapshot row takes two passes: a max pass, then one exp pass that
// accumulates s and the weighted sum (the row is L1/L2-resident for the second
// pass).  Both walk the row in whole vectors with branch-free loop bodies, then
// one tail (the last C mod 16 classes) loaded with a fill value and masked.
// Schedule (C <= 16 floats / 8 doubles, e.g. 10 classes): classes in the lanes
// would leave lanes idle and pay three horizontal reductions per row, so the W
// sample rows of a block go in the lanes instead: each [W, C] tile is staged
// transposed in the scratch (tile[c][lane]), every per-row quantity (max, sum,
// log, KL) is one vector op for W rows, and the [K, B] outputs are stored a
// vector at a time.
// Summation order, the same in every variant (and as before the per-target
// widths): a row's classes are taken in 64-byte blocks, 16 partial sums per
// row (lane j of the block sums classes j, j + 16, ...; U = 64 / (4 W) vectors
// of W lanes each hold a part), reduced by halving (block_sum, hsum).  The
// variants differ only in FMA contraction (none on baseline), and each is
// deterministic and independent of the thread split.
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
// padded to whole 64-byte vectors so every scratch load of any variant is a full
// vector load.  Sized for the widest variant, so the caller needs no ISA.
template <typename acc_t>
inline int64_t padded_row(int64_t C) { return (C + Simd<acc_t>::W - 1) / Simd<acc_t>::W * Simd<acc_t>::W; }
// Largest C of the rows-in-lanes forward (one 64-byte vector of classes).
template <typename acc_t>
constexpr int64_t kSmallC = Simd<acc_t>::W;
template <typename acc_t>
inline int64_t discrepancy_forward_scratch(int64_t C) {
  return C <= kSmallC<acc_t> ? 3 * C * Simd<acc_t>::W : 2 * padded_row<acc_t>(C);
}
template <typename acc_t>
inline int64_t discrepancy_backward_scratch(int64_t C) { return 3 * padded_row<acc_t>(C); }

namespace detail {

// max_c v_c over one row of n >= 1 values (end: end of the readable buffer).
template <typename V, typename scalar_t>
MEMDISC_INLINE lane_t<V> row_max(const scalar_t* v, int64_t n, const scalar_t* end) {
  using acc_t = lane_t<V>;
  constexpr int W = simd_of<V>::W;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  V m = splat<V>(ninf);
  int64_t c = 0;
  for (; c + W <= n; c += W) m = vmax(m, load_full<V>(v + c));
  if (c < n) m = vmax(m, load<V>(v + c, n - c, ninf, end));
  return hmax(m);
}

// One vector of a snapshot row: xb = b/T - mb.  Accumulates s += exp(xb) and
// w += e (xb - xa) (forward) or w += p_t (xa - xb) (reverse).  The tail form
// (n < W lanes valid) masks e and reads xa, p_t with a 0 fill; the full form
// (every lane valid) has no mask.
template <bool kReverse, typename V>
MEMDISC_INLINE void forward_chunk(V xb, const lane_t<V>* xa, const lane_t<V>* pt, V& s, V& w) {
  const V e = exp_vec(xb);
  s += e;
  const V va = load_full<V>(xa);
  if constexpr (kReverse) {
    w += load_full<V>(pt) * (va - xb);
  } else {
    w += e * (xb - va);
  }
}
template <bool kReverse, typename V>
MEMDISC_INLINE void forward_chunk_tail(V xb, int64_t n, const lane_t<V>* xa, const lane_t<V>* pt,
                                       const lane_t<V>* xa_end, V& s, V& w) {
  using acc_t = lane_t<V>;
  const V e = select_lanes(n, exp_vec(xb), acc_t(0));
  s += e;
  const V va = load<V>(xa, n, acc_t(0), xa_end);
  if constexpr (kReverse) {
    w += load<V>(pt, n, acc_t(0), xa_end + (pt - xa)) * (va - xb);
  } else {
    w += e * (xb - va);
  }
}

// Stage n <= W rows of C <= W logits (row stride C), times inv_t, transposed:
// tile[c * W + l] = src[l * C + c] * inv_t; lanes l >= n get 0.
template <int W, typename scalar_t, typename acc_t>
MEMDISC_INLINE void stage_tile(const scalar_t* src, int64_t n, int64_t C, acc_t inv_t, acc_t* tile) {
  for (int64_t l = 0; l < n; ++l) {
    for (int64_t c = 0; c < C; ++c) tile[c * W + l] = static_cast<acc_t>(src[l * C + c]) * inv_t;
  }
  for (int64_t l = n; l < W; ++l) {
    for (int64_t c = 0; c < C; ++c) tile[c * W + l] = acc_t(0);
  }
}

// Per-lane max over the C vectors of a staged tile.
template <typename V>
MEMDISC_INLINE V tile_max(const lane_t<V>* tile, int64_t C) {
  V m = splat<V>(-std::numeric_limits<lane_t<V>>::infinity());
  for (int64_t c = 0; c < C; ++c) m = vmax(m, load_full<V>(tile + c * simd_of<V>::W));
  return m;
}

// The forward for C <= kSmallC: blocks of W sample rows in the lanes (see Schedule).
template <typename scalar_t, typename acc_t, int VB, bool kReverse>
MEMDISC_INLINE void forward_rows_small_c(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                         int64_t row_end, acc_t* scratch) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int W = Simd<acc_t, VB>::W;
  const int64_t K = p.K, B = p.B, C = p.C;
  const V zero = splat<V>(acc_t(0));
  acc_t* xa = scratch;              // [C][W] a/T - max(a/T)
  acc_t* pt = scratch + C * W;      // [C][W] p_t (reverse only)
  acc_t* xb = scratch + 2 * C * W;  // [C][W] b/T, then b/T - max(b/T)
  for (int64_t i0 = row_begin; i0 < row_end; i0 += W) {
    const int64_t n = std::min<int64_t>(W, row_end - i0);
    stage_tile<W>(p.current + i0 * C, n, C, p.inv_t, xa);
    const V ma = tile_max<V>(xa, C);
    V sa = zero;
    for (int64_t c = 0; c < C; ++c) {
      const V x = load_full<V>(xa + c * W) - ma;
      store(xa + c * W, x, W);
      sa += exp_vec(x);
    }
    const V log_sa = log_vec(sa);
    store(p.lse_cur + i0, ma + log_sa, n);
    if constexpr (kReverse) {
      for (int64_t c = 0; c < C; ++c) store(pt + c * W, exp_vec(load_full<V>(xa + c * W) - log_sa), W);
    }
    for (int64_t k = 0; k < K; ++k) {
      stage_tile<W>(p.snapshots + (k * B + i0) * C, n, C, p.inv_t, xb);
      const V mb = tile_max<V>(xb, C);
      V s = zero, w = zero;
      for (int64_t c = 0; c < C; ++c) forward_chunk<kReverse>(load_full<V>(xb + c * W) - mb, xa + c * W, pt + c * W, s, w);
      const V log_sb = log_vec(s);
      store(p.lse_snap + k * B + i0, mb + log_sb, n);
      store(p.kl + k * B + i0, kReverse ? (w + log_sb - log_sa) : (w / s + log_sa - log_sb), n);
    }
  }
}

// Sum of the U partial-sum vectors of a 64-byte block, by halving (pairs u and
// u + U/2 first), then across the lanes: the same additions, in the same order,
// as hsum of one 64-byte vector holding them, so every variant sums a row alike.
template <int U, typename V>
MEMDISC_INLINE lane_t<V> block_sum(const V* acc) {
  if constexpr (U == 1) {
    return hsum(acc[0]);
  } else {
    V half[U / 2];
    for (int u = 0; u < U / 2; ++u) half[u] = acc[u] + acc[u + U / 2];
    return block_sum<U / 2>(half);
  }
}

// The forward for C > kSmallC: classes in the lanes (see Schedule).  A row is
// walked in 64-byte blocks of U = 64 / VB vectors, each vector with its own
// partial sums, so lane j of vector u sums classes c = 16 q + u W + j (floats)
// in every variant.
template <typename scalar_t, typename acc_t, int VB, bool kReverse>
MEMDISC_INLINE void forward_rows_large_c(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                         int64_t row_end, acc_t* scratch) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int W = Simd<acc_t, VB>::W;
  constexpr int U = kMaxVecBytes / VB;         // vectors per 64-byte block
  constexpr int BW = Simd<acc_t>::W;           // classes per block (= U * W)
  const int64_t K = p.K, B = p.B, C = p.C, Cp = padded_row<acc_t>(C);
  const int64_t Cf = C / BW * BW;              // classes in whole blocks; a tail of C - Cf < BW follows
  const acc_t inv_t = p.inv_t;
  const V zero = splat<V>(acc_t(0));
  const scalar_t* a_end = p.current + B * C;
  const scalar_t* b_end = p.snapshots + K * B * C;
  acc_t* xa = scratch;       // [Cp] a/T - max(a/T)
  acc_t* pt = scratch + Cp;  // [Cp] p_t (reverse only)
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = p.current + i * C;
    const acc_t ma = row_max<V>(a, C, a_end) * inv_t;
    V vs[U];
    for (int u = 0; u < U; ++u) vs[u] = zero;
    for (int64_t c = 0; c < Cf; c += BW) {
      for (int u = 0; u < U; ++u) {
        const V x = load_full<V>(a + c + u * W) * inv_t - ma;
        store(xa + c + u * W, x, W);
        vs[u] += exp_vec(x);
      }
    }
    if (Cf < C) {
      for (int u = 0; u < U; ++u) {
        const int64_t n = std::min<int64_t>(W, C - Cf - u * W);  // lanes of tail vector u that hold classes
        if (n <= 0) break;  // no classes left (adding the masked zeros would change nothing)
        const V x = load<V>(a + Cf + u * W, n, acc_t(0), a_end) * inv_t - ma;
        store(xa + Cf + u * W, x, W);
        vs[u] += select_lanes(n, exp_vec(x), acc_t(0));
      }
    }
    const acc_t log_sa = std::log(block_sum<U>(vs));
    p.lse_cur[i] = ma + log_sa;
    if constexpr (kReverse) {
      for (int64_t c = 0; c < C; c += W) store(pt + c, exp_vec(load_full<V>(xa + c) - log_sa), W);
    }
    // Snapshots in blocks of W: the per-row sums land in lanes, so the logs and
    // the final KL assembly are one vector step per block.
    for (int64_t k0 = 0; k0 < K; k0 += W) {
      const int64_t nk = std::min<int64_t>(W, K - k0);
      V mbv = zero, ssv = splat<V>(acc_t(1)), wsv = zero;
      for (int64_t kk = 0; kk < nk; ++kk) {
        const scalar_t* b = p.snapshots + ((k0 + kk) * B + i) * C;
        V s[U], w[U];
        for (int u = 0; u < U; ++u) s[u] = w[u] = zero;
        const acc_t mb = row_max<V>(b, C, b_end) * inv_t;
        for (int64_t c = 0; c < Cf; c += BW) {
          for (int u = 0; u < U; ++u) {
            const int64_t cu = c + u * W;
            forward_chunk<kReverse>(load_full<V>(b + cu) * inv_t - mb, xa + cu, pt + cu, s[u], w[u]);
          }
        }
        if (Cf < C) {
          for (int u = 0; u < U; ++u) {
            const int64_t cu = Cf + u * W, n = std::min<int64_t>(W, C - cu);
            if (n <= 0) break;
            forward_chunk_tail<kReverse>(load<V>(b + cu, n, acc_t(0), b_end) * inv_t - mb, n, xa + cu, pt + cu,
                                         xa + Cp, s[u], w[u]);
          }
        }
        mbv[kk] = mb;
        ssv[kk] = block_sum<U>(s);
        wsv[kk] = block_sum<U>(w);
      }
      const V log_sb = log_vec(ssv);
      const V lse = mbv + log_sb;
      const V klv = kReverse ? (wsv + log_sb - log_sa) : (wsv / ssv + log_sa - log_sb);
      for (int64_t kk = 0; kk < nk; ++kk) {
        p.lse_snap[(k0 + kk) * B + i] = lse[kk];
        p.kl[(k0 + kk) * B + i] = klv[kk];
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VB>
MEMDISC_INLINE void forward_rows(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                 int64_t row_end, acc_t* scratch) {
  if (p.C <= kSmallC<acc_t>) {
    if (p.reverse) return forward_rows_small_c<scalar_t, acc_t, VB, true>(p, row_begin, row_end, scratch);
    return forward_rows_small_c<scalar_t, acc_t, VB, false>(p, row_begin, row_end, scratch);
  }
  if (p.reverse) return forward_rows_large_c<scalar_t, acc_t, VB, true>(p, row_begin, row_end, scratch);
  return forward_rows_large_c<scalar_t, acc_t, VB, false>(p, row_begin, row_end, scratch);
}

// One vector of the backward of snapshot row (k, i): adds to d/da in the
// scratch and returns d/db (see the formulas at the top).
template <bool kReverse, typename V>
MEMDISC_INLINE V backward_chunk(V lph, const lane_t<V>* pt, const lane_t<V>* lpt, lane_t<V>* ga, lane_t<V> g,
                                lane_t<V> d) {
  const V ph = exp_vec(lph);
  const V vpt = load_full<V>(pt), vlpt = load_full<V>(lpt), vga = load_full<V>(ga);
  if constexpr (kReverse) {
    store(ga, vga + g * vpt * (vlpt - lph - d), simd_of<V>::W);
    return g * (ph - vpt);
  } else {
    store(ga, vga + g * (vpt - ph), simd_of<V>::W);
    return g * ph * (lph - vlpt - d);
  }
}

template <typename scalar_t, typename acc_t, int VB, bool kReverse>
MEMDISC_INLINE void backward_rows_impl(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                       int64_t row_end, acc_t* scratch) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int W = Simd<acc_t, VB>::W;
  const int64_t K = p.K, B = p.B, C = p.C, Cp = padded_row<acc_t>(C);
  const int64_t Cf = C / W * W;  // classes in full vectors; a tail of C - Cf follows
  const acc_t inv_t = p.inv_t;
  const V zero = splat<V>(acc_t(0));
  const scalar_t* a_end = p.current + B * C;
  const scalar_t* b_end = p.snapshots + K * B * C;
  acc_t* lpt = scratch;          // [C] log p_t
  acc_t* pt = scratch + Cp;      // [C] p_t
  acc_t* ga = scratch + 2 * Cp;  // [C] d/da accumulated over k
  for (int64_t i = row_begin; i < row_end; ++i) {
    const scalar_t* a = p.current + i * C;
    const acc_t la = p.lse_cur[i];
    for (int64_t c = 0; c <= C - W; c += W) {  // full vectors, then the tail (same stores)
      const V l = load_full<V>(a + c) * inv_t - la;
      store(lpt + c, l, W);
      store(pt + c, exp_vec(l), W);
      store(ga + c, zero, W);
    }
    if (Cf < C) {
      const V l = load<V>(a + Cf, C - Cf, acc_t(0), a_end) * inv_t - la;
      store(lpt + Cf, l, W);
      store(pt + Cf, exp_vec(l), W);
      store(ga + Cf, zero, W);
    }
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* b = p.snapshots + (k * B + i) * C;
      scalar_t* gb = p.grad_snapshots + (k * B + i) * C;
      const acc_t lb = p.lse_snap[k * B + i];
      const acc_t g = p.grad_kl[k * B + i] * inv_t;
      const acc_t d = p.kl[k * B + i];
      for (int64_t c = 0; c < Cf; c += W) {
        store(gb + c, backward_chunk<kReverse>(load_full<V>(b + c) * inv_t - lb, pt + c, lpt + c, ga + c, g, d), W);
      }
      if (Cf < C) {
        const V lph = load<V>(b + Cf, C - Cf, acc_t(0), b_end) * inv_t - lb;
        store(gb + Cf, backward_chunk<kReverse>(lph, pt + Cf, lpt + Cf, ga + Cf, g, d), C - Cf);
      }
    }
    scalar_t* out = p.grad_current + i * C;
    for (int64_t c = 0; c < C; c += W) store(out + c, load_full<V>(ga + c), std::min<int64_t>(W, C - c));
  }
}

template <typename scalar_t, typename acc_t, int VB>
MEMDISC_INLINE void backward_rows(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t row_begin,
                                  int64_t row_end, acc_t* scratch) {
  if (p.reverse) return backward_rows_impl<scalar_t, acc_t, VB, true>(p, row_begin, row_end, scratch);
  return backward_rows_impl<scalar_t, acc_t, VB, false>(p, row_begin, row_end, scratch);
}

// The instantiations, each with its target's register width.
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX512 void forward_avx512(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                          acc_t* scratch) {
  forward_rows<scalar_t, acc_t, kVecBytesAvx512>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX2 void forward_avx2(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                      acc_t* scratch) {
  forward_rows<scalar_t, acc_t, kVecBytesAvx2>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
void forward_default(const DiscrepancyForwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e, acc_t* scratch) {
  forward_rows<scalar_t, acc_t, kVecBytesDefault>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX512 void backward_avx512(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                           acc_t* scratch) {
  backward_rows<scalar_t, acc_t, kVecBytesAvx512>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
MEMDISC_TARGET_AVX2 void backward_avx2(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e,
                                       acc_t* scratch) {
  backward_rows<scalar_t, acc_t, kVecBytesAvx2>(p, b, e, scratch);
}
template <typename scalar_t, typename acc_t>
void backward_default(const DiscrepancyBackwardArgs<scalar_t, acc_t>& p, int64_t b, int64_t e, acc_t* scratch) {
  backward_rows<scalar_t, acc_t, kVecBytesDefault>(p, b, e, scratch);
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
