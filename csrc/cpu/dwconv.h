// Depthwise 2-D convolution on CPU: what the op entry points (dwconv.cpp) and the per-capability
// kernels (isa/dwconv_*.cpp) share.
//
//   forward : y = act(conv(x) + bias) [+ x]        conv = nn.Conv2d(C, C, k, s, p, groups=C)
//   backward: g = dy · act'(pre) (pre recomputed, never stored); dx = the conv of g with the
//             flipped kernel (g zero-upsampled for stride 2) [+ dy]; dweight and dbias as
//             per-plane partial sums that dwconv.cpp reduces over the batch in a fixed order
//             (deterministic, no atomics).
//
// Three kernels ("paths"), all built for every capability, chosen per call by dwconv.cpp:
// * rows   any shape and dtype: one (b, c) plane per work item, copied (and converted to the
//          accumulation type) into a zero-padded scratch plane so the inner loops carry no
//          border branches; blocks of output rows × vectors of output columns in registers;
// * flat   small planes (fp32/fp64): the padded plane as one 1-D array, so every tap is one
//          broadcast weight times a contiguous run and a plane's outputs sit in a few registers;
// * cblock fp32, C a multiple of the vector width, k ≤ 13: the vector lanes are channels
//          (transposed in and out of a (rows, cols, lanes) tile in L1), every lane useful on
//          planes narrower than a vector; forward, and the backward at stride 1.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/capability.h"

namespace fastvit_ops {
namespace cpu {

enum DwActivation : int { kActNone = 0, kActSilu = 1, kActGelu = 2 };

// fp32 accumulation for fp32 and the half types, fp64 for fp64.
template <typename T>
using DwAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct DwShape {
  int64_t B, C, H, W, Ho, Wo;
  int k, s, p;
};

struct Strides4 {
  int64_t b, c, h, w;
};

template <typename T>
struct DwForwardArgs {
  using A = DwAcc<T>;
  DwShape sh;
  const T* x;
  Strides4 xs;
  const A* w;     // (C, k, k) contiguous
  const A* bias;  // (C,) or null
  T* y;           // NCHW, or channels_last when y_cl (cblock only)
  bool y_cl;
  int act;
  bool residual;
  // FCViT's global-context apply as the conv's input prologue (rows path only): the conv reads
  // z = x + sp[b, γ]·c[b, c] with γ = c / (C / G); sp (B, G, H, W) and c (B, C) contiguous.
  const A* sp;
  const A* c;
  int64_t G;
};

template <typename T>
struct DwBackwardArgs {
  using A = DwAcc<T>;
  DwShape sh;
  const T* x;
  Strides4 xs;
  const T* dy;
  Strides4 gs;
  const A* w;      // (C, k, k)
  const A* wflip;  // the same kernels flipped in both axes (rows path's dgrad)
  const A* bias;
  T* dx;           // (B, C, H, W) contiguous, or null: no dgrad
  A* dw_part;      // (B, C, k·k) per-plane partial sums, or null: no wgrad
  A* db_part;      // (B, C)
  int act;
  bool residual;
};

template <typename T>
using DwForwardFn = void (*)(const DwForwardArgs<T>&);
template <typename T>
using DwBackwardFn = void (*)(const DwBackwardArgs<T>&);

// Registered for every dtype by the rows kernels, for fp32/fp64 by flat, fp32 by cblock (whose
// backward takes stride 1 only).
extern PerDtype<DwForwardFn> dwconv_rows_forward;
extern PerDtype<DwBackwardFn> dwconv_rows_backward;
extern PerDtype<DwForwardFn> dwconv_flat_forward;
extern PerDtype<DwBackwardFn> dwconv_flat_backward;
extern PerDtype<DwForwardFn> dwconv_cblock_forward;
extern PerDtype<DwBackwardFn> dwconv_cblock_backward;
// The channel block of the cblock kernel in use: its vector width in fp32 lanes (16, 8 or 4).
extern CpuKernel<int (*)()> dwconv_cblock_lanes;

// The op entry points (dwconv.cpp), for the C++ autograd node (dwconv_autograd.cpp).
at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, int64_t padding, int64_t activation, bool residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias,
                                                               int64_t stride, int64_t padding, int64_t activation,
                                                               bool residual, bool need_dx, bool need_dw);
void dwconv_check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding, int64_t activation,
                       bool residual);
bool is_channels_last(const at::Tensor& t);

}  // namespace cpu
}  // namespace fastvit_ops
