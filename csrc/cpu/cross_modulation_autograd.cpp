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
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& local,
                            const at::Tensor& global, int64_t mode) {
    ctx->save_for_backward({local, global});
    ctx->saved_data["mode"] = mode;
    return cross_modulation_fwd(local, global, mode);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels are not differentiable themselves: refuse instead of a silently wrong result.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastvit_ops sigmoid_cross_modulation: double backward (create_graph=True) is not supported");
    torch::autograd::variable_list res(3);
    if (!grads[0].defined()) return res;
    const auto s = ctx->get_saved_variables();
    at::Tensor grad = grads[0];
    // The kernel walks the three tensors as one flat array: the incoming gradient must share the
    // inputs' strides (it does unless a later op produced another layout).
    if (grad.strides() != s[0].strides()) grad = at::empty_like(s[0]).copy_(grad);
    auto [dl, dg] = cross_modulation_bwd(grad, s[0], s[1], ctx->saved_data["mode"].toInt());
    if (ctx->needs_input_grad(0)) res[0] = dl;
    if (ctx->needs_input_grad(1)) res[1] = dg;
    return res;
  }
};

at::Tensor cross_mod_autograd(const at::Tensor& local, const at::Tensor& global, int64_t mode) {
  return CrossModAutograd::apply(local, global, mode);
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
