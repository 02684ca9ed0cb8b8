// Downsampled attention on CPU (SPEC §1.3): O = softmax_keys(scale · q kᵀ) v, optional epilogue
// out = SiLU(O) ⊙ gate (SPEC §1.4 "silu" with gate = SiLU(L0)).
//
// Layout strategy: a tile of NT queries is gathered into a (d × NT) fp32 buffer — query index
// fastest — so every hot loop runs along the queries with K/V entries as broadcast scalars and
// vectorizes cleanly whatever the head dim (16, 20, 24, 40, ...). Channels-first queries (FASA,
// stride 1 along the pixels) gather as straight copies. All M keys of a (b, h) fit in one pass
// (the score tile is M × NT), so the softmax is exact without an online rescale; only the
// row max and log2 of the row sum per query (base 2) are saved, and the backward recomputes P and the
// pre-gate output O from it (no N × M matrix, no O in memory).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "avx512.h"
#include "vec_math.h"

namespace fastvit_ops {
namespace {

constexpr int64_t NT = 64;  // queries per tile: 64 fp32 = 8 AVX2 / 4 AVX-512 registers
constexpr double kLog2e = 1.4426950408889634;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

static inline float exp2_nonpos(float x) { return vec::exp_nonpos(x * 0.693147180559945309f); }
static inline double exp2_nonpos(double x) { return std::exp2(x); }

// ---- hot loops (fp32 clones per ISA; fp64 is the gradcheck path) ----------------------------------
// GCC generic vectors: accumulators stay in registers (plain arrays got spilled), and each
// target clone lowers them to its own ISA.
typedef float v8f __attribute__((vector_size(32)));
static inline v8f ld8(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void st8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }

// S[j, :] = Σ_e A[j, e] · X[e, :]     (A: M × D row-major, X: D × NT)
// Register blocking: 4 rows × 16 queries of accumulators, one load of X per (e, 16 queries).
FASTVIT_VEC_CLONES
void rows_dot_f32(const float* __restrict A, const float* __restrict X, float* __restrict S,
                  int64_t M, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= M; j += 4) {
    const float* a = A + j * D;
    for (int64_t c = 0; c < NT; c += 16) {
      v8f s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s30 = {0}, s31 = {0};
      for (int64_t e = 0; e < D; ++e) {
        const v8f x0 = ld8(X + e * NT + c), x1 = ld8(X + e * NT + c + 8);
        const float k0 = a[e], k1 = a[D + e], k2 = a[2 * D + e], k3 = a[3 * D + e];
        s00 += k0 * x0; s01 += k0 * x1;
        s10 += k1 * x0; s11 += k1 * x1;
        s20 += k2 * x0; s21 += k2 * x1;
        s30 += k3 * x0; s31 += k3 * x1;
      }
      float* o = S + j * NT + c;
      st8(o, s00); st8(o + 8, s01);
      st8(o + NT, s10); st8(o + NT + 8, s11);
      st8(o + 2 * NT, s20); st8(o + 2 * NT + 8, s21);
      st8(o + 3 * NT, s30); st8(o + 3 * NT + 8, s31);
    }
  }
  for (; j < M; ++j) {
    const float* a = A + j * D;
    for (int64_t c = 0; c < NT; c += 16) {
      v8f s0 = {0}, s1 = {0};
      for (int64_t e = 0; e < D; ++e) {
        s0 += a[e] * ld8(X + e * NT + c);
        s1 += a[e] * ld8(X + e * NT + c + 8);
      }
      st8(S + j * NT + c, s0);
      st8(S + j * NT + c + 8, s1);
    }
  }
}

// Y[e, :] = Σ_j A[j, e] · P[j, :]     (A: M × D, P: M × NT, Y: D × NT); 2 outputs × 32 queries.
FASTVIT_VEC_CLONES
void cols_dot_f32(const float* __restrict A, const float* __restrict P, float* __restrict Y,
                  int64_t M, int64_t D) {
  int64_t e = 0;
  for (; e + 2 <= D; e += 2) {
    for (int64_t c = 0; c < NT; c += 32) {
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
      for (int64_t j = 0; j < M; ++j) {
        const float* p = P + j * NT + c;
        const v8f p0 = ld8(p), p1 = ld8(p + 8), p2 = ld8(p + 16), p3 = ld8(p + 24);
        const float u = A[j * D + e], w = A[j * D + e + 1];
        a0 += u * p0; a1 += u * p1; a2 += u * p2; a3 += u * p3;
        b0 += w * p0; b1 += w * p1; b2 += w * p2; b3 += w * p3;
      }
      float* y = Y + e * NT + c;
      st8(y, a0); st8(y + 8, a1); st8(y + 16, a2); st8(y + 24, a3);
      st8(y + NT, b0); st8(y + NT + 8, b1); st8(y + NT + 16, b2); st8(y + NT + 24, b3);
    }
  }
  for (; e < D; ++e) {
    for (int64_t c = 0; c < NT; c += 32) {
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int64_t j = 0; j < M; ++j) {
        const float* p = P + j * NT + c;
        const float u = A[j * D + e];
        a0 += u * ld8(p); a1 += u * ld8(p + 8); a2 += u * ld8(p + 16); a3 += u * ld8(p + 24);
      }
      float* y = Y + e * NT + c;
      st8(y, a0); st8(y + 8, a1); st8(y + 16, a2); st8(y + 24, a3);
    }
  }
}

