// SIMD building blocks of the per-capability kernels (csrc/cpu/isa/*.cpp only: setup.py compiles
// those once per capability with CPU_CAPABILITY set, see capability.h).
//
// Two vector types, both ISA-neutral:
// * at::vec::Vectorized<float> (`fVec`) for elementwise math over arrays: AVX-512, AVX2, NEON, or
//   ATen's portable fallback, with loads/stores that take a count for the tails;
// * GCC/clang generic vectors (`Vec<A, L>::type`) in the convolution and attention inner loops,
//   where the width is chosen per loop (half-width vectors for narrow rows) and accumulators must
//   stay in registers; the compiler lowers them to the ISA it was given (or to several registers).
#pragma once

#ifndef CPU_CAPABILITY
#error "csrc/cpu/isa/ files are compiled once per CPU capability by setup.py (CPU_CAPABILITY unset)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/capability.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#define FASTVIT_ISA_BEGIN namespace fastvit_ops { namespace cpu { namespace CPU_CAPABILITY {
#define FASTVIT_ISA_END } } }
#define FASTVIT_INLINE inline __attribute__((always_inline))

FASTVIT_ISA_BEGIN

// Widest native vector (bytes) and the number of vector registers: they size the register blocks.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#else
constexpr int kVecBytes = 16;  // SSE2 on x86-64, NEON on aarch64
constexpr int kVecRegs = 16;
#endif

template <typename A, int L>
struct Vec {
  typedef A type __attribute__((vector_size(sizeof(A) * L)));
};

