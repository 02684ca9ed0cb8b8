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

// ---- elementwise math on Vectorized<float> --------------------------------------------------------
using fVec = at::vec::Vectorized<float>;
using iVec = at::vec::Vectorized<int32_t>;

// exp(x) for x <= 0, ~1 ulp: Cody-Waite reduction x = n·ln2 + r, degree-6 minimax on r (Cephes
// expf coefficients), then 2^n through the exponent bits. Clamped at -87 so 2^n stays normal;
// exp(-87) ~ 1.6e-38 stands in for anything smaller. NaN propagates.
FASTVIT_INLINE fVec exp_nonpos(fVec x) {
  x = at::vec::clamp_min(x, fVec(-87.0f));
  const fVec shifter(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  const fVec n = at::vec::fmadd(x, fVec(1.44269504088896341f), shifter) - shifter;
  fVec r = at::vec::fmadd(n, fVec(-0.693359375f), x);
  r = at::vec::fmadd(n, fVec(2.12194440e-4f), r);
  fVec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, fVec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, fVec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, fVec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, fVec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, fVec(5.0000001201e-1f));
  p = at::vec::fmadd(p * r, r, r) + fVec(1.0f);
  const iVec bits = (at::vec::convert_to_int_of_same_size(n) + iVec(127)) << iVec(23);
  return p * at::vec::cast<float>(bits);
}

// σ(x) without overflow: e = exp(-|x|) ∈ (0, 1]; σ = 1/(1+e) for x ≥ 0, e/(1+e) otherwise.
FASTVIT_INLINE fVec sigmoid(fVec x) {
  const fVec one(1.0f);
  const fVec e = exp_nonpos(fVec(0.0f) - x.abs());
  const fVec num = fVec::blendv(e, one, x >= fVec(0.0f));
  return num / (one + e);
}

// σ(a) and σ(b) with one division (the divider is the bottleneck of these loops): with
// e = exp(-|x|) and n = (x ≥ 0 ? 1 : e), σ(x) = n / (1 + e); both share 1 / ((1 + ea)(1 + eb)).
FASTVIT_INLINE void sigmoid2(fVec a, fVec b, fVec& sa, fVec& sb) {
  const fVec one(1.0f), zero(0.0f);
  const fVec ea = exp_nonpos(zero - a.abs()), eb = exp_nonpos(zero - b.abs());
  const fVec da = one + ea, db = one + eb;
  const fVec inv = one / (da * db);
  sa = fVec::blendv(ea, one, a >= zero) * db * inv;
  sb = fVec::blendv(eb, one, b >= zero) * da * inv;
}

// erf(z) = sign(z)·(1 − P(t)·t·exp(−z²)) with t = 1/(1 + 0.3275911|z|): Abramowitz & Stegun
// 7.1.26, |error| ≤ 1.5e-7 (fp32 rounding level). `t` is passed in so callers can share divisions.
FASTVIT_INLINE fVec erf_poly(fVec t, fVec az, fVec z) {
  fVec p(1.061405429f);
  p = at::vec::fmadd(p, t, fVec(-1.453152027f));
  p = at::vec::fmadd(p, t, fVec(1.421413741f));
  p = at::vec::fmadd(p, t, fVec(-0.284496736f));
  p = at::vec::fmadd(p, t, fVec(0.254829592f));
  const fVec r = fVec(1.0f) - p * t * exp_nonpos(fVec(0.0f) - az * az);
  return fVec::blendv(r, fVec(0.0f) - r, z < fVec(0.0f));
}

// GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)) (exact, erf) for two vectors sharing one division. |z| is
// clamped at 9, where erf is 1 in fp32, so da·db stays finite.
FASTVIT_INLINE void gelu2(fVec& a, fVec& b) {
  const fVec k(0.70710678118654752f), half(0.5f), one(1.0f), c(0.3275911f), nine(9.0f);
  const fVec za = a * k, zb = b * k;
  const fVec xa = at::vec::minimum(za.abs(), nine), xb = at::vec::minimum(zb.abs(), nine);
  const fVec da = at::vec::fmadd(c, xa, one), db = at::vec::fmadd(c, xb, one);
  const fVec inv = one / (da * db);
  a = half * a * (one + erf_poly(db * inv, xa, za));
  b = half * b * (one + erf_poly(da * inv, xb, zb));
}

FASTVIT_INLINE void silu2(fVec& a, fVec& b) {
  fVec sa, sb;
  sigmoid2(a, b, sa, sb);
  a = a * sa;
  b = b * sb;
}

// SiLU'(x) = σ(x)(1 + x(1 − σ(x))).
FASTVIT_INLINE fVec silu_grad(fVec x) {
  const fVec s = sigmoid(x), one(1.0f);
  return s * at::vec::fmadd(x, one - s, one);
}

// GELU'(x) = Φ(x) + x·φ(x).
FASTVIT_INLINE fVec gelu_grad(fVec x) {
  const fVec z = x * fVec(0.70710678118654752f), az = at::vec::minimum(z.abs(), fVec(9.0f));
  const fVec t = fVec(1.0f) / at::vec::fmadd(fVec(0.3275911f), az, fVec(1.0f));
  const fVec cdf = fVec(0.5f) * (fVec(1.0f) + erf_poly(t, az, z));
  return at::vec::fmadd(x * fVec(0.39894228040143268f), exp_nonpos(fVec(-0.5f) * x * x), cdf);
}

FASTVIT_ISA_END
