// FCViT grouped token-global similarity with normalization on CPU (SPEC §1.2), the kernels behind
// fastvit_ops/ops/global_context.py (which holds the derivation). at::parallel_for over
// (sample, group) tasks so every group's d rows stay in cache while they are reused; fp32 math
// (fp64 for fp64) in loops GCC vectorizes (vec_math.h clones; `omp simd` lets it reorder the
// float reductions); half/bf16 rows are staged to fp32 one row at a time.
//
// Per sample b (s = d^-1/2, T_γ = s·Σ_e g², n = G·N):
//   D[γ,i] = s·Σ_e (x[γd+e,i] − g_e)·g_e + s·Σ_e (g_γe − g_0e)(g_γe + g_0e)   (= S − T_0)
//   per group two-pass mean_γ, M2_γ = Σ(D − mean_γ)²; merged exactly: mean = mean of mean_γ,
//   σ² = (Σ M2_γ + N·Σ(mean_γ − mean)²)/(n−1)
//   S' = α_γ·(D − mean)/(σ + eps) + β_γ;  out = [x] + S'·c   (or S' itself when c is None)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace fastvit_ops {
namespace {

// ---- inner loops over one row of N tokens: a float copy (ISA clones) and a double copy ---------
#define GC_ROW_LOOPS(A, ATTR)                                                                      \
  ATTR void axpy_centered(A* __restrict d, const A* __restrict x, A w, A m, int64_t n) {           \
    for (int64_t i = 0; i < n; ++i) d[i] += w * (x[i] - m);                                        \
  }                                                                                                \
  /* two-pass mean and M2 = Σ(d − mean)² of one row, shifted by its first value (exact 0 for a   \
     constant row) */                                                                              \
  ATTR void row_moments(const A* __restrict d, int64_t n, A* mean, A* m2) {                        \
    const A k = d[0];                                                                              \
    A a = 0;                                                                                       \
    _Pragma("omp simd reduction(+ : a)") for (int64_t i = 0; i < n; ++i) a += d[i] - k;           \
    const A m = a / static_cast<A>(n);                                                             \
    A b = 0;                                                                                       \
    _Pragma("omp simd reduction(+ : b)") for (int64_t i = 0; i < n; ++i) {                         \
      const A t = (d[i] - k) - m;                                                                  \
      b += t * t;                                                                                  \
    }                                                                                              \
    *mean = k + m;                                                                                 \
    *m2 = b;                                                                                       \
  }                                                                                                \
  ATTR void affine(A* __restrict d, int64_t n, A a, A m, A b) {                                    \
    for (int64_t i = 0; i < n; ++i) d[i] = (d[i] - m) * a + b;                                     \
  }                                                                                                \
  ATTR void apply_row(A* __restrict o, const A* __restrict x, const A* __restrict sp, A c,         \
                      int64_t n, bool residual) {                                                  \
    if (residual) {                                                                                \
      for (int64_t i = 0; i < n; ++i) o[i] = x[i] + c * sp[i];                                     \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) o[i] = c * sp[i];                                            \
    }                                                                                              \
  }                                                                                                \
  ATTR void axpy(A* __restrict d, const A* __restrict x, A w, int64_t n) {                         \
    for (int64_t i = 0; i < n; ++i) d[i] += w * x[i];                                              \
  }                                                                                                \
  /* per channel: Σ dS'·(x−g), Σ Ŝ·(x−g), and (with dy) Σ dy·Ŝ, Σ dy */                            \
  ATTR void channel_dots(const A* __restrict x, A m, const A* __restrict dsp,                      \
                         const A* __restrict shat, const A* __restrict dy, int64_t n, A* out) {    \
    A a = 0, b = 0, c = 0, e = 0;                                                                  \
    if (dy != nullptr) {                                                                           \
      _Pragma("omp simd reduction(+ : a, b, c, e)") for (int64_t i = 0; i < n; ++i) {              \
        A t = x[i] - m;                                                                            \
        a += dsp[i] * t;                                                                           \
        b += shat[i] * t;                                                                          \
        c += dy[i] * shat[i];                                                                      \
        e += dy[i];                                                                                \
      }                                                                                            \
    } else {                                                                                       \
      _Pragma("omp simd reduction(+ : a, b)") for (int64_t i = 0; i < n; ++i) {                    \
        A t = x[i] - m;                                                                            \
        a += dsp[i] * t;                                                                           \
        b += shat[i] * t;                                                                          \
      }                                                                                            \
    }                                                                                              \
    out[0] = a;                                                                                    \
    out[1] = b;                                                                                    \
    out[2] = c;                                                                                    \
    out[3] = e;                                                                                    \
  }                                                                                                \
  ATTR void group_sums(const A* __restrict dsp, const A* __restrict shat, int64_t n, A* out) {     \
    A p = 0, q = 0, r = 0;                                                                         \
    _Pragma("omp simd reduction(+ : p, q, r)") for (int64_t i = 0; i < n; ++i) {                   \
      p += dsp[i];                                                                                 \
      q += dsp[i] * shat[i];                                                                       \
      r += shat[i];                                                                                \
    }                                                                                              \
    out[0] = p;                                                                                    \
    out[1] = q;                                                                                    \
    out[2] = r;                                                                                    \
  }                                                                                                \
  ATTR void combine(A* __restrict t, const A* __restrict dsp, const A* __restrict shat, A a1,      \
                    A a0, A a2, int64_t n) {                                                       \
    for (int64_t i = 0; i < n; ++i) t[i] = a1 * dsp[i] + a0 + a2 * shat[i];                        \
  }                                                                                                \
  ATTR void dx_row(A* __restrict o, const A* __restrict dy, const A* __restrict t, A gs, A bias,   \
                   int64_t n) {                                                                    \
    if (dy != nullptr) {                                                                           \
      for (int64_t i = 0; i < n; ++i) o[i] = dy[i] + gs * t[i] + bias;                             \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) o[i] = gs * t[i] + bias;                                     \
    }                                                                                              \
  }

