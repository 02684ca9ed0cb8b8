// Sigmoid cross-modulation, FASA's bidirectional gate (FAT, arXiv:2303.14189, Sec. 3.2; the
// released code's `local * sigmoid(local) * global * sigmoid(global)` form), one build per CPU
// capability: fp32 in Vectorized<float> (σ of both inputs with one shared division), half types
// converted to fp32 in L1-sized chunks, fp64 with libm (the gradcheck path).
//   forward   out = SiLU(l)·SiLU(g)           (full: a = SiLU(SiLU(l)) in place of SiLU(l))
//   backward  dl = dy·SiLU(g)·SiLU'(l)        dg = dy·SiLU(l)·SiLU'(g)   (chain rule through a)
// Training in fp32/fp64 takes the partials path: the forward also writes ∂out/∂l and ∂out/∂g
// (forward_partials) and the backward is two products (scale_f32 / scale_f64). The exps and the
// division then run once per element instead of twice; the op's compute, not its traffic, bounds it.
#include "cpu/cross_modulation.h"
#include "cpu/isa/vec.h"

#include <algorithm>
#include <type_traits>

FASTVIT_ISA_BEGIN
namespace {

constexpr int64_t kChunk = 1024;  // fp32 staging of half types stays in L1

void forward_f32(const float* l, const float* g, float* out, int64_t n, bool full) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min(W, n - i);
    const fVec lv = fVec::loadu(l + i, m), gv = fVec::loadu(g + i, m);
    fVec sl, sg;
    sigmoid2(lv, gv, sl, sg);
    fVec a = lv * sl;
    if (full) {
      fVec sa, ca;  // σ rounded as the training forward (forward_partials_f32) rounds it
      sigmoid_c(a, sa, ca);
      a = a * sa;
    }
    (a * gv * sg).store(out + i, m);
  }
}

// What both gradients are built from: a = SiLU(l) (full: SiLU(SiLU(l))), da = ∂a/∂l, sg = σ(g) and
// kg = 1 + g·(1 − σ(g)), so SiLU'(g) = sg·kg.
FASTVIT_INLINE void gradient_parts(fVec lv, fVec gv, bool full, fVec& a, fVec& da, fVec& sg, fVec& kg) {
  const fVec one(1.0f);
  fVec sl, cl, cg;  // σ and 1 − σ, the latter without cancellation (vec.h sigmoid_c)
  sigmoid2_c(lv, gv, sl, sg, cl, cg);
  a = lv * sl;
  da = sl * vfma(lv, cl, one);  // SiLU'(l)
  if (full) {
    fVec sa, ca;
    sigmoid_c(a, sa, ca);
    da = da * sa * vfma(a, ca, one);
    a = a * sa;
  }
  kg = vfma(gv, cg, one);
}

void backward_f32(const float* dy, const float* l, const float* g, float* dl, float* dg, int64_t n, bool full) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min(W, n - i);
    const fVec dv = fVec::loadu(dy + i, m), lv = fVec::loadu(l + i, m), gv = fVec::loadu(g + i, m);
    fVec a, da, sg, kg;
    gradient_parts(lv, gv, full, a, da, sg, kg);
    (dv * gv * sg * da).store(dl + i, m);
    (dv * a * sg * kg).store(dg + i, m);
  }
}

// out and the partials pl = ∂out/∂l, pg = ∂out/∂g (either may be null: that input needs no gradient).
void forward_partials_f32(const float* l, const float* g, float* out, float* pl, float* pg, int64_t n,
                          bool full) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min(W, n - i);
    const fVec lv = fVec::loadu(l + i, m), gv = fVec::loadu(g + i, m);
    fVec a, da, sg, kg;
    gradient_parts(lv, gv, full, a, da, sg, kg);
    (a * gv * sg).store(out + i, m);  // as forward_f32 rounds it: training and eval agree bitwise
    if (pl != nullptr) (gv * sg * da).store(pl + i, m);
    if (pg != nullptr) (a * sg * kg).store(pg + i, m);
  }
}

// dl = dy·pl, dg = dy·pg (a null partial: no gradient for that input).
void scale_f32(const float* dy, const float* pl, const float* pg, float* dl, float* dg, int64_t n) {
  constexpr int64_t W = fVec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t m = std::min(W, n - i);
    const fVec d = fVec::loadu(dy + i, m);
    if (pl != nullptr) (d * fVec::loadu(pl + i, m)).store(dl + i, m);
    if (pg != nullptr) (d * fVec::loadu(pg + i, m)).store(dg + i, m);
  }
}

