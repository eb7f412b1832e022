// Torch-free unit tests of the kernel templates, against naive float64 oracles.
//
//   test_kernels cpu_discrepancy   kernels/discrepancy_cpu.h forward + backward (float, double)
//   test_kernels cpu_pgd_step      kernels/pgd_step_cpu.h (float bit-exact, double; NaN/inf
//                                  inputs as torch: NaN in x or x0 propagates, sign(NaN) = 0)
//   test_kernels cuda_kl_stats     kernels/kl_stats_cuda.h: the CUDA forward's arithmetic,
//                                  chunking and merge trees, run on the host
//
// Inputs are random normals (scale 3) mixed with rows of +-1e4 logits; outputs
// are pre-filled with NaN so an unwritten element fails.  Shapes include C = 1,
// B = 0 and K = 0.  Tolerances: both forwards assemble the KL from
// max-shifted logits, so the error is a few ulp of what is left,
// tol = 16 eps (1 + |kl| + log C), whatever the logits' magnitude.  When 1/T
// is not a power of two, z * (1/T) is rounded in the kernel's precision (as in
// the PyTorch reference), moving each scaled logit by eps/2 |z/T| and the KL by
// up to about that times (2 + 2 |kl|): tol += 4 eps max|z/T| (1 + |kl|).
// T = 2 checks the scaled path with the tight bound.  eps is the kernel type's.
// The CPU tests run under every ISA the machine has (MEMDISC_CPU_ISA, set by ctest).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/discrepancy_cpu.h"
#include "kernels/kl_stats_cuda.h"
#include "kernels/pgd_step_cpu.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    ++g_checks;                                                 \
    if (!(cond)) {                                              \
      ++g_failures;                                             \
      if (g_failures <= 20) {                                   \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                               \
        std::printf("\n");                                      \
      }                                                         \
    }                                                           \
  } while (0)

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <typename T>
double eps_of() {
  return static_cast<double>(std::numeric_limits<T>::epsilon());
}

// Logits [n]: normals of scale 3, and with probability 1/4 a row of +-1e4 values.
std::vector<double> random_logits(std::mt19937_64& rng, int64_t rows, int64_t C) {
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::vector<double> v(static_cast<size_t>(rows * C));
  for (int64_t r = 0; r < rows; ++r) {
    const bool huge = unif(rng) < 0.25;
    for (int64_t c = 0; c < C; ++c) {
      double z = normal(rng);
      if (huge) z = (unif(rng) < 0.5 ? -1e4 : 1e4) + z;
      v[static_cast<size_t>(r * C + c)] = z;
    }
  }
  return v;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// The inputs as the kernel sees them, widened back to double for the oracle.
template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// The oracle: long double (64-bit mantissa on x86-64) on max-shifted logits, so
// its own error stays far below the double kernels' tolerance even at +-1e4.
using ldouble = long double;

ldouble row_max(const double* v, int64_t C, double inv_t) {
  ldouble m = -std::numeric_limits<ldouble>::infinity();
  for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<ldouble>(v[c]) * inv_t);
  return m;
}

ldouble log_sum_shifted(const double* v, int64_t C, double inv_t, ldouble m) {
  ldouble s = 0;
  for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<ldouble>(v[c]) * inv_t - m);
  return std::log(s);
}

double lse(const double* v, int64_t C, double inv_t) {
  const ldouble m = row_max(v, C, inv_t);
  return static_cast<double>(m + log_sum_shifted(v, C, inv_t, m));
}

