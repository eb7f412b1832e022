// Memorization Discrepancy against K snapshots: CUDA kernels (torch-free).
//
// Inputs (row-major, contiguous):
//   current   [B, C]     logits of the current model f_t
//   snapshots [K, B, C]  logits of K historical models f_h
// With a = current / T, b = snapshot / T, lse(v) = log sum_c exp(v_c):
//   forward  (reverse = false)  kl[k,i] = KL(p_h || p_t) = KL(softmax(b) || softmax(a))
//   forward  (reverse = true)   kl[k,i] = KL(p_t || p_h) = KL(softmax(a) || softmax(b))
//   backward (reverse = false)  d/da = (p_t - p_h) / T,                 d/db = p_h (log p_h - log p_t - kl) / T
//   backward (reverse = true)   d/da = p_t (log p_t - log p_h - kl) / T, d/db = (p_h - p_t) / T
// times grad_kl[k,i]; d/da sums over k.  Same outputs as discrepancy_cpu.h.
//
// Forward: one team of TEAM threads per row pair (k, i) (TEAM = 4 for C <= 16,
// 16 for C <= 64, a warp for C <= 4096, a 256-thread block above), so K * B
// teams run in parallel; each thread folds its strided slice of both rows into
// the mergeable online statistics of kl_stats_cuda.h (one exp per element and
// row), the team merges them by shuffles (and shared memory for a block), and
// KL = (w1 - w2)/sp + log sq - log sp is free of the cancellation between the
// two log-sum-exps, so logits of +-1e4 lose nothing.  Rows whose byte length
// and base pointers are 16-byte aligned are read with 16-byte packs.
// The team of (0, i) also writes lse_current[i]; with K = 0 only those run.
// Backward: one thread per (i, pack of columns) owns that slice of row i for
// every k, so grad_current is summed in registers (no atomics); p_t is
// recomputed once per element, p_h once per (k, element), from the saved lse.
// All arithmetic in acc_t (float for float/half/bfloat16, double for double);
// no fast-math.  Sizes and offsets are int64.
//
// Byte model (s = sizeof(scalar_t), acc = sizeof(acc_t)):
//   forward  reads (K + 1)·B·C·s from DRAM (the current row is re-read K times,
//            from L2), writes (2K + 1)·B·acc            -> ~ (K+1)·B·C·s bytes.
//   backward reads (K + 1)·B·C·s + (3K + 1)·B·acc, writes (K + 1)·B·C·s
//                                                        -> ~ 2·(K+1)·B·C·s bytes.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/discrepancy_cuda.h"
#include "kernels/kl_stats_cuda.h"
#include "kernels/scalar_cuda.h"

