// Autograd and ADInplaceOrView kernels of memdisc::pgd_step_, for every device.
//
// The op writes x in place and has no derivative.  Without these kernels the
// dispatcher would run the CPU/CUDA kernel with no autograd bookkeeping at all;
// with them the compiled path behaves like PyTorch's own in-place ops and like
// the reference kernel (whose x.copy_ does the same bookkeeping):
//   Autograd:        with grad mode on, a leaf x that requires grad (or a view of
//                    one) raises PyTorch's in-place error; any other input that
//                    requires grad raises too (there is no derivative to record);
//   ADInplaceOrView: bumps x's version counter (also under no_grad and
//                    inference mode), so a backward that saved x raises the usual
//                    "modified by an inplace operation" error.
// Device-independent; the _cpu suffix puts the file in every build (setup.py
// compiles every bindings/*_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace memdisc {
namespace {

using PgdStepFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                       double, double, double, bool);

const c10::TypedOperatorHandle<PgdStepFn>& pgd_step_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("memdisc::pgd_step_", "").typed<PgdStepFn>();
  return op;
}

void pgd_step_autograd(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                       const std::optional<at::Tensor>& active, double step, double eps, double lo, double hi,
                       bool descent) {
  const bool requires_grad =
      at::GradMode::is_enabled() && (x.requires_grad() || grad.requires_grad() || x0.requires_grad());
  torch::autograd::check_inplace(x, requires_grad);
  TORCH_CHECK(!requires_grad, "memdisc::pgd_step_ has no derivative, but x, grad or x0 requires grad; call it under "
              "torch.no_grad() or on detached tensors");
  const at::AutoDispatchBelowAutograd guard;
  pgd_step_op().redispatch(ks & c10::after_autograd_keyset, x, grad, x0, active, step, eps, lo, hi, descent);
}

void pgd_step_inplace_or_view(c10::DispatchKeySet ks, at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                              const std::optional<at::Tensor>& active, double step, double eps, double lo, double hi,
                              bool descent) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    pgd_step_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, x, grad, x0, active, step, eps, lo, hi,
                             descent);
  }
  torch::autograd::increment_version(x);
}

}  // namespace

TORCH_LIBRARY_IMPL(memdisc, Autograd, m) { m.impl("pgd_step_", &pgd_step_autograd); }
TORCH_LIBRARY_IMPL(memdisc, ADInplaceOrView, m) { m.impl("pgd_step_", &pgd_step_inplace_or_view); }

}  // namespace memdisc
