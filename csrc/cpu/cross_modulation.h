// Sigmoid cross-modulation kernels (csrc/cpu/isa/cross_modulation.cpp, one build per capability)
// over n contiguous elements; mode `full` = SiLU(SiLU(l))·SiLU(g), else SiLU(l)·SiLU(g).
#pragma once
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "cpu/capability.h"

namespace fastvit_ops {
namespace cpu {

template <typename T>
using CrossModForward = void (*)(const T* l, const T* g, T* out, int64_t n, bool full);
template <typename T>
using CrossModBackward = void (*)(const T* dy, const T* l, const T* g, T* dl, T* dg, int64_t n, bool full);

extern PerDtype<CrossModForward> cross_modulation_forward;
extern PerDtype<CrossModBackward> cross_modulation_backward;

// The threaded ops behind _cross_modulation_forward / _backward (inputs of one shape and strides,
// dense; mode 0 "silu", 1 "full").
at::Tensor cross_modulation_fwd(const at::Tensor& local, const at::Tensor& global, int64_t mode);
std::tuple<at::Tensor, at::Tensor> cross_modulation_bwd(const at::Tensor& grad, const at::Tensor& local,
                                                        const at::Tensor& global, int64_t mode);

}  // namespace cpu
}  // namespace fastvit_ops
