// Branch-free float math that GCC auto-vectorizes (no libm calls in the hot loops), and the
// target_clones attribute that builds one copy per ISA and picks the best at load time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTVIT_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTVIT_VEC_CLONES
#endif

namespace fastvit_ops {
namespace vec {

// exp(x) for x <= 0, ~1 ulp: Cody-Waite reduction x = n·ln2 + r, degree-6 minimax on r
// (Cephes expf coefficients), then 2^n through the exponent bits. Clamped at -87 so 2^n stays
// normal; exp(-87) ~ 1.6e-38 stands in for anything smaller.
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest with the 1.5·2^23 trick: unlike std::floor it vectorizes without -ffast-math.
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// σ(x) without overflow: e = exp(-|x|) ∈ (0, 1]; σ = 1/(1+e) for x ≥ 0, e/(1+e) otherwise.
static inline float sigmoid(float x) {
  float e = exp_nonpos(-std::fabs(x));
  float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

static inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// σ(a) and σ(b) with one division (the divider is the bottleneck of these loops): with
// e = exp(-|x|) and n = (x ≥ 0 ? 1 : e), σ(x) = n / (1 + e); both share 1 / ((1 + ea)(1 + eb)).
static inline void sigmoid2(float a, float b, float& sa, float& sb) {
  float ea = exp_nonpos(-std::fabs(a)), eb = exp_nonpos(-std::fabs(b));
  float da = 1.0f + ea, db = 1.0f + eb;
  float inv = 1.0f / (da * db);
  sa = (a >= 0.0f ? 1.0f : ea) * db * inv;
  sb = (b >= 0.0f ? 1.0f : eb) * da * inv;
}

}  // namespace vec
}  // namespace fastvit_ops
