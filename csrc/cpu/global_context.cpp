// FCViT grouped token-global similarity with normalization on CPU (SPEC §1.2), the kernels behind
// fastvit_ops/ops/global_context.py (which holds the derivation). The whole op (forward, and
// backward) runs as one task per sample when the batch covers the threads (a sample's slab stays
// in cache across its passes, one parallel region), else as (sample, group) tasks with the
// per-sample steps between regions; both call the same row functions in the same order. fp32 math
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

// Per-sample statistics from its groups' two-pass moments q = (mean_γ, M2_γ)·G, merged exactly
// (Chan et al.), shifted by group 0's mean; fixed order over groups, so deterministic.
// st = (mean, σ) with the unbiased σ (NaN at G·N = 1, like torch.std).
template <typename A>
void merge_stats(const A* q, const Dims& k, A* st) {
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
  st[0] = k0 + um;
  st[1] = std::sqrt(m2 / static_cast<A>(k.G * k.N - 1));
}

// Phase 2 for group γ of sample b: S' = α·(D − mean)·r + β in place in `sp`, then the group's
// output rows [x] + S'·c (or S' itself when c is null). x_b / o_b point at the sample.
template <typename T, typename A>
void apply_group(const T* x_b, T* o_b, A* sp, const A* c_b, const A* st, A alpha, A beta, double eps,
                 const Dims& k, int64_t gamma, bool residual, std::vector<A>& buf, std::vector<A>& obuf) {
  const A r = A(1) / (st[1] + static_cast<A>(eps));
  affine(sp, k.N, alpha * r, st[0], beta);
  if (c_b == nullptr) {
    T* o = o_b + gamma * k.N;  // out is (B, G, N): o_b points at the sample's G rows
    if constexpr (std::is_same_v<T, A>) {
      std::copy(sp, sp + k.N, o);
    } else {
      store_row(o, sp, k.N);
    }
    return;
  }
  for (int64_t e = 0; e < k.d; ++e) {
    const int64_t ch = gamma * k.d + e;
    const int64_t off = ch * k.N;
    const A* row = load_row<T, A>(x_b + off, buf, k.N);
    A* o = out_row<T, A>(o_b + off, obuf, k.N);
    apply_row(o, row, sp, c_b[ch], k.N, residual);
    store_row(o_b + off, o, k.N);
  }
}

// Mean of n values of one plane, accumulated in double.
template <typename T>
double plane_mean(const T* p, int64_t n) {
  double s = 0;
  _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]);
  return n > 0 ? s / static_cast<double>(n) : std::nan("");
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
    for (int64_t b = 0; b < k.B; ++b) merge_stats(pp + 2 * b * k.G, k, st + 2 * b);
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
  return {out, stats};
}

