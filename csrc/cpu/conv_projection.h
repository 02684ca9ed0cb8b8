// CvT's convolutional projection on CPU (see isa/conv_projection.cpp): q, k, v depthwise convs
// of one token map in one pass. Weights as (k·k, C) (a tap's weights contiguous over channels).
#pragma once
#include <cstdint>

#include "cpu/capability.h"

namespace fastvit_ops {
namespace cpu {

template <typename T>
struct QkvArgs {
  const T* x;  // (B, ntok, C) contiguous tokens
  int64_t B, ntok, C, h, w, k, cls, stride_q, stride_kv;  // ntok = cls + h·w
  int64_t wq, wk, Tq, Tk;  // output widths and token counts of q and of k, v
  const T *wtq, *bq, *wtk, *bk, *wtv, *bv;
  T *q, *k_out, *v_out;
};

template <typename T>
using QkvFn = void (*)(const QkvArgs<T>&);
extern PerDtype<QkvFn> conv_projection_qkv;  // fp32 and fp64

}  // namespace cpu
}  // namespace fastvit_ops
