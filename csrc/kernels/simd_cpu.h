// Portable SIMD helpers for the CPU kernels (torch-free), and the runtime ISA dispatch.
//
// Vectors are GCC/Clang vector extensions of 64 bytes (16 floats or 8 doubles):
// the compiler lowers them to one zmm register under AVX-512, two ymm under AVX2
// and four xmm on baseline x86-64, so one source serves every target.  The
// kernels are instantiated three times with `target` attributes and the fastest
// one the CPU supports is picked once at run time (`cpu_isa()`), so the build
// needs no -march flag and the binary still runs on any x86-64.
// MEMDISC_CPU_ISA=default|avx2|avx512 caps the choice (tests use it to exercise
// every variant).
//
// exp_vec(float) is Cephes' expf: n = round(x log2 e), r = x - n ln2 (two-constant
// Cody-Waite), exp(r) by a degree-6 polynomial, times 2^n built in the exponent
// bits.  Error <= 2 ulp on [-87.3, 88.3]; 0 below (no denormal outputs), +inf
// above; NaN propagates.  No -ffast-math anywhere.  For double the lanes call
// std::exp (float64 is the oracle path, not the fast path).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define MEMDISC_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MEMDISC_X86_DISPATCH 1
#define MEMDISC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define MEMDISC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MEMDISC_X86_DISPATCH 0
#define MEMDISC_TARGET_AVX512
#define MEMDISC_TARGET_AVX2
#endif

namespace memdisc {
namespace cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports, capped by MEMDISC_CPU_ISA; computed once.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kDefault;
#if MEMDISC_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("MEMDISC_CPU_ISA");
    if (cap != nullptr) {
      Isa want = best;
      if (std::strcmp(cap, "default") == 0) want = Isa::kDefault;
      if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "default");
}

template <typename acc_t>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef int32_t L;  // lane type of I
  static constexpr int W = 16;
  alignas(64) static constexpr L kLaneMask[2 * W] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                     0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  typedef int64_t L;
  static constexpr int W = 8;
  alignas(64) static constexpr L kLaneMask[2 * W] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
};

template <typename acc_t>
MEMDISC_INLINE typename Simd<acc_t>::V splat(acc_t v) {
  typename Simd<acc_t>::V r = {};
  return r + v;
}

// Lanes < n of v, `fill` in the others (0 <= n <= W).  Bitwise, with the lane
// mask read from a table: GCC lowers a vector ternary on a runtime count lane
// by lane, which costs more than the whole exp.
template <typename acc_t>
MEMDISC_INLINE typename Simd<acc_t>::V select_lanes(int64_t n, typename Simd<acc_t>::V v, acc_t fill) {
  using V = typename Simd<acc_t>::V;
  using I = typename Simd<acc_t>::I;
  constexpr int W = Simd<acc_t>::W;
  I mask, vi, fi;
  std::memcpy(&mask, Simd<acc_t>::kLaneMask + (W - n), sizeof(mask));
  const V f = splat(fill);
  std::memcpy(&vi, &v, sizeof(v));
  std::memcpy(&fi, &f, sizeof(f));
  vi = (vi & mask) | (fi & ~mask);
  V out;
  std::memcpy(&out, &vi, sizeof(out));
  return out;
}

// Load W values of scalar_t as acc_t (a plain vector load when the types match).
template <typename acc_t, typename scalar_t>
MEMDISC_INLINE typename Simd<acc_t>::V load_full(const scalar_t* p) {
  typename Simd<acc_t>::V v;
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int j = 0; j < Simd<acc_t>::W; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  return v;
}

// Load n <= W values from p; lanes >= n get `fill`.  `end` is the end of the
// readable buffer: when a whole vector fits before it, one full load and a
// select replace the lane-by-lane tail (rows of a [.., C] tensor are
// contiguous, so only the very last row of a buffer takes the slow tail).
template <typename acc_t, typename scalar_t>
MEMDISC_INLINE typename Simd<acc_t>::V load(const scalar_t* p, int64_t n, acc_t fill, const scalar_t* end) {
  constexpr int W = Simd<acc_t>::W;
  using V = typename Simd<acc_t>::V;
  if (n == W) return load_full<acc_t>(p);
  if (end - p >= W) {
    return select_lanes<acc_t>(n, load_full<acc_t>(p), fill);
  }
  V v;
  for (int j = 0; j < W; ++j) v[j] = j < n ? static_cast<acc_t>(p[j]) : fill;
  return v;
}

