// The float instantiations of the CPU discrepancy and PGD-step kernel variants,
// compiled as the extension compiles them (-O3, no -march), for
// check_vectorised.py: ctest `vectorised_kernels` disassembles this object and
// fails if a hot loop of a variant is not vectorised at its register width.
#include "kernels/discrepancy_cpu.h"
#include "kernels/pgd_step_cpu.h"

namespace memdisc {
namespace cpu {
namespace detail {

template void forward_avx512<float, float>(const DiscrepancyForwardArgs<float, float>&, int64_t, int64_t, float*);
template void forward_avx2<float, float>(const DiscrepancyForwardArgs<float, float>&, int64_t, int64_t, float*);
template void forward_default<float, float>(const DiscrepancyForwardArgs<float, float>&, int64_t, int64_t, float*);
template void backward_avx512<float, float>(const DiscrepancyBackwardArgs<float, float>&, int64_t, int64_t, float*);
template void backward_avx2<float, float>(const DiscrepancyBackwardArgs<float, float>&, int64_t, int64_t, float*);
template void backward_default<float, float>(const DiscrepancyBackwardArgs<float, float>&, int64_t, int64_t, float*);
template void pgd_avx512<float, float>(const PgdStepArgs<float, float>&, int64_t, int64_t);
template void pgd_avx2<float, float>(const PgdStepArgs<float, float>&, int64_t, int64_t);
template void pgd_default<float, float>(const PgdStepArgs<float, float>&, int64_t, int64_t);

}  // namespace detail
}  // namespace cpu
}  // namespace memdisc