GC_ROW_LOOPS(float, FASTVIT_VEC_CLONES)
GC_ROW_LOOPS(double, )
#undef GC_ROW_LOOPS

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// A row of T as a row of A: the row itself when T == A, else converted into `buf`.
template <typename T, typename A>
const A* load_row(const T* src, std::vector<A>& buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf.data();
  }
}

// Where to write a row of T from A math: directly when T == A, else a staging row.
template <typename T, typename A>
A* out_row(T* dst, std::vector<A>& buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return dst;
  } else {
    buf.resize(n);
    return buf.data();
  }
}

template <typename T, typename A>
void store_row(T* dst, const A* src, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

struct Dims {
  int64_t B, C, G, d, N;
};

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

// D for group γ of sample b (x_b points at the sample): d rows of N tokens folded into `dg`.
template <typename T, typename A>
void similarity_rows(const T* x_b, const A* g_b, const Dims& k, int64_t gamma, A* dg,
                     std::vector<A>& buf) {
  const A s = A(1) / std::sqrt(static_cast<A>(k.d));
  // T_γ − T_0 = s·Σ_e (g_γe − g_0e)(g_γe + g_0e): the difference is formed first, so no
  // cancellation between the two large self-similarities; exactly 0 for a constant input.
  A dt = 0;
  for (int64_t e = 0; e < k.d; ++e) {
    const A a = g_b[gamma * k.d + e], b = g_b[e];
    dt += (a - b) * (a + b);
  }
  const A offset = s * dt;
  for (int64_t i = 0; i < k.N; ++i) dg[i] = offset;
  for (int64_t e = 0; e < k.d; ++e) {
    const int64_t ch = gamma * k.d + e;
    const A* row = load_row<T, A>(x_b + ch * k.N, buf, k.N);
    axpy_centered(dg, row, s * g_b[ch], g_b[ch], k.N);
  }
}

std::tuple<at::Tensor, at::Tensor> gc_forward(const at::Tensor& x_, const at::Tensor& g_,
                                              const std::optional<at::Tensor>& c_,
                                              const at::Tensor& alpha_, const at::Tensor& beta_,
                                              int64_t groups, double eps, bool residual) {
  const char* op = "_gc_forward";
  TORCH_CHECK(x_.device().is_cpu(), op, ": x must be a CPU tensor");
  const at::Tensor x = x_.contiguous();
  const Dims k = dims_of(x, groups, op);
  const auto acc = acc_type(x);
  check_acc(op, "g", g_, acc, {k.B, k.C});
  check_acc(op, "alpha", alpha_, acc, {k.G});
  check_acc(op, "beta", beta_, acc, {k.G});
  const bool has_c = c_.has_value();
  if (has_c) check_acc(op, "c", *c_, acc, {k.B, k.C});
  at::Tensor out = has_c ? at::empty_like(x) : at::empty({k.B, k.G, x.size(2), x.size(3)}, x.options());
  at::Tensor stats = at::empty({k.B, 2}, x.options().dtype(acc));
  if (x.numel() == 0 || k.N == 0) return {out, stats.fill_(NAN)};
  at::Tensor dbuf = at::empty({k.B, k.G, k.N}, x.options().dtype(acc));
  at::Tensor part = at::empty({k.B, k.G, 2}, x.options().dtype(acc));
  const int64_t n = k.G * k.N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_forward", [&] {
    using A = typename AccOf<scalar_t>::type;
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
    // Statistics per sample: the groups' moments merged exactly (Chan et al.), shifted by group
    // 0's mean; fixed order over groups, so deterministic.
    for (int64_t b = 0; b < k.B; ++b) {
      const A* q = pp + 2 * b * k.G;
      const A k0 = q[0];
      A um = 0;
      for (int64_t gamma = 0; gamma < k.G; ++gamma) um += q[2 * gamma] - k0;
      um /= static_cast<A>(k.G);
      A m2 = 0, spread = 0;
      for (int64_t gamma = 0; gamma < k.G; ++gamma) {
        const A u = (q[2 * gamma] - k0) - um;
        m2 += q[2 * gamma + 1];
        spread += u * u;
      }
      m2 += static_cast<A>(k.N) * spread;
      st[2 * b] = k0 + um;
      st[2 * b + 1] = std::sqrt(m2 / static_cast<A>(n - 1));  // NaN at n = 1, like torch.std
    }
    // Phase 2: S' = α·(D − mean)·r + β in place, then the output rows of the group.
    at::parallel_for(0, k.B * k.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> buf, obuf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / k.G, gamma = t % k.G;
        A* sp = D + t * k.N;
        const A r = A(1) / (st[2 * b + 1] + static_cast<A>(eps));
        affine(sp, k.N, alpha[gamma] * r, st[2 * b], beta[gamma]);
        if (!has_c) {
          if constexpr (std::is_same_v<scalar_t, A>) {
            std::copy(sp, sp + k.N, op_ + t * k.N);
          } else {
            store_row(op_ + t * k.N, sp, k.N);
          }
          continue;
        }
        for (int64_t e = 0; e < k.d; ++e) {
          const int64_t ch = gamma * k.d + e;
          const int64_t off = (b * k.C + ch) * k.N;
          const A* row = load_row<scalar_t, A>(xp + off, buf, k.N);
          A* o = out_row<scalar_t, A>(op_ + off, obuf, k.N);
          apply_row(o, row, sp, c[b * k.C + ch], k.N, residual);
          store_row(op_ + off, o, k.N);
        }
      }
    });
  });
  return {out, stats};
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
  const auto acc = acc_type(x);
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
    using A = typename AccOf<scalar_t>::type;
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
        A* shg = sh + t * k.N;
        A* dsg = ds + t * k.N;
        const A r = A(1) / (st[2 * b + 1] + static_cast<A>(eps));
        similarity_rows<scalar_t, A>(xp + b * k.C * k.N, g + b * k.C, k, gamma, shg, buf);
        affine(shg, k.N, r, st[2 * b], A(0));
        if (has_c) {
          std::fill(dsg, dsg + k.N, A(0));
          for (int64_t e = 0; e < k.d; ++e) {
            const int64_t ch = gamma * k.d + e;
            const A* dy = load_row<scalar_t, A>(gp + (b * k.C + ch) * k.N, dbuf, k.N);
            axpy(dsg, dy, c[b * k.C + ch], k.N);
          }
        } else {
          const A* src = load_row<scalar_t, A>(gp + t * k.N, dbuf, k.N);
          std::copy(src, src + k.N, dsg);
        }
        A sums[4];
        group_sums(dsg, shg, k.N, sums);
        for (int j = 0; j < 3; ++j) gr[(b * 3 + j) * k.G + gamma] = sums[j];
        for (int64_t e = 0; e < k.d; ++e) {
          const int64_t ch = gamma * k.d + e;
          const int64_t off = (b * k.C + ch) * k.N;
          const A* row = load_row<scalar_t, A>(xp + off, buf, k.N);
          const A* dy = has_c ? load_row<scalar_t, A>(gp + off, dbuf, k.N) : nullptr;
          channel_dots(row, g[b * k.C + ch], dsg, shg, dy, k.N, sums);
          ch_[(b * 3 + 0) * k.C + ch] = sums[0];
          ch_[(b * 3 + 1) * k.C + ch] = sums[1];
          if (has_c) ch_[(b * 3 + 2) * k.C + ch] = alpha[gamma] * sums[2] + beta[gamma] * sums[3];
        }
      }
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
  const auto acc = acc_type(x_);
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
    using A = typename AccOf<scalar_t>::type;
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
        combine(tbuf.data(), ds + t * N, sh + t * N, cf[3 * t], cf[3 * t + 1], cf[3 * t + 2], N);
        for (int64_t e = 0; e < d; ++e) {
          const int64_t ch = gamma * d + e;
          const int64_t off = (b * C + ch) * N;
          const A* dy = has_dy ? load_row<scalar_t, A>(gp + off, buf, N) : nullptr;
          A* o = out_row<scalar_t, A>(out + off, obuf, N);
          dx_row(o, dy, tbuf.data(), gs[b * C + ch], bias[b * C + ch], N);
          store_row(out + off, o, N);
        }
      }
    });
  });
  return dx;
}