// Backward pass 1 for group γ of sample b (x_b, dy_b, g_b, c_b, st_b point at the sample; dy_b is
// (C, N) with c, else the (G, N) gradient of S'): Ŝ and dS' rows of the group into shg / dsg, the
// group's sums into grp_b (3 rows of G) and its channels' sums into chan_b (3 rows of C).
template <typename T, typename A>
void reduce_group(const T* x_b, const T* dy_b, const A* g_b, const A* c_b, const A* st_b, A alpha, A beta,
                  double eps, const Dims& k, int64_t gamma, A* shg, A* dsg, A* chan_b, A* grp_b,
                  std::vector<A>& buf, std::vector<A>& dbuf) {
  const bool has_c = c_b != nullptr;
  const A r = A(1) / (st_b[1] + static_cast<A>(eps));
  similarity_rows<T, A>(x_b, g_b, k, gamma, shg, buf);
  affine(shg, k.N, r, st_b[0], A(0));
  if (has_c) {
    std::fill(dsg, dsg + k.N, A(0));
    for (int64_t e = 0; e < k.d; ++e) {
      const int64_t ch = gamma * k.d + e;
      const A* dy = load_row<T, A>(dy_b + ch * k.N, dbuf, k.N);
      axpy(dsg, dy, c_b[ch], k.N);
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
    const A* row = load_row<T, A>(x_b + off, buf, k.N);
    const A* dy = has_c ? load_row<T, A>(dy_b + off, dbuf, k.N) : nullptr;
    channel_dots(row, g_b[ch], dsg, shg, dy, k.N, sums);
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
    const A* dy = dy_b != nullptr ? load_row<T, A>(dy_b + off, buf, k.N) : nullptr;
    A* o = out_row<T, A>(dx_b + off, obuf, k.N);
    dx_row(o, dy, tbuf, gs_b[ch], bias_b[ch], k.N);
    store_row(dx_b + off, o, k.N);
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
        reduce_group<scalar_t, A>(xp + b * k.C * k.N, gp + b * (has_c ? k.C : k.G) * k.N, g + b * k.C,
                                  has_c ? c + b * k.C : nullptr, st + 2 * b, alpha[gamma], beta[gamma], eps, k,
                                  gamma, sh + t * k.N, ds + t * k.N, ch_ + b * 3 * k.C, gr + b * 3 * k.G, buf, dbuf);
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
        apply_dx_group<scalar_t, A>(has_dy ? gp + b * C * N : nullptr, sh + t * N, ds + t * N, cf + 3 * t,
                                    gs + b * C, bias + b * C, out + b * C * N, Dims{B, C, G, d, N}, gamma,
                                    tbuf.data(), buf, obuf);
      }
    });
  });
  return dx;
}

// ---- whole forward / backward in one call: the (B, C)-sized glue and the tiny MLP in ATen from
// C++ (no Python dispatch per small op), the passes over x in the kernels above. Same math as
// fastvit_ops/ops/global_context.py (_forward / _backward).
// The maxout MLP on (B, C): u = W1·g + b1 (2h), m = max(u[:h], u[h:]), c = W2·m + b2. Plain
// vectorized loops, one thread: at FCViT's sizes (C ≤ 512, h ≤ 64, B ≈ 8) it is under 1 M MACs
// forward and backward together, and the ~30 ATen calls (addmm, mm, where, cat, ...) it replaced
// cost more in dispatch than the arithmetic (half the backward at the 7×7 and 14×14 stages).
// Fixed summation order: deterministic.
struct Mlp {
  at::Tensor w1, b1, w2, b2;           // weights in the accumulation dtype (for the backward)
  at::Tensor u, m, c;                  // u (B, 2h), m (B, h), c (B, C) in the accumulation dtype
  int64_t h = 0;
};

// The forward accumulates in double from the fp32 (or fp64) g and weights: a product of two fp32
// values is exact in double, so u, m, c carry ~1e-16 relative error before their final rounding.
// Accumulated in fp32 (a dot product per output, or an FMA chain) it measured 2–3× torch's own
// error at FCViT's large-mean inputs, where c cancels (terms ~10³, c ~ 1): beyond the 2× rule.
template <typename X, typename Y>
inline __attribute__((always_inline)) double dot_wide(const X* __restrict a, const Y* __restrict b, int64_t n) {
  double s = 0;
  _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}
FASTVIT_VEC_CLONES double dot_ff(const float* a, const float* b, int64_t n) { return dot_wide(a, b, n); }
FASTVIT_VEC_CLONES double dot_fd(const float* a, const double* b, int64_t n) { return dot_wide(a, b, n); }
FASTVIT_VEC_CLONES double dot_dd(const double* a, const double* b, int64_t n) { return dot_wide(a, b, n); }
inline double dot_acc(const float* a, const float* b, int64_t n) { return dot_ff(a, b, n); }
inline double dot_acc(const float* a, const double* b, int64_t n) { return dot_fd(a, b, n); }
inline double dot_acc(const double* a, const double* b, int64_t n) { return dot_dd(a, b, n); }

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

