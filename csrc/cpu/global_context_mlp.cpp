// FCViT global context on CPU: the maxout MLP on the channel means (see cpu/global_context.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include "cpu/global_context.h"

namespace fastvit_ops {
namespace cpu {
namespace gc {

// The forward accumulates in double from the fp32 (or fp64) g and weights: a product of two fp32
// values is exact in double, so u, m, c carry ~1e-16 relative error before their final rounding.
// Accumulated in fp32 (a dot product per output, or an FMA chain) it measured 2–3× torch's own
// error at FCViT's large-mean inputs, where c cancels (terms ~10³, c ~ 1): beyond the 2× rule.
namespace {

template <typename A>
void mlp_forward_loops(const A* g, const A* w1, const A* b1, const A* w2, const A* b2, int64_t B, int64_t C,
                       int64_t h, A* u, A* m, A* c) {
  std::vector<double> ud(2 * h), md(h);
  for (int64_t b = 0; b < B; ++b) {
    const A* gb = g + b * C;
    for (int64_t j = 0; j < 2 * h; ++j) {
      ud[j] = static_cast<double>(b1[j]) + dot_acc(w1 + j * C, gb, C);
      u[b * 2 * h + j] = static_cast<A>(ud[j]);
    }
    for (int64_t j = 0; j < h; ++j) {
      const double p = ud[j], q = ud[h + j];
      md[j] = (p > q || p != p) ? p : q;  // torch.maximum: NaN propagates
      m[b * h + j] = static_cast<A>(md[j]);
    }
    for (int64_t i = 0; i < C; ++i)
      c[b * C + i] = static_cast<A>(static_cast<double>(b2[i]) + dot_acc(w2 + i * h, md.data(), h));
  }
}

}  // namespace

// The MLP backward of sample b: du_b (2h) from dc_b, and dg_b += W1ᵀ·du_b. The maxout's gradient
// follows torch.maximum's rule: ties split it in half, NaN gets none. `dm` is h of scratch.
template <typename A>
void mlp_backward_sample(const A* dc_b, const A* u_b, const A* w1, const A* w2, int64_t C, int64_t h, A* dm,
                         A* du_b, A* dg_b) {
  std::fill(dm, dm + h, A(0));
  for (int64_t i = 0; i < C; ++i) axpy(dm, w2 + i * h, dc_b[i], h);
  for (int64_t j = 0; j < h; ++j) {
    const A p = u_b[j], q = u_b[h + j];
    const A t = p == q ? dm[j] * A(0.5) : dm[j];
    du_b[j] = p >= q ? t : A(0);
    du_b[h + j] = q >= p ? t : A(0);
  }
  for (int64_t j = 0; j < 2 * h; ++j) axpy(dg_b, w1 + j * C, du_b[j], C);
}

// dW2 = Σ_b dc_b·m_bᵀ, db2 = Σ_b dc_b, dW1 = Σ_b du_b·g_bᵀ, db1 = Σ_b du_b (overwritten). Each output
// row sums over b in order, whichever thread writes it: deterministic. In parallel over the rows
// (C of dW2, 2h of dW1): serial, it was a tenth of the backward at FCViT-tiny s4 (C = 320).
template <typename A>
void mlp_weight_grads(const A* dc, int64_t ldc, const A* du, const A* g, const A* m, int64_t B, int64_t C,
                      int64_t h, A* dw1, A* db1, A* dw2, A* db2) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(B * std::max(C, h), 1));
  at::parallel_for(0, C + 2 * h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r < C) {  // row i of dW2 and db2
        const int64_t i = r;
        A* w = dw2 + i * h;
        std::fill(w, w + h, A(0));
        A s = 0;
        for (int64_t b = 0; b < B; ++b) {
          const A v = dc[b * ldc + i];
          axpy(w, m + b * h, v, h);
          s += v;
        }
        db2[i] = s;
      } else {  // row j of dW1 and db1
        const int64_t j = r - C;
        A* w = dw1 + j * C;
        std::fill(w, w + C, A(0));
        A s = 0;
        for (int64_t b = 0; b < B; ++b) {
          const A v = du[b * 2 * h + j];
          axpy(w, g + b * C, v, C);
          s += v;
        }
        db1[j] = s;
      }
    }
  });
}

// The weights in the accumulation dtype and room for u, m, c (B rows); nothing computed yet.
Mlp make_mlp(int64_t B, int64_t C, const at::TensorOptions& acc_opts, const at::Tensor& w1, const at::Tensor& b1,
             const at::Tensor& w2, const at::Tensor& b2) {
  Mlp r;
  const auto acc = acc_opts.dtype().toScalarType();
  r.w1 = w1.to(acc).contiguous();
  r.b1 = b1.to(acc).contiguous();
  r.w2 = w2.to(acc).contiguous();
  r.b2 = b2.to(acc).contiguous();
  r.h = w2.size(1);
  r.u = at::empty({B, 2 * r.h}, acc_opts);
  r.m = at::empty({B, r.h}, acc_opts);
  r.c = at::empty({B, C}, acc_opts);
  return r;
}

// MLP rows [b0, b1) from g (its rows at g_b0).
template <typename A>
void mlp_rows(const Mlp& r, const A* g_b0, int64_t b0, int64_t b1, int64_t C) {
  const int64_t h = r.h;
  mlp_forward_loops<A>(g_b0, r.w1.const_data_ptr<A>(), r.b1.const_data_ptr<A>(), r.w2.const_data_ptr<A>(),
                       r.b2.const_data_ptr<A>(), b1 - b0, C, h, r.u.mutable_data_ptr<A>() + b0 * 2 * h,
                       r.m.mutable_data_ptr<A>() + b0 * h, r.c.mutable_data_ptr<A>() + b0 * C);
}

Mlp run_mlp(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
            const at::Tensor& b2) {
  const int64_t B = g.size(0), C = g.size(1);
  Mlp r = make_mlp(B, C, g.options(), w1, b1, w2, b2);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gc_mlp", [&] { mlp_rows<scalar_t>(r, g.const_data_ptr<scalar_t>(), 0, B, C); });
  return r;
}

template void mlp_rows<float>(const Mlp&, const float*, int64_t, int64_t, int64_t);
template void mlp_rows<double>(const Mlp&, const double*, int64_t, int64_t, int64_t);
template void mlp_backward_sample<float>(const float*, const float*, const float*, const float*, int64_t, int64_t,
                                         float*, float*, float*);
template void mlp_backward_sample<double>(const double*, const double*, const double*, const double*, int64_t,
                                          int64_t, double*, double*, double*);
template void mlp_weight_grads<float>(const float*, int64_t, const float*, const float*, const float*, int64_t,
                                      int64_t, int64_t, float*, float*, float*, float*);
template void mlp_weight_grads<double>(const double*, int64_t, const double*, const double*, const double*, int64_t,
                                       int64_t, int64_t, double*, double*, double*, double*);

}  // namespace gc
}  // namespace cpu
}  // namespace fastvit_ops