// KL(softmax(p/T) || softmax(q/T)) by its definition.
double kl_naive(const double* p, const double* q, int64_t C, double inv_t) {
  const ldouble mp = row_max(p, C, inv_t), mq = row_max(q, C, inv_t);
  const ldouble lp = log_sum_shifted(p, C, inv_t, mp), lq = log_sum_shifted(q, C, inv_t, mq);
  ldouble kl = 0;
  for (int64_t c = 0; c < C; ++c) {
    const ldouble log_p = (static_cast<ldouble>(p[c]) * inv_t - mp) - lp;
    const ldouble log_q = (static_cast<ldouble>(q[c]) * inv_t - mq) - lq;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  return static_cast<double>(kl);
}

// True when multiplying by inv_t is exact (a power of two).
bool exact_scale(double inv_t) {
  int e;
  return std::frexp(inv_t, &e) == 0.5;
}

double max_abs_scaled(const double* a, const double* b, int64_t C, double inv_t) {
  double m = 0;
  for (int64_t c = 0; c < C; ++c) m = std::max({m, std::fabs(a[c] * inv_t), std::fabs(b[c] * inv_t)});
  return m;
}

// ---------------------------------------------------------------- CPU forward + backward

template <typename T>
void check_cpu_forward(std::mt19937_64& rng, int64_t K, int64_t B, int64_t C, double temperature, bool reverse,
                       bool same_rows) {
  const auto cur = cast<T>(random_logits(rng, B, C));
  auto snap = cast<T>(random_logits(rng, K * B, C));
  if (same_rows) {
    for (int64_t k = 0; k < K; ++k) std::copy(cur.begin(), cur.end(), snap.begin() + k * B * C);
  }
  const auto a = widen(cur), b = widen(snap);
  const T inv_t = static_cast<T>(1.0 / temperature);
  const double inv_td = static_cast<double>(inv_t);
  std::vector<T> kl(K * B, T(kNaN)), lse_cur(B, T(kNaN)), lse_snap(K * B, T(kNaN));
  std::vector<T> scratch(memdisc::cpu::discrepancy_forward_scratch<T>(C));
  // Two row ranges split off a block boundary, as a parallel_for may split them.
  const memdisc::cpu::DiscrepancyForwardArgs<T, T> args{cur.data(), snap.data(), K, B, C, inv_t, reverse,
                                                         kl.data(), lse_cur.data(), lse_snap.data()};
  memdisc::cpu::discrepancy_forward<T, T>(args, 0, B / 3, scratch.data());
  memdisc::cpu::discrepancy_forward<T, T>(args, B / 3, B, scratch.data());
  const double eps = eps_of<T>();
  double worst = 0;
  for (int64_t i = 0; i < B; ++i) {
    const double* ai = a.data() + i * C;
    const double la = lse(ai, C, inv_td);
    EXPECT(std::fabs(lse_cur[i] - la) <= 16 * eps * (1 + std::fabs(la)), "lse_cur[%lld]=%g ref %g", (long long)i,
           (double)lse_cur[i], la);
    for (int64_t k = 0; k < K; ++k) {
      const double* bi = b.data() + (k * B + i) * C;
      const double ref = reverse ? kl_naive(ai, bi, C, inv_td) : kl_naive(bi, ai, C, inv_td);
      const double lb = lse(bi, C, inv_td);
      const double tol = 16 * eps * (1 + std::fabs(ref) + std::log(static_cast<double>(C))) +
                         (exact_scale(inv_td) ? 0.0 : 4 * eps * max_abs_scaled(ai, bi, C, inv_td) * (1 + std::fabs(ref)));
      const double err = std::fabs(kl[k * B + i] - ref);
      worst = std::max(worst, err / tol);
      EXPECT(err <= tol, "K=%lld B=%lld C=%lld T=%g rev=%d kl=%.9g ref %.9g",
             (long long)K, (long long)B, (long long)C, temperature, reverse, (double)kl[k * B + i], ref);
      EXPECT(std::fabs(lse_snap[k * B + i] - lb) <= 16 * eps * (1 + std::fabs(lb)), "lse_snap %g ref %g",
             (double)lse_snap[k * B + i], lb);
      if (same_rows) EXPECT(std::fabs(kl[k * B + i]) <= tol, "KL(p||p)=%g", (double)kl[k * B + i]);
    }
  }
  if (worst > 0.25) std::printf("  cpu forward %-6s K=%lld B=%lld C=%-4lld T=%.1f rev=%d: max err/tol = %.2f\n",
                                sizeof(T) == 4 ? "float" : "double", (long long)K, (long long)B, (long long)C,
                                temperature, reverse, worst);
}

// Naive backward: the formulas of discrepancy_cpu.h from the definition.
void backward_naive(const double* a, const double* b, int64_t C, double inv_t, bool reverse, double g, double* ga,
                    double* gb) {
  const double la = lse(a, C, inv_t), lb = lse(b, C, inv_t);
  const double d = reverse ? kl_naive(a, b, C, inv_t) : kl_naive(b, a, C, inv_t);
  for (int64_t c = 0; c < C; ++c) {
    const double log_pt = a[c] * inv_t - la, log_ph = b[c] * inv_t - lb;
    const double pt = std::exp(log_pt), ph = std::exp(log_ph);
    if (reverse) {
      ga[c] += g * inv_t * pt * (log_pt - log_ph - d);
      gb[c] = g * inv_t * (ph - pt);
    } else {
      ga[c] += g * inv_t * (pt - ph);
      gb[c] = g * inv_t * ph * (log_ph - log_pt - d);
    }
  }
}

// The naive backward is the derivative of the naive forward (central differences).
void check_naive_backward_is_gradient(std::mt19937_64& rng, bool reverse) {
  const int64_t C = 6;
  const double inv_t = 1.0 / 1.7, h = 1e-6;
  auto a = random_logits(rng, 1, C), b = random_logits(rng, 1, C);
  for (auto& v : a) v = std::fmod(v, 50.0);  // keep the difference quotient well conditioned
  for (auto& v : b) v = std::fmod(v, 50.0);
  std::vector<double> ga(C, 0.0), gb(C);
  backward_naive(a.data(), b.data(), C, inv_t, reverse, 0.75, ga.data(), gb.data());
  const auto f = [&] { return 0.75 * (reverse ? kl_naive(a.data(), b.data(), C, inv_t) : kl_naive(b.data(), a.data(), C, inv_t)); };
  for (int64_t c = 0; c < C; ++c) {
    for (int side = 0; side < 2; ++side) {
      double& v = side == 0 ? a[c] : b[c];
      const double keep = v;
      v = keep + h;
      const double up = f();
      v = keep - h;
      const double down = f();
      v = keep;
      const double fd = (up - down) / (2 * h), an = side == 0 ? ga[c] : gb[c];
      EXPECT(std::fabs(fd - an) <= 1e-6 * (1 + std::fabs(an)), "rev=%d side=%d c=%lld fd=%.10g analytic=%.10g",
             reverse, side, (long long)c, fd, an);
    }
  }
}

template <typename T>
void check_cpu_backward(std::mt19937_64& rng, int64_t K, int64_t B, int64_t C, double temperature, bool reverse) {
  const auto cur = cast<T>(random_logits(rng, B, C));
  const auto snap = cast<T>(random_logits(rng, K * B, C));
  const auto a = widen(cur), b = widen(snap);
  const T inv_t = static_cast<T>(1.0 / temperature);
  const double inv_td = static_cast<double>(inv_t);
  std::uniform_real_distribution<double> unif(-2.0, 2.0);
  std::vector<T> grad_kl(K * B), kl(K * B), lse_cur(B), lse_snap(K * B);
  for (auto& g : grad_kl) g = static_cast<T>(unif(rng));  // not all ones
  std::vector<T> fscratch(memdisc::cpu::discrepancy_forward_scratch<T>(C));
  memdisc::cpu::discrepancy_forward<T, T>({cur.data(), snap.data(), K, B, C, inv_t, reverse, kl.data(), lse_cur.data(),
                                           lse_snap.data()},
                                          0, B, fscratch.data());
  std::vector<T> ga(B * C, T(kNaN)), gb(K * B * C, T(kNaN));
  std::vector<T> scratch(memdisc::cpu::discrepancy_backward_scratch<T>(C));
  const memdisc::cpu::DiscrepancyBackwardArgs<T, T> args{grad_kl.data(), cur.data(), snap.data(), lse_cur.data(),
                                                          lse_snap.data(), kl.data(), K, B, C, inv_t, reverse,
                                                          ga.data(), gb.data()};
  memdisc::cpu::discrepancy_backward<T, T>(args, 0, B / 3, scratch.data());  // split off a block boundary
  memdisc::cpu::discrepancy_backward<T, T>(args, B / 3, B, scratch.data());
  // First-order error: the kernel's log p carry eps * m (m = max |z/T|), which
  // moves each gradient term by about eps * m * (|term| + |g| / T).
  const double eps = eps_of<T>();
  std::vector<double> ref_ga(C), tol_ga(C), ga_k(C), ref_gb(C);
  for (int64_t i = 0; i < B; ++i) {
    std::fill(ref_ga.begin(), ref_ga.end(), 0.0);
    std::fill(tol_ga.begin(), tol_ga.end(), 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * B + i;
      const double* bi = b.data() + r * C;
      const double m = 1 + max_abs_scaled(a.data() + i * C, bi, C, inv_td);
      const double g = static_cast<double>(grad_kl[r]);
      std::fill(ga_k.begin(), ga_k.end(), 0.0);
      backward_naive(a.data() + i * C, bi, C, inv_td, reverse, g, ga_k.data(), ref_gb.data());
      for (int64_t c = 0; c < C; ++c) {
        ref_ga[c] += ga_k[c];
        tol_ga[c] += 16 * eps * m * (std::fabs(ga_k[c]) + std::fabs(g) * inv_td);
        const double tol = 16 * eps * m * (std::fabs(ref_gb[c]) + std::fabs(g) * inv_td);
        EXPECT(std::fabs(gb[r * C + c] - ref_gb[c]) <= tol, "grad_snap K=%lld C=%lld rev=%d got %.9g ref %.9g",
               (long long)K, (long long)C, reverse, (double)gb[r * C + c], ref_gb[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      EXPECT(std::fabs(ga[i * C + c] - ref_ga[c]) <= tol_ga[c], "grad_cur K=%lld C=%lld rev=%d got %.9g ref %.9g",
             (long long)K, (long long)C, reverse, (double)ga[i * C + c], ref_ga[c]);
    }
  }
}

void test_cpu_discrepancy() {
  std::mt19937_64 rng(1234);
  // C <= 16 (float) / 8 (double) take the rows-in-lanes forward, larger C the row-at-a-time one.
  const int64_t shapes[][3] = {{3, 7, 10}, {1, 5, 1}, {2, 0, 10}, {0, 4, 10}, {2, 3, 1000}, {4, 33, 17},
                               {3, 37, 16}, {2, 21, 8}, {2, 50, 9}};
  for (const auto& s : shapes) {
    for (bool reverse : {false, true}) {
      for (double T : {1.0, 2.0, 2.5}) {
        check_cpu_forward<float>(rng, s[0], s[1], s[2], T, reverse, false);
        check_cpu_forward<double>(rng, s[0], s[1], s[2], T, reverse, false);
        check_cpu_backward<float>(rng, s[0], s[1], s[2], T, reverse);
        check_cpu_backward<double>(rng, s[0], s[1], s[2], T, reverse);
      }
      check_cpu_forward<float>(rng, s[0], s[1], s[2], 1.0, reverse, true);
      check_cpu_forward<double>(rng, s[0], s[1], s[2], 1.0, reverse, true);
    }
  }
  check_naive_backward_is_gradient(rng, false);
  check_naive_backward_is_gradient(rng, true);
}

// ---------------------------------------------------------------- CPU pgd step

// The PyTorch reference's op sequence, each op rounded to T, with torch's NaN rules
// (sign(NaN) = 0; maximum/minimum return NaN if either side is; clamp keeps a NaN):
// new = x - step*sign(g); new = min(max(new, x0 - eps), x0 + eps); new = clamp(new, lo, hi).
template <typename T>
T pgd_naive(T x, T g, T x0, T step, T eps, T lo, T hi, bool descent) {
  const T s = g > 0 ? T(1) : (g < 0 ? T(-1) : T(0));
  const T t = static_cast<T>(step * s);
  T v = descent ? static_cast<T>(x - t) : static_cast<T>(x + t);
  const T low = static_cast<T>(x0 - eps), high = static_cast<T>(x0 + eps);
  v = std::isnan(low) ? low : std::max(v, low);
  v = std::isnan(high) ? high : std::min(v, high);
  return std::isnan(v) ? v : std::min(std::max(v, lo), hi);
}

// One element of x, grad or x0: v, or with probability 1/8 (when non_finite) NaN, +inf or -inf.
template <typename T>
T maybe_non_finite(std::mt19937_64& rng, T v, bool non_finite) {
  if (!non_finite) return v;
  const T special[3] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                        -std::numeric_limits<T>::infinity()};
  const auto r = std::uniform_int_distribution<int>(0, 23)(rng);
  return r < 3 ? special[r] : v;
}

template <typename T>
void check_cpu_pgd(std::mt19937_64& rng, int64_t B, int64_t D, double step, double eps, bool descent, bool masked,
                   bool zero_grad, bool non_finite = false) {
  std::uniform_real_distribution<double> unif(-0.3, 1.3);
  std::uniform_int_distribution<int> coin(0, 2);
  std::vector<T> x(B * D), g(B * D), x0(B * D);
  for (int64_t j = 0; j < B * D; ++j) {
    x0[j] = static_cast<T>(unif(rng));
    x[j] = maybe_non_finite<T>(rng, static_cast<T>(x0[j] + 0.1 * unif(rng)), non_finite);
    x0[j] = maybe_non_finite<T>(rng, x0[j], non_finite);
    g[j] = maybe_non_finite<T>(rng, zero_grad ? T(0) : static_cast<T>(coin(rng) - 1) * static_cast<T>(unif(rng)),
                               non_finite);  // exact zeros too
  }
  bool active[64];  // B <= 64 here
  for (int64_t i = 0; i < B; ++i) active[i] = !masked || (i % 3 != 1);
  const auto before = x;
  const T ts = static_cast<T>(step), te = static_cast<T>(eps), lo = T(0), hi = T(1);
  memdisc::cpu::pgd_step<T, T>({x.data(), g.data(), x0.data(), masked ? active : nullptr, D, ts, te, lo, hi, descent},
                               0, B);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < D; ++j) {
      const int64_t e = i * D + j;
      const T want = active[i] ? pgd_naive<T>(before[e], g[e], x0[e], ts, te, lo, hi, descent) : before[e];
      EXPECT(std::memcmp(&x[e], &want, sizeof(T)) == 0 || (std::isnan(x[e]) && std::isnan(want)),
             "pgd %s row %lld active=%d x=%g g=%g x0=%g: got %.9g want %.9g", sizeof(T) == 4 ? "float" : "double",
             (long long)i, active[i], (double)before[e], (double)g[e], (double)x0[e], (double)x[e], (double)want);
      if (non_finite) continue;  // the bounds below hold for finite inputs
      if (active[i]) {
        EXPECT(x[e] >= lo && x[e] <= hi, "outside the box: %g", (double)x[e]);
        EXPECT(std::fabs(static_cast<double>(x[e]) - static_cast<double>(x0[e])) <= eps * (1 + 4 * eps_of<T>()) ||
                   x0[e] < lo || x0[e] > hi,
               "outside the eps-ball: x=%g x0=%g", (double)x[e], (double)x0[e]);
      }
      if (eps == 0 && active[i]) {
        const T want0 = std::min(std::max(x0[e], lo), hi);
        EXPECT(x[e] == want0, "eps=0 must give clip(x0): %g vs %g", (double)x[e], (double)want0);
      }
      if (zero_grad && active[i]) {
        const T want0 = std::min(std::max(std::min(std::max(before[e], static_cast<T>(x0[e] - te)),
                                                   static_cast<T>(x0[e] + te)), lo), hi);
        EXPECT(x[e] == want0, "zero grad must only project: %g vs %g", (double)x[e], (double)want0);
      }
    }
  }
}

void test_cpu_pgd_step() {
  std::mt19937_64 rng(99);
  for (bool descent : {true, false}) {
    for (bool masked : {false, true}) {
      for (double eps : {0.0, 0.2}) {
        for (bool zero_grad : {false, true}) {
          check_cpu_pgd<float>(rng, 7, 33, 0.02, eps, descent, masked, zero_grad);
          check_cpu_pgd<double>(rng, 7, 33, 0.02, eps, descent, masked, zero_grad);
        }
      }
    }
  }
  check_cpu_pgd<float>(rng, 0, 5, 0.02, 0.2, true, true, false);  // B = 0
  for (bool descent : {true, false}) {  // NaN and +-inf in x, grad and x0; D = 67 leaves a vector tail
    check_cpu_pgd<float>(rng, 9, 67, 0.02, 0.2, descent, true, false, true);
    check_cpu_pgd<double>(rng, 9, 67, 0.02, 0.2, descent, true, false, true);
  }
}

// ---------------------------------------------------------------- CUDA forward arithmetic on the host

// The state the CUDA forward reaches for one row pair: thread t of a team of
// `team` threads folds packs j = t, t + team, ... of V elements, then the team
// merges by an xor butterfly (width <= 32); team = 256 merges each warp, then
// the 8 warp results, as discrepancy.cu's team_reduce does.
template <typename acc_t, int V>
memdisc::cuda::KLStats<acc_t> emulate_team(const std::vector<acc_t>& p, const std::vector<acc_t>& q, int team) {
  using S = memdisc::cuda::KLStats<acc_t>;
  const int64_t packs = static_cast<int64_t>(p.size()) / V;
  std::vector<S> st(team, S::empty());
  for (int t = 0; t < team; ++t) {
    for (int64_t j = t; j < packs; j += team) {
      acc_t pa[V], qa[V];
      for (int u = 0; u < V; ++u) {
        pa[u] = p[j * V + u];
        qa[u] = q[j * V + u];
      }
      if constexpr (V == 1) {
        st[t].merge(S::of(pa[0], qa[0]));
      } else {
        st[t].merge(S::of(pa, qa));
      }
    }
  }
  const auto butterfly = [](std::vector<S>& s, int width) {
    for (int off = width / 2; off > 0; off >>= 1) {
      std::vector<S> next = s;
      for (size_t l = 0; l < s.size(); ++l) next[l].merge(s[l ^ static_cast<size_t>(off)]);
      s = next;
    }
  };
  if (team <= 32) {
    butterfly(st, team);
    return st[0];
  }
  std::vector<S> warps;
  for (int w = 0; w < team / 32; ++w) {
    std::vector<S> lanes(st.begin() + 32 * w, st.begin() + 32 * (w + 1));
    butterfly(lanes, 32);
    warps.push_back(lanes[0]);
  }
  butterfly(warps, static_cast<int>(warps.size()));
  return warps[0];
}

template <typename acc_t, int V>
void check_kl_stats(std::mt19937_64& rng, int64_t C, int team, double temperature) {
  const double eps = eps_of<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  for (int trial = 0; trial < 6; ++trial) {
    const auto raw_p = random_logits(rng, 1, C), raw_q = random_logits(rng, 1, C);
    std::vector<acc_t> p(C), q(C);
    for (int64_t c = 0; c < C; ++c) {
      p[c] = static_cast<acc_t>(raw_p[c]) * inv_t;  // the kernel scales each element by inv_t on load
      q[c] = static_cast<acc_t>(raw_q[c]) * inv_t;
    }
    const auto pd = widen(p), qd = widen(q);
    const double ref = kl_naive(pd.data(), qd.data(), C, 1.0);
    const double lp = lse(pd.data(), C, 1.0), lq = lse(qd.data(), C, 1.0);
    const auto st = emulate_team<acc_t, V>(p, q, team);
    const double tol = 16 * eps * (1 + std::fabs(ref) + std::log(static_cast<double>(C)));
    EXPECT(std::fabs(st.kl() - ref) <= tol, "team=%d V=%d C=%lld kl=%.9g ref=%.9g", team, V, (long long)C,
           (double)st.kl(), ref);
    EXPECT(std::fabs(st.lse_p() - lp) <= 16 * eps * (1 + std::fabs(lp)), "lse_p %g ref %g", (double)st.lse_p(), lp);
    EXPECT(std::fabs(st.lse_q() - lq) <= 16 * eps * (1 + std::fabs(lq)), "lse_q %g ref %g", (double)st.lse_q(), lq);
    const auto same = emulate_team<acc_t, V>(p, p, team);
    EXPECT(same.kl() == acc_t(0), "KL(p||p) must be exactly 0, got %g (team=%d C=%lld)", (double)same.kl(), team,
           (long long)C);
  }
}

// q = -inf on every element of the packs that thread 1 of the team reads (so its whole slice is -inf).
template <int V>
void check_minus_inf_q(int team, int64_t C) {
  std::vector<float> p(C), q(C);
  for (int64_t c = 0; c < C; ++c) {
    p[c] = static_cast<float>(c % 7) * 0.5f - 1.0f;
    q[c] = (c / V) % team == 1 ? -std::numeric_limits<float>::infinity() : static_cast<float>(c % 5) * 0.25f;
  }
  const auto pd = widen(p), qd = widen(q);
  const double lq = lse(qd.data(), C, 1.0), lp = lse(pd.data(), C, 1.0);
  const auto got = emulate_team<float, V>(p, q, team);
  EXPECT(std::isinf(got.kl()) && got.kl() > 0, "team=%d V=%d C=%lld: KL with -inf q must be +inf, got %g", team, V,
         (long long)C, (double)got.kl());
  EXPECT(std::fabs(got.lse_q() - lq) <= 16 * eps_of<float>() * (1 + std::fabs(lq)), "lse_q %g ref %g",
         (double)got.lse_q(), lq);
  EXPECT(std::fabs(got.lse_p() - lp) <= 16 * eps_of<float>() * (1 + std::fabs(lp)), "lse_p %g ref %g",
         (double)got.lse_p(), lp);
}

void test_cuda_kl_stats() {
  std::mt19937_64 rng(7);
  for (double T : {1.0, 3.0}) {
    for (int64_t C : {1, 2, 10, 16}) check_kl_stats<float, 1>(rng, C, 4, T);
    for (int64_t C : {17, 64}) check_kl_stats<float, 1>(rng, C, 16, T);
    for (int64_t C : {100, 1000, 4096}) {
      check_kl_stats<float, 1>(rng, C, 32, T);
      check_kl_stats<float, 4>(rng, C, 32, T);
      check_kl_stats<double, 2>(rng, C, 32, T);
    }
    for (int64_t C : {4100, 20000}) {
      check_kl_stats<float, 4>(rng, C, 256, T);
      check_kl_stats<float, 1>(rng, C, 256, T);
      check_kl_stats<double, 1>(rng, C, 256, T);
    }
    for (int64_t C : {1, 10}) check_kl_stats<double, 1>(rng, C, 4, T);
  }
  // -inf on the q side (masked classes), with whole thread slices all -inf: +inf KL, finite lse(q), as the CPU.
  check_minus_inf_q<1>(4, 10);
  check_minus_inf_q<1>(16, 64);
  check_minus_inf_q<4>(4, 64);
  // Merging is order-free up to rounding: a state merged with an empty one is unchanged.
  using S = memdisc::cuda::KLStats<float>;
  S s = S::of(1.5f, -2.0f);
  s.merge(S::empty());
  EXPECT(s.mp == 1.5f && s.sp == 1.0f && s.mq == -2.0f && s.sq == 1.0f && s.w1 == 0 && s.w2 == 0,
         "merge with empty changed the state");
  S nan_state = S::of(std::numeric_limits<float>::quiet_NaN(), 0.0f);
  S t = S::of(1.0f, 1.0f);
  t.merge(nan_state);
  EXPECT(std::isnan(t.kl()), "NaN input must give NaN, got %g", (double)t.kl());
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  bool ran = false;
  if (which == "all" || which == "cpu_discrepancy") {
    test_cpu_discrepancy();
    ran = true;
  }
  if (which == "all" || which == "cpu_pgd_step") {
    test_cpu_pgd_step();
    ran = true;
  }
  if (which == "all" || which == "cuda_kl_stats") {
    test_cuda_kl_stats();
    ran = true;
  }
  if (!ran) {
    std::printf("unknown test group '%s' (cpu_discrepancy, cpu_pgd_step, cuda_kl_stats, all)\n", which.c_str());
    return 2;
  }
  std::printf("%s: %d checks, %d failures\n", which.c_str(), g_checks, g_failures);
  return g_failures == 0 && g_checks > 0 ? 0 : 1;
}
