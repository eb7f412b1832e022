// Host-side argument checks shared by the CPU and CUDA bindings.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#define MEMDISC_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), "memdisc: ", #x, " must have ", n, " dims, got shape ", (x).sizes())
#define MEMDISC_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), "memdisc: ", #x, " is on ", (x).device(), " but ", #y, " is on ", (y).device())
#define MEMDISC_CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), "memdisc: ", #x, " is ", (x).scalar_type(), " but ", #y, " is ", (y).scalar_type())
#define MEMDISC_CHECK_FLOATING(x)                                                        \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||     \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kBFloat16,  \
              "memdisc: ", #x, " must be float32, float64, float16 or bfloat16, got ", (x).scalar_type())

namespace memdisc {

// The per-row accumulator dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Shape checks common to the discrepancy forward on every device.
inline void check_discrepancy_args(const at::Tensor& current, const at::Tensor& snapshots, double temperature) {
  MEMDISC_CHECK_DIM(current, 2);
  MEMDISC_CHECK_DIM(snapshots, 3);
  MEMDISC_CHECK_FLOATING(current);
  MEMDISC_CHECK_SAME_DTYPE(current, snapshots);
  MEMDISC_CHECK_SAME_DEVICE(current, snapshots);
  TORCH_CHECK(snapshots.size(1) == current.size(0) && snapshots.size(2) == current.size(1),
              "memdisc: snapshots must be [K, B, C] with [B, C] = current's shape ", current.sizes(),
              ", got ", snapshots.sizes());
  TORCH_CHECK(current.size(1) >= 1, "memdisc: the class dimension C must be >= 1");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "memdisc: temperature must be finite and > 0, got ",
              temperature);
}

// A tensor saved by the forward (or the upstream gradient), checked for shape and
// device, as the accumulator dtype and contiguous.
inline at::Tensor saved_row_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                                   const at::Tensor& like, at::ScalarType acc) {
  TORCH_CHECK(t.sizes() == shape, "memdisc: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "memdisc: ", name, " is on ", t.device(), " but current is on ",
              like.device());
  return t.to(acc).contiguous();
}

// The backward's inputs, checked and made contiguous (the saved per-row tensors in the
// accumulator dtype), shared by the CPU and CUDA bindings.
struct BackwardInputs {
  at::Tensor current, snapshots, grad_kl, lse_cur, lse_snap, kl;
  int64_t K, B, C;
};

inline BackwardInputs prepare_backward(const at::Tensor& grad_kl, const at::Tensor& current_in,
                                       const at::Tensor& snapshots_in, const at::Tensor& lse_cur,
                                       const at::Tensor& lse_snap, const at::Tensor& kl, double temperature) {
  check_discrepancy_args(current_in, snapshots_in, temperature);
  BackwardInputs in;
  in.current = current_in.contiguous();
  in.snapshots = snapshots_in.contiguous();
  in.K = in.snapshots.size(0), in.B = in.current.size(0), in.C = in.current.size(1);
  const auto acc = acc_dtype(in.current.scalar_type());
  in.grad_kl = saved_row_tensor(grad_kl, "grad_kl", {in.K, in.B}, in.current, acc);
  in.lse_cur = saved_row_tensor(lse_cur, "lse_current", {in.B}, in.current, acc);
  in.lse_snap = saved_row_tensor(lse_snap, "lse_snapshots", {in.K, in.B}, in.current, acc);
  in.kl = saved_row_tensor(kl, "kl", {in.K, in.B}, in.current, acc);
  return in;
}

inline void check_pgd_args(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                           const c10::optional<at::Tensor>& active, double step, double eps, double lo, double hi) {
  MEMDISC_CHECK_FLOATING(x);
  MEMDISC_CHECK_SAME_DTYPE(x, grad);
  MEMDISC_CHECK_SAME_DTYPE(x, x0);
  MEMDISC_CHECK_SAME_DEVICE(x, grad);
  MEMDISC_CHECK_SAME_DEVICE(x, x0);
  TORCH_CHECK(x.sizes() == grad.sizes() && x.sizes() == x0.sizes(), "memdisc: x, grad and x0 must share a shape, got ",
              x.sizes(), ", ", grad.sizes(), ", ", x0.sizes());
  TORCH_CHECK(x.dim() >= 1, "memdisc: x must have a leading batch dimension");
  TORCH_CHECK(std::isfinite(step) && std::isfinite(eps) && std::isfinite(lo) && std::isfinite(hi),
              "memdisc: step, eps, lo and hi must be finite, got ", step, ", ", eps, ", ", lo, ", ", hi);
  TORCH_CHECK(eps >= 0, "memdisc: eps must be >= 0, got ", eps);
  if (active.has_value()) {
    TORCH_CHECK(active->scalar_type() == at::kBool, "memdisc: active must be a bool tensor, got ", active->scalar_type());
    TORCH_CHECK(active->dim() == 1 && active->size(0) == x.size(0), "memdisc: active must be [B] with B = ", x.size(0),
                ", got ", active->sizes());
    MEMDISC_CHECK_SAME_DEVICE(x, (*active));
  }
}

}  // namespace memdisc