static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// R[j, e] += Σ_n P[j, n] · X[e, n]     (P: M × NT, X: D × NT, R: M × D)
// Register blocking: 4 rows of P × 2 rows of X, 8 vector accumulators along n, one horizontal
// sum per output at the end (a plain dot per (j, e) was bound by loads and reductions).
FASTVIT_VEC_CLONES
void outer_acc_f32(const float* __restrict P, const float* __restrict X, float* __restrict R,
                   int64_t M, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= M; j += 4) {
    const float* p = P + j * NT;
    int64_t e = 0;
    for (; e + 2 <= D; e += 2) {
      const float* x = X + e * NT;
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
      for (int64_t n = 0; n < NT; n += 8) {
        const v8f x0 = ld8(x + n), x1 = ld8(x + NT + n);
        const v8f p0 = ld8(p + n), p1 = ld8(p + NT + n), p2 = ld8(p + 2 * NT + n), p3 = ld8(p + 3 * NT + n);
        a0 += p0 * x0; a1 += p1 * x0; a2 += p2 * x0; a3 += p3 * x0;
        b0 += p0 * x1; b1 += p1 * x1; b2 += p2 * x1; b3 += p3 * x1;
      }
      R[j * D + e] += hsum8(a0); R[(j + 1) * D + e] += hsum8(a1);
      R[(j + 2) * D + e] += hsum8(a2); R[(j + 3) * D + e] += hsum8(a3);
      R[j * D + e + 1] += hsum8(b0); R[(j + 1) * D + e + 1] += hsum8(b1);
      R[(j + 2) * D + e + 1] += hsum8(b2); R[(j + 3) * D + e + 1] += hsum8(b3);
    }
    for (; e < D; ++e) {
      const float* x = X + e * NT;
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int64_t n = 0; n < NT; n += 8) {
        const v8f x0 = ld8(x + n);
        a0 += ld8(p + n) * x0; a1 += ld8(p + NT + n) * x0;
        a2 += ld8(p + 2 * NT + n) * x0; a3 += ld8(p + 3 * NT + n) * x0;
      }
      R[j * D + e] += hsum8(a0); R[(j + 1) * D + e] += hsum8(a1);
      R[(j + 2) * D + e] += hsum8(a2); R[(j + 3) * D + e] += hsum8(a3);
    }
  }
  for (; j < M; ++j) {
    const float* p = P + j * NT;
    for (int64_t e = 0; e < D; ++e) {
      const float* x = X + e * NT;
      v8f a0 = {0};
      for (int64_t n = 0; n < NT; n += 8) a0 += ld8(p + n) * ld8(x + n);
      R[j * D + e] += hsum8(a0);
    }
  }
}