// dW2 = Σ_b dc_b·m_bᵀ, db2 = Σ_b dc_b, dW1 = Σ_b du_b·g_bᵀ, db1 = Σ_b du_b (overwritten), summed over
// b in order: deterministic.
template <typename A>
void mlp_weight_grads(const A* dc, int64_t ldc, const A* du, const A* g, const A* m, int64_t B, int64_t C,
                      int64_t h, A* dw1, A* db1, A* dw2, A* db2) {
  std::fill(dw1, dw1 + 2 * h * C, A(0));
  std::fill(db1, db1 + 2 * h, A(0));
  std::fill(dw2, dw2 + C * h, A(0));
  std::fill(db2, db2 + C, A(0));
  for (int64_t b = 0; b < B; ++b) {
    const A* dcb = dc + b * ldc;
    for (int64_t i = 0; i < C; ++i) {
      axpy(dw2 + i * h, m + b * h, dcb[i], h);
      db2[i] += dcb[i];
    }
    const A* dub = du + b * 2 * h;
    for (int64_t j = 0; j < 2 * h; ++j) {
      axpy(dw1 + j * C, g + b * C, dub[j], C);
      db1[j] += dub[j];
    }
  }
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
      for (int64_t t = begin; t < end; ++t) gp[t] = static_cast<A>(plane_mean(xp + t * N, N));
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
                                                                  int64_t groups, double eps, bool residual) {
  const Dims k = dims_of(x, groups, "_gc_forward");
  const auto acc_opts = x.options().dtype(acc_type(x));
  const bool has_c = mlp != nullptr;
  at::Tensor g = at::empty({k.B, k.C}, acc_opts);
  at::Tensor stats = at::empty({k.B, 2}, acc_opts);
  at::Tensor out = has_c ? at::empty_like(x) : at::empty({k.B, k.G, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gc_forward_samples", [&] {
    using A = typename AccOf<scalar_t>::type;
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
        A* gb = gp + b * k.C;
        for (int64_t ch = 0; ch < k.C; ++ch) gb[ch] = static_cast<A>(plane_mean(xb + ch * k.N, k.N));
        const A* cb = nullptr;
        if (has_c) {
          mlp_rows<A>(*mlp, gb, b, b + 1, k.C);
          cb = mlp->c.const_data_ptr<A>() + b * k.C;
        }
        for (int64_t gamma = 0; gamma < k.G; ++gamma) {
          A* dg = D.data() + gamma * k.N;
          similarity_rows<scalar_t, A>(xb, gb, k, gamma, dg, buf);
          row_moments(dg, k.N, &pp[2 * gamma], &pp[2 * gamma + 1]);
        }
        merge_stats(pp.data(), k, st + 2 * b);
        for (int64_t gamma = 0; gamma < k.G; ++gamma)
          apply_group<scalar_t, A>(xb, op_ + b * (has_c ? k.C : k.G) * k.N, D.data() + gamma * k.N, cb, st + 2 * b,
                                   alpha[gamma], beta[gamma], eps, k, gamma, residual, buf, obuf);
      }
    });
  });
  return {out, g, stats};
}

// Whether the one-task-per-sample paths run: enough samples to keep every thread busy.
bool per_sample(const at::Tensor& x) {
  return x.numel() > 0 && x.size(0) >= at::get_num_threads();
}

