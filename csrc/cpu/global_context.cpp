// FCViT global context on CPU, forward (see cpu/global_context.h): the channel means, the
// similarity statistics and the output, per (sample, group) or one task per sample.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/global_context.h"

namespace fastvit_ops {
namespace cpu {
namespace gc {

CpuKernel<const RowKernels<float>*> row_kernels_f32;
CpuKernel<const RowKernels<double>*> row_kernels_f64;
CpuKernel<const DotKernels*> dot_kernels;
CpuKernel<const WideKernels*> wide_kernels;

Dims dims_of(const at::Tensor& x, int64_t groups, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W)");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, op, ": groups must divide C");
  return {x.size(0), x.size(1), groups, x.size(1) / groups, x.size(2) * x.size(3)};
}

void check_acc(const char* op, const char* name, const at::Tensor& t, at::ScalarType acc,
               at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have the accumulation dtype");
  TORCH_CHECK(t.is_contiguous() && t.sizes() == shape, op, ": ", name, " must be contiguous ",
              shape);
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}


namespace {

std::tuple<at::Tensor, at::Tensor> gc_forward(const at::Tensor& x_, const at::Tensor& g_,
                                              const std::optional<at::Tensor>& c_,
                                              const at::Tensor& alpha_, const at::Tensor& beta_,
                                              int64_t groups, double eps, bool residual, bool stats_only) {
  const char* op = "_gc_forward";
  TORCH_CHECK(x_.device().is_cpu(), op, ": x must be a CPU tensor");
  const at::Tensor x = x_.contiguous();
  const Dims k = dims_of(x, groups, op);
  const auto acc = g_.scalar_type() == at::kDouble ? at::kDouble : acc_type(x);  // double: the fp32 backward's recompute
  check_acc(op, "g", g_, acc, {k.B, k.C});
  check_acc(op, "alpha", alpha_, acc, {k.G});
  check_acc(op, "beta", beta_, acc, {k.G});
  const bool has_c = c_.has_value();
  if (has_c) check_acc(op, "c", *c_, acc, {k.B, k.C});
  at::Tensor out = stats_only ? at::empty({0}, x.options())
                   : has_c    ? at::empty_like(x)
                              : at::empty({k.B, k.G, x.size(2), x.size(3)}, x.options());
  at::Tensor stats = at::empty({k.B, 2}, x.options().dtype(acc));
  if (x.numel() == 0 || k.N == 0) return {out, stats.fill_(NAN)};
  at::Tensor dbuf = at::empty({k.B, k.G, k.N}, x.options().dtype(acc));
  at::Tensor part = at::empty({k.B, k.G, 2}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_forward", [&] {
  with_acc<scalar_t>(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* g = g_.const_data_ptr<A>();
    const A* alpha = alpha_.const_data_ptr<A>();
    const A* beta = beta_.const_data_ptr<A>();
    const A* c = has_c ? c_->const_data_ptr<A>() : nullptr;
    A* D = dbuf.mutable_data_ptr<A>();
    A* pp = part.mutable_data_ptr<A>();
    A* st = stats.mutable_data_ptr<A>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    // Phase 1: D and its two-pass moments per (b, γ).
    at::parallel_for(0, k.B * k.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> buf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / k.G, gamma = t % k.G;
        A* dg = D + t * k.N;
        similarity_rows<scalar_t, A>(xp + b * k.C * k.N, g + b * k.C, k, gamma, dg, buf);
        row_moments(dg, k.N, &pp[2 * t], &pp[2 * t + 1]);
      }
    });
    for (int64_t b = 0; b < k.B; ++b) merge_stats(pp + 2 * b * k.G, k, st + 2 * b);
    if (stats_only) return;
    // Phase 2: S' = α·(D − mean)·r + β in place, then the output rows of the group.
    at::parallel_for(0, k.B * k.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> buf, obuf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / k.G, gamma = t % k.G;
        apply_group<scalar_t, A>(xp + b * k.C * k.N, op_ + b * (has_c ? k.C : k.G) * k.N, D + t * k.N,
                                 has_c ? c + b * k.C : nullptr, st + 2 * b, alpha[gamma], beta[gamma], eps, k,
                                 gamma, residual, buf, obuf);
      }
    });
  });
  });
  return {out, stats};
}

// g = mean over H·W per (b, c) plane, accumulated in double (x contiguous NCHW). One pass, in
// parallel over planes: ATen's mean over the two inner dims of small planes cost 3–4× the memory
// time here, a fifth of the whole op at FCViT's 14×14 and 7×7 stages.
at::Tensor channel_means(const at::Tensor& x, at::ScalarType acc) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "_gc_forward_full: x must be a 4-D (B, C, H, W) tensor");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  at::Tensor g = at::empty({B, C}, x.options().dtype(acc));
  if (g.numel() == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_channel_means", [&] {
  with_acc<scalar_t>(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    A* gp = g.mutable_data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) gp[t] = static_cast<A>(plane_mean(xp + t * N, N));
    });
  });
  });
  return g;
}