// Forward softmax over the M rows of raw dot products S (per column): S ← 2^((S − max)·c) with
// c = scale·log2(e) applied to the difference (one rounding at the small magnitude of S − max,
// not at the logits' — matters for large logits); returns the raw max and the sum.
FASTVIT_VEC_CLONES
void softmax_cols_f32(float* __restrict S, float* __restrict mx, float* __restrict l, float c, int64_t M) {
  for (int64_t n = 0; n < NT; ++n) mx[n] = S[n];
  for (int64_t j = 1; j < M; ++j) {
    const float* s = S + j * NT;
    for (int64_t n = 0; n < NT; ++n) mx[n] = s[n] > mx[n] ? s[n] : mx[n];
  }
  for (int64_t n = 0; n < NT; ++n) l[n] = 0.f;
  for (int64_t j = 0; j < M; ++j) {
    float* s = S + j * NT;
    for (int64_t n = 0; n < NT; ++n) {
      s[n] = exp2_nonpos((s[n] - mx[n]) * c);
      l[n] += s[n];
    }
  }
}

// Backward: P = 2^((S − max)·c − log2 Σ), the forward's probabilities. The max and the log-sum are
// kept apart: folding them into one lse would round at the logits' magnitude (|S| ~ 1e3 for large
// logits) and cost ~1e-4 relative error in P.
FASTVIT_VEC_CLONES
void probs_from_lse_f32(float* __restrict S, const float* __restrict mx, const float* __restrict ll, float c,
                        int64_t M) {
  for (int64_t j = 0; j < M; ++j) {
    float* s = S + j * NT;
    for (int64_t n = 0; n < NT; ++n) s[n] = exp2_nonpos(std::min((s[n] - mx[n]) * c - ll[n], 0.f));
  }
}

// dS = P ⊙ (dP − Dn) · scale, in place in dP.
FASTVIT_VEC_CLONES
void dscores_f32(const float* __restrict P, float* __restrict dP, const float* __restrict Dn,
                 float scale, int64_t M) {
  for (int64_t j = 0; j < M; ++j) {
    const float* p = P + j * NT;
    float* d = dP + j * NT;
    for (int64_t n = 0; n < NT; ++n) d[n] = p[n] * (d[n] - Dn[n]) * scale;
  }
}

// Forward epilogue: Y ← Y / sum (inv holds 1/sum), then SiLU(Y)·gate when gated.
FASTVIT_VEC_CLONES
void finish_f32(float* __restrict Y, const float* __restrict inv, const float* __restrict G, int64_t D) {
  for (int64_t e = 0; e < D; ++e) {
    float* y = Y + e * NT;
    if (G) {
      const float* g = G + e * NT;
      for (int64_t n = 0; n < NT; ++n) {
        const float o = y[n] * inv[n];
        y[n] = o * vec::sigmoid(o) * g[n];
      }
    } else {
      for (int64_t n = 0; n < NT; ++n) y[n] *= inv[n];
    }
  }
}

// Backward through the gate: G ← dout·SiLU(O) (d gate), dY ← dout·gate·SiLU'(O).
FASTVIT_VEC_CLONES
void gate_bwd_f32(const float* __restrict Y, float* __restrict G, float* __restrict dY, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float o = Y[i], s = vec::sigmoid(o), go = dY[i], gv = G[i];
    G[i] = go * o * s;
    dY[i] = go * gv * s * (1.f + o * (1.f - s));
  }
}

// Dn[n] = Σ_j P[j, n]·dP[j, n]: the softmax backward's row term as eager autograd forms it. It
// equals Σ_e dO·O, but built from the same rounded dP that dS = P ⊙ (dP − Dn) subtracts it from, so
// with a near-one-hot P (large logits) the rounding of dP cancels instead of doubling the error.
FASTVIT_VEC_CLONES
void pdot_f32(const float* __restrict P, const float* __restrict dP, float* __restrict Dn, int64_t M) {
  for (int64_t n = 0; n < NT; ++n) Dn[n] = 0.f;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) Dn[n] += P[j * NT + n] * dP[j * NT + n];
}

