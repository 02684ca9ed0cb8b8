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

// The partials path (fp32/fp64 only): out and ∂out/∂l, ∂out/∂g in one pass (pl/pg may be null),
// then dl = dy·pl, dg = dy·pg.
template <typename T>
using CrossModForwardPartials = void (*)(const T* l, const T* g, T* out, T* pl, T* pg, int64_t n, bool full);
template <typename T>
using CrossModScale = void (*)(const T* dy, const T* pl, const T* pg, T* dl, T* dg, int64_t n);

extern PerDtype<CrossModForward> cross_modulation_forward;
extern PerDtype<CrossModForwardPartials> cross_modulation_forward_partials;
extern PerDtype<CrossModScale> cross_modulation_scale;
extern PerDtype<CrossModBackward> cross_modulation_backward;

// The threaded ops behind _cross_modulation_forward / _backward (inputs of one shape and strides,
// dense; mode 0 "silu", 1 "full").
at::Tensor cross_modulation_fwd(const at::Tensor& local, const at::Tensor& global, int64_t mode);
std::tuple<at::Tensor, at::Tensor> cross_modulation_bwd(const at::Tensor& grad, const at::Tensor& local,
                                                        const at::Tensor& global, int64_t mode);

// Forward for training: out plus the partials of the inputs flagged in need_local/need_global
// (undefined tensors otherwise). fp32/fp64, dense inputs of one shape and strides.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modulation_fwd_partials(const at::Tensor& local,
                                                                           const at::Tensor& global, int64_t mode,
                                                                           bool need_local, bool need_global);
// (dl, dg) = (grad·pl, grad·pg), each undefined where its partial is.
std::tuple<at::Tensor, at::Tensor> cross_modulation_bwd_partials(const at::Tensor& grad, const at::Tensor& pl,
                                                                 const at::Tensor& pg);

}  // namespace cpu
}  // namespace fastvit_ops
