// Sigmoid cross-modulation, eager CPU fast path: the forward and backward kernels under a C++
// autograd node. Same kernels and results as the Python custom op without its per-call dispatch
// and autograd glue, which at FASA's 7×7 and 14×14 stages (0.1-0.25 M elements, 40-80 µs of eager
// work) cost as much as the kernel saves.
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/cross_modulation.h"

namespace fastvit_ops {
namespace cpu {
namespace {

struct CrossModAutograd : public torch::autograd::Function<CrossModAutograd> {
  // need_local / need_global: whether each input will get a gradient (grad mode on and it requires
  // one). fp32/fp64 then save the partials ∂out/∂l, ∂out/∂g (written by the forward's pass) instead
  // of the inputs, and the backward is two products: the exps and the division run once, not twice
  // (docs/cross_modulation.md). Half types keep the inputs and recompute, so their gradients are
  // rounded once, from fp32.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& local,
                            const at::Tensor& global, int64_t mode, bool need_local, bool need_global) {
    const auto dtype = local.scalar_type();
    const bool partials = (need_local || need_global) && (dtype == at::kFloat || dtype == at::kDouble);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["partials"] = partials;
    if (!partials) {
      ctx->save_for_backward({local, global});
      return cross_modulation_fwd(local, global, mode);
    }
    auto [out, pl, pg] = cross_modulation_fwd_partials(local, global, mode, need_local, need_global);
    ctx->save_for_backward({pl, pg});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels are not differentiable themselves: refuse instead of a silently wrong result.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastvit_ops sigmoid_cross_modulation: double backward (create_graph=True) is not supported");
    torch::autograd::variable_list res(5);
    if (!grads[0].defined()) return res;
    const auto s = ctx->get_saved_variables();
    const at::Tensor& like = s[0].defined() ? s[0] : s[1];
    at::Tensor grad = grads[0];
    // The kernels walk the tensors as one flat array: the incoming gradient must share the saved
    // tensors' strides (it does unless a later op produced another layout).
    if (grad.strides() != like.strides()) grad = at::empty_like(like).copy_(grad);
    at::Tensor dl, dg;
    if (ctx->saved_data["partials"].toBool()) {
      std::tie(dl, dg) = cross_modulation_bwd_partials(grad, s[0], s[1]);
    } else {
      std::tie(dl, dg) = cross_modulation_bwd(grad, s[0], s[1], ctx->saved_data["mode"].toInt());
    }
    if (ctx->needs_input_grad(0)) res[0] = dl;
    if (ctx->needs_input_grad(1)) res[1] = dg;
    return res;
  }
};

at::Tensor cross_mod_autograd(const at::Tensor& local, const at::Tensor& global, int64_t mode) {
  const bool grad_mode = at::GradMode::is_enabled();
  return CrossModAutograd::apply(local, global, mode, grad_mode && local.requires_grad(),
                                 grad_mode && global.requires_grad());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, AutogradCPU, m) {
  m.impl("_cross_modulation_autograd", &cross_mod_autograd);
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_cross_modulation_autograd", &cross_modulation_fwd);  // below autograd: the forward alone
}

}  // namespace cpu
}  // namespace fastvit_ops