void finish_f64(double* Y, const double* inv, const double* G, int64_t D) {
  for (int64_t i = 0; i < D * NT; ++i) {
    const double o = Y[i] * inv[i % NT];
    Y[i] = G ? o / (1.0 + std::exp(-o)) * G[i] : o;
  }
}
void gate_bwd_f64(const double* Y, double* G, double* dY, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double o = Y[i], s = 1.0 / (1.0 + std::exp(-o)), go = dY[i], gv = G[i];
    G[i] = go * o * s;
    dY[i] = go * gv * s * (1.0 + o * (1.0 - s));
  }
}
void pdot_f64(const double* P, const double* dP, double* Dn, int64_t M) {
  for (int64_t n = 0; n < NT; ++n) Dn[n] = 0;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) Dn[n] += P[j * NT + n] * dP[j * NT + n];
}
inline void finish(float* Y, const float* i, const float* G, int64_t D) { finish_f32(Y, i, G, D); }
inline void finish(double* Y, const double* i, const double* G, int64_t D) { finish_f64(Y, i, G, D); }
inline void gate_bwd(const float* Y, float* G, float* dY, int64_t n) { gate_bwd_f32(Y, G, dY, n); }
inline void gate_bwd(const double* Y, double* G, double* dY, int64_t n) { gate_bwd_f64(Y, G, dY, n); }
inline void pdot(const float* P, const float* dP, float* Dn, int64_t M) { pdot_f32(P, dP, Dn, M); }
inline void pdot(const double* P, const double* dP, double* Dn, int64_t M) { pdot_f64(P, dP, Dn, M); }

// fp64 versions (plain loops).
void rows_dot_f64(const double* A, const double* X, double* S, int64_t M, int64_t D) {
  for (int64_t j = 0; j < M; ++j) {
    double* s = S + j * NT;
    for (int64_t n = 0; n < NT; ++n) s[n] = 0;
    for (int64_t e = 0; e < D; ++e)
      for (int64_t n = 0; n < NT; ++n) s[n] += A[j * D + e] * X[e * NT + n];
  }
}
void cols_dot_f64(const double* A, const double* P, double* Y, int64_t M, int64_t D) {
  for (int64_t e = 0; e < D; ++e) {
    double* y = Y + e * NT;
    for (int64_t n = 0; n < NT; ++n) y[n] = 0;
    for (int64_t j = 0; j < M; ++j)
      for (int64_t n = 0; n < NT; ++n) y[n] += A[j * D + e] * P[j * NT + n];
  }
}
void outer_acc_f64(const double* P, const double* X, double* R, int64_t M, int64_t D) {
  for (int64_t j = 0; j < M; ++j)
    for (int64_t e = 0; e < D; ++e) {
      double s = 0;
      for (int64_t n = 0; n < NT; ++n) s += P[j * NT + n] * X[e * NT + n];
      R[j * D + e] += s;
    }
}
void softmax_cols_f64(double* S, double* mx, double* l, double c, int64_t M) {
  for (int64_t n = 0; n < NT; ++n) mx[n] = S[n];
  for (int64_t j = 1; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) mx[n] = std::max(mx[n], S[j * NT + n]);
  for (int64_t n = 0; n < NT; ++n) l[n] = 0;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) {
      S[j * NT + n] = std::exp2((S[j * NT + n] - mx[n]) * c);
      l[n] += S[j * NT + n];
    }
}
void probs_from_lse_f64(double* S, const double* mx, const double* ll, double c, int64_t M) {
  for (int64_t j = 0; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) S[j * NT + n] = std::exp2(std::min((S[j * NT + n] - mx[n]) * c - ll[n], 0.0));
}
void dscores_f64(const double* P, double* dP, const double* Dn, double scale, int64_t M) {
  for (int64_t j = 0; j < M * NT; ++j) dP[j] = P[j] * (dP[j] - Dn[j % NT]) * scale;
}