void scale_f64(const double* dy, const double* pl, const double* pg, double* dl, double* dg, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (pl != nullptr) dl[i] = dy[i] * pl[i];
    if (pg != nullptr) dg[i] = dy[i] * pg[i];
  }
}

double sigmoid_f64(double x) { return 1.0 / (1.0 + std::exp(-x)); }

void forward_f64(const double* l, const double* g, double* out, int64_t n, bool full) {
  for (int64_t i = 0; i < n; ++i) {
    double a = l[i] * sigmoid_f64(l[i]);
    if (full) a = a * sigmoid_f64(a);
    out[i] = a * g[i] * sigmoid_f64(g[i]);
  }
}

// gradient_parts in double: a, da = ∂a/∂l, sg = σ(g), kg = 1 + g·(1 − σ(g)).
void gradient_parts_f64(double l, double g, bool full, double& a, double& da, double& sg, double& kg) {
  const double sl = sigmoid_f64(l);
  a = l * sl;
  da = sl * (1.0 + l * (1.0 - sl));
  if (full) {
    const double sa = sigmoid_f64(a);
    da = da * sa * (1.0 + a * (1.0 - sa));
    a = a * sa;
  }
  sg = sigmoid_f64(g);
  kg = 1.0 + g * (1.0 - sg);
}

void backward_f64(const double* dy, const double* l, const double* g, double* dl, double* dg, int64_t n,
                  bool full) {
  for (int64_t i = 0; i < n; ++i) {
    double a, da, sg, kg;
    gradient_parts_f64(l[i], g[i], full, a, da, sg, kg);
    dl[i] = dy[i] * g[i] * sg * da;
    dg[i] = dy[i] * a * sg * kg;
  }
}

void forward_partials_f64(const double* l, const double* g, double* out, double* pl, double* pg, int64_t n,
                          bool full) {
  for (int64_t i = 0; i < n; ++i) {
    double a, da, sg, kg;
    gradient_parts_f64(l[i], g[i], full, a, da, sg, kg);
    out[i] = a * g[i] * sg;
    if (pl != nullptr) pl[i] = g[i] * sg * da;
    if (pg != nullptr) pg[i] = a * sg * kg;
  }
}

template <typename T>
void forward_kernel(const T* l, const T* g, T* o, int64_t n, bool full) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32(l, g, o, n, full);
  } else if constexpr (std::is_same_v<T, double>) {
    forward_f64(l, g, o, n, full);
  } else {
    float bl[kChunk], bg[kChunk], bo[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      at::vec::convert(l + s, bl, m);
      at::vec::convert(g + s, bg, m);
      forward_f32(bl, bg, bo, m, full);
      at::vec::convert(bo, o + s, m);
    }
  }
}

template <typename T>
void backward_kernel(const T* dy, const T* l, const T* g, T* dl, T* dg, int64_t n, bool full) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32(dy, l, g, dl, dg, n, full);
  } else if constexpr (std::is_same_v<T, double>) {
    backward_f64(dy, l, g, dl, dg, n, full);
  } else {
    float bdy[kChunk], bl[kChunk], bg[kChunk], bdl[kChunk], bdg[kChunk];
    for (int64_t s = 0; s < n; s += kChunk) {
      const int64_t m = std::min(kChunk, n - s);
      at::vec::convert(dy + s, bdy, m);
      at::vec::convert(l + s, bl, m);
      at::vec::convert(g + s, bg, m);
      backward_f32(bdy, bl, bg, bdl, bdg, m, full);
      at::vec::convert(bdl, dl + s, m);
      at::vec::convert(bdg, dg + s, m);
    }
  }
}

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward.of<float>(), &forward_kernel<float>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward.of<double>(), &forward_kernel<double>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward.of<c10::Half>(), &forward_kernel<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward.of<c10::BFloat16>(), &forward_kernel<c10::BFloat16>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward_partials.of<float>(), &forward_partials_f32);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_forward_partials.of<double>(), &forward_partials_f64);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_scale.of<float>(), &scale_f32);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_scale.of<double>(), &scale_f64);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_backward.of<float>(), &backward_kernel<float>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_backward.of<double>(), &backward_kernel<double>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_backward.of<c10::Half>(), &backward_kernel<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(cross_modulation_backward.of<c10::BFloat16>(), &backward_kernel<c10::BFloat16>);

FASTVIT_ISA_END