namespace memdisc {
namespace cuda {
namespace {

constexpr int kThreads = 256;                     // threads per block, every kernel
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond this the grid strides

int64_t grid_for(int64_t units, int64_t units_per_block) {
  const int64_t blocks = (units + units_per_block - 1) / units_per_block;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

template <typename acc_t>
__device__ __forceinline__ KLStats<acc_t> shfl_xor(const KLStats<acc_t>& s, int offset, unsigned mask, int width) {
  KLStats<acc_t> o;
  o.mp = __shfl_xor_sync(mask, s.mp, offset, width);
  o.sp = __shfl_xor_sync(mask, s.sp, offset, width);
  o.w1 = __shfl_xor_sync(mask, s.w1, offset, width);
  o.w2 = __shfl_xor_sync(mask, s.w2, offset, width);
  o.mq = __shfl_xor_sync(mask, s.mq, offset, width);
  o.sq = __shfl_xor_sync(mask, s.sq, offset, width);
  return o;
}

// Merge the statistics of a team's TEAM threads; the team's rank-0 thread
// (thread 0 of the block for TEAM > 32) holds the result.  Teams of <= 32
// threads are aligned lane groups of one warp and shuffle under their own mask,
// so neighbouring teams may leave the item loop at different times.
template <int TEAM, typename acc_t>
__device__ __forceinline__ void team_reduce(KLStats<acc_t>& st) {
  const unsigned lane = threadIdx.x & 31u;
  if constexpr (TEAM <= 32) {
    const unsigned mask = TEAM == 32 ? 0xffffffffu : ((1u << TEAM) - 1u) << (lane & ~unsigned(TEAM - 1));
    for (int offset = TEAM / 2; offset > 0; offset >>= 1) st.merge(shfl_xor(st, offset, mask, TEAM));
  } else {
    constexpr int kWarps = TEAM / 32;
    __shared__ KLStats<acc_t> partial[kWarps];
    for (int offset = 16; offset > 0; offset >>= 1) st.merge(shfl_xor(st, offset, 0xffffffffu, 32));
    const unsigned warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? partial[lane] : KLStats<acc_t>::empty();
      for (int offset = kWarps / 2; offset > 0; offset >>= 1) st.merge(shfl_xor(st, offset, 0xffffffffu, kWarps));
    }
    __syncthreads();  // partial is rewritten by the next item
  }
}

// TEAM threads per (k, i) row pair; V elements per load (V > 1: 16-byte packs).
template <typename scalar_t, int TEAM, int V>
__global__ void __launch_bounds__(kThreads)
    discrepancy_forward_kernel(const scalar_t* __restrict__ current,    // [B, C]
                               const scalar_t* __restrict__ snapshots,  // [K, B, C]
                               int64_t K, int64_t B, int64_t C, acc_type<scalar_t> inv_t, bool reverse,
                               acc_type<scalar_t>* __restrict__ kl,         // [K, B] out
                               acc_type<scalar_t>* __restrict__ lse_cur,    // [B] out
                               acc_type<scalar_t>* __restrict__ lse_snap) {  // [K, B] out
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  constexpr int kTeams = kThreads / TEAM;  // teams per block
  const int rank = static_cast<int>(threadIdx.x) % TEAM;
  const int64_t items = (K > 0 ? K : 1) * B;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeams;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM; item < items; item += stride) {
    const int64_t k = item / B, i = item - k * B;
    const scalar_t* a = current + i * C;
    const scalar_t* b = K > 0 ? snapshots + item * C : a;  // K == 0: lse_current only
    // KL(p || q): p is the distribution the expectation is taken under.
    const P* p = reinterpret_cast<const P*>(reverse ? a : b);
    const P* q = reinterpret_cast<const P*>(reverse ? b : a);
    KLStats<acc_t> st = KLStats<acc_t>::empty();
    for (int64_t j = rank; j < C / V; j += TEAM) {
      const P pp = p[j], qq = q[j];
      acc_t pa[V], qa[V];
#pragma unroll
      for (int u = 0; u < V; ++u) {
        pa[u] = scale(to_acc(pp.v[u]), inv_t);
        qa[u] = scale(to_acc(qq.v[u]), inv_t);
      }
      if constexpr (V == 1) {
        st.merge(KLStats<acc_t>::of(pa[0], qa[0]));
      } else {
        st.merge(KLStats<acc_t>::of(pa, qa));
      }
    }
    team_reduce<TEAM>(st);
    if (rank == 0) {
      const acc_t lp = st.lse_p(), lq = st.lse_q();
      if (K > 0) {
        kl[item] = st.kl();
        lse_snap[item] = reverse ? lq : lp;
      }
      if (k == 0) lse_cur[i] = reverse ? lp : lq;
    }
  }
}

// One thread per (i, pack of V columns), looping over k.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    discrepancy_backward_kernel(const acc_type<scalar_t>* __restrict__ grad_kl,   // [K, B]
                                const scalar_t* __restrict__ current,             // [B, C]
                                const scalar_t* __restrict__ snapshots,           // [K, B, C]
                                const acc_type<scalar_t>* __restrict__ lse_cur,   // [B]
                                const acc_type<scalar_t>* __restrict__ lse_snap,  // [K, B]
                                const acc_type<scalar_t>* __restrict__ kl,        // [K, B]
                                int64_t K, int64_t B, int64_t C, acc_type<scalar_t> inv_t, bool reverse,
                                scalar_t* __restrict__ grad_current,     // [B, C] out
                                scalar_t* __restrict__ grad_snapshots) {  // [K, B, C] out
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  const int64_t packs_per_row = C / V;
  const int64_t packs = B * packs_per_row;
  const int64_t plane = B * C;  // elements per snapshot
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < packs; u += stride) {
    const int64_t i = u / packs_per_row;
    const int64_t off = u * V;  // element offset of this pack in [B, C]
    const P av = *reinterpret_cast<const P*>(current + off);
    const acc_t la = lse_cur[i];
    acc_t log_pt[V], pt[V], ga[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      log_pt[v] = scale(to_acc(av.v[v]), inv_t) - la;
      pt[v] = acc_exp(log_pt[v]);
      ga[v] = 0;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = k * B + i;
      const acc_t g = grad_kl[r] * inv_t, lb = lse_snap[r], d = kl[r];
      const P bv = *reinterpret_cast<const P*>(snapshots + k * plane + off);
      P gb;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc_t log_ph = scale(to_acc(bv.v[v]), inv_t) - lb;
        const acc_t ph = acc_exp(log_ph);
        if (reverse) {
          ga[v] += g * pt[v] * (log_pt[v] - log_ph - d);
          gb.v[v] = from_acc<scalar_t>(g * (ph - pt[v]));
        } else {
          ga[v] += g * (pt[v] - ph);
          gb.v[v] = from_acc<scalar_t>(g * ph * (log_ph - log_pt[v] - d));
        }
      }
      *reinterpret_cast<P*>(grad_snapshots + k * plane + off) = gb;
    }
    P gav;
#pragma unroll
    for (int v = 0; v < V; ++v) gav.v[v] = from_acc<scalar_t>(ga[v]);
    *reinterpret_cast<P*>(grad_current + off) = gav;
  }
}

