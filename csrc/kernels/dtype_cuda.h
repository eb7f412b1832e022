// Element types of the CUDA launchers, named without torch so the launchers
// stay torch-free; bindings/ops_cuda.cpp maps at::ScalarType onto them.
// Accumulation is in float64 for kFloat64 and float32 for every other type.
#pragma once

namespace memdisc {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace cuda
}  // namespace memdisc
