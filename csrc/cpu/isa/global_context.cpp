// FCViT global context: the loops over one row of N tokens (see cpu/global_context.h), one build
// per CPU capability. Plain loops the compiler vectorizes for the capability's ISA; `omp simd`
// lets it reorder the float reductions (the accumulation stays in the row's dtype, the MLP's dot
// products in double).
#include "cpu/global_context.h"
#include "cpu/isa/vec.h"

FASTVIT_ISA_BEGIN
namespace {

#define GC_ROW_LOOPS(A)                                                                      \
  void axpy_centered(A* __restrict d, const A* __restrict x, A w, A m, int64_t n) {           \
    for (int64_t i = 0; i < n; ++i) d[i] += w * (x[i] - m);                                        \
  }                                                                                                \
  /* two-pass mean and M2 = Σ(d − mean)² of one row, shifted by its first value (exact 0 for a   \
     constant row) */                                                                              \
  void row_moments(const A* __restrict d, int64_t n, A* mean, A* m2) {                        \
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
  void affine(A* __restrict d, int64_t n, A a, A m, A b) {                                    \
    for (int64_t i = 0; i < n; ++i) d[i] = (d[i] - m) * a + b;                                     \
  }                                                                                                \
  void apply_row(A* __restrict o, const A* __restrict x, const A* __restrict sp, A c,         \
                      int64_t n, bool residual) {                                                  \
    if (residual) {                                                                                \
      for (int64_t i = 0; i < n; ++i) o[i] = x[i] + c * sp[i];                                     \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) o[i] = c * sp[i];                                            \
    }                                                                                              \
  }                                                                                                \
  void axpy(A* __restrict d, const A* __restrict x, A w, int64_t n) {                         \
    for (int64_t i = 0; i < n; ++i) d[i] += w * x[i];                                              \
  }                                                                                                \
  void channel_dots(const A* __restrict x, A m, const A* __restrict dsp,                      \
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
  void group_sums(const A* __restrict dsp, const A* __restrict shat, int64_t n, A* out) {     \
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
  void combine(A* __restrict t, const A* __restrict dsp, const A* __restrict shat, A a1,      \
                    A a0, A a2, int64_t n) {                                                       \
    for (int64_t i = 0; i < n; ++i) t[i] = a1 * dsp[i] + a0 + a2 * shat[i];                        \
  }                                                                                                \
  void dx_row(A* __restrict o, const A* __restrict dy, const A* __restrict t, A gs, A bias,   \
                   int64_t n) {                                                                    \
    if (dy != nullptr) {                                                                           \
      for (int64_t i = 0; i < n; ++i) o[i] = dy[i] + gs * t[i] + bias;                             \
    } else {                                                                                       \
      for (int64_t i = 0; i < n; ++i) o[i] = gs * t[i] + bias;                                     \
    }                                                                                              \
  }


GC_ROW_LOOPS(float)
GC_ROW_LOOPS(double)
#undef GC_ROW_LOOPS

// fp32 rows under double math (the fp32 backward, see global_context_backward.cpp): the loops
// above with the widening folded in, so no row is staged through a baseline-compiled copy loop.
// Each fp32 value widens exactly: the same math as widening first.
void wide_axpy_centered(double* __restrict d, const float* __restrict x, double w, double m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] += w * (static_cast<double>(x[i]) - m);
}
void wide_axpy(double* __restrict d, const float* __restrict x, double w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] += w * static_cast<double>(x[i]);
}
void wide_channel_dots(const float* __restrict x, double m, const double* __restrict dsp,
                       const double* __restrict shat, const float* __restrict dy, int64_t n, double* out) {
  double a = 0, b = 0, c = 0, e = 0;
  if (dy != nullptr) {
    _Pragma("omp simd reduction(+ : a, b, c, e)") for (int64_t i = 0; i < n; ++i) {
      const double t = static_cast<double>(x[i]) - m;
      const double g = static_cast<double>(dy[i]);
      a += dsp[i] * t;
      b += shat[i] * t;
      c += g * shat[i];
      e += g;
    }
  } else {
    _Pragma("omp simd reduction(+ : a, b)") for (int64_t i = 0; i < n; ++i) {
      const double t = static_cast<double>(x[i]) - m;
      a += dsp[i] * t;
      b += shat[i] * t;
    }
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
  out[3] = e;
}
void wide_dx_row(float* __restrict o, const float* __restrict dy, const double* __restrict t, double gs,
                 double bias, int64_t n) {
  if (dy != nullptr) {
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(static_cast<double>(dy[i]) + gs * t[i] + bias);
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<float>(gs * t[i] + bias);
  }
}
double wide_sum(const float* __restrict p, int64_t n) {
  double s = 0;
  _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]);
  return s;
}

// The MLP's dot products accumulated in double from fp32 or fp64 operands (see global_context_mlp.cpp).
template <typename X, typename Y>
FASTVIT_INLINE double dot_wide(const X* __restrict a, const Y* __restrict b, int64_t n) {
  double s = 0;
  _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}
double dot_ff(const float* a, const float* b, int64_t n) { return dot_wide(a, b, n); }
double dot_fd(const float* a, const double* b, int64_t n) { return dot_wide(a, b, n); }
double dot_dd(const double* a, const double* b, int64_t n) { return dot_wide(a, b, n); }

template <typename A>
constexpr gc::RowKernels<A> row_kernels() {
  return {&axpy_centered, &row_moments, &affine, &apply_row, &axpy, &channel_dots, &group_sums, &combine, &dx_row};
}
const gc::RowKernels<float> kRowsF32 = row_kernels<float>();
const gc::RowKernels<double> kRowsF64 = row_kernels<double>();
const gc::DotKernels kDots = {&dot_ff, &dot_fd, &dot_dd};
const gc::WideKernels kWide = {&wide_axpy_centered, &wide_axpy, &wide_channel_dots, &wide_dx_row, &wide_sum};

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(gc::row_kernels_f32, &kRowsF32);
FASTVIT_REGISTER_CPU_KERNEL(gc::row_kernels_f64, &kRowsF64);
FASTVIT_REGISTER_CPU_KERNEL(gc::dot_kernels, &kDots);
FASTVIT_REGISTER_CPU_KERNEL(gc::wide_kernels, &kWide);

FASTVIT_ISA_END