template <typename scalar_t, int TEAM, int V>
void launch_forward(const scalar_t* a, const scalar_t* b, int64_t K, int64_t B, int64_t C,
                    acc_type<scalar_t> inv_t, bool reverse, acc_type<scalar_t>* kl, acc_type<scalar_t>* lse_cur,
                    acc_type<scalar_t>* lse_snap, cudaStream_t stream) {
  const int64_t items = (K > 0 ? K : 1) * B;
  const auto blocks = static_cast<unsigned>(grid_for(items, kThreads / TEAM));
  discrepancy_forward_kernel<scalar_t, TEAM, V>
      <<<blocks, kThreads, 0, stream>>>(a, b, K, B, C, inv_t, reverse, kl, lse_cur, lse_snap);
}

template <typename scalar_t>
void forward_typed(const void* current, const void* snapshots, int64_t K, int64_t B, int64_t C, double inv_t,
                   bool reverse, void* kl, void* lse_cur, void* lse_snap, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = pack_width<scalar_t>();
  const auto* a = static_cast<const scalar_t*>(current);
  const auto* b = static_cast<const scalar_t*>(snapshots);
  const auto t = static_cast<acc_t>(inv_t);
  auto* klp = static_cast<acc_t*>(kl);
  auto* lcp = static_cast<acc_t*>(lse_cur);
  auto* lsp = static_cast<acc_t*>(lse_snap);
  const bool packed = aligned16(C * static_cast<int64_t>(sizeof(scalar_t)), current, snapshots);
  if (C <= 16) {
    launch_forward<scalar_t, 4, 1>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
  } else if (C <= 64) {
    launch_forward<scalar_t, 16, 1>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
  } else if (C <= 4096) {
    if (packed) {
      launch_forward<scalar_t, 32, V>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
    } else {
      launch_forward<scalar_t, 32, 1>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
    }
  } else if (packed) {
    launch_forward<scalar_t, kThreads, V>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
  } else {
    launch_forward<scalar_t, kThreads, 1>(a, b, K, B, C, t, reverse, klp, lcp, lsp, stream);
  }
}