// The whole forward with one task per sample (when the batch covers the threads): means, MLP,
// similarity, statistics and output of a sample in one go, its slab of x staying in cache between
// the passes, one parallel region instead of three. Same per-row functions in the same order as
// the (sample, group)-parallel path, so both give identical results.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_samples(const at::Tensor& x, const Mlp* mlp,
                                                                  const at::Tensor& alpha_, const at::Tensor& beta_,
                                                                  int64_t groups, double eps, bool residual,
                                                                  bool stats_only) {
  const Dims k = dims_of(x, groups, "_gc_forward");
  const auto acc = alpha_.scalar_type();  // the caller's accumulation dtype
  const auto acc_opts = x.options().dtype(acc);
  const bool has_c = mlp != nullptr;
  at::Tensor g = at::empty({k.B, k.C}, acc_opts);
  at::Tensor stats = at::empty({k.B, 2}, acc_opts);
  at::Tensor out = stats_only ? at::empty({0}, x.options())
                   : has_c    ? at::empty_like(x)
                              : at::empty({k.B, k.G, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_forward_samples", [&] {
  with_acc<scalar_t>(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* alpha = alpha_.const_data_ptr<A>();
    const A* beta = beta_.const_data_ptr<A>();
    A* gp = g.mutable_data_ptr<A>();
    A* st = stats.mutable_data_ptr<A>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, k.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> D(k.G * k.N), pp(2 * k.G), buf, obuf;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* xb = xp + b * k.C * k.N;
        sample_statistics<scalar_t, A>(xb, b, mlp, k, gp + b * k.C, D.data(), pp.data(), st + 2 * b, buf);
        if (stats_only) continue;
        const A* cb = has_c ? mlp->c.const_data_ptr<A>() + b * k.C : nullptr;
        for (int64_t gamma = 0; gamma < k.G; ++gamma)
          apply_group<scalar_t, A>(xb, op_ + b * (has_c ? k.C : k.G) * k.N, D.data() + gamma * k.N, cb, st + 2 * b,
                                   alpha[gamma], beta[gamma], eps, k, gamma, residual, buf, obuf);
      }
    });
  });
  });
  return {out, g, stats};
}

}  // namespace

// Maps of at most this many values per sample (G·H·W) run the fp32 forward in double.
constexpr int64_t kTinyMap = 64;

// Whether the one-task-per-sample paths run: enough samples to keep every thread busy.
bool per_sample(const at::Tensor& x) {
  return x.numel() > 0 && x.size(0) >= at::get_num_threads();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_impl(
    const at::Tensor& x_, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps, bool residual,
    Mlp* mlp_out, at::ScalarType acc_, bool stats_only) {
  if (x_.scalar_type() == at::kFloat && acc_ == at::ScalarType::Undefined && x_.dim() == 4 && groups > 0 &&
      groups * x_.size(2) * x_.size(3) <= kTinyMap) {
    // fp32 on tiny maps: the statistics are over a handful of similarities, and one rounding of a
    // similarity moves Ŝ = (D − mean)/σ by as much as σ is small; fp32 measured up to 3.9× eager's
    // error there (G·H·W ≤ 16, pooled over 6 inputs). In double each output is rounded once; g,
    // the statistics and the MLP's activations come back in fp32, as the fp32 path gives them (the
    // fp32 backward recomputes its own in double). Costs nothing measurable: ≤ kTinyMap values.
    const auto wide = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
    };
    Mlp mlp;
    auto [out, g, stats] = gc_forward_impl(x_, wide(w1), wide(b1), wide(w2), wide(b2), alpha.to(at::kDouble),
                                           beta.to(at::kDouble), groups, eps, residual,
                                           mlp_out != nullptr ? &mlp : nullptr, at::kDouble, stats_only);
    if (mlp_out != nullptr && w1.has_value()) *mlp_out = mlp.to(at::kFloat);
    return {out, g.to(at::kFloat), stats.to(at::kFloat)};
  }
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_ == at::ScalarType::Undefined ? acc_type(x) : acc_;
  if (per_sample(x)) {
    Mlp mlp;
    if (w1.has_value()) mlp = make_mlp(x.size(0), x.size(1), x.options().dtype(acc), *w1, *b1, *w2, *b2);
    auto res = gc_forward_samples(x, w1.has_value() ? &mlp : nullptr, alpha.to(acc).contiguous(),
                                  beta.to(acc).contiguous(), groups, eps, residual, stats_only);
    if (mlp_out != nullptr && w1.has_value()) *mlp_out = std::move(mlp);
    return res;
  }
  at::Tensor g = channel_means(x, acc);
  std::optional<at::Tensor> c;
  if (w1.has_value()) {
    Mlp mlp = run_mlp(g, *w1, *b1, *w2, *b2);
    c = mlp.c;
    if (mlp_out != nullptr) *mlp_out = std::move(mlp);
  }
  auto [out, stats] = gc_forward(x, g, c, alpha.to(acc).contiguous(), beta.to(acc).contiguous(),
                                 groups, eps, residual, stats_only);
  return {out, g, stats};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_full(
    const at::Tensor& x, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return gc_forward_impl(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_gc_forward_full", &gc_forward_full);
}

}  // namespace gc
}  // namespace cpu
}  // namespace fastvit_ops
