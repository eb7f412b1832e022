// Online softmax statistics of a pair of logit rows, mergeable in any order:
// the per-thread state of the CUDA discrepancy forward (discrepancy.cu).
//
// The header is host/device (plain C++ without nvcc) so the C++ unit tests in
// csrc/tests/ check the GPU forward's arithmetic, chunking and tree-merge order
// on a machine without a GPU.  It includes no CUDA header.
//
// For a p row and a q row (p = snapshot, q = current for KL(p_h || p_t); the
// roles swap for the reverse KL), over the elements c seen so far:
//   mp = max_c p_c        sp = sum_c e_c,  e_c = exp(p_c - mp)
//   mq = max_c q_c        sq = sum_c exp(q_c - mq)
//   w1 = sum_c e_c (p_c - mp)          w2 = sum_c e_c (q_c - mq)
// and, once every element is in,
//   KL(softmax(p) || softmax(q)) = (w1 - w2) / sp + log(sq) - log(sp)
//   lse(p) = mp + log(sp),  lse(q) = mq + log(sq).
// The logit scale cancels out of the KL: the error is a few ulp of
// (log C + |entropy terms|), not of the logits' magnitude, so logits of +-1e4
// give KL(p||p) = 0 exactly and C = 1 gives 0 exactly.
//
// Merging state o into s moves both to the common maxima M = max(s.mp, o.mp),
// N = max(s.mq, o.mq); with dp = M - x.mp, dq = N - x.mq, r = exp(-dp) for each x:
//   sp += r sp_x,  w1 += r (w1_x - dp sp_x),  w2 += r (w2_x - dq sp_x),  sq += exp(-dq) sq_x.
// A state with sp == 0 is empty (no element yet); a non-empty one has sp >= 1.
// -inf logits on the q side (e.g. masked classes of the current model) give the
// CPU kernel's answers: lse(q) finite, KL = +inf where p has mass; a shift of a
// maximum to itself is taken as 0, so a slice whose q values are all -inf
// yields no -inf - -inf NaN.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define MEMDISC_HD __host__ __device__ __forceinline__
#else
#define MEMDISC_HD inline
#endif

namespace memdisc {
namespace cuda {

MEMDISC_HD float acc_exp(float v) { return ::expf(v); }
MEMDISC_HD double acc_exp(double v) { return ::exp(v); }
MEMDISC_HD float acc_log(float v) { return ::logf(v); }
MEMDISC_HD double acc_log(double v) { return ::log(v); }
MEMDISC_HD float acc_max(float a, float b) { return ::fmaxf(a, b); }
MEMDISC_HD double acc_max(double a, double b) { return ::fmax(a, b); }

template <typename acc_t>
struct KLStats {
  acc_t mp, sp, w1, w2, mq, sq;

  MEMDISC_HD static KLStats empty() {
    const acc_t ninf = -static_cast<acc_t>(INFINITY);  // numeric_limits is host-only without relaxed constexpr
    return {ninf, acc_t(0), acc_t(0), acc_t(0), ninf, acc_t(0)};
  }

  // The state of one element pair (p, q), already scaled by 1/T.
  MEMDISC_HD static KLStats of(acc_t p, acc_t q) { return {p, acc_t(1), acc_t(0), acc_t(0), q, acc_t(1)}; }

  // The state of V element pairs: one exp per element and side.
  template <int V>
  MEMDISC_HD static KLStats of(const acc_t (&p)[V], const acc_t (&q)[V]) {
    KLStats s{p[0], acc_t(0), acc_t(0), acc_t(0), q[0], acc_t(0)};
    for (int j = 1; j < V; ++j) {
      s.mp = acc_max(s.mp, p[j]);
      s.mq = acc_max(s.mq, q[j]);
    }
    for (int j = 0; j < V; ++j) {
      // q[j] == mq: shift 0, also when both are -inf (masked logits of the current row; a NaN otherwise).
      const acc_t dp = p[j] - s.mp, dq = q[j] == s.mq ? acc_t(0) : q[j] - s.mq;
      const acc_t e = acc_exp(dp);
      s.sp += e;
      s.w1 += e * dp;
      s.w2 += e * dq;
      s.sq += acc_exp(dq);
    }
    return s;
  }

  // this <- this (+) o; NaN in either state propagates (NaN != 0).
  MEMDISC_HD void merge(const KLStats& o) {
    if (o.sp == acc_t(0)) return;
    if (sp == acc_t(0)) {
      *this = o;
      return;
    }
    const acc_t M = acc_max(mp, o.mp), N = acc_max(mq, o.mq);
    const acc_t dps = M - mp, dpo = M - o.mp;
    const acc_t dqs = mq == N ? acc_t(0) : N - mq, dqo = o.mq == N ? acc_t(0) : N - o.mq;  // -inf - -inf: 0
    const acc_t ep = acc_exp(-(dps + dpo)), eq = acc_exp(-(dqs + dqo));  // one of each pair is 0
    const acc_t rps = dps == acc_t(0) ? acc_t(1) : ep, rpo = dps == acc_t(0) ? ep : acc_t(1);
    const acc_t rqs = dqs == acc_t(0) ? acc_t(1) : eq, rqo = dqs == acc_t(0) ? eq : acc_t(1);
    w1 = rps * (w1 - dps * sp) + rpo * (o.w1 - dpo * o.sp);
    w2 = rps * (w2 - dqs * sp) + rpo * (o.w2 - dqo * o.sp);
    sp = rps * sp + rpo * o.sp;
    sq = rqs * sq + rqo * o.sq;
    mp = M;
    mq = N;
  }

  MEMDISC_HD acc_t kl() const { return (w1 - w2) / sp + acc_log(sq) - acc_log(sp); }
  MEMDISC_HD acc_t lse_p() const { return mp + acc_log(sp); }
  MEMDISC_HD acc_t lse_q() const { return mq + acc_log(sq); }
};

}  // namespace cuda
}  // namespace memdisc
