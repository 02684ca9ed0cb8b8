// What the depthwise kernels of one capability share: the fused activations over a buffer, the
// padded-plane copy, prefetching, and the work split.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/dwconv.h"
#include "cpu/isa/lanes.h"

FASTVIT_ISA_BEGIN
namespace dw {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Work per plane decides the grain, so tiny planes are batched into one task.
inline int64_t plane_grain(const DwShape& sh) {
  const int64_t work = std::max<int64_t>(1, sh.Ho * sh.Wo * sh.k * sh.k);
  return std::max<int64_t>(1, 65536 / work);
}

// ---- activations over a buffer: fp32 in Vectorized<float>, two vectors per step sharing one
// division (σ's 1/(1+e), erf's 1/(1+p|z|): the divider bounds these loops); fp64 with libm.
inline void activate(float* a, int64_t n, int act) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += 2 * W) {
    const int64_t m0 = std::min(W, n - i), m1 = std::max<int64_t>(0, std::min(W, n - i - W));
    fVec u = fVec::loadu(a + i, m0), v = fVec::loadu(a + i + W, m1);
    if (act == kActSilu) silu2(u, v);
    else gelu2(u, v);
    u.store(a + i, m0);
    if (m1 > 0) v.store(a + i + W, m1);
  }
}

// g[i] ← g[i] · act'(pre[i])
inline void act_backward(const float* pre, float* g, int64_t n, int act) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min(W, n - i);
    const fVec p = fVec::loadu(pre + i, m);
    (fVec::loadu(g + i, m) * (act == kActSilu ? silu_grad(p) : gelu_grad(p))).store(g + i, m);
  }
}

inline void activate(double* a, int64_t n, int act) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = a[i];
    a[i] = act == kActSilu ? x / (1.0 + std::exp(-x)) : 0.5 * x * (1.0 + std::erf(x * M_SQRT1_2));
  }
}

inline void act_backward(const double* pre, double* g, int64_t n, int act) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = pre[i];
    double d;
    if (act == kActSilu) {
      const double s = 1.0 / (1.0 + std::exp(-x));
      d = s * (1.0 + x * (1.0 - s));
    } else {
      d = 0.5 * (1.0 + std::erf(x * M_SQRT1_2)) + x * 0.39894228040143268 * std::exp(-0.5 * x * x);
    }
    g[i] *= d;
  }
}

// Ask for a plane's rows ahead of its use (rows are contiguous only when sW == 1).
template <typename T>
inline void prefetch_plane(const T* src, int64_t sH, int64_t sW, int64_t H, int64_t W) {
  if (sW != 1) return;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; j += kLine) __builtin_prefetch(src + i * sH + j);
}

}  // namespace dw
FASTVIT_ISA_END