inline void rows_dot(const float* A, const float* X, float* S, int64_t M, int64_t D) { rows_dot_f32(A, X, S, M, D); }
inline void rows_dot(const double* A, const double* X, double* S, int64_t M, int64_t D) { rows_dot_f64(A, X, S, M, D); }
inline void cols_dot(const float* A, const float* P, float* Y, int64_t M, int64_t D) { cols_dot_f32(A, P, Y, M, D); }
inline void cols_dot(const double* A, const double* P, double* Y, int64_t M, int64_t D) { cols_dot_f64(A, P, Y, M, D); }
inline void outer_acc(const float* P, const float* X, float* R, int64_t M, int64_t D) { outer_acc_f32(P, X, R, M, D); }
inline void outer_acc(const double* P, const double* X, double* R, int64_t M, int64_t D) { outer_acc_f64(P, X, R, M, D); }
inline void softmax_cols(float* S, float* mx, float* l, float c, int64_t M) { softmax_cols_f32(S, mx, l, c, M); }
inline void softmax_cols(double* S, double* mx, double* l, double c, int64_t M) { softmax_cols_f64(S, mx, l, c, M); }
inline void probs_from_lse(float* S, const float* m, const float* l, float c, int64_t M) { probs_from_lse_f32(S, m, l, c, M); }
inline void probs_from_lse(double* S, const double* m, const double* l, double c, int64_t M) { probs_from_lse_f64(S, m, l, c, M); }
inline void dscores(const float* P, float* dP, const float* Dn, float s, int64_t M) { dscores_f32(P, dP, Dn, s, M); }
inline void dscores(const double* P, double* dP, const double* Dn, double s, int64_t M) { dscores_f64(P, dP, Dn, s, M); }


// ---- strided tile access -------------------------------------------------------------------------
// A (B, h, N, d)-indexed tensor with arbitrary strides.
template <typename T>
struct View4 {
  T* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sd = 0;
  View4() = default;
  explicit View4(const at::Tensor& t)
      : p(const_cast<T*>(t.const_data_ptr<T>())), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)),
        sd(t.stride(3)) {}
  T* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

// Tile X[e, n] (D × NT) ← t[n0 + n, e] for n < cnt, zero beyond.
template <typename T, typename A>
void gather(const T* base, int64_t sn, int64_t sd, int64_t n0, int64_t cnt, int64_t D, A* X) {
  for (int64_t e = 0; e < D; ++e) {
    A* x = X + e * NT;
    const T* src = base + n0 * sn + e * sd;
    if (sn == 1) {
      for (int64_t n = 0; n < cnt; ++n) x[n] = static_cast<A>(src[n]);
    } else {
      for (int64_t n = 0; n < cnt; ++n) x[n] = static_cast<A>(src[n * sn]);
    }
    for (int64_t n = cnt; n < NT; ++n) x[n] = A(0);
  }
}

template <typename T, typename A>
void scatter(const A* X, int64_t cnt, int64_t D, T* base, int64_t sn, int64_t sd, int64_t n0) {
  for (int64_t e = 0; e < D; ++e) {
    const A* x = X + e * NT;
    T* dst = base + n0 * sn + e * sd;
    if (sn == 1) {
      for (int64_t n = 0; n < cnt; ++n) dst[n] = static_cast<T>(x[n]);
    } else {
      for (int64_t n = 0; n < cnt; ++n) dst[n * sn] = static_cast<T>(x[n]);
    }
  }
}

#ifdef FASTVIT_HAVE_AVX512
// gather/scatter for token-major fp32 tensors (channels contiguous, sd == 1: FASA's channels_last
// maps) with D a multiple of 16: 16 tokens × 16 channels per 16×16 in-register transpose instead
// of one scalar move per element (which cost the channels_last forward ~20% at FAT-B0's shapes).
bool tokens16(const at::Tensor& t, int64_t D) {
  return t.scalar_type() == at::kFloat && t.stride(3) == 1 && D % 16 == 0 && avx512::supported();
}

__attribute__((FASTVIT_AVX512_ATTR)) void gather_tokens16(const float* base, int64_t sn, int64_t n0, int64_t cnt,
                                                          int64_t D, float* X) {
  for (int64_t e0 = 0; e0 < D; e0 += 16)
    for (int64_t p0 = 0; p0 < NT; p0 += 16) {
      __m512 r[16];
      for (int q = 0; q < 16; ++q)
        r[q] = p0 + q < cnt ? _mm512_loadu_ps(base + (n0 + p0 + q) * sn + e0) : _mm512_setzero_ps();
      avx512::transpose16(r);  // r[i]: channel e0 + i of tokens p0 … p0 + 15
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(X + (e0 + i) * NT + p0, r[i]);
    }
}

