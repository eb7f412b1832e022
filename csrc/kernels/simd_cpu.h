// Portable SIMD helpers for the CPU kernels (torch-free), and the runtime ISA dispatch.
//
// Vectors are GCC/Clang vector extensions as wide as one register of the target
// the calling kernel is compiled for: Simd<acc_t, VB> with VB = 64 bytes (zmm)
// for AVX-512, 32 (ymm) for AVX2, 16 (xmm) for baseline x86-64 (kVecBytes*).
// The kernels are templates on VB, instantiated three times with `target`
// attributes, and the fastest one the CPU supports is picked once at run time
// (`cpu_isa()`), so the build needs no -march flag and the binary still runs on
// any x86-64.  MEMDISC_CPU_ISA=default|avx2|avx512 caps the choice (tests use it
// to exercise every variant).
//
// Why not one 64-byte type for every target: GCC (12 at least) splits
// arithmetic on a vector wider than the registers into register-wide pieces,
// but lowers a comparison or a vector `?:` on it lane by lane (a `vmaxss`, or
// `vcomiss` + `seta`, per lane through the stack), and keeps such a vector in
// memory across loop iterations, copying it through general registers (8 bytes
// at a time, then a 32-byte reload: a store-forwarding stall per iteration).
// A vector of exactly the register width has none of this.  bench/NOTES.md
// (issue 10) has the measurements; csrc/tests/check_vectorised.cmake (ctest
// `vectorised_*`) fails if a hot loop of an instantiation stops vectorising.
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
#include <utility>

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

// Bytes of one vector register for each instantiation's target (the VB argument).
constexpr int kVecBytesAvx512 = 64, kVecBytesAvx2 = 32, kVecBytesDefault = 16;
constexpr int kMaxVecBytes = 64;

template <typename acc_t>
struct LaneInt;
template <>
struct LaneInt<float> {
  typedef int32_t type;
};
template <>
struct LaneInt<double> {
  typedef int64_t type;
};

