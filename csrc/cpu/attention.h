// Downsampled attention on CPU: what the op entry points (attention.cpp) and the per-capability
// kernels (isa/attention.cpp) share. q, gate, out (B, h, N, d) and k, v (B, h, M, d) with any
// strides; lse (B, h, N, 2) contiguous in the accumulation type (fp32; fp64 for fp64): per query
// the max of q·k (unscaled) and log2 Σ 2^((q·k − max)·scale·log2 e).
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <type_traits>

#include "cpu/capability.h"

namespace fastvit_ops {
namespace cpu {

template <typename T>
using AttnAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A (B, h, N, d)-indexed tensor with arbitrary strides; p == nullptr for an absent one.
template <typename T>
struct View4 {
  T* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sd = 0;
  T* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

template <typename T>
struct AttnForwardArgs {
  int64_t B, H, N, M, D;
  View4<T> q, k, v, gate, out;
  AttnAcc<T>* lse;
  double scale;
};

template <typename T>
struct AttnBackwardArgs {
  int64_t B, H, N, M, D;
  View4<T> grad, q, k, v, gate, dq, dk, dv, dgate;
  const AttnAcc<T>* lse;
  double scale;
};

template <typename T>
using AttnForwardFn = void (*)(const AttnForwardArgs<T>&);
template <typename T>
using AttnBackwardFn = void (*)(const AttnBackwardArgs<T>&);

extern PerDtype<AttnForwardFn> attention_forward;
extern PerDtype<AttnBackwardFn> attention_backward;

// The ops behind _downsampled_attention_forward / _backward (argument checks, dtype dispatch),
// for the C++ autograd node (attention_autograd.cpp).
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& gate, at::Tensor out, at::Tensor lse, double scale);
void attention_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& gate, const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                   at::Tensor dv, at::Tensor dgate, double scale);

}  // namespace cpu
}  // namespace fastvit_ops
