// FCViT's grouped token-global similarity with normalization and global context (FCViT,
// arXiv:2302.14045; the math and its derivatives are written out in fastvit_ops/ops/global_context.py)
// on CPU: what the forward, MLP, backward and autograd files share. The whole op (forward, and
// backward) runs as one task per sample when the batch covers the threads (a sample's slab stays
// in cache across its passes, one parallel region), else as (sample, group) tasks with the
// per-sample steps between regions; both call the same row functions in the same order. fp32 math
// (fp64 for fp64) in the row loops of isa/global_context.cpp (one build per CPU capability);
// half/bf16 rows are staged to fp32 one row at a time.
//
// Per sample b (s = d^-1/2, T_γ = s·Σ_e g², n = G·N):
//   D[γ,i] = s·Σ_e (x[γd+e,i] − g_e)·g_e + (s/G)·Σ_κ Σ_e (g_γe − g_κe)(g_γe + g_κe)   (= S − T̄,
//   T̄ = mean_γ T_γ = S's mean: D is centred, no offset larger than S's spread)
//   per group two-pass mean_γ, M2_γ = Σ(D − mean_γ)²; merged exactly: mean = mean of mean_γ,
//   σ² = (Σ M2_γ + N·Σ(mean_γ − mean)²)/(n−1)
//   S' = α_γ·(D − mean)/(σ + eps) + β_γ;  out = [x] + S'·c   (or S' itself when c is None)
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/capability.h"