__attribute__((FASTVIT_AVX512_ATTR)) void scatter_tokens16(const float* X, int64_t cnt, int64_t D, float* base,
                                                           int64_t sn, int64_t n0) {
  for (int64_t e0 = 0; e0 < D; e0 += 16)
    for (int64_t p0 = 0; p0 < cnt; p0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(X + (e0 + i) * NT + p0);
      avx512::transpose16(r);  // r[q]: channels e0 … e0 + 15 of token p0 + q
      const int64_t n = std::min<int64_t>(16, cnt - p0);
      for (int64_t q = 0; q < n; ++q) _mm512_storeu_ps(base + (n0 + p0 + q) * sn + e0, r[q]);
    }
}
#endif

#ifndef FASTVIT_HAVE_AVX512
bool tokens16(const at::Tensor&, int64_t) { return false; }
#endif

// Tile of (b, h) rows n0 … n0 + cnt − 1 in or out, through the 16×16 transposes where `tok`
// (fp32 token-major, see tokens16), element by element otherwise.
template <typename T, typename A>
void gather_any(const View4<T>& t, bool tok, int64_t b, int64_t h, int64_t n0, int64_t cnt, int64_t D, A* X) {
#ifdef FASTVIT_HAVE_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (tok) return gather_tokens16(t.at(b, h), t.sn, n0, cnt, D, X);
  }
#endif
  gather(t.at(b, h), t.sn, t.sd, n0, cnt, D, X);
}

template <typename T, typename A>
void scatter_any(const A* X, int64_t cnt, int64_t D, const View4<T>& t, bool tok, int64_t b, int64_t h, int64_t n0) {
#ifdef FASTVIT_HAVE_AVX512
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (tok) return scatter_tokens16(X, cnt, D, t.at(b, h), t.sn, n0);
  }
#endif
  scatter(X, cnt, D, t.at(b, h), t.sn, t.sd, n0);
}

// K or V of one (b, h) → contiguous M × D in the accumulation type, times `mul`.
template <typename T, typename A>
void load_kv(const View4<T>& t, int64_t b, int64_t h, int64_t M, int64_t D, A mul, A* out) {
  const T* base = t.at(b, h);
  for (int64_t j = 0; j < M; ++j)
    for (int64_t e = 0; e < D; ++e) out[j * D + e] = static_cast<A>(base[j * t.sn + e * t.sd]) * mul;
}

struct Dims {
  int64_t B, H, N, M, D;
};