template <typename scalar_t, int V>
void launch_backward(const void* grad_kl, const void* current, const void* snapshots, const void* lse_cur,
                     const void* lse_snap, const void* kl, int64_t K, int64_t B, int64_t C, double inv_t,
                     bool reverse, void* grad_current, void* grad_snapshots, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const auto blocks = static_cast<unsigned>(grid_for(B * (C / V), kThreads));
  discrepancy_backward_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
      static_cast<const acc_t*>(grad_kl), static_cast<const scalar_t*>(current),
      static_cast<const scalar_t*>(snapshots), static_cast<const acc_t*>(lse_cur),
      static_cast<const acc_t*>(lse_snap), static_cast<const acc_t*>(kl), K, B, C, static_cast<acc_t>(inv_t),
      reverse, static_cast<scalar_t*>(grad_current), static_cast<scalar_t*>(grad_snapshots));
}

template <typename scalar_t>
void backward_typed(const void* grad_kl, const void* current, const void* snapshots, const void* lse_cur,
                    const void* lse_snap, const void* kl, int64_t K, int64_t B, int64_t C, double inv_t,
                    bool reverse, void* grad_current, void* grad_snapshots, cudaStream_t stream) {
  const bool packed =
      aligned16(C * static_cast<int64_t>(sizeof(scalar_t)), current, snapshots, grad_current, grad_snapshots);
  if (packed) {
    launch_backward<scalar_t, pack_width<scalar_t>()>(grad_kl, current, snapshots, lse_cur, lse_snap, kl, K, B, C,
                                                      inv_t, reverse, grad_current, grad_snapshots, stream);
  } else {
    launch_backward<scalar_t, 1>(grad_kl, current, snapshots, lse_cur, lse_snap, kl, K, B, C, inv_t, reverse,
                                 grad_current, grad_snapshots, stream);
  }
}

}  // namespace

cudaError_t discrepancy_forward(DType dtype, const void* current, const void* snapshots, int64_t K, int64_t B,
                                int64_t C, double inv_t, bool reverse, void* kl, void* lse_current,
                                void* lse_snapshots, cudaStream_t stream) {
  if (K < 0 || B < 0 || C < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      forward_typed<float>(current, snapshots, K, B, C, inv_t, reverse, kl, lse_current, lse_snapshots, stream);
      break;
    case DType::kFloat64:
      forward_typed<double>(current, snapshots, K, B, C, inv_t, reverse, kl, lse_current, lse_snapshots, stream);
      break;
    case DType::kFloat16:
      forward_typed<__half>(current, snapshots, K, B, C, inv_t, reverse, kl, lse_current, lse_snapshots, stream);
      break;
    case DType::kBFloat16:
      forward_typed<__nv_bfloat16>(current, snapshots, K, B, C, inv_t, reverse, kl, lse_current, lse_snapshots,
                                   stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t discrepancy_backward(DType dtype, const void* grad_kl, const void* current, const void* snapshots,
                                 const void* lse_current, const void* lse_snapshots, const void* kl, int64_t K,
                                 int64_t B, int64_t C, double inv_t, bool reverse, void* grad_current,
                                 void* grad_snapshots, cudaStream_t stream) {
  if (K < 0 || B < 0 || C < 1) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      backward_typed<float>(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, K, B, C, inv_t, reverse,
                            grad_current, grad_snapshots, stream);
      break;
    case DType::kFloat64:
      backward_typed<double>(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, K, B, C, inv_t, reverse,
                             grad_current, grad_snapshots, stream);
      break;
    case DType::kFloat16:
      backward_typed<__half>(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, K, B, C, inv_t, reverse,
                             grad_current, grad_snapshots, stream);
      break;
    case DType::kBFloat16:
      backward_typed<__nv_bfloat16>(grad_kl, current, snapshots, lse_current, lse_snapshots, kl, K, B, C, inv_t,
                                    reverse, grad_current, grad_snapshots, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memdisc
