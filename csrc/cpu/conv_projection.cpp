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

#include <vector>

#include "vec_math.h"

namespace fastvit_ops {
namespace {

// o[c] += w[c]·s[c] and o2[c] += w2[c]·s[c] (o2 null: one output)
FASTVIT_VEC_CLONES
void fma_f32(float* __restrict o, const float* __restrict w, float* __restrict o2,
             const float* __restrict w2, const float* __restrict s, int64_t C) {
  if (o2 == nullptr) {
    for (int64_t c = 0; c < C; ++c) o[c] += w[c] * s[c];
  } else {
    for (int64_t c = 0; c < C; ++c) {
      o[c] += w[c] * s[c];
      o2[c] += w2[c] * s[c];
    }
  }
}
void fma_f64(double* o, const double* w, double* o2, const double* w2, const double* s, int64_t C) {
  for (int64_t c = 0; c < C; ++c) o[c] += w[c] * s[c];
  if (o2 != nullptr)
    for (int64_t c = 0; c < C; ++c) o2[c] += w2[c] * s[c];
}
inline void fma(float* o, const float* w, float* o2, const float* w2, const float* s, int64_t C) {
  fma_f32(o, w, o2, w2, s, C);
}
inline void fma(double* o, const double* w, double* o2, const double* w2, const double* s, int64_t C) {
  fma_f64(o, w, o2, w2, s, C);
}

struct Geo {
  int64_t h, w, C, k, p;
};

// One output row (centre input row y, column stride s, wo columns) of one or two depthwise convs:
// out[xo, :] = bias + Σ_taps wT[tap, :] ⊙ x[y + dy − p, xo·s + dx − p, :].
template <typename T>
void conv_row(const T* x, const Geo& g, int64_t y, int64_t s, int64_t wo, const T* wT, const T* bias,
              T* out, const T* wT2, const T* bias2, T* out2) {
  const int64_t C = g.C;
  for (int64_t xo = 0; xo < wo; ++xo) {
    T* o = out + xo * C;
    T* o2 = out2 ? out2 + xo * C : nullptr;
    std::copy(bias, bias + C, o);
    if (o2) std::copy(bias2, bias2 + C, o2);
    for (int64_t dy = 0; dy < g.k; ++dy) {
      const int64_t yy = y + dy - g.p;
      if (yy < 0 || yy >= g.h) continue;  // a tap on padding only
      for (int64_t dx = 0; dx < g.k; ++dx) {
        const int64_t xx = xo * s + dx - g.p;
        if (xx < 0 || xx >= g.w) continue;
        const int64_t tap = dy * g.k + dx;
        fma(o, wT + tap * C, o2, o2 ? wT2 + tap * C : nullptr, x + (yy * g.w + xx) * C, C);
      }
    }
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
