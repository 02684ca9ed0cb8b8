// Downsampled attention on CPU: argument checks and the dtype dispatch; the kernels are in
// isa/attention.cpp (one build per CPU capability).
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/attention.h"

namespace fastvit_ops {
namespace cpu {

PerDtype<AttnForwardFn> attention_forward;
PerDtype<AttnBackwardFn> attention_backward;

namespace {

template <typename T>
View4<T> view(const at::Tensor& t) {
  return {const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Dims {
  int64_t B, H, N, M, D;
};

Dims check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const c10::optional<at::Tensor>& gate) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, h, N|M, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": q and k disagree on B, h or d");
  if (gate.has_value()) {
    TORCH_CHECK(gate->sizes() == q.sizes() && gate->scalar_type() == q.scalar_type(), op,
                ": gate must match q in shape and dtype");
  }
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

}  // namespace

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& gate, at::Tensor out, at::Tensor lse, double scale) {
  const Dims g = check("_downsampled_attention_forward", q, k, v, gate);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "_downsampled_attention_forward: out must match q");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.B * g.H * g.N * 2,
              "_downsampled_attention_forward: lse must be a contiguous (B, h, N, 2) tensor");
  TORCH_CHECK(g.M >= 1, "_downsampled_attention_forward: needs at least one key");
  if (g.N == 0 || g.B == 0 || g.H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_fwd", [&] {
    TORCH_CHECK(lse.scalar_type() == (std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat),
                "_downsampled_attention_forward: lse must be float32 (float64 for float64 inputs)");
    AttnForwardArgs<scalar_t> a{g.B, g.H, g.N, g.M, g.D, view<scalar_t>(q), view<scalar_t>(k), view<scalar_t>(v),
                                gate.has_value() ? view<scalar_t>(*gate) : View4<scalar_t>(), view<scalar_t>(out),
                                lse.mutable_data_ptr<AttnAcc<scalar_t>>(), scale};
    attention_forward.of<scalar_t>().get()(a);
  });
}

void attention_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& gate, const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
                   at::Tensor dv, at::Tensor dgate, double scale) {
  const char* op = "_downsampled_attention_backward";
  const Dims g = check(op, q, k, v, gate);
  TORCH_CHECK(grad.sizes() == q.sizes() && grad.scalar_type() == q.scalar_type(), op, ": grad must match q");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), op,
              ": gradient outputs must match their inputs");
  TORCH_CHECK(dq.scalar_type() == q.scalar_type() && dk.scalar_type() == q.scalar_type() &&
              dv.scalar_type() == q.scalar_type(), op, ": gradient dtypes must match q");
  if (gate.has_value()) {
    TORCH_CHECK(dgate.sizes() == q.sizes() && dgate.scalar_type() == q.scalar_type(), op,
                ": dgate must match gate");
  }
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.B * g.H * g.N * 2, op, ": lse must be contiguous (B, h, N, 2)");
  if (g.B == 0 || g.H == 0) return;
  if (g.N == 0) {
    dk.zero_();
    dv.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_bwd", [&] {
    TORCH_CHECK(lse.scalar_type() == (std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat), op,
                ": lse must be float32 (float64 for float64 inputs)");
    const bool gated = gate.has_value();
    AttnBackwardArgs<scalar_t> a{g.B, g.H, g.N, g.M, g.D, view<scalar_t>(grad), view<scalar_t>(q), view<scalar_t>(k),
                                 view<scalar_t>(v), gated ? view<scalar_t>(*gate) : View4<scalar_t>(),
                                 view<scalar_t>(dq), view<scalar_t>(dk), view<scalar_t>(dv),
                                 gated ? view<scalar_t>(dgate) : View4<scalar_t>(),
                                 lse.const_data_ptr<AttnAcc<scalar_t>>(), scale};
    attention_backward.of<scalar_t>().get()(a);
  });
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_downsampled_attention_forward", &attention_fwd);
  m.impl("_downsampled_attention_backward", &attention_bwd);
}

}  // namespace cpu
}  // namespace fastvit_ops
