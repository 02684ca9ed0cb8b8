// FCViT global context on CPU, backward (see cpu/global_context.h): pass 1 reduces x and the
// incoming gradient per (sample, group), the (B, C)-sized glue and the MLP's share of dg run per
// sample, pass 2 writes dx; the weight gradients are summed over samples in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/global_context.h"

namespace fastvit_ops {
namespace cpu {
namespace gc {
namespace {

// Backward pass 1 for group γ of sample b (x_b, dy_b, g_b, c_b, st_b point at the sample; dy_b is
// (C, N) with c, else the (G, N) gradient of S'): Ŝ and dS' rows of the group into shg / dsg, the
// group's sums into grp_b (3 rows of G) and its channels' sums into chan_b (3 rows of C).
// `have_d`: shg holds the group's D already (computed for the statistics in the same task).
template <typename T, typename A>
void reduce_group(const T* x_b, const T* dy_b, const A* g_b, const A* c_b, const A* st_b, A alpha, A beta,
                  double eps, const Dims& k, int64_t gamma, bool have_d, A* shg, A* dsg, A* chan_b, A* grp_b,
                  std::vector<A>& buf, std::vector<A>& dbuf) {
  const bool has_c = c_b != nullptr;
  const A r = A(1) / (st_b[1] + static_cast<A>(eps));
  if (!have_d) similarity_rows<T, A>(x_b, g_b, k, gamma, shg, buf);
  affine(shg, k.N, r, st_b[0], A(0));
  if (has_c) {
    std::fill(dsg, dsg + k.N, A(0));
    for (int64_t e = 0; e < k.d; ++e) {
      const int64_t ch = gamma * k.d + e;
      axpy_row<T, A>(dsg, dy_b + ch * k.N, c_b[ch], k.N, dbuf);
    }
  } else {
    const A* src = load_row<T, A>(dy_b + gamma * k.N, dbuf, k.N);
    std::copy(src, src + k.N, dsg);
  }
  A sums[4];
  group_sums(dsg, shg, k.N, sums);
  for (int j = 0; j < 3; ++j) grp_b[j * k.G + gamma] = sums[j];
  for (int64_t e = 0; e < k.d; ++e) {
    const int64_t ch = gamma * k.d + e;
    const int64_t off = ch * k.N;
    channel_dots_row<T, A>(x_b + off, g_b[ch], dsg, shg, has_c ? dy_b + off : nullptr, k.N, sums, buf, dbuf);
    chan_b[ch] = sums[0];
    chan_b[k.C + ch] = sums[1];
    if (has_c) chan_b[2 * k.C + ch] = alpha * sums[2] + beta * sums[3];
  }
}

// Backward pass 2 for group γ of sample b: dx rows [dy] + gs_c·(a1·dS' + a0 + a2·Ŝ) + bias_c.
template <typename T, typename A>
void apply_dx_group(const T* dy_b, const A* shg, const A* dsg, const A* cf, const A* gs_b, const A* bias_b,
                    T* dx_b, const Dims& k, int64_t gamma, A* tbuf, std::vector<A>& buf, std::vector<A>& obuf) {
  combine(tbuf, dsg, shg, cf[0], cf[1], cf[2], k.N);
  for (int64_t e = 0; e < k.d; ++e) {
    const int64_t ch = gamma * k.d + e;
    const int64_t off = ch * k.N;
    dx_row_out<T, A>(dx_b + off, dy_b != nullptr ? dy_b + off : nullptr, tbuf, gs_b[ch], bias_b[ch], k.N, buf,
                     obuf);
  }
}

// The (B, C)-sized glue of sample b: coef (G rows of a1, a0, a2), gs = s·g and the similarity part
// of dg (= N·∂L/∂g before the MLP's share), from the sample's sums. See the Python module.
template <typename A>
void glue_sample(const A* a, const A* st_b, const A* chan_b, const A* grp_b, const A* g_b, const Dims& k,
                 double eps, A* cf_b, A* dg_b, A* gs_b) {
  const A s = A(1) / std::sqrt(static_cast<A>(k.d));
  const int64_t n = k.G * k.N;
  const A* P = grp_b;
  const A* Q = grp_b + k.G;
  const A* R = grp_b + 2 * k.G;
  const A sigma = st_b[1];
  const A r = A(1) / (sigma + static_cast<A>(eps));
  A ap = 0, aq = 0;
  for (int64_t j = 0; j < k.G; ++j) {
    ap += a[j] * P[j];
    aq += a[j] * Q[j];
  }
  const A m1 = ap / static_cast<A>(n);  // mean(dŜ)
  // σ-term of the std backward; 0 at σ = 0 like torch.std's masked backward
  const A kk = sigma > 0 ? aq / (static_cast<A>(n - 1) * sigma) : A(0);
  for (int64_t j = 0; j < k.G; ++j) {
    const A a1 = r * a[j], a0 = -r * m1, a2 = -kk;
    cf_b[j * 3 + 0] = a1;
    cf_b[j * 3 + 1] = a0;
    cf_b[j * 3 + 2] = a2;
    const A sum_ds = a1 * P[j] + a0 * static_cast<A>(k.N) + a2 * R[j];
    for (int64_t e = 0; e < k.d; ++e) {
      const int64_t cc = j * k.d + e;
      const A gv = g_b[cc];
      dg_b[cc] = s * (gv * sum_ds + a1 * chan_b[cc] + a2 * chan_b[k.C + cc]);
      gs_b[cc] = s * gv;
    }
  }
}

// Backward, pass 1 (reads x and the incoming gradient once per (b, γ)):
//   shat = Ŝ (B,G,N), dsp = dS' (B,G,N), chan (B,3,C) = [Σ dS'(x−g), Σ Ŝ(x−g), dc],
//   grp (B,3,G) = [Σ dS', Σ dS'·Ŝ, Σ Ŝ].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gc_backward_reduce(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& g_,
    const std::optional<at::Tensor>& c_, const at::Tensor& alpha_, const at::Tensor& beta_,
    const at::Tensor& stats_, int64_t groups, double eps) {
  const char* op = "_gc_backward_reduce";
  TORCH_CHECK(x_.device().is_cpu() && grad_.device().is_cpu(), op, ": expected CPU tensors");
  const at::Tensor x = x_.contiguous();
  const at::Tensor grad = grad_.contiguous();
  const Dims k = dims_of(x, groups, op);
  const auto acc = g_.scalar_type() == at::kDouble ? at::kDouble : acc_type(x);  // double: fp32's wide backward
  check_acc(op, "g", g_, acc, {k.B, k.C});
  check_acc(op, "alpha", alpha_, acc, {k.G});
  check_acc(op, "beta", beta_, acc, {k.G});
  check_acc(op, "stats", stats_, acc, {k.B, 2});
  const bool has_c = c_.has_value();
  if (has_c) {
    check_acc(op, "c", *c_, acc, {k.B, k.C});
    TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have x's shape");
  } else {
    TORCH_CHECK(grad.numel() == k.B * k.G * k.N, op, ": grad must have shape (B, G, H, W)");
  }
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad and x dtypes differ");
  auto opts = x.options().dtype(acc);
  at::Tensor shat = at::empty({k.B, k.G, k.N}, opts);
  at::Tensor dsp = at::empty({k.B, k.G, k.N}, opts);
  at::Tensor chan = at::zeros({k.B, 3, k.C}, opts);
  at::Tensor grp = at::zeros({k.B, 3, k.G}, opts);
  if (x.numel() == 0 || k.N == 0) return {shat, dsp, chan, grp};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_bwd_reduce", [&] {
  with_acc<scalar_t>(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const A* g = g_.const_data_ptr<A>();
    const A* alpha = alpha_.const_data_ptr<A>();
    const A* beta = beta_.const_data_ptr<A>();
    const A* st = stats_.const_data_ptr<A>();
    const A* c = has_c ? c_->const_data_ptr<A>() : nullptr;
    A* sh = shat.mutable_data_ptr<A>();
    A* ds = dsp.mutable_data_ptr<A>();
    A* ch_ = chan.mutable_data_ptr<A>();
    A* gr = grp.mutable_data_ptr<A>();
    at::parallel_for(0, k.B * k.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> buf, dbuf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / k.G, gamma = t % k.G;
        reduce_group<scalar_t, A>(xp + b * k.C * k.N, gp + b * (has_c ? k.C : k.G) * k.N, g + b * k.C,
                                  has_c ? c + b * k.C : nullptr, st + 2 * b, alpha[gamma], beta[gamma], eps, k,
                                  gamma, false, sh + t * k.N, ds + t * k.N, ch_ + b * 3 * k.C, gr + b * 3 * k.G, buf, dbuf);
      }
    });
  });
  });
  return {shat, dsp, chan, grp};
}