Dims check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const c10::optional<at::Tensor>& gate) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, h, N|M, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": q and k disagree on B, h or d");
  if (gate.has_value()) {
    TORCH_CHECK(gate->sizes() == q.sizes() && gate->scalar_type() == q.scalar_type(), op,
                ": gate must match q in shape and dtype");
  }
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& gate, at::Tensor& out, at::Tensor& lse, double scale,
                  const Dims& g) {
  using A = typename Acc<T>::type;
  const View4<T> Q(q), K(k), V(v), O(out);
  const bool has_gate = gate.has_value();
  const View4<T> G = has_gate ? View4<T>(*gate) : View4<T>();
  A* L = lse.mutable_data_ptr<A>();
  const int64_t tiles = (g.N + NT - 1) / NT;
  const int64_t M = g.M, D = g.D;
  const A qk_scale = static_cast<A>(scale * kLog2e);
  const bool q_tok = tokens16(q, D), g_tok = has_gate && tokens16(*gate, D), o_tok = tokens16(out, D);
  // Work item = (b, h, tile); K/V of the item's head are reloaded only when the head changes.
  at::parallel_for(0, g.B * g.H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kbuf(M * D), vbuf(M * D), X(D * NT), S(M * NT), Y(D * NT), Gt(D * NT), mx(NT), l(NT);
    int64_t loaded = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / tiles, t = it % tiles, b = bh / g.H, h = bh % g.H;
      if (bh != loaded) {
        load_kv(K, b, h, M, D, A(1), kbuf.data());
        load_kv(V, b, h, M, D, A(1), vbuf.data());
        loaded = bh;
      }
      const int64_t n0 = t * NT, cnt = std::min(NT, g.N - n0);
      gather_any(Q, q_tok, b, h, n0, cnt, D, X.data());
      rows_dot(kbuf.data(), X.data(), S.data(), M, D);
      softmax_cols(S.data(), mx.data(), l.data(), qk_scale, M);  // exp2 with scale·log2(e) folded in
      cols_dot(vbuf.data(), S.data(), Y.data(), M, D);
      for (int64_t n = 0; n < NT; ++n) l[n] = A(1) / l[n];
      if (has_gate) gather_any(G, g_tok, b, h, n0, cnt, D, Gt.data());
      finish(Y.data(), l.data(), has_gate ? Gt.data() : nullptr, D);
      scatter_any(Y.data(), cnt, D, O, o_tok, b, h, n0);
      A* lrow = L + (bh * g.N + n0) * 2;
      for (int64_t n = 0; n < cnt; ++n) {
        lrow[2 * n] = mx[n];
        lrow[2 * n + 1] = -std::log2(l[n]);  // l holds 1/sum here
      }
    }
  });
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const c10::optional<at::Tensor>& gate, at::Tensor out, at::Tensor lse, double scale) {
  const Dims g = check("_downsampled_attention_forward", q, k, v, gate);
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "_downsampled_attention_forward: out must match q");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.B * g.H * g.N * 2,
              "_downsampled_attention_forward: lse must be a contiguous (B, h, N, 2) tensor");
  TORCH_CHECK(g.M >= 1, "_downsampled_attention_forward: needs at least one key");
  if (g.N == 0 || g.B == 0 || g.H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_fwd", [&] {
    TORCH_CHECK(lse.scalar_type() == (std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat),
                "_downsampled_attention_forward: lse must be float32 (float64 for float64 inputs)");
    forward_impl<scalar_t>(q, k, v, gate, out, lse, scale, g);
  });
}