// Lane mask table: kMaxW x -1 then kMaxW x 0; W entries from (kMaxW - n) give n
// leading -1 lanes for any vector width W <= kMaxW.
template <typename L>
struct LaneMaskTable {
  static constexpr int kMaxW = kMaxVecBytes / sizeof(L);
  alignas(64) static constexpr L kMask[2 * kMaxW] = {
      -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
      0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
  static_assert(kMaxW <= 16, "table holds 16 + 16 entries");
};
template <>
struct LaneMaskTable<int64_t> {
  static constexpr int kMaxW = kMaxVecBytes / sizeof(int64_t);
  alignas(64) static constexpr int64_t kMask[2 * kMaxW] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
};

// VB bytes of acc_t (default: the widest, 64 bytes, which sizes scratch buffers).
template <typename acc_t, int VB = kMaxVecBytes>
struct Simd {
  typedef acc_t V __attribute__((vector_size(VB)));
  typedef typename LaneInt<acc_t>::type L;  // lane type of I
  typedef L I __attribute__((vector_size(VB)));
  static constexpr int W = VB / sizeof(acc_t);
};

// Lane and integer-vector types of a vector type V.
template <typename V>
using lane_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V>
using simd_of = Simd<lane_t<V>, sizeof(V)>;

template <typename V>
MEMDISC_INLINE V splat(lane_t<V> v) {
  V r = {};
  return r + v;
}

template <typename V>
MEMDISC_INLINE typename simd_of<V>::I as_int(V v) {
  typename simd_of<V>::I r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
template <typename V>
MEMDISC_INLINE V as_float(typename simd_of<V>::I v) {
  V r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// Lanes < n of v, `fill` in the others (0 <= n <= W).  Bitwise, with the lane
// mask read from a table: GCC lowers a vector ternary on a runtime count lane
// by lane, which costs more than the whole exp.
template <typename V>
MEMDISC_INLINE V select_lanes(int64_t n, V v, lane_t<V> fill) {
  using S = simd_of<V>;
  using I = typename S::I;
  using T = LaneMaskTable<typename S::L>;
  I mask;
  std::memcpy(&mask, T::kMask + (T::kMaxW - n), sizeof(mask));
  const I vi = as_int(v), fi = as_int(splat<V>(fill));
  return as_float<V>((vi & mask) | (fi & ~mask));
}

// Load W values of scalar_t as the lanes of V (a plain vector load when the types match).
template <typename V, typename scalar_t>
MEMDISC_INLINE V load_full(const scalar_t* p) {
  using acc_t = lane_t<V>;
  V v;
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int j = 0; j < simd_of<V>::W; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  return v;
}

// Load n <= W values from p; lanes >= n get `fill`.  `end` is the end of the
// readable buffer: when a whole vector fits before it, one full load and a
// select replace the lane-by-lane tail (rows of a [.., C] tensor are
// contiguous, so only the very last row of a buffer takes the slow tail).
template <typename V, typename scalar_t>
MEMDISC_INLINE V load(const scalar_t* p, int64_t n, lane_t<V> fill, const scalar_t* end) {
  constexpr int W = simd_of<V>::W;
  if (n == W) return load_full<V>(p);
  if (end - p >= W) return select_lanes(n, load_full<V>(p), fill);
  V v;
  for (int j = 0; j < W; ++j) v[j] = j < n ? static_cast<lane_t<V>>(p[j]) : fill;
  return v;
}

// The two halves of v.
template <typename V, typename H>
MEMDISC_INLINE void halves(V v, H& lo, H& hi) {
  static_assert(2 * sizeof(H) == sizeof(V), "H is half of V");
  std::memcpy(&lo, &v, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
}

// Store the first 0 < n < W lanes of v to p (same lane type): whole halves,
// quarters, ... by the bits of n, so no lane-by-lane loop (which GCC turns into
// a libc memcpy call of the spilled vector).
template <typename V>
MEMDISC_INLINE void store_part(lane_t<V>* p, V v, int64_t n) {
  constexpr int W = simd_of<V>::W;
  if constexpr (W <= 2) {
    p[0] = v[0];  // n == 1
  } else if constexpr (W == 4) {
    if (n >= 2) std::memcpy(p, &v, 2 * sizeof(p[0]));
    if (n & 1) p[n - 1] = n == 1 ? v[0] : v[2];
  } else {
    typedef lane_t<V> H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    halves(v, lo, hi);
    if (n < W / 2) return store_part(p, lo, n);
    std::memcpy(p, &lo, sizeof(lo));
    if (n > W / 2) store_part(p + W / 2, hi, n - W / 2);
  }
}

// Store the first n <= W lanes of v to p, converted to scalar_t.
template <typename scalar_t, typename V>
MEMDISC_INLINE void store(scalar_t* p, V v, int64_t n) {
  constexpr int W = simd_of<V>::W;
  if constexpr (std::is_same<lane_t<V>, scalar_t>::value) {
    if (n == W) {
      std::memcpy(p, &v, sizeof(v));
    } else if (n > 0) {
      store_part(p, v, n);
    }
  } else if (n == W) {
    for (int j = 0; j < W; ++j) p[j] = static_cast<scalar_t>(v[j]);
  } else {
    for (int j = 0; j < n; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

// a > b ? a : b and a < b ? a : b: one maxps / minps (b where either is NaN).
template <typename V>
MEMDISC_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
MEMDISC_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

// Horizontal sum / max by halving down to 16 bytes, then the lanes
// ((v0 + v2) + (v1 + v3) for 4 lanes): log2 W vector steps instead of W scalar ones.
template <typename V>
MEMDISC_INLINE lane_t<V> hsum(V v) {
  using acc_t = lane_t<V>;
  if constexpr (sizeof(V) > 16) {
    typedef acc_t H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    halves(v, lo, hi);
    return hsum(lo + hi);
  } else if constexpr (simd_of<V>::W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    return v[0] + v[1];
  }
}
template <typename V>
MEMDISC_INLINE lane_t<V> hmax(V v) {
  using acc_t = lane_t<V>;
  if constexpr (sizeof(V) > 16) {
    typedef acc_t H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    halves(v, lo, hi);
    return hmax(vmax(lo, hi));
  } else if constexpr (simd_of<V>::W == 4) {
    const acc_t c = v[0] > v[2] ? v[0] : v[2], d = v[1] > v[3] ? v[1] : v[3];
    return c > d ? c : d;
  } else {
    return v[0] > v[1] ? v[0] : v[1];
  }
}

template <typename V>
MEMDISC_INLINE V exp_vec(V x) {
  if constexpr (std::is_same<lane_t<V>, double>::value) {
    for (int j = 0; j < simd_of<V>::W; ++j) x[j] = std::exp(x[j]);
    return x;
  } else {
    using I = typename simd_of<V>::I;
    const V hi = splat<V>(88.3762626647949f), lo = splat<V>(-87.3365478515625f);
    const V xc = vmin(hi, vmax(lo, x));  // NaN stays NaN
    // t = x log2(e) + 1.5 * 2^23 holds round(x log2 e) in its low mantissa bits.
    const float magic = 12582912.0f;
    const V t = xc * 1.44269504088896341f + magic;
    const V n = t - magic;
    V r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V y = splat<V>(1.9875691500E-4f);
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * (r * r) + r + 1.0f;
    I yi = as_int(y);
    yi += (as_int(t) - 0x4B400000) << 23;  // y * 2^n, n in [-126, 127]
    V out = as_float<V>(yi);
    out = x < lo ? splat<V>(0.0f) : out;
    out = x > hi ? splat<V>(std::numeric_limits<float>::infinity()) : out;
    return out;
  }
}

// Natural log, Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-8
// polynomial in m - 1, e ln2 added in two parts.  Error <= 2 ulp for positive
// normal x; +inf and NaN pass through (the kernels only take logs of sums >= 1).
template <typename V>
MEMDISC_INLINE V log_vec(V x) {
  if constexpr (std::is_same<lane_t<V>, double>::value) {
    for (int j = 0; j < simd_of<V>::W; ++j) x[j] = std::log(x[j]);
    return x;
  } else {
    using I = typename simd_of<V>::I;
    const I xi = as_int(x);
    I e = ((xi >> 23) & 0xff) - 126;  // x = m 2^e, m in [0.5, 1)
    V m = as_float<V>((xi & 0x007fffff) | 0x3f000000);
    const I small = m < 0.707106781186547524f;  // -1 where m < sqrt(1/2): use 2m, e - 1
    e += small;
    const V ms = as_float<V>(as_int(m) & small);  // m where small, else 0
    m = m - 1.0f + ms;                            // m - 1, or 2m - 1 where small
    const V ef = __builtin_convertvector(e, V);
    const V z = m * m;
    V y = splat<V>(7.0376836292E-2f);
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
    const V out = m + y + ef * 0.693359375f;
    return x <= std::numeric_limits<float>::max() ? out : x;
  }
}

}  // namespace cpu
}  // namespace memdisc