template <typename A, int L>
FASTVIT_INLINE typename Vec<A, L>::type vload(const A* p) {
  typename Vec<A, L>::type v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename A, int L>
FASTVIT_INLINE void vstore(A* p, typename Vec<A, L>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename A, int L>
FASTVIT_INLINE A hsum(typename Vec<A, L>::type v) {
  A s = 0;
  for (int l = 0; l < L; ++l) s += v[l];
  return s;
}

// ---- elementwise math ------------------------------------------------------------------------------
// fVec: Vectorized<float> where ATen implements it with SIMD (AVX2, AVX-512, NEON on aarch64). Where
// ATen's is its portable emulation (the x86-64 baseline build: an array with a loop per operation,
// measured 4× slower than eager PyTorch's scalar libm path here), a 4-lane generic vector with the
// same interface, which the compiler maps onto SSE2 (or the platform's 128-bit SIMD).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(__aarch64__)
using fVec = at::vec::Vectorized<float>;
using fMask = fVec;  // comparisons give all-ones / all-zeros lanes

FASTVIT_INLINE fVec vfma(fVec a, fVec b, fVec c) { return at::vec::fmadd(a, b, c); }  // a·b + c
FASTVIT_INLINE fVec vfms(fVec a, fVec b, fVec c) { return at::vec::fmsub(a, b, c); }  // a·b − c
FASTVIT_INLINE fVec vmin(fVec a, fVec b) { return at::vec::minimum(a, b); }
FASTVIT_INLINE fVec vmax(fVec a, fVec b) { return at::vec::maximum(a, b); }
FASTVIT_INLINE fVec vclamp_min(fVec a, fVec lo) { return at::vec::clamp_min(a, lo); }  // NaN stays NaN
FASTVIT_INLINE fVec vabs(fVec a) { return a.abs(); }
FASTVIT_INLINE fMask vge(fVec a, fVec b) { return a >= b; }
FASTVIT_INLINE fMask vlt(fVec a, fVec b) { return a < b; }
FASTVIT_INLINE fVec vselect(fMask m, fVec if_true, fVec if_false) { return fVec::blendv(if_false, if_true, m); }
// 2^n for integral n in [-126, 127], through the exponent bits.
FASTVIT_INLINE fVec pow2i(fVec n) {
  using iVec = at::vec::Vectorized<int32_t>;
  return at::vec::cast<float>((at::vec::convert_to_int_of_same_size(n) + iVec(127)) << iVec(23));
}
#else
struct fVec {
  typedef float V __attribute__((vector_size(16)));
  V v;
  static constexpr int size() { return 4; }
  fVec() = default;
  fVec(V x) : v(x) {}
  fVec(float s) : v(V{} + s) {}
  static fVec loadu(const void* p) {
    V x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  static fVec loadu(const void* p, int64_t n) {
    if (n >= size()) return loadu(p);
    V x{};
    if (n > 0) std::memcpy(&x, p, n * sizeof(float));
    return x;
  }
  void store(void* p) const { std::memcpy(p, &v, sizeof(v)); }
  void store(void* p, int64_t n) const {
    if (n >= size()) return store(p);
    if (n > 0) std::memcpy(p, &v, n * sizeof(float));
  }
  friend fVec operator+(fVec a, fVec b) { return a.v + b.v; }
  friend fVec operator-(fVec a, fVec b) { return a.v - b.v; }
  friend fVec operator*(fVec a, fVec b) { return a.v * b.v; }
  friend fVec operator/(fVec a, fVec b) { return a.v / b.v; }
};
typedef int32_t fMask __attribute__((vector_size(16)));

FASTVIT_INLINE fVec vfma(fVec a, fVec b, fVec c) { return a.v * b.v + c.v; }
FASTVIT_INLINE fVec vfms(fVec a, fVec b, fVec c) { return a.v * b.v - c.v; }
FASTVIT_INLINE fVec vselect(fMask m, fVec if_true, fVec if_false) {
  fMask t, f;
  std::memcpy(&t, &if_true.v, 16);
  std::memcpy(&f, &if_false.v, 16);
  const fMask r = (t & m) | (f & ~m);
  fVec::V out;
  std::memcpy(&out, &r, 16);
  return out;
}
FASTVIT_INLINE fMask vge(fVec a, fVec b) { return a.v >= b.v; }
FASTVIT_INLINE fMask vlt(fVec a, fVec b) { return a.v < b.v; }
FASTVIT_INLINE fVec vmin(fVec a, fVec b) { return vselect(vlt(b, a), b, a); }
FASTVIT_INLINE fVec vmax(fVec a, fVec b) { return vselect(vlt(a, b), b, a); }
FASTVIT_INLINE fVec vclamp_min(fVec a, fVec lo) { return vselect(vlt(a, lo), lo, a); }  // NaN stays NaN
FASTVIT_INLINE fVec vabs(fVec a) {
  fMask bits;
  std::memcpy(&bits, &a.v, 16);
  bits &= 0x7fffffff;
  fVec::V out;
  std::memcpy(&out, &bits, 16);
  return out;
}
FASTVIT_INLINE fVec pow2i(fVec n) {
  const fMask bits = (__builtin_convertvector(n.v, fMask) + 127) << 23;
  fVec::V out;
  std::memcpy(&out, &bits, 16);
  return out;
}
#endif

// exp(x) for x <= 0, ~1 ulp: Cody-Waite reduction x = n·ln2 + r, degree-6 minimax on r (Cephes
// expf coefficients), then 2^n through the exponent bits. Clamped at -87 so 2^n stays normal;
// exp(-87) ~ 1.6e-38 stands in for anything smaller. NaN propagates.
FASTVIT_INLINE fVec exp_nonpos(fVec x) {
  x = vclamp_min(x, fVec(-87.0f));
  const fVec shifter(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const fVec n = vfma(x, fVec(1.44269504088896341f), shifter) - shifter;
  fVec r = vfma(n, fVec(-0.693359375f), x);
  r = vfma(n, fVec(2.12194440e-4f), r);
  fVec p(1.9875691500e-4f);
  p = vfma(p, r, fVec(1.3981999507e-3f));
  p = vfma(p, r, fVec(8.3334519073e-3f));
  p = vfma(p, r, fVec(4.1665795894e-2f));
  p = vfma(p, r, fVec(1.6666665459e-1f));
  p = vfma(p, r, fVec(5.0000001201e-1f));
  p = vfma(p * r, r, r) + fVec(1.0f);
  return p * pow2i(n);
}

// σ(x) without overflow: e = exp(-|x|) ∈ (0, 1]; σ = 1/(1+e) for x ≥ 0, e/(1+e) otherwise.
FASTVIT_INLINE fVec sigmoid(fVec x) {
  const fVec one(1.0f);
  const fVec e = exp_nonpos(fVec(0.0f) - vabs(x));
  const fVec num = vselect(vge(x, fVec(0.0f)), one, e);
  return num / (one + e);
}

// σ(x) and its complement c = 1 − σ(x) = σ(−x), both from e = exp(-|x|): c = e/(1+e) for x ≥ 0.
// Derivatives need c, and 1 − σ rounded cancels: at x = 8, σ's half-ulp is 1e-4 of c, which
// SiLU'(x) = σ(1 + x·c) multiplies by x (eager's own form, and an outlier of ~8 ulp with our σ).
FASTVIT_INLINE void sigmoid_c(fVec x, fVec& s, fVec& c) {
  const fVec one(1.0f);
  const fVec e = exp_nonpos(fVec(0.0f) - vabs(x));
  const fVec inv = one / (one + e);
  const fMask pos = vge(x, fVec(0.0f));
  s = vselect(pos, one, e) * inv;
  c = vselect(pos, e, one) * inv;
}

// σ(a) and σ(b) with one division (the divider is the bottleneck of these loops): with
// e = exp(-|x|) and n = (x ≥ 0 ? 1 : e), σ(x) = n / (1 + e); both share 1 / ((1 + ea)(1 + eb)).
FASTVIT_INLINE void sigmoid2(fVec a, fVec b, fVec& sa, fVec& sb) {
  const fVec one(1.0f), zero(0.0f);
  const fVec ea = exp_nonpos(zero - vabs(a)), eb = exp_nonpos(zero - vabs(b));
  const fVec da = one + ea, db = one + eb;
  const fVec inv = one / (da * db);
  const fVec ia = db * inv, ib = da * inv;  // rounded as in sigmoid2_c, so both give the same σ
  sa = vselect(vge(a, zero), one, ea) * ia;
  sb = vselect(vge(b, zero), one, eb) * ib;
}

// sigmoid2 with the complements ca = 1 − σ(a), cb = 1 − σ(b) (see sigmoid_c).
FASTVIT_INLINE void sigmoid2_c(fVec a, fVec b, fVec& sa, fVec& sb, fVec& ca, fVec& cb) {
  const fVec one(1.0f), zero(0.0f);
  const fVec ea = exp_nonpos(zero - vabs(a)), eb = exp_nonpos(zero - vabs(b));
  const fVec da = one + ea, db = one + eb;
  const fVec inv = one / (da * db);
  const fVec ia = db * inv, ib = da * inv;
  const fMask pa = vge(a, zero), pb = vge(b, zero);
  sa = vselect(pa, one, ea) * ia;
  ca = vselect(pa, ea, one) * ia;
  sb = vselect(pb, one, eb) * ib;
  cb = vselect(pb, eb, one) * ib;
}

// erf(z) = sign(z)·(1 − P(t)·t·exp(−z²)) with t = 1/(1 + 0.3275911|z|): Abramowitz & Stegun
// 7.1.26, |error| ≤ 1.5e-7 (fp32 rounding level). `t` is passed in so callers can share divisions.
FASTVIT_INLINE fVec erf_poly(fVec t, fVec az, fVec z) {
  fVec p(1.061405429f);
  p = vfma(p, t, fVec(-1.453152027f));
  p = vfma(p, t, fVec(1.421413741f));
  p = vfma(p, t, fVec(-0.284496736f));
  p = vfma(p, t, fVec(0.254829592f));
  const fVec r = fVec(1.0f) - p * t * exp_nonpos(fVec(0.0f) - az * az);
  return vselect(vlt(z, fVec(0.0f)), fVec(0.0f) - r, r);
}

// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)) (exact, erf) for two vectors sharing one division. |z| is
// clamped at 9, where erf is 1 in fp32, so da·db stays finite; a NaN lane is clamped to 9 as well
// (the comparison is false), so it cannot reach the other vector's lane through the shared
// division (its own result stays NaN through the factor x).
FASTVIT_INLINE void gelu2(fVec& a, fVec& b) {
  const fVec k(0.70710678118654752f), half(0.5f), one(1.0f), c(0.3275911f), nine(9.0f);
  const fVec za = a * k, zb = b * k;
  const fVec aza = vabs(za), azb = vabs(zb);
  const fVec xa = vselect(vlt(aza, nine), aza, nine), xb = vselect(vlt(azb, nine), azb, nine);
  const fVec da = vfma(c, xa, one), db = vfma(c, xb, one);
  const fVec inv = one / (da * db);
  a = half * a * (one + erf_poly(db * inv, xa, za));
  b = half * b * (one + erf_poly(da * inv, xb, zb));
}

// SiLU of two vectors of unrelated elements sharing one division (sigmoid2): a NaN lane enters as
// 0, so it cannot make the other vector's lane NaN through that division; its own result stays
// NaN through the factor x.
FASTVIT_INLINE void silu2(fVec& a, fVec& b) {
  const fVec zero(0.0f);
  fVec sa, sb;
  sigmoid2(vselect(vge(a, a), a, zero), vselect(vge(b, b), b, zero), sa, sb);
  a = a * sa;
  b = b * sb;
}

// SiLU'(x) = σ(x)(1 + x(1 − σ(x))).
FASTVIT_INLINE fVec silu_grad(fVec x) {
  fVec s, c;
  sigmoid_c(x, s, c);
  return s * vfma(x, c, fVec(1.0f));
}

// GELU'(x) = Φ(x) + x·φ(x).
FASTVIT_INLINE fVec gelu_grad(fVec x) {
  const fVec z = x * fVec(0.70710678118654752f), az = vmin(vabs(z), fVec(9.0f));
  const fVec t = fVec(1.0f) / vfma(fVec(0.3275911f), az, fVec(1.0f));
  const fVec cdf = fVec(0.5f) * (fVec(1.0f) + erf_poly(t, az, z));
  return vfma(x * fVec(0.39894228040143268f), exp_nonpos(fVec(-0.5f) * x * x), cdf);
}

FASTVIT_ISA_END