// Store the first n <= W lanes of v to p, converted to scalar_t.
template <typename scalar_t, typename acc_t>
MEMDISC_INLINE void store(scalar_t* p, typename Simd<acc_t>::V v, int64_t n) {
  constexpr int W = Simd<acc_t>::W;
  if (n == W && std::is_same<acc_t, scalar_t>::value) {
    std::memcpy(p, &v, sizeof(v));
  } else if (n == W) {
    for (int j = 0; j < W; ++j) p[j] = static_cast<scalar_t>(v[j]);
  } else {
    for (int j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

template <typename acc_t>
MEMDISC_INLINE typename Simd<acc_t>::V vmax(typename Simd<acc_t>::V a, typename Simd<acc_t>::V b) {
  return a > b ? a : b;
}

// Horizontal sum / max by halving (log2 W vector steps instead of W scalar ones).
MEMDISC_INLINE float hsum(Simd<float>::V v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
MEMDISC_INLINE double hsum(Simd<double>::V v) {
  typedef double V4 __attribute__((vector_size(32)));
  const V4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (a[0] + a[2]) + (a[1] + a[3]);
}
MEMDISC_INLINE float hmax(Simd<float>::V v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 lo8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const V8 hi8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V8 a = lo8 > hi8 ? lo8 : hi8;
  const V4 lo4 = __builtin_shufflevector(a, a, 0, 1, 2, 3), hi4 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const V4 b = lo4 > hi4 ? lo4 : hi4;
  const float c = b[0] > b[2] ? b[0] : b[2], d = b[1] > b[3] ? b[1] : b[3];
  return c > d ? c : d;
}
MEMDISC_INLINE double hmax(Simd<double>::V v) {
  typedef double V4 __attribute__((vector_size(32)));
  const V4 lo4 = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi4 = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const V4 a = lo4 > hi4 ? lo4 : hi4;
  const double c = a[0] > a[2] ? a[0] : a[2], d = a[1] > a[3] ? a[1] : a[3];
  return c > d ? c : d;
}

MEMDISC_INLINE Simd<float>::V exp_vec(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const V hi = splat(88.3762626647949f), lo = splat(-87.3365478515625f);
  const V xc = x > hi ? hi : (x < lo ? lo : x);
  // t = x log2(e) + 1.5 * 2^23 holds round(x log2 e) in its low mantissa bits.
  const float magic = 12582912.0f;
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + r + 1.0f;
  I ti, yi;
  std::memcpy(&ti, &t, sizeof(t));
  std::memcpy(&yi, &y, sizeof(y));
  yi += (ti - 0x4B400000) << 23;  // y * 2^n, n in [-126, 127]
  V out;
  std::memcpy(&out, &yi, sizeof(out));
  const V inf = splat(std::numeric_limits<float>::infinity());
  out = x < lo ? splat(0.0f) : out;
  out = x > hi ? inf : out;
  return out;
}

// Natural log, Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-8
// polynomial in m - 1, e ln2 added in two parts.  Error <= 2 ulp for positive
// normal x; +inf and NaN pass through (the kernels only take logs of sums >= 1).
MEMDISC_INLINE Simd<float>::V log_vec(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  I xi;
  std::memcpy(&xi, &x, sizeof(x));
  I e = ((xi >> 23) & 0xff) - 126;  // x = m 2^e, m in [0.5, 1)
  I mi = (xi & 0x007fffff) | 0x3f000000;
  V m;
  std::memcpy(&m, &mi, sizeof(m));
  const I small = m < 0.707106781186547524f;  // -1 where m < sqrt(1/2): use 2m, e - 1
  e += small;
  I smi;
  std::memcpy(&smi, &m, sizeof(m));
  smi &= small;  // m where small, else 0
  V ms;
  std::memcpy(&ms, &smi, sizeof(ms));
  m = m - 1.0f + ms;  // m - 1, or 2m - 1 where small
  const V ef = __builtin_convertvector(e, V);
  const V z = m * m;
  V y = splat(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  V out = m + y + ef * 0.693359375f;
  const V big = splat(std::numeric_limits<float>::max());
  return x <= big ? out : x;
}

MEMDISC_INLINE Simd<double>::V log_vec(Simd<double>::V x) {
  for (int j = 0; j < Simd<double>::W; ++j) x[j] = std::log(x[j]);
  return x;
}

MEMDISC_INLINE Simd<double>::V exp_vec(Simd<double>::V x) {
  for (int j = 0; j < Simd<double>::W; ++j) x[j] = std::exp(x[j]);
  return x;
}

}  // namespace cpu
}  // namespace memdisc