// ---- backward --------------------------------------------------------------------------------
template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& gate, const at::Tensor& lse, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dgate, double scale, const Dims& g) {
  using A = typename Acc<T>::type;
  const View4<T> Q(q), K(k), V(v), dO(grad), dQ(dq), dK(dk), dV(dv);
  const bool has_gate = gate.has_value();
  const View4<T> G = has_gate ? View4<T>(*gate) : View4<T>();
  const View4<T> dG = has_gate ? View4<T>(dgate) : View4<T>();
  const A* L = lse.const_data_ptr<A>();
  const int64_t M = g.M, D = g.D, BH = g.B * g.H;
  const int64_t tiles = (g.N + NT - 1) / NT;
  // dK, dV reduce over the queries: split each head's tiles into `chunks` with their own fp32
  // partials (deterministic: fixed chunking, summed in order below), enough items to feed all threads.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(tiles, (want + BH - 1) / BH));
  const int64_t per = (tiles + chunks - 1) / chunks;
  std::vector<A> part(static_cast<size_t>(BH * chunks * 2 * M * D), A(0));
  const A qk_scale = static_cast<A>(scale * kLog2e);
  const A sc = static_cast<A>(scale);

  at::parallel_for(0, BH * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kraw(M * D), vbuf(M * D), X(D * NT), S(M * NT), dP(M * NT), Y(D * NT),
        dY(D * NT), Gt(D * NT), Dn(NT), mrow(NT), lrow(NT);
    int64_t loaded = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / chunks, c = it % chunks, b = bh / g.H, h = bh % g.H;
      if (bh != loaded) {
        load_kv(K, b, h, M, D, A(1), kraw.data());
        load_kv(V, b, h, M, D, A(1), vbuf.data());
        loaded = bh;
      }
      A* pdk = part.data() + (it * 2) * M * D;
      A* pdv = pdk + M * D;
      for (int64_t t = c * per; t < std::min(tiles, (c + 1) * per); ++t) {
        const int64_t n0 = t * NT, cnt = std::min(NT, g.N - n0);
        gather(Q.at(b, h), Q.sn, Q.sd, n0, cnt, D, X.data());
        for (int64_t n = 0; n < NT; ++n) {
          mrow[n] = n < cnt ? L[(bh * g.N + n0 + n) * 2] : A(0);
          lrow[n] = n < cnt ? L[(bh * g.N + n0 + n) * 2 + 1] : A(0);
        }
        rows_dot(kraw.data(), X.data(), S.data(), M, D);
        probs_from_lse(S.data(), mrow.data(), lrow.data(), qk_scale, M);               // S ← P
        gather(dO.at(b, h), dO.sn, dO.sd, n0, cnt, D, dY.data());
        if (has_gate) {
          cols_dot(vbuf.data(), S.data(), Y.data(), M, D);      // Y ← O (pre-gate), recomputed
          // out = SiLU(O)·gate: d gate = dout·SiLU(O); dO = dout·gate·SiLU'(O).
          gather(G.at(b, h), G.sn, G.sd, n0, cnt, D, Gt.data());
          gate_bwd(Y.data(), Gt.data(), dY.data(), D * NT);
          scatter(Gt.data(), cnt, D, dG.at(b, h), dG.sn, dG.sd, n0);
        }
        outer_acc(S.data(), dY.data(), pdv, M, D);              // dV += Pᵀ dO
        rows_dot(vbuf.data(), dY.data(), dP.data(), M, D);      // dP = dO Vᵀ
        pdot(S.data(), dP.data(), Dn.data(), M);                // Dn = Σ_j P ⊙ dP
        dscores(S.data(), dP.data(), Dn.data(), sc, M);         // dP ← scale · P ⊙ (dP − D)
        outer_acc(dP.data(), X.data(), pdk, M, D);              // dK += dSᵀ Q
        cols_dot(kraw.data(), dP.data(), Y.data(), M, D);       // dQ = dS K
        scatter(Y.data(), cnt, D, dQ.at(b, h), dQ.sn, dQ.sd, n0);
      }
    }
  });
  // Sum the partials per head in a fixed order and write dK, dV in their layouts.
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      T* kd = dK.at(b, h);
      T* vd = dV.at(b, h);
      for (int64_t j = 0; j < M; ++j)
        for (int64_t e = 0; e < D; ++e) {
          A sk = 0, sv = 0;
          for (int64_t c = 0; c < chunks; ++c) {
            const A* p = part.data() + ((bh * chunks + c) * 2) * M * D;
            sk += p[j * D + e];
            sv += p[M * D + j * D + e];
          }
          kd[j * dK.sn + e * dK.sd] = static_cast<T>(sk);
          vd[j * dV.sn + e * dV.sd] = static_cast<T>(sv);
        }
    }
  });
}

void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const c10::optional<at::Tensor>& gate, const at::Tensor& lse, at::Tensor dq, at::Tensor dk,
              at::Tensor dv, at::Tensor dgate, double scale) {
  const char* op = "_downsampled_attention_backward";
  const Dims g = check(op, q, k, v, gate);
  TORCH_CHECK(grad.sizes() == q.sizes() && grad.scalar_type() == q.scalar_type(), op, ": grad must match q");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), op,
              ": gradient outputs must match their inputs");
  TORCH_CHECK(dq.scalar_type() == q.scalar_type() && dk.scalar_type() == q.scalar_type() &&
              dv.scalar_type() == q.scalar_type(), op, ": gradient dtypes must match q");
  if (gate.has_value()) {
    TORCH_CHECK(dgate.sizes() == q.sizes() && dgate.scalar_type() == q.scalar_type(), op,
                ": dgate must match gate");
  }
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.B * g.H * g.N * 2, op, ": lse must be contiguous (B, h, N, 2)");
  if (g.B == 0 || g.H == 0) return;
  if (g.N == 0) {
    dk.zero_();
    dv.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_bwd", [&] {
    TORCH_CHECK(lse.scalar_type() == (std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat), op,
                ": lse must be float32 (float64 for float64 inputs)");
    backward_impl<scalar_t>(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale, g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvit_ops, CPU, m) {
  m.impl("_downsampled_attention_forward", &forward);
  m.impl("_downsampled_attention_backward", &backward);
}

}  // namespace fastvit_ops
