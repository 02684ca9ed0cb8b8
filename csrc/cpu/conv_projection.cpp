// CvT's convolutional projection on CPU: argument checks and outputs; the pass itself is in
// isa/conv_projection.cpp (one build per CPU capability).
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include "cpu/conv_projection.h"

namespace fastvit_ops {
namespace cpu {

PerDtype<QkvFn> conv_projection_qkv;

namespace {

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
  const int64_t hq = (h - 1) / stride_q + 1, wq_ = (w - 1) / stride_q + 1;
  const int64_t hk = (h - 1) / stride_kv + 1, wk_ = (w - 1) / stride_kv + 1;
  at::Tensor q = at::empty({B, cls + hq * wq_, C}, x.options());
  at::Tensor kk = at::empty({B, cls + hk * wk_, C}, x.options());
  at::Tensor vv = at::empty({B, cls + hk * wk_, C}, x.options());
  if (B == 0 || C == 0) return {q, kk, vv};
  const at::Tensor tq = taps_last(wq), tk = taps_last(wk), tv = taps_last(wv);
  const at::Tensor cq = bq.contiguous(), ck = bk.contiguous(), cv = bv.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_conv_projection_qkv_forward", [&] {
    const QkvArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), B, x.size(1), C, h, w, k, cls, stride_q, stride_kv,
                              wq_, wk_, q.size(1), kk.size(1), tq.const_data_ptr<scalar_t>(),
                              cq.const_data_ptr<scalar_t>(), tk.const_data_ptr<scalar_t>(),
                              ck.const_data_ptr<scalar_t>(), tv.const_data_ptr<scalar_t>(),
                              cv.const_data_ptr<scalar_t>(), q.mutable_data_ptr<scalar_t>(),
                              kk.mutable_data_ptr<scalar_t>(), vv.mutable_data_ptr<scalar_t>()};
    conv_projection_qkv.of<scalar_t>().get()(a);
  });
  return {q, kk, vv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) { m.impl("_conv_projection_qkv_forward", &qkv_forward); }

}  // namespace cpu
}  // namespace fastvit_ops