// ---- whole forward / backward in one call: the (B, C)-sized glue and the tiny MLP in ATen from
// C++ (no Python dispatch per small op), the passes over x in the kernels above. Same math as
// fastvit_ops/ops/global_context.py (_forward / _backward).
struct Mlp {
  at::Tensor w1, b1, w2, b2, ua, ub, m, c;
};

Mlp run_mlp(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
            const at::Tensor& b2) {
  Mlp r;
  const auto acc = g.scalar_type();
  r.w1 = w1.to(acc);
  r.b1 = b1.to(acc);
  r.w2 = w2.to(acc);
  r.b2 = b2.to(acc);
  const int64_t h = w2.size(1);
  at::Tensor u = at::addmm(r.b1, g, r.w1.t());
  r.ua = u.narrow(1, 0, h);
  r.ub = u.narrow(1, h, h);
  r.m = at::maximum(r.ua, r.ub);
  r.c = at::addmm(r.b2, r.m, r.w2.t()).contiguous();
  return r;
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
    using A = typename AccOf<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    A* gp = g.mutable_data_ptr<A>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* p = xp + t * N;
        double s = 0;
        _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < N; ++i) s += static_cast<double>(p[i]);
        gp[t] = static_cast<A>(N > 0 ? s / static_cast<double>(N) : std::nan(""));
      }
    });
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_full(
    const at::Tensor& x_, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  at::Tensor g = channel_means(x, acc);
  std::optional<at::Tensor> c;
  if (w1.has_value()) c = run_mlp(g, *w1, *b1, *w2, *b2).c;
  auto [out, stats] = gc_forward(x, g, c, alpha.to(acc).contiguous(), beta.to(acc).contiguous(),
                                 groups, eps, residual);
  return {out, g, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gc_backward_full(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& g,
                 const at::Tensor& stats, const std::optional<at::Tensor>& w1,
                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                 const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  const at::Tensor x = x_.contiguous();
  const at::Tensor grad = grad_.contiguous();
  const Dims k = dims_of(x, groups, "_gc_backward");
  const auto acc = acc_type(x);
  const at::Tensor al = alpha.to(acc).contiguous();
  const at::Tensor be = beta.to(acc).contiguous();
  const bool has_mlp = w1.has_value();
  Mlp mlp;
  std::optional<at::Tensor> c;
  if (has_mlp) {
    mlp = run_mlp(g, *w1, *b1, *w2, *b2);
    c = mlp.c;
  }
  auto [shat, dsp, chan, grp] = gc_backward_reduce(grad, x, g, c, al, be, stats, groups, eps);
  at::Tensor coef = at::empty({k.B, k.G, 3}, g.options());
  at::Tensor dg = at::empty({k.B, k.C}, g.options());
  at::Tensor gs = at::empty({k.B, k.C}, g.options());
  at::Tensor dalpha = at::zeros({k.G}, g.options());
  at::Tensor dbeta = at::zeros({k.G}, g.options());
  const int64_t n = k.G * k.N;
  AT_DISPATCH_FLOATING_TYPES(acc, "gc_backward_glue", [&] {
    using A = scalar_t;
    const A s = A(1) / std::sqrt(static_cast<A>(k.d));
    const A* a = al.const_data_ptr<A>();
    const A* st = stats.const_data_ptr<A>();
    const A* ch = chan.const_data_ptr<A>();
    const A* gr = grp.const_data_ptr<A>();
    const A* gp = g.const_data_ptr<A>();
    A* cf = coef.mutable_data_ptr<A>();
    A* dgp = dg.mutable_data_ptr<A>();
    A* gsp = gs.mutable_data_ptr<A>();
    A* da = dalpha.mutable_data_ptr<A>();
    A* db = dbeta.mutable_data_ptr<A>();
    for (int64_t b = 0; b < k.B; ++b) {
      const A* P = gr + (b * 3 + 0) * k.G;
      const A* Q = gr + (b * 3 + 1) * k.G;
      const A* R = gr + (b * 3 + 2) * k.G;
      const A sigma = st[2 * b + 1];
      const A r = A(1) / (sigma + static_cast<A>(eps));
      A ap = 0, aq = 0;
      for (int64_t j = 0; j < k.G; ++j) {
        ap += a[j] * P[j];
        aq += a[j] * Q[j];
        da[j] += Q[j];
        db[j] += P[j];
      }
      const A m1 = ap / static_cast<A>(n);  // mean(dŜ)
      // σ-term of the std backward; 0 at σ = 0 like torch.std's masked backward
      const A kk = sigma > 0 ? aq / (static_cast<A>(n - 1) * sigma) : A(0);
      for (int64_t j = 0; j < k.G; ++j) {
        const A a1 = r * a[j], a0 = -r * m1, a2 = -kk;
        cf[(b * k.G + j) * 3 + 0] = a1;
        cf[(b * k.G + j) * 3 + 1] = a0;
        cf[(b * k.G + j) * 3 + 2] = a2;
        const A sum_ds = a1 * P[j] + a0 * static_cast<A>(k.N) + a2 * R[j];
        for (int64_t e = 0; e < k.d; ++e) {
          const int64_t cc = b * k.C + j * k.d + e;
          const A gv = gp[cc];
          dgp[cc] = s * (gv * sum_ds + a1 * ch[(b * 3 + 0) * k.C + j * k.d + e] +
                         a2 * ch[(b * 3 + 1) * k.C + j * k.d + e]);
          gsp[cc] = s * gv;
        }
      }
    }
  });
  at::Tensor dw1, db1, dw2, db2;
  if (has_mlp) {
    const at::Tensor dc = chan.select(1, 2);
    dw2 = at::mm(dc.t(), mlp.m);
    db2 = dc.sum(0);
    const at::Tensor dm = at::mm(dc, mlp.w2);
    // torch.maximum's rule: ties split the gradient in half
    const at::Tensor tie = at::eq(mlp.ua, mlp.ub);
    const at::Tensor half = at::where(tie, dm * 0.5, dm);
    const at::Tensor du = at::cat({half * at::ge(mlp.ua, mlp.ub), half * at::ge(mlp.ub, mlp.ua)}, 1);
    dw1 = at::mm(du.t(), g);
    db1 = du.sum(0);
    dg.add_(at::mm(du, mlp.w1));
    dw1 = dw1.to(w1->scalar_type());
    db1 = db1.to(b1->scalar_type());
    dw2 = dw2.to(w2->scalar_type());
    db2 = db2.to(b2->scalar_type());
  } else {
    dw1 = db1 = dw2 = db2 = at::empty({0}, g.options());
  }
  dg.div_(static_cast<double>(k.N));
  std::optional<at::Tensor> dy;
  if (residual) dy = grad;
  at::Tensor dx = gc_backward_apply(x, dy, shat, dsp, coef, gs, dg);
  return {dx, dalpha.to(alpha.scalar_type()), dbeta.to(beta.scalar_type()), dw1, db1, dw2, db2};
}

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
    auto [out, g, stats] = gc_forward_full(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual);
    const bool has_mlp = w1.has_value();
    ctx->save_for_backward({x, g, stats, has_mlp ? *w1 : at::Tensor(), has_mlp ? *b1 : at::Tensor(),
                            has_mlp ? *w2 : at::Tensor(), has_mlp ? *b2 : at::Tensor(), alpha,
                            beta});
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
    auto [dx, da, db, dw1, db1, dw2, db2] = gc_backward_full(
        grads[0], s[0], s[1], s[2], opt(3), opt(4), opt(5), opt(6), s[7], s[8],
        ctx->saved_data["groups"].toInt(), ctx->saved_data["eps"].toDouble(),
        ctx->saved_data["residual"].toBool());
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
  return std::get<0>(gc_forward_full(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, AutogradCPU, m) {
  m.impl("_gc_autograd", &gc_autograd);
}

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_gc_autograd", &gc_autograd_cpu);
  m.impl("_gc_forward", &gc_forward);
  m.impl("_gc_backward_reduce", &gc_backward_reduce);
  m.impl("_gc_backward_apply", &gc_backward_apply);
  m.impl("_gc_forward_full", &gc_forward_full);
  m.impl("_gc_backward_full", &gc_backward_full);
}

}  // namespace fastvit_ops