// The whole forward; `mlp_out` (when given) receives the MLP's activations for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_impl(
    const at::Tensor& x_, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps, bool residual,
    Mlp* mlp_out) {
  const at::Tensor x = x_.contiguous();
  const auto acc = acc_type(x);
  if (per_sample(x)) {
    Mlp mlp;
    if (w1.has_value()) mlp = make_mlp(x.size(0), x.size(1), x.options().dtype(acc), *w1, *b1, *w2, *b2);
    auto res = gc_forward_samples(x, w1.has_value() ? &mlp : nullptr, alpha.to(acc).contiguous(),
                                  beta.to(acc).contiguous(), groups, eps, residual);
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
                                 groups, eps, residual);
  return {out, g, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_full(
    const at::Tensor& x, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
    const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return gc_forward_impl(x, w1, b1, w2, b2, alpha, beta, groups, eps, residual, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gc_backward_impl(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& g,
                 const at::Tensor& stats, const std::optional<at::Tensor>& w1,
                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                 const at::Tensor& beta, int64_t groups, double eps, bool residual,
                 const Mlp* saved) {
  if (x_.scalar_type() == at::kFloat) {
    // fp32: the whole backward in double from the fp32 tensors, each gradient rounded once. The
    // gradients of α, β and the MLP are sums over B·H·W terms that cancel; in fp32 their error
    // is a coin toss against eager's (up to 500× it at groups = 1), so g and the statistics the
    // forward saved in fp32 are recomputed in double too. See ops/global_context.py.
    const auto wide = [](const std::optional<at::Tensor>& t) {
      return t.has_value() ? std::optional<at::Tensor>(t->to(at::kDouble)) : std::nullopt;
    };
    const at::Tensor xd = x_.to(at::kDouble), ad = alpha.to(at::kDouble), bd = beta.to(at::kDouble);
    const auto fwd = gc_forward_impl(xd, std::nullopt, std::nullopt, std::nullopt, std::nullopt, ad, bd, groups,
                                     eps, false, nullptr);
    auto r = gc_backward_impl(grad_.to(at::kDouble), xd, std::get<1>(fwd), std::get<2>(fwd), wide(w1), wide(b1),
                              wide(w2), wide(b2), ad, bd, groups, eps, residual, nullptr);
    const bool m = w1.has_value();
    return {std::get<0>(r).to(at::kFloat), std::get<1>(r).to(alpha.scalar_type()),
            std::get<2>(r).to(beta.scalar_type()), m ? std::get<3>(r).to(w1->scalar_type()) : std::get<3>(r),
            m ? std::get<4>(r).to(b1->scalar_type()) : std::get<4>(r),
            m ? std::get<5>(r).to(w2->scalar_type()) : std::get<5>(r),
            m ? std::get<6>(r).to(b2->scalar_type()) : std::get<6>(r)};
  }
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
    mlp = saved != nullptr ? *saved : run_mlp(g, *w1, *b1, *w2, *b2);  // recomputed only without saved
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
      using T = scalar_t;
      using A = typename AccOf<T>::type;
      const T* xp = x.const_data_ptr<T>();
      const T* gp = grad.const_data_ptr<T>();
      T* dxp = dx.mutable_data_ptr<T>();
      const A* gv = g.const_data_ptr<A>();
      const A* st = stats.const_data_ptr<A>();
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
        std::vector<A> buf, dbuf, obuf;
        for (int64_t b = begin; b < end; ++b) {
          const T* xb = xp + b * k.C * k.N;
          const T* dyb = gp + b * (has_mlp ? k.C : k.G) * k.N;
          const A* gb = gv + b * k.C;
          A* chb = ch + b * 3 * k.C;
          A* grb = gr + b * 3 * k.G;
          for (int64_t gamma = 0; gamma < k.G; ++gamma)
            reduce_group<T, A>(xb, dyb, gb, has_mlp ? cp + b * k.C : nullptr, st + 2 * b, a[gamma], bt[gamma], eps,
                               k, gamma, shat.data() + gamma * k.N, dsp.data() + gamma * k.N, chb, grb, buf, dbuf);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gc_backward_full(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g,
                 const at::Tensor& stats, const std::optional<at::Tensor>& w1,
                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                 const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
                 const at::Tensor& beta, int64_t groups, double eps, bool residual) {
  return gc_backward_impl(grad, x, g, stats, w1, b1, w2, b2, alpha, beta, groups, eps, residual, nullptr);
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
