// CvT's convolutional projection (SPEC §4) on CPU: the q, k and v depthwise convs of one token map
// in a single pass, token layout in and out. x is (B, [1 +] h·w, C) tokens (row-major pixels,
// channels contiguous: the NHWC image); q, k, v come out as tokens too, cls row copied through.
// Every output row is centred on an input row ("same" padding, p = k/2), so one task per input
// row y computes q's row y/s_q and k's and v's row y/s_kv when y is on their stride: the k·k input
// rows it reads are the ones the neighbouring tasks read, in cache; k and v share every input load.
// The inner loop runs over the contiguous channels (vectorized; ISA clones).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "vec_math.h"

namespace fastvit_ops {
namespace {

struct Geo {
  int64_t h, w, C, k, p;
};

// Channels c0 … c0 + n − 1 of one output pixel of one (NOUT = 1) or two (NOUT = 2: k and v share
// every input load) depthwise convs: o[c] = bias[c] + Σ_{valid taps} wT[tap, c]·x[y + dy − p,
// xc + dx − p, c]; taps that only see padding are skipped by the caller's [dy0, dy1) × [dx0, dx1).
// Inlined with n = 64 (a compile-time trip count: the accumulators stay in registers across the
// taps, 4 AVX-512 vectors per output) and once more for the channel tail.
template <typename T, int NOUT>
inline __attribute__((always_inline)) void pixel_block(
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
inline __attribute__((always_inline)) void pixel_body(
    const T* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0, int64_t dy1, int64_t dx0,
    int64_t dx1, const T* wT, const T* bias, T* out, const T* wT2, const T* bias2, T* out2) {
  constexpr int64_t CB = 64;
  int64_t c0 = 0;
  for (; c0 + CB <= C; c0 += CB)
    pixel_block<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2, c0, CB);
  if (c0 < C)
    pixel_block<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2, c0, C - c0);
}

#define QKV_PIXEL(NAME, T, NOUT, ATTR)                                                                      \
  ATTR void NAME(const T* x, int64_t w, int64_t C, int64_t k, int64_t yb, int64_t xb, int64_t dy0,       \
                 int64_t dy1, int64_t dx0, int64_t dx1, const T* wT, const T* bias, T* out, const T* wT2, \
                 const T* bias2, T* out2) {                                                               \
    pixel_body<T, NOUT>(x, w, C, k, yb, xb, dy0, dy1, dx0, dx1, wT, bias, out, wT2, bias2, out2);          \
  }

QKV_PIXEL(pixel1_f32, float, 1, FASTVIT_VEC_CLONES)
QKV_PIXEL(pixel2_f32, float, 2, FASTVIT_VEC_CLONES)
QKV_PIXEL(pixel1_f64, double, 1, )
QKV_PIXEL(pixel2_f64, double, 2, )
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

// (C, 1, k, k) → (k·k, C): a tap's weights contiguous over channels.
at::Tensor taps_last(const at::Tensor& w) { return w.reshape({w.size(0), -1}).t().contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_forward(
    const at::Tensor& x_, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
    const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, int64_t h, int64_t w,
    int64_t cls, int64_t stride_q, int64_t stride_kv) {
  const char* op = "_conv_projection_qkv_forward";
  TORCH_CHECK(x_.device().is_cpu() && x_.dim() == 3, op, ": x must be a 3-D CPU tensor (B, T, C)");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64");
  TORCH_CHECK(cls == 0 || cls == 1, op, ": cls must be 0 or 1");
  TORCH_CHECK(x_.size(1) == cls + h * w, op, ": x has ", x_.size(1), " tokens, expected ", cls + h * w);
  TORCH_CHECK(stride_q >= 1 && stride_kv >= 1, op, ": strides must be positive");
  const int64_t B = x_.size(0), C = x_.size(2), k = wq.size(-1);
  TORCH_CHECK(k % 2 == 1, op, ": kernel size must be odd");
  for (const at::Tensor* t : {&wq, &wk, &wv}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == C && t->size(1) == 1 && t->size(2) == k && t->size(3) == k,
                op, ": weights must be (C, 1, k, k) with one k");
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), op, ": weights must have x's dtype");
  }
  for (const at::Tensor* t : {&bq, &bk, &bv})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == x_.scalar_type(), op,
                ": biases must be (C,) in x's dtype");
  const at::Tensor x = x_.contiguous();
  const Geo g{h, w, C, k, k / 2};
  const int64_t hq = (h - 1) / stride_q + 1, wq_ = (w - 1) / stride_q + 1;
  const int64_t hk = (h - 1) / stride_kv + 1, wk_ = (w - 1) / stride_kv + 1;
  at::Tensor q = at::empty({B, cls + hq * wq_, C}, x.options());
  at::Tensor kk = at::empty({B, cls + hk * wk_, C}, x.options());
  at::Tensor vv = at::empty({B, cls + hk * wk_, C}, x.options());
  if (B == 0 || C == 0) return {q, kk, vv};
  const at::Tensor tq = taps_last(wq), tk = taps_last(wk), tv = taps_last(wv);
  const at::Tensor cq = bq.contiguous(), ck = bk.contiguous(), cv = bv.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_conv_projection_qkv_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t *qp = q.mutable_data_ptr<scalar_t>(), *kp = kk.mutable_data_ptr<scalar_t>(),
             *vp = vv.mutable_data_ptr<scalar_t>();
    const int64_t T = x.size(1), Tq = q.size(1), Tk = kk.size(1);
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
          conv_row(xb, g, y, stride_q, wq_, tq.const_data_ptr<scalar_t>(), cq.const_data_ptr<scalar_t>(),
                   qp + (b * Tq + cls + (y / stride_q) * wq_) * C, static_cast<const scalar_t*>(nullptr),
                   static_cast<const scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
        if (y % stride_kv == 0) {
          const int64_t row = cls + (y / stride_kv) * wk_;
          conv_row(xb, g, y, stride_kv, wk_, tk.const_data_ptr<scalar_t>(), ck.const_data_ptr<scalar_t>(),
                   kp + (b * Tk + row) * C, tv.const_data_ptr<scalar_t>(), cv.const_data_ptr<scalar_t>(),
                   vp + (b * Tk + row) * C);
        }
      }
    });
  });
  return {q, kk, vv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) { m.impl("_conv_projection_qkv_forward", &qkv_forward); }

}  // namespace fastvit_ops
