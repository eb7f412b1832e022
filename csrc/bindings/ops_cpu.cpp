// ATen glue for the CPU kernels: checks, dtype dispatch, parallel row split.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bindings/checks.h"
#include "kernels/discrepancy_cpu.h"
#include "kernels/pgd_step_cpu.h"

namespace memdisc {
namespace {

// Rows handed to one thread at a time: at least kGrainElems logits (about 10 us
// of kernel time), so tiny shapes run on the calling thread without an OpenMP
// fork and two cores split anything bigger.
constexpr int64_t kGrainElems = 16384;
int64_t grain_rows(int64_t per_row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_row)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> discrepancy_cpu(const at::Tensor& current_in, const at::Tensor& snapshots_in,
                                                               double temperature, bool reverse) {
  check_discrepancy_args(current_in, snapshots_in, temperature);
  const at::Tensor current = current_in.contiguous();
  const at::Tensor snapshots = snapshots_in.contiguous();
  const int64_t K = snapshots.size(0), B = current.size(0), C = current.size(1);
  const auto acc = acc_dtype(current.scalar_type());
  auto opts = current.options().dtype(acc);
  at::Tensor kl = at::empty({K, B}, opts), lse_cur = at::empty({B}, opts), lse_snap = at::empty({K, B}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, current.scalar_type(), "memdisc_discrepancy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = current.const_data_ptr<scalar_t>();
    const scalar_t* b = snapshots.const_data_ptr<scalar_t>();
    acc_t* klp = kl.mutable_data_ptr<acc_t>();
    acc_t* lcp = lse_cur.mutable_data_ptr<acc_t>();
    acc_t* lsp = lse_snap.mutable_data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const cpu::DiscrepancyForwardArgs<scalar_t, acc_t> args{a, b, K, B, C, inv_t, reverse, klp, lcp, lsp};
    at::parallel_for(0, B, grain_rows((K + 1) * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(cpu::discrepancy_forward_scratch<acc_t>(C));
      cpu::discrepancy_forward<scalar_t, acc_t>(args, begin, end, scratch.data());
    });
  });
  return {kl, lse_cur, lse_snap};
}

std::tuple<at::Tensor, at::Tensor> discrepancy_backward_cpu(const at::Tensor& grad_kl_in, const at::Tensor& current_in,
                                                            const at::Tensor& snapshots_in, const at::Tensor& lse_cur_in,
                                                            const at::Tensor& lse_snap_in, const at::Tensor& kl_in,
                                                            double temperature, bool reverse) {
  const BackwardInputs in = prepare_backward(grad_kl_in, current_in, snapshots_in, lse_cur_in, lse_snap_in, kl_in,
                                             temperature);
  const at::Tensor &current = in.current, &snapshots = in.snapshots, &grad_kl = in.grad_kl;
  const at::Tensor &lse_cur = in.lse_cur, &lse_snap = in.lse_snap, &kl = in.kl;
  const int64_t K = in.K, B = in.B, C = in.C;
  at::Tensor grad_current = at::empty_like(current), grad_snapshots = at::empty_like(snapshots);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, current.scalar_type(), "memdisc_discrepancy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const cpu::DiscrepancyBackwardArgs<scalar_t, acc_t> args{
        grad_kl.const_data_ptr<acc_t>(), current.const_data_ptr<scalar_t>(), snapshots.const_data_ptr<scalar_t>(),
        lse_cur.const_data_ptr<acc_t>(), lse_snap.const_data_ptr<acc_t>(), kl.const_data_ptr<acc_t>(), K, B, C, inv_t,
        reverse, grad_current.mutable_data_ptr<scalar_t>(), grad_snapshots.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, B, grain_rows(2 * (K + 1) * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(cpu::discrepancy_backward_scratch<acc_t>(C));
      cpu::discrepancy_backward<scalar_t, acc_t>(args, begin, end, scratch.data());
    });
  });
  return {grad_current, grad_snapshots};
}

void pgd_step_cpu(at::Tensor& x, const at::Tensor& grad_in, const at::Tensor& x0_in, const c10::optional<at::Tensor>& active_in,
                  double step, double eps, double lo, double hi, bool descent) {
  check_pgd_args(x, grad_in, x0_in, active_in, step, eps, lo, hi);
  const int64_t B = x.size(0);
  if (x.numel() == 0) return;
  const int64_t D = x.numel() / B;
  const at::Tensor grad = grad_in.contiguous(), x0 = x0_in.contiguous();
  at::Tensor work = x.is_contiguous() ? x : x.contiguous();
  at::Tensor active;
  if (active_in.has_value()) active = active_in->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memdisc_pgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = work.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* x0p = x0.const_data_ptr<scalar_t>();
    const bool* ap = active.defined() ? active.const_data_ptr<bool>() : nullptr;
    const cpu::PgdStepArgs<scalar_t, acc_t> args{xp, gp, x0p, ap, D, static_cast<acc_t>(step), static_cast<acc_t>(eps),
                                                 static_cast<acc_t>(lo), static_cast<acc_t>(hi), descent};
    // The step is memory-bound and ~10x cheaper per element than an exp: a larger grain.
    at::parallel_for(0, B, grain_rows(D / 8), [&](int64_t begin, int64_t end) {
      cpu::pgd_step<scalar_t, acc_t>(args, begin, end);
    });
  });
  if (!work.is_same(x)) x.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(memdisc, CPU, m) {
  m.impl("discrepancy", &discrepancy_cpu);
  m.impl("discrepancy_backward", &discrepancy_backward_cpu);
  m.impl("pgd_step_", &pgd_step_cpu);
}

}  // namespace memdisc
