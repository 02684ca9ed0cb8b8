// FCViT global context on CPU, eager fast path (see cpu/global_context.h).
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/global_context.h"

namespace fastvit_ops {
namespace cpu {
namespace gc {
namespace {

// ---- eager fast path: the two calls above under a C++ autograd node (the Python custom op costs
// a few hundred µs per forward+backward in dispatch and autograd glue, more than the kernels at
// the small FCViT stages). Saves what the custom op saves: x, g, stats and the parameters.
struct GcAutograd : public torch::autograd::Function<GcAutograd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& w1,
                            const std::optional<at::Tensor>& b1,
                            const std::optional<at::Tensor>& w2,
                            const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                            const at::Tensor& beta, int64_t groups, double eps, bool residual) {
    Mlp mlp;
    auto [out, g, stats] = gc_forward_impl(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, &mlp);
    const bool has_mlp = w1.has_value();
    // The MLP's (B, ·)-sized activations are kept (a few KiB) instead of recomputed.
    ctx->save_for_backward({x, g, stats, has_mlp ? *w1 : at::Tensor(), has_mlp ? *b1 : at::Tensor(),
                            has_mlp ? *w2 : at::Tensor(), has_mlp ? *b2 : at::Tensor(), alpha,
                            beta, mlp.u, mlp.m, mlp.c});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["residual"] = residual;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The kernels are not differentiable themselves: refuse instead of a silently wrong result.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastvit_ops global context: double backward (create_graph=True) is not supported");
    torch::autograd::variable_list res(10);
    if (!grads[0].defined()) return res;
    const auto s = ctx->get_saved_variables();
    const bool has_mlp = s[3].defined();
    auto opt = [&](int i) { return has_mlp ? std::optional<at::Tensor>(s[i]) : std::nullopt; };
    Mlp mlp;
    if (has_mlp) {
      const auto acc = s[1].scalar_type();
      mlp.w1 = s[3].to(acc).contiguous();
      mlp.b1 = s[4].to(acc).contiguous();
      mlp.w2 = s[5].to(acc).contiguous();
      mlp.b2 = s[6].to(acc).contiguous();
      mlp.h = s[5].size(1);
      mlp.u = s[9];
      mlp.m = s[10];
      mlp.c = s[11];
    }
    auto [dx, da, db, dw1, db1, dw2, db2] = gc_backward_impl(
        grads[0], s[0], s[1], s[2], opt(3), opt(4), opt(5), opt(6), s[7], s[8],
        ctx->saved_data["groups"].toInt(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["residual"].toBool(), has_mlp ? &mlp : nullptr);
    res[0] = dx;
    if (has_mlp) {
      res[1] = dw1;
      res[2] = db1;
      res[3] = dw2;
      res[4] = db2;
    }
    res[5] = da;
    res[6] = db;
    return res;
  }
};

at::Tensor gc_autograd(const at::Tensor& x, const std::optional<at::Tensor>& w1,
                       const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                       const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                       const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return GcAutograd::apply(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual);
}

// Below autograd (inference mode): the forward alone.
at::Tensor gc_autograd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& w1,
                           const std::optional<at::Tensor>& b1,
                           const std::optional<at::Tensor>& w2,
                           const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                           const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return std::get<0>(gc_forward_impl(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, nullptr));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, AutogradCPU, m) {
  m.impl("_gc_autograd", &gc_autograd);
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_gc_autograd", &gc_autograd_cpu);
}

}  // namespace gc
}  // namespace cpu
}  // namespace fastvit_ops
