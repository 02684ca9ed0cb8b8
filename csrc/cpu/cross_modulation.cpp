// Sigmoid cross-modulation on CPU (SPEC §1.4): at::parallel_for (OpenMP) over flat chunks,
// fp32 math vectorized by the compiler (vec_math.h), half/bf16 converted per chunk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "vec_math.h"

namespace fastvit_ops {
namespace {

constexpr int64_t kChunk = 1024;    // fp32 staging buffers for half types stay in L1
constexpr int64_t kGrain = 16384;   // elements per task: amortizes the OpenMP fork

FASTVIT_VEC_CLONES
void forward_f32(const float* __restrict l, const float* __restrict g, float* __restrict out,
                 int64_t n, bool full) {
  if (full) {
    for (int64_t i = 0; i < n; ++i) {
      float a = l[i] * vec::sigmoid(l[i]);
      out[i] = a * vec::sigmoid(a) * g[i] * vec::sigmoid(g[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float sl, sg;
      vec::sigmoid2(l[i], g[i], sl, sg);
      out[i] = l[i] * sl * g[i] * sg;
    }
  }
}

FASTVIT_VEC_CLONES
void backward_f32(const float* __restrict dy, const float* __restrict l, const float* __restrict g,
                  float* __restrict dl, float* __restrict dg, int64_t n, bool full) {
  // Two loops rather than a branch on `full` inside one: the plain loop is the hot one (FAT's
  // released gate) and must not pay for the third sigmoid.
  if (full) {
    for (int64_t i = 0; i < n; ++i) {
      float sl, sg;
      vec::sigmoid2(l[i], g[i], sl, sg);
      float a = l[i] * sl;
      float da = sl * (1.0f + l[i] * (1.0f - sl));
      float sa = vec::sigmoid(a);
      da = da * sa * (1.0f + a * (1.0f - sa));
      a = a * sa;
      dl[i] = dy[i] * g[i] * sg * da;
      dg[i] = dy[i] * a * sg * (1.0f + g[i] * (1.0f - sg));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float sl, sg;
      vec::sigmoid2(l[i], g[i], sl, sg);
      dl[i] = dy[i] * g[i] * sg * sl * (1.0f + l[i] * (1.0f - sl));
      dg[i] = dy[i] * l[i] * sl * sg * (1.0f + g[i] * (1.0f - sg));
    }
  }
}

void forward_f64(const double* l, const double* g, double* out, int64_t n, bool full) {
  for (int64_t i = 0; i < n; ++i) {
    double a = l[i] * vec::sigmoid(l[i]);
    if (full) a = a * vec::sigmoid(a);
    out[i] = a * g[i] * vec::sigmoid(g[i]);
  }
}

void backward_f64(const double* dy, const double* l, const double* g, double* dl, double* dg,
                  int64_t n, bool full) {
  for (int64_t i = 0; i < n; ++i) {
    double sl = vec::sigmoid(l[i]);
    double a = l[i] * sl;
    double da = sl * (1.0 + l[i] * (1.0 - sl));
    if (full) {
      double sa = vec::sigmoid(a);
      da = da * sa * (1.0 + a * (1.0 - sa));
      a = a * sa;
    }
    double sg = vec::sigmoid(g[i]);
    dl[i] = dy[i] * g[i] * sg * da;
    dg[i] = dy[i] * a * sg * (1.0 + g[i] * (1.0 - sg));
  }
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
void forward_block(const T* l, const T* g, T* o, int64_t n, bool full) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32(l, g, o, n, full);
  } else if constexpr (std::is_same_v<T, double>) {
    forward_f64(l, g, o, n, full);
  } else {
    float bl[kChunk], bg[kChunk], bo[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      to_float(l + s, bl, m);
      to_float(g + s, bg, m);
      forward_f32(bl, bg, bo, m, full);
      from_float(bo, o + s, m);
    }
  }
}

template <typename T>
void backward_block(const T* dy, const T* l, const T* g, T* dl, T* dg, int64_t n, bool full) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32(dy, l, g, dl, dg, n, full);
  } else if constexpr (std::is_same_v<T, double>) {
    backward_f64(dy, l, g, dl, dg, n, full);
  } else {
    float bdy[kChunk], bl[kChunk], bg[kChunk], bdl[kChunk], bdg[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      to_float(dy + s, bdy, m);
      to_float(l + s, bl, m);
      to_float(g + s, bg, m);
      backward_f32(bdy, bl, bg, bdl, bdg, m, full);
      from_float(bdl, dl + s, m);
      from_float(bdg, dg + s, m);
    }
  }
}

void check_inputs(const char* op, std::initializer_list<at::Tensor> ts) {
  const at::Tensor& first = *ts.begin();
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": dtypes differ");
    TORCH_CHECK(t.sizes() == first.sizes() && t.strides() == first.strides(), op,
                ": inputs must share shape and strides");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": inputs must be dense");
  }
}

at::Tensor forward(const at::Tensor& local, const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_forward", {local, global});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_forward: mode must be 0 or 1");
  at::Tensor out = at::empty_like(local);
  const int64_t n = local.numel();
  const bool full = mode == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_fwd", [&] {
    const scalar_t* l = local.const_data_ptr<scalar_t>();
    const scalar_t* g = global.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      forward_block(l + begin, g + begin, o + begin, end - begin, full);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& local,
                                            const at::Tensor& global, int64_t mode) {
  check_inputs("_cross_modulation_backward", {local, global, grad});
  TORCH_CHECK(mode == 0 || mode == 1, "_cross_modulation_backward: mode must be 0 or 1");
  at::Tensor dlocal = at::empty_like(local);
  at::Tensor dglobal = at::empty_like(local);
  const int64_t n = local.numel();
  const bool full = mode == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, local.scalar_type(), "cross_mod_bwd", [&] {
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    const scalar_t* l = local.const_data_ptr<scalar_t>();
    const scalar_t* g = global.const_data_ptr<scalar_t>();
    scalar_t* dl = dlocal.mutable_data_ptr<scalar_t>();
    scalar_t* dg = dglobal.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      backward_block(dy + begin, l + begin, g + begin, dl + begin, dg + begin, end - begin, full);
    });
  });
  return {dlocal, dglobal};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_cross_modulation_forward", &forward);
  m.impl("_cross_modulation_backward", &backward);
}

}  // namespace fastvit_ops
