// CvT's convolutional projection (CvT, arXiv:2103.15808, Sec. 3.2; the released code's
// depthwise conv + BN per q/k/v, BN folded) on CPU, one build per CPU capability: the q, k and v
// depthwise convs of one token map in a single pass, token layout in and out. x is
// (B, [1 +] h·w, C) tokens (row-major pixels, channels contiguous: the NHWC image); q, k, v come
// out as tokens too, cls row copied through. Every output row is centred on an input row ("same"
// padding, p = k/2), so one task per input row y computes q's row y/s_q and k's and v's row y/s_kv
// when y is on their stride: the k·k input rows it reads are the ones the neighbouring tasks read,
// in cache; k and v share every input load. The inner loop runs over the contiguous channels.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/conv_projection.h"
#include "cpu/isa/vec.h"

FASTVIT_ISA_BEGIN
namespace {

struct Geo {
  int64_t h, w, C, k, p;
};

// Channels c0 … c0 + n − 1 of one output pixel of one (NOUT = 1) or two (NOUT = 2: k and v share
// every input load) depthwise convs: o[c] = bias[c] + Σ_{valid taps} wT[tap, c]·x[y + dy − p,
// xc + dx − p, c]; taps that only see padding are skipped by the caller's [dy0, dy1) × [dx0, dx1).
// Inlined with n = 64 (a compile-time trip count: the accumulators stay in registers across the
// taps: 4 AVX-512 or 8 AVX2 vectors per output) and once more for the channel tail.
template <typename T, int NOUT>
FASTVIT_INLINE void pixel_block(
    const T* __restrict x, int64_t w, int64_t C, int64_t k, int64_t ybase, int64_t xbase, int64_t dy0,
    int64_t dy1, int64_t dx0, int64_t dx1, const T* __restrict wT, const T* __restrict bias, T* __restrict out,
    const T* __restrict wT2, const T* __restrict bias2, T* __restrict out2, int64_t c0, int64_t n) {
  T a[64], b[64];
  for (int64_t c = 0; c < n; ++c) a[c] = bias[c0 + c];
  if (NOUT == 2)
    for (int64_t c = 0; c < n; ++c) b[c] = bias2[c0 + c];
  for (int64_t dy = dy0; dy < dy1; ++dy)
    for (int64_t dx = dx0; dx < dx1; ++dx) {
      const T* s = x + ((ybase + dy) * w + xbase + dx) * C + c0;
      const int64_t tap = (dy * k + dx) * C + c0;
      for (int64_t c = 0; c < n; ++c) a[c] += wT[tap + c] * s[c];
      if (NOUT == 2)
        for (int64_t c = 0; c < n; ++c) b[c] += wT2[tap + c] * s[c];
    }
  for (int64_t c = 0; c < n; ++c) out[c0 + c] = a[c];
  if (NOUT == 2)
    for (int64_t c = 0; c < n; ++c) out2[c0 + c] = b[c];
}

template <typename T, int NOUT>
FASTVIT_INLINE void pixel_body(
    const T* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0, int64_t dy1, int64_t dx0,
    int64_t dx1, const T* wT, const T* bias, T* out, const T* wT2, const T* bias2, T* out2) {
  constexpr int64_t CB = 64;
  int64_t c0 = 0;
  for (; c0 + CB <= C; c0 += CB)
    pixel_block<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2, c0, CB);
  if (c0 < C)
    pixel_block<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2, c0, C - c0);
}

#define QKV_PIXEL(NAME, T, NOUT)                                                                      \
  void NAME(const T* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0,       \
                 int64_t dy1, int64_t dx0, int64_t dx1, const T* wT, const T* bias, T* out, const T* wT2, \
                 const T* bias2, T* out2) {                                                               \
    pixel_body<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);          \
  }

QKV_PIXEL(pixel1_f32, float, 1)
QKV_PIXEL(pixel2_f32, float, 2)
QKV_PIXEL(pixel1_f64, double, 1)
QKV_PIXEL(pixel2_f64, double, 2)
#undef QKV_PIXEL

inline void pixel(const float* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0,
                  int64_t dy1, int64_t dx0, int64_t dx1, const float* wT, const float* bias, float* out,
                  const float* wT2, const float* bias2, float* out2) {
  if (out2) pixel2_f32(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);
  else pixel1_f32(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);
}
inline void pixel(const double* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0,
                  int64_t dy1, int64_t dx0, int64_t dx1, const double* wT, const double* bias, double* out,
                  const double* wT2, const double* bias2, double* out2) {
  if (out2) pixel2_f64(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);
  else pixel1_f64(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);
}

// One output row (centre input row y, column stride s, wo columns) of one or two depthwise convs.
template <typename T>
void conv_row(const T* x, const Geo& g, int64_t y, int64_t s, int64_t wo, const T* wT, const T* bias,
              T* out, const T* wT2, const T* bias2, T* out2) {
  const int64_t yb = y - g.p;
  const int64_t dy0 = std::max<int64_t>(0, -yb), dy1 = std::min<int64_t>(g.k, g.h - yb);
  for (int64_t xo = 0; xo < wo; ++xo) {
    const int64_t xb = xo * s - g.p;
    const int64_t dx0 = std::max<int64_t>(0, -xb), dx1 = std::min<int64_t>(g.k, g.w - xb);
    pixel(x, g.w, g.C, g.k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out + xo * g.C, wT2, bias2,
          out2 ? out2 + xo * g.C : nullptr);
  }
}

template <typename scalar_t>
void qkv_kernel(const QkvArgs<scalar_t>& a) {
  const Geo g{a.h, a.w, a.C, a.k, a.k / 2};
  const int64_t B = a.B, h = a.h, cls = a.cls, stride_q = a.stride_q, stride_kv = a.stride_kv, C = a.C;
  const int64_t wq_ = a.wq, wk_ = a.wk;
    const scalar_t* xp = a.x;
    scalar_t *qp = a.q, *kp = a.k_out, *vp = a.v_out;
    const int64_t T = a.ntok, Tq = a.Tq, Tk = a.Tk;
    if (cls) {  // the cls token bypasses the convs
      for (int64_t b = 0; b < B; ++b) {
        std::copy(xp + b * T * C, xp + b * T * C + C, qp + b * Tq * C);
        std::copy(xp + b * T * C, xp + b * T * C + C, kp + b * Tk * C);
        std::copy(xp + b * T * C, xp + b * T * C + C, vp + b * Tk * C);
      }
    }
    at::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / h, y = t % h;
        const scalar_t* xb = xp + (b * T + cls) * C;
        if (y % stride_q == 0)
          conv_row(xb, g, y, stride_q, wq_, a.wtq, a.bq,
                   qp + (b * Tq + cls + (y / stride_q) * wq_) * C, static_cast<const scalar_t*>(nullptr),
                   static_cast<const scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
        if (y % stride_kv == 0) {
          const int64_t row = cls + (y / stride_kv) * wk_;
          conv_row(xb, g, y, stride_kv, wk_, a.wtk, a.bk,
                   kp + (b * Tk + row) * C, a.wtv, a.bv,
                   vp + (b * Tk + row) * C);
        }
      }
    });
}

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(conv_projection_qkv.of<float>(), &qkv_kernel<float>);
FASTVIT_REGISTER_CPU_KERNEL(conv_projection_qkv.of<double>(), &qkv_kernel<double>);

FASTVIT_ISA_END