// Backward, pass 2: dx[c,i] = [dy] + gs_c·(a1·dS' + a0 + a2·Ŝ)[γ(c), i] + bias_c, with
// coef (B,G,3) = (a1, a0, a2), gs = s·g, bias = (dg_sim + dg_mlp)/N.
at::Tensor gc_backward_apply(const at::Tensor& x_, const std::optional<at::Tensor>& grad_,
                             const at::Tensor& shat_, const at::Tensor& dsp_,
                             const at::Tensor& coef_, const at::Tensor& gs_,
                             const at::Tensor& bias_) {
  const char* op = "_gc_backward_apply";
  TORCH_CHECK(x_.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x_.dim() == 4, op, ": x must be 4-D");
  const int64_t B = x_.size(0), C = x_.size(1), N = x_.size(2) * x_.size(3);
  TORCH_CHECK(shat_.dim() == 3 && shat_.size(0) == B && shat_.size(2) == N, op,
              ": shat must be (B, G, N)");
  const int64_t G = shat_.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, op, ": G must divide C");
  const int64_t d = C / G;
  const auto acc = shat_.scalar_type() == at::kDouble ? at::kDouble : acc_type(x_);
  check_acc(op, "shat", shat_, acc, {B, G, N});
  check_acc(op, "dsp", dsp_, acc, {B, G, N});
  check_acc(op, "coef", coef_, acc, {B, G, 3});
  check_acc(op, "gs", gs_, acc, {B, C});
  check_acc(op, "bias", bias_, acc, {B, C});
  const bool has_dy = grad_.has_value();
  at::Tensor grad;
  if (has_dy) {
    grad = grad_->contiguous();
    TORCH_CHECK(grad.sizes() == x_.sizes() && grad.scalar_type() == x_.scalar_type(), op,
                ": grad must match x in shape and dtype");
  }
  at::Tensor dx = at::empty(x_.sizes(), x_.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_.scalar_type(), "gc_bwd_apply", [&] {
  with_acc<scalar_t>(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const scalar_t* gp = has_dy ? grad.const_data_ptr<scalar_t>() : nullptr;
    const A* sh = shat_.const_data_ptr<A>();
    const A* ds = dsp_.const_data_ptr<A>();
    const A* cf = coef_.const_data_ptr<A>();
    const A* gs = gs_.const_data_ptr<A>();
    const A* bias = bias_.const_data_ptr<A>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> tbuf(N), buf, obuf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / G, gamma = t % G;
        apply_dx_group<scalar_t, A>(has_dy ? gp + b * C * N : nullptr, sh + t * N, ds + t * N, cf + 3 * t,
                                    gs + b * C, bias + b * C, out + b * C * N, Dims{B, C, G, d, N}, gamma,
                                    tbuf.data(), buf, obuf);
      }
    });
  });
  });
  return dx;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gc_backward_impl(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& g_,
                 const at::Tensor& stats_, const std::optional<at::Tensor>& w1,
                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                 const at::Tensor& beta, int64_t groups, double eps, bool residual,
                 const Mlp* saved, at::ScalarType acc_, bool recompute) {
  if (x_.scalar_type() == at::kFloat && acc_ == at::ScalarType::Undefined) {
    // fp32: the whole backward accumulates in double, each gradient rounded once. The gradients of
    // alpha, beta and the MLP are sums over B*H*W terms that cancel; in fp32 their error is a coin
    // toss against eager's (up to 500x it at groups = 1), so g and the statistics the forward saved
    // in fp32 are recomputed in double too (as the reference and Triton glue do). x and dy stay
    // fp32, widened inside the row loops (global_context.h, WideKernels): widening the whole
    // tensors first cost 1 ms of copies per call at FCViT-tiny s1 (8, 32, 56, 56), a quarter of
    // the call, and staging each row through a baseline-compiled copy loop a third of the backward.
    const auto wide = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
    };
    const at::Tensor ad = alpha.to(at::kDouble), bd = beta.to(at::kDouble);
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
    if (per_sample(x_)) {
      // Each sample's task recomputes its g, statistics and MLP activations itself and keeps each
      // group's D for Ŝ: a separate statistics pass first read x once more and formed D twice.
      // Same functions in the same order: the same numbers as that pass.
      r = gc_backward_impl(grad_, x_, at::Tensor(), at::Tensor(), wide(w1), wide(b1), wide(w2), wide(b2), ad, bd,
                           groups, eps, residual, nullptr, at::kDouble, /*recompute=*/true);
    } else {
      const auto fwd = gc_forward_impl(x_, std::nullopt, std::nullopt, std::nullopt, std::nullopt, ad, bd, groups,
                                       eps, false, nullptr, at::kDouble, /*stats_only=*/true);
      r = gc_backward_impl(grad_, x_, std::get<1>(fwd), std::get<2>(fwd), wide(w1), wide(b1), wide(w2), wide(b2),
                           ad, bd, groups, eps, residual, nullptr, at::kDouble);
    }
    const bool m = w1.has_value();
    return {std::get<0>(r), std::get<1>(r).to(alpha.scalar_type()),
            std::get<2>(r).to(beta.scalar_type()), m ? std::get<3>(r).to(w1->scalar_type()) : std::get<3>(r),
            m ? std::get<4>(r).to(b1->scalar_type()) : std::get<4>(r),
            m ? std::get<5>(r).to(w2->scalar_type()) : std::get<5>(r),
            m ? std::get<6>(r).to(b2->scalar_type()) : std::get<6>(r)};
  }
  const at::Tensor x = x_.contiguous();
  const at::Tensor grad = grad_.contiguous();
  const Dims k = dims_of(x, groups, "_gc_backward");
  const auto acc = acc_ == at::ScalarType::Undefined ? acc_type(x) : acc_;
  const at::Tensor al = alpha.to(acc).contiguous();
  const at::Tensor be = beta.to(acc).contiguous();
  const bool has_mlp = w1.has_value();
  // recompute: g, the statistics and the MLP's activations are filled in by the per-sample tasks
  TORCH_CHECK(!recompute || (per_sample(x) && saved == nullptr), "_gc_backward: recompute needs the per-sample path");
  const at::Tensor g = recompute ? at::empty({k.B, k.C}, x.options().dtype(acc)) : g_;
  const at::Tensor stats = recompute ? at::empty({k.B, 2}, x.options().dtype(acc)) : stats_;
  Mlp mlp;
  std::optional<at::Tensor> c;
  if (has_mlp) {
    if (recompute) {
      mlp = make_mlp(k.B, k.C, g.options(), *w1, *b1, *w2, *b2);
    } else {
      mlp = saved != nullptr ? *saved : run_mlp(g, *w1, *b1, *w2, *b2);  // recomputed only without saved
    }
    c = mlp.c;
  }
  const auto o = g.options();
  const int64_t h = has_mlp ? mlp.h : 0;
  at::Tensor dalpha = at::empty({k.G}, o);
  at::Tensor dbeta = at::empty({k.G}, o);
  at::Tensor du = at::empty({k.B, 2 * h}, o);
  at::Tensor dw1, db1, dw2, db2;
  if (has_mlp) {
    dw1 = at::empty({2 * h, k.C}, o);
    db1 = at::empty({2 * h}, o);
    dw2 = at::empty({k.C, h}, o);
    db2 = at::empty({k.C}, o);
  }
  at::Tensor chan, grp, dx;
  if (per_sample(x)) {
    // One task per sample: pass 1, the glue, the MLP's share of dg and pass 2 of a sample back to
    // back (its slabs of x and dy stay in cache), one parallel region; the weight gradients are
    // summed over samples afterwards in a fixed order. Same per-row functions and orders as the
    // (sample, group)-parallel path below: identical results.
    chan = at::empty({k.B, 3, k.C}, o);
    grp = at::empty({k.B, 3, k.G}, o);
    dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_backward_samples", [&] {
    with_acc<scalar_t>(acc, [&](auto acc_tag) {
      using T = scalar_t;
      using A = decltype(acc_tag);
      const T* xp = x.const_data_ptr<T>();
      const T* gp = grad.const_data_ptr<T>();
      T* dxp = dx.mutable_data_ptr<T>();
      A* gv = g.data_ptr<A>();  // written only under recompute
      A* st = stats.data_ptr<A>();
      const A* a = al.const_data_ptr<A>();
      const A* bt = be.const_data_ptr<A>();
      const A* cp = has_mlp ? mlp.c.const_data_ptr<A>() : nullptr;
      const A* up = has_mlp ? mlp.u.const_data_ptr<A>() : nullptr;
      const A* w1p = has_mlp ? mlp.w1.const_data_ptr<A>() : nullptr;
      const A* w2p = has_mlp ? mlp.w2.const_data_ptr<A>() : nullptr;
      A* ch = chan.mutable_data_ptr<A>();
      A* gr = grp.mutable_data_ptr<A>();
      A* dup = du.mutable_data_ptr<A>();
      at::parallel_for(0, k.B, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> shat(k.G * k.N), dsp(k.G * k.N), cf(3 * k.G), dgb(k.C), gsb(k.C), dm(h), tbuf(k.N);
        std::vector<A> pp(2 * k.G), buf, dbuf, obuf;
        for (int64_t b = begin; b < end; ++b) {
          const T* xb = xp + b * k.C * k.N;
          const T* dyb = gp + b * (has_mlp ? k.C : k.G) * k.N;
          A* gb = gv + b * k.C;
          A* chb = ch + b * 3 * k.C;
          A* grb = gr + b * 3 * k.G;
          if (recompute)  // as gc_forward_samples computes them; each group's D stays in shat
            sample_statistics<T, A>(xb, b, has_mlp ? &mlp : nullptr, k, gb, shat.data(), pp.data(), st + 2 * b, buf);
          for (int64_t gamma = 0; gamma < k.G; ++gamma)
            reduce_group<T, A>(xb, dyb, gb, has_mlp ? cp + b * k.C : nullptr, st + 2 * b, a[gamma], bt[gamma], eps,
                               k, gamma, recompute, shat.data() + gamma * k.N, dsp.data() + gamma * k.N, chb, grb,
                               buf, dbuf);
          glue_sample<A>(a, st + 2 * b, chb, grb, gb, k, eps, cf.data(), dgb.data(), gsb.data());
          if (has_mlp)
            mlp_backward_sample<A>(chb + 2 * k.C, up + b * 2 * h, w1p, w2p, k.C, h, dm.data(), dup + b * 2 * h,
                                   dgb.data());
          for (int64_t i = 0; i < k.C; ++i) dgb[i] /= static_cast<A>(k.N);
          for (int64_t gamma = 0; gamma < k.G; ++gamma)
            apply_dx_group<T, A>(residual ? dyb : nullptr, shat.data() + gamma * k.N, dsp.data() + gamma * k.N,
                                 cf.data() + 3 * gamma, gsb.data(), dgb.data(), dxp + b * k.C * k.N, k, gamma,
                                 tbuf.data(), buf, obuf);
        }
      });
    });
    });
  } else {
    std::optional<at::Tensor> c;
    if (has_mlp) c = mlp.c;
    at::Tensor shat, dsp;
    std::tie(shat, dsp, chan, grp) = gc_backward_reduce(grad, x, g, c, al, be, stats, groups, eps);
    at::Tensor coef = at::empty({k.B, k.G, 3}, o);
    at::Tensor dg = at::empty({k.B, k.C}, o);
    at::Tensor gs = at::empty({k.B, k.C}, o);
    AT_DISPATCH_FLOATING_TYPES(acc, "gc_backward_glue", [&] {
      using A = scalar_t;
      const A* ch = chan.const_data_ptr<A>();
      const A* gr = grp.const_data_ptr<A>();
      A* dgp = dg.mutable_data_ptr<A>();
      std::vector<A> dm(h);
      for (int64_t b = 0; b < k.B; ++b) {
        glue_sample<A>(al.const_data_ptr<A>(), stats.const_data_ptr<A>() + 2 * b, ch + b * 3 * k.C,
                       gr + b * 3 * k.G, g.const_data_ptr<A>() + b * k.C, k, eps,
                       coef.mutable_data_ptr<A>() + b * 3 * k.G, dgp + b * k.C, gs.mutable_data_ptr<A>() + b * k.C);
        if (has_mlp)
          mlp_backward_sample<A>(ch + b * 3 * k.C + 2 * k.C, mlp.u.const_data_ptr<A>() + b * 2 * h,
                                 mlp.w1.const_data_ptr<A>(), mlp.w2.const_data_ptr<A>(), k.C, h, dm.data(),
                                 du.mutable_data_ptr<A>() + b * 2 * h, dgp + b * k.C);
      }
      for (int64_t i = 0; i < k.B * k.C; ++i) dgp[i] /= static_cast<A>(k.N);
    });
    std::optional<at::Tensor> dy;
    if (residual) dy = grad;
    dx = gc_backward_apply(x, dy, shat, dsp, coef, gs, dg);
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "gc_backward_weights", [&] {
    using A = scalar_t;
    // dα = Σ_b Q_b, dβ = Σ_b P_b (grp rows 1 and 0), in sample order
    const A* gr = grp.const_data_ptr<A>();
    A* da = dalpha.mutable_data_ptr<A>();
    A* db = dbeta.mutable_data_ptr<A>();
    std::fill(da, da + k.G, A(0));
    std::fill(db, db + k.G, A(0));
    for (int64_t b = 0; b < k.B; ++b)
      for (int64_t j = 0; j < k.G; ++j) {
        da[j] += gr[(b * 3 + 1) * k.G + j];
        db[j] += gr[(b * 3 + 0) * k.G + j];
      }
    if (has_mlp)
      mlp_weight_grads<A>(chan.const_data_ptr<A>() + 2 * k.C, 3 * k.C, du.const_data_ptr<A>(), g.const_data_ptr<A>(),
                          mlp.m.const_data_ptr<A>(), k.B, k.C, h, dw1.mutable_data_ptr<A>(),
                          db1.mutable_data_ptr<A>(), dw2.mutable_data_ptr<A>(), db2.mutable_data_ptr<A>());
  });
  if (has_mlp) {
    dw1 = dw1.to(w1->scalar_type());
    db1 = db1.to(b1->scalar_type());
    dw2 = dw2.to(w2->scalar_type());
    db2 = db2.to(b2->scalar_type());
  } else {
    dw1 = db1 = dw2 = db2 = at::empty({0}, o);
  }
  return {dx, dalpha.to(alpha.scalar_type()), dbeta.to(beta.scalar_type()), dw1, db1, dw2, db2};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gc_backward_full(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g,
                 const at::Tensor& stats, const std::optional<at::Tensor>& w1,
                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                 const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return gc_backward_impl(grad, x, g, stats, w1, b1, w2, b2, alpha, beta, groups, eps, residual, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_gc_backward_full", &gc_backward_full);
}

}  // namespace gc
}  // namespace cpu
}  // namespace fastvit_ops