namespace fastvit_ops {
namespace cpu {
namespace gc {

// ---- the row loops (isa/global_context.cpp), fp32 and fp64 --------------------------------------
template <typename A>
struct RowKernels {
  void (*axpy_centered)(A* d, const A* x, A w, A m, int64_t n);          // d += w·(x − m)
  void (*row_moments)(const A* d, int64_t n, A* mean, A* m2);            // two-pass mean, Σ(d − mean)²
  void (*affine)(A* d, int64_t n, A a, A m, A b);                        // d ← (d − m)·a + b
  void (*apply_row)(A* o, const A* x, const A* sp, A c, int64_t n, bool residual);  // o = [x] + c·sp
  void (*axpy)(A* d, const A* x, A w, int64_t n);                        // d += w·x
  void (*channel_dots)(const A* x, A m, const A* dsp, const A* shat, const A* dy, int64_t n, A* out);
  void (*group_sums)(const A* dsp, const A* shat, int64_t n, A* out);
  void (*combine)(A* t, const A* dsp, const A* shat, A a1, A a0, A a2, int64_t n);
  void (*dx_row)(A* o, const A* dy, const A* t, A gs, A bias, int64_t n);
};
struct DotKernels {  // Σ a·b accumulated in double
  double (*ff)(const float*, const float*, int64_t);
  double (*fd)(const float*, const double*, int64_t);
  double (*dd)(const double*, const double*, int64_t);
};
// fp32 rows, double math (the fp32 backward): the widening inside the loop (isa/global_context.cpp).
struct WideKernels {
  void (*axpy_centered)(double* d, const float* x, double w, double m, int64_t n);  // d += w·(x − m)
  void (*axpy)(double* d, const float* x, double w, int64_t n);                    // d += w·x
  void (*channel_dots)(const float* x, double m, const double* dsp, const double* shat, const float* dy,
                       int64_t n, double* out);
  void (*dx_row)(float* o, const float* dy, const double* t, double gs, double bias, int64_t n);
  double (*sum)(const float* p, int64_t n);  // Σ p in double
};
extern CpuKernel<const RowKernels<float>*> row_kernels_f32;
extern CpuKernel<const RowKernels<double>*> row_kernels_f64;
extern CpuKernel<const DotKernels*> dot_kernels;
extern CpuKernel<const WideKernels*> wide_kernels;

inline const RowKernels<float>& rows(float) { return *row_kernels_f32.get(); }
inline const RowKernels<double>& rows(double) { return *row_kernels_f64.get(); }

template <typename A> void axpy_centered(A* d, const A* x, A w, A m, int64_t n) { rows(A()).axpy_centered(d, x, w, m, n); }
template <typename A> void row_moments(const A* d, int64_t n, A* mean, A* m2) { rows(A()).row_moments(d, n, mean, m2); }
template <typename A> void affine(A* d, int64_t n, A a, A m, A b) { rows(A()).affine(d, n, a, m, b); }
template <typename A> void apply_row(A* o, const A* x, const A* sp, A c, int64_t n, bool residual) {
  rows(A()).apply_row(o, x, sp, c, n, residual);
}
template <typename A> void axpy(A* d, const A* x, A w, int64_t n) { rows(A()).axpy(d, x, w, n); }
template <typename A> void channel_dots(const A* x, A m, const A* dsp, const A* shat, const A* dy, int64_t n, A* out) {
  rows(A()).channel_dots(x, m, dsp, shat, dy, n, out);
}
template <typename A> void group_sums(const A* dsp, const A* shat, int64_t n, A* out) { rows(A()).group_sums(dsp, shat, n, out); }
template <typename A> void combine(A* t, const A* dsp, const A* shat, A a1, A a0, A a2, int64_t n) {
  rows(A()).combine(t, dsp, shat, a1, a0, a2, n);
}
template <typename A> void dx_row(A* o, const A* dy, const A* t, A gs, A bias, int64_t n) { rows(A()).dx_row(o, dy, t, gs, bias, n); }
inline double dot_acc(const float* a, const float* b, int64_t n) { return dot_kernels.get()->ff(a, b, n); }
inline double dot_acc(const float* a, const double* b, int64_t n) { return dot_kernels.get()->fd(a, b, n); }
inline double dot_acc(const double* a, const double* b, int64_t n) { return dot_kernels.get()->dd(a, b, n); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// body(A{}) with A the accumulation type of a pass over T: double where `acc` is kDouble (the fp32
// backward, see gc_backward_impl), else AccOf<T>.
template <typename T, typename F>
void with_acc(at::ScalarType acc, F&& body) {
  if (acc == at::kDouble) {
    body(double{});
  } else {
    body(typename AccOf<T>::type{});
  }
}

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

// The row loops over rows of T (x, dy, dx) with math in A: fp32 rows under double math go to the
// wide kernels (no staging copy), T == A reads the row directly, half/bf16 stage it in `buf`.
template <typename T, typename A>
constexpr bool kWide = std::is_same_v<T, float> && std::is_same_v<A, double>;

template <typename T, typename A>
void axpy_centered_row(A* d, const T* x, A w, A m, int64_t n, std::vector<A>& buf) {
  if constexpr (kWide<T, A>) {
    wide_kernels.get()->axpy_centered(d, x, w, m, n);
  } else {
    axpy_centered(d, load_row<T, A>(x, buf, n), w, m, n);
  }
}

template <typename T, typename A>
void axpy_row(A* d, const T* x, A w, int64_t n, std::vector<A>& buf) {
  if constexpr (kWide<T, A>) {
    wide_kernels.get()->axpy(d, x, w, n);
  } else {
    axpy(d, load_row<T, A>(x, buf, n), w, n);
  }
}

// channel_dots of an x row and (when given) a dy row of T.
template <typename T, typename A>
void channel_dots_row(const T* x, A m, const A* dsp, const A* shat, const T* dy, int64_t n, A* out,
                      std::vector<A>& buf, std::vector<A>& dbuf) {
  if constexpr (kWide<T, A>) {
    wide_kernels.get()->channel_dots(x, m, dsp, shat, dy, n, out);
  } else {
    const A* row = load_row<T, A>(x, buf, n);
    channel_dots(row, m, dsp, shat, dy != nullptr ? load_row<T, A>(dy, dbuf, n) : nullptr, n, out);
  }
}

// A dx row of T: [dy] + gs·t + bias.
template <typename T, typename A>
void dx_row_out(T* o, const T* dy, const A* t, A gs, A bias, int64_t n, std::vector<A>& buf,
                std::vector<A>& obuf) {
  if constexpr (kWide<T, A>) {
    wide_kernels.get()->dx_row(o, dy, t, gs, bias, n);
  } else {
    const A* d = dy != nullptr ? load_row<T, A>(dy, buf, n) : nullptr;
    A* w = out_row<T, A>(o, obuf, n);
    dx_row(w, d, t, gs, bias, n);
    store_row(o, w, n);
  }
}

struct Dims {
  int64_t B, C, G, d, N;
};

Dims dims_of(const at::Tensor& x, int64_t groups, const char* op);
void check_acc(const char* op, const char* name, const at::Tensor& t, at::ScalarType acc, at::IntArrayRef shape);
at::ScalarType acc_type(const at::Tensor& x);

template <typename T, typename A>
void similarity_rows(const T* x_b, const A* g_b, const Dims& k, int64_t gamma, A* dg,
                     std::vector<A>& buf) {
  const A s = A(1) / std::sqrt(static_cast<A>(k.d));
  // T_γ − T̄ = (s/G)·Σ_κ Σ_e (g_γe − g_κe)(g_γe + g_κe): each difference is formed first, so no
  // cancellation between the large self-similarities; exactly 0 for a constant input. The mean
  // T̄ (S's own mean) rather than one group's T_0 as the shift: where group 0's means stand out,
  // S − T_0 carried an offset many times S's spread and 10× eager's rounding into Ŝ.
  A dt = 0;
  for (int64_t kappa = 0; kappa < k.G; ++kappa) {
    for (int64_t e = 0; e < k.d; ++e) {
      const A a = g_b[gamma * k.d + e], b = g_b[kappa * k.d + e];
      dt += (a - b) * (a + b);
    }
  }
  const A offset = s * dt / static_cast<A>(k.G);
  for (int64_t i = 0; i < k.N; ++i) dg[i] = offset;
  for (int64_t e = 0; e < k.d; ++e) {
    const int64_t ch = gamma * k.d + e;
    axpy_centered_row<T, A>(dg, x_b + ch * k.N, s * g_b[ch], g_b[ch], k.N, buf);
  }
}

// Per-sample statistics from its groups' two-pass moments q = (mean_γ, M2_γ)·G, merged exactly
// (Chan et al.) without a shift: D is centred already (a shift by group 0's mean put that group's
// offset into every Ŝ); fixed order over groups, so deterministic.
// st = (mean, σ) with the unbiased σ (NaN at G·N = 1, like torch.std).
template <typename A>
void merge_stats(const A* q, const Dims& k, A* st) {
  A um = 0, corr = 0;
  for (int64_t gamma = 0; gamma < k.G; ++gamma) um += q[2 * gamma];
  um /= static_cast<A>(k.G);
  // One correction pass: equal group means (a constant input) give exactly that mean, so σ = 0.
  for (int64_t gamma = 0; gamma < k.G; ++gamma) corr += q[2 * gamma] - um;
  um += corr / static_cast<A>(k.G);
  A m2 = 0, spread = 0;
  for (int64_t gamma = 0; gamma < k.G; ++gamma) {
    const A u = q[2 * gamma] - um;
    m2 += q[2 * gamma + 1];
    spread += u * u;
  }
  m2 += static_cast<A>(k.N) * spread;
  st[0] = um;
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


template <typename T>
inline double plane_mean(const T* p, int64_t n) {
  double s = 0;
  if constexpr (std::is_same_v<T, float>) {
    s = wide_kernels.get()->sum(p, n);  // at the capability's width
  } else {
    _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]);
  }
  return n > 0 ? s / static_cast<double>(n) : std::nan("");
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
  Mlp to(at::ScalarType t) const {  // every tensor converted (the tiny-map fp32 forward runs in double)
    return {w1.to(t), b1.to(t), w2.to(t), b2.to(t), u.to(t), m.to(t), c.to(t), h};
  }
};

Mlp make_mlp(int64_t B, int64_t C, const at::TensorOptions& acc_opts, const at::Tensor& w1, const at::Tensor& b1,
             const at::Tensor& w2, const at::Tensor& b2);
Mlp run_mlp(const at::Tensor& g, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
            const at::Tensor& b2);
template <typename A>
void mlp_rows(const Mlp& r, const A* g_b0, int64_t b0, int64_t b1, int64_t C);
template <typename A>
void mlp_backward_sample(const A* dc_b, const A* u_b, const A* w1, const A* w2, int64_t C, int64_t h, A* dm,
                         A* du_b, A* dg_b);
template <typename A>
void mlp_weight_grads(const A* dc, int64_t ldc, const A* du, const A* g, const A* m, int64_t B, int64_t C,
                      int64_t h, A* dw1, A* db1, A* dw2, A* db2);

// One sample's statistics as the per-sample forward and the fp32 backward's recompute both form
// them (one function: the same numbers in both): g_b (C means), the MLP's row b (when `mlp`), each
// group's D in D_b (G rows of N) and st_b = (mean, σ). `pp`: 2·G of scratch.
template <typename T, typename A>
void sample_statistics(const T* x_b, int64_t b, const Mlp* mlp, const Dims& k, A* g_b, A* D_b, A* pp, A* st_b,
                       std::vector<A>& buf) {
  for (int64_t ch = 0; ch < k.C; ++ch) g_b[ch] = static_cast<A>(plane_mean(x_b + ch * k.N, k.N));
  if (mlp != nullptr) mlp_rows<A>(*mlp, g_b, b, b + 1, k.C);
  for (int64_t gamma = 0; gamma < k.G; ++gamma) {
    A* dg = D_b + gamma * k.N;
    similarity_rows<T, A>(x_b, g_b, k, gamma, dg, buf);
    row_moments(dg, k.N, &pp[2 * gamma], &pp[2 * gamma + 1]);
  }
  merge_stats(pp, k, st_b);
}

// ---- the passes (global_context.cpp, global_context_backward.cpp) --------------------------------
// The whole forward; `mlp_out` (when given) receives the MLP's activations for the backward. `acc`:
// the accumulation dtype (Undefined: acc_type(x)); g, the statistics and the MLP come out in it.
// `stats_only`: g and the statistics alone (the output comes back empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gc_forward_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, const at::Tensor& alpha,
    const at::Tensor& beta, int64_t groups, double eps, bool residual, Mlp* mlp_out,
    at::ScalarType acc = at::ScalarType::Undefined, bool stats_only = false);
// The whole backward; `saved` (when given) holds the forward's MLP activations. `acc` as above (g,
// stats, alpha, beta and the MLP weights in it); Undefined: fp32 runs in double (see the .cpp).
// `recompute` (per-sample path, no `saved`): g and stats are not read; each sample's task
// recomputes them and the MLP's activations in `acc`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gc_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& g, const at::Tensor& stats,
    const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
    const std::optional<at::Tensor>& b2, const at::Tensor& alpha, const at::Tensor& beta, int64_t groups, double eps,
    bool residual, const Mlp* saved, at::ScalarType acc = at::ScalarType::Undefined, bool recompute = false);
// Whether the one-task-per-sample paths run: enough samples to keep every thread busy.
bool per_sample(const at::Tensor& x);

}  // namespace gc
}  // namespace cpu
}  // namespace fastvit_ops
