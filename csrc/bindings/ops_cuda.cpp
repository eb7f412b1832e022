// ATen glue for the CUDA kernels: checks, dtype mapping, device guard, current
// stream.  The kernels themselves are torch-free (kernels/*.cu); their launch
// errors come back as cudaError_t and become TORCH_CHECK failures here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "bindings/checks.h"
#include "kernels/discrepancy_cuda.h"
#include "kernels/pgd_step_cuda.h"

namespace memdisc {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      C10_THROW_ERROR(TypeError, c10::str("memdisc: no CUDA kernel for dtype ", t));
  }
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "memdisc: CUDA kernel ", kernel, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> discrepancy_cuda(const at::Tensor& current_in,
                                                                const at::Tensor& snapshots_in, double temperature,
                                                                bool reverse) {
  check_discrepancy_args(current_in, snapshots_in, temperature);
  const c10::cuda::CUDAGuard guard(current_in.device());
  const at::Tensor current = current_in.contiguous();
  const at::Tensor snapshots = snapshots_in.contiguous();
  const int64_t K = snapshots.size(0), B = current.size(0), C = current.size(1);
  const auto opts = current.options().dtype(acc_dtype(current.scalar_type()));
  at::Tensor kl = at::empty({K, B}, opts), lse_cur = at::empty({B}, opts), lse_snap = at::empty({K, B}, opts);
  check_launch(cuda::discrepancy_forward(kernel_dtype(current.scalar_type()), current.const_data_ptr(),
                                         snapshots.const_data_ptr(), K, B, C, 1.0 / temperature, reverse,
                                         kl.mutable_data_ptr(), lse_cur.mutable_data_ptr(),
                                         lse_snap.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "discrepancy_forward");
  return {kl, lse_cur, lse_snap};
}

std::tuple<at::Tensor, at::Tensor> discrepancy_backward_cuda(const at::Tensor& grad_kl_in, const at::Tensor& current_in,
                                                             const at::Tensor& snapshots_in,
                                                             const at::Tensor& lse_cur_in,
                                                             const at::Tensor& lse_snap_in, const at::Tensor& kl_in,
                                                             double temperature, bool reverse) {
  const c10::cuda::CUDAGuard guard(current_in.device());
  const BackwardInputs in = prepare_backward(grad_kl_in, current_in, snapshots_in, lse_cur_in, lse_snap_in, kl_in,
                                             temperature);
  const at::Tensor &current = in.current, &snapshots = in.snapshots, &grad_kl = in.grad_kl;
  const at::Tensor &lse_cur = in.lse_cur, &lse_snap = in.lse_snap, &kl = in.kl;
  const int64_t K = in.K, B = in.B, C = in.C;
  at::Tensor grad_current = at::empty_like(current), grad_snapshots = at::empty_like(snapshots);
  check_launch(cuda::discrepancy_backward(kernel_dtype(current.scalar_type()), grad_kl.const_data_ptr(),
                                          current.const_data_ptr(), snapshots.const_data_ptr(),
                                          lse_cur.const_data_ptr(), lse_snap.const_data_ptr(), kl.const_data_ptr(),
                                          K, B, C, 1.0 / temperature, reverse, grad_current.mutable_data_ptr(),
                                          grad_snapshots.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "discrepancy_backward");
  return {grad_current, grad_snapshots};
}

void pgd_step_cuda(at::Tensor& x, const at::Tensor& grad_in, const at::Tensor& x0_in,
                   const c10::optional<at::Tensor>& active_in, double step, double eps, double lo, double hi,
                   bool descent) {
  check_pgd_args(x, grad_in, x0_in, active_in, step, eps, lo, hi);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0);
  const int64_t D = x.numel() / B;
  const at::Tensor grad = grad_in.contiguous(), x0 = x0_in.contiguous();
  at::Tensor work = x.is_contiguous() ? x : x.contiguous();
  at::Tensor active;
  if (active_in.has_value()) active = active_in->contiguous();
  check_launch(cuda::pgd_step(kernel_dtype(x.scalar_type()), work.mutable_data_ptr(), grad.const_data_ptr(),
                              x0.const_data_ptr(), active.defined() ? active.const_data_ptr<bool>() : nullptr, B, D,
                              step, eps, lo, hi, descent, c10::cuda::getCurrentCUDAStream()),
               "pgd_step_");
  if (!work.is_same(x)) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(memdisc, CUDA, m) {
  m.impl("discrepancy", &discrepancy_cuda);
  m.impl("discrepancy_backward", &discrepancy_backward_cuda);
  m.impl("pgd_step_", &pgd_step_cuda);
}

}  // namespace memdisc
