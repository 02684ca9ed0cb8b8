// Downsampled attention, eager CPU fast path: the forward and backward kernels under a C++
// autograd node. Same kernels, buffers and results as the Python custom op without its per-call
// dispatch and autograd glue (~0.25 ms per forward+backward, a quarter of the call at FAT-B0 s4).
// Output layouts as the Python side's (fastvit_ops/ops/attention.py): 0 (B, h, N, d), 1
// channels-first (B, h·d, N), 2 tokens (B, N, h·d); gradients in their inputs' layouts when dense.
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/attention.h"

namespace fastvit_ops {
namespace cpu {
namespace {

at::Tensor empty_out(const at::Tensor& q, int64_t layout) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3);
  if (layout == 1) return at::empty({b, h, d, n}, q.options()).transpose(2, 3);
  if (layout == 2) return at::empty({b, n, h, d}, q.options()).transpose(1, 2);
  return at::empty({b, h, n, d}, q.options());
}

at::Tensor empty_grad(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? at::empty_like(t) : at::empty(t.sizes(), t.options());
}

std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& gate, double scale, int64_t layout) {
  TORCH_CHECK(layout >= 0 && layout <= 2, "_downsampled_attention_autograd: layout must be 0, 1 or 2");
  at::Tensor out = empty_out(q, layout);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), 2},
                             q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (q.numel() > 0 && out.numel() > 0) attention_fwd(q, k, v, gate, out, lse, scale);
  return {out, lse};
}

struct AttnAutograd : public torch::autograd::Function<AttnAutograd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const c10::optional<at::Tensor>& gate, double scale,
                            int64_t layout) {
    auto [out, lse] = run_forward(q, k, v, gate, scale, layout);
    ctx->save_for_backward({q, k, v, gate.has_value() ? *gate : at::Tensor(), lse});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels are not differentiable themselves: refuse instead of a silently wrong result.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastvit_ops downsampled_attention: double backward (create_graph=True) is not supported");
    torch::autograd::variable_list res(6);
    if (!grads[0].defined()) return res;
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &lse = s[4];
    const bool gated = s[3].defined();
    const c10::optional<at::Tensor> gate = gated ? c10::optional<at::Tensor>(s[3]) : c10::nullopt;
    at::Tensor dq = empty_grad(q), dk = empty_grad(k), dv = empty_grad(v);
    at::Tensor dgate = gated ? empty_grad(s[3]) : at::empty({0}, q.options());
    if (q.size(2) == 0 || q.size(3) == 0) {
      dk.zero_();
      dv.zero_();
    } else if (q.numel() > 0) {
      attention_bwd(grads[0], q, k, v, gate, lse, dq, dk, dv, dgate, ctx->saved_data["scale"].toDouble());
    }
    res[0] = dq;
    res[1] = dk;
    res[2] = dv;
    if (gated) res[3] = dgate;
    return res;
  }
};

at::Tensor attn_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& gate, double scale, int64_t layout) {
  return AttnAutograd::apply(q, k, v, gate, scale, layout);
}

at::Tensor attn_forward_only(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& gate, double scale, int64_t layout) {
  return std::get<0>(run_forward(q, k, v, gate, scale, layout));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, AutogradCPU, m) {
  m.impl("_downsampled_attention_autograd", &attn_autograd);
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_downsampled_attention_autograd", &attn_forward_only);  // below autograd: the forward alone
}

}  // namespace cpu
}  // namespace fastvit_ops
