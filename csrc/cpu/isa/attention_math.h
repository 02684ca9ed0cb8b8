// The hot loops of the downsampled attention (isa/attention.cpp), on one tile of NT queries with
// the query index fastest: S (M × NT) scores, X / Y / dY (D × NT) query-side tiles, K / V (M × D)
// rows. fp32: the dot-product loops in GCC generic vectors of the capability's width (accumulators
// stay in registers; plain arrays got spilled), the softmax and gate in Vectorized<float> with our exp;
// fp64 (the gradcheck path) as plain loops.
#pragma once
#include <algorithm>
#include <cmath>

#include "cpu/isa/vec.h"

FASTVIT_ISA_BEGIN
namespace attn {
namespace {

constexpr int64_t NT = 64;  // queries per tile: 64 fp32 = 8 AVX2 / 4 AVX-512 registers

// The dot-product loops' vector: the capability's full width (16 fp32 lanes with AVX-512, 8
// otherwise; GCC splits 8 into two SSE2/NEON halves on the baseline). NT is a multiple of 4·VW.
constexpr int VW = kVecBytes >= 64 ? 16 : 8;
typedef float vwf __attribute__((vector_size(VW * 4)));
static inline vwf ldv(const float* p) { vwf v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void stv(float* p, vwf v) { __builtin_memcpy(p, &v, sizeof(v)); }
static_assert(NT % (4 * VW) == 0, "a tile is whole blocks of 4 vectors");

// S[j, :] = Σ_e A[j, e] · X[e, :]     (A: M × D row-major, X: D × NT)
// Register blocking: R rows × 2 vectors of queries of accumulators, one load of X per (e, block).
// 6-row blocks on AVX2 (12 accumulators) measured no faster than 4 in the op (CvT-13 s1).
// Long sums (over the head dim here, over the keys in cols_dot) are accumulated KB terms at a time
// from zero and each block's sum added to the output in memory: one running register sum of D
// products rounds D times at the full sum's magnitude, which at d = 128 and large logits gave the
// scores (and the output) 1.8x eager's RMS error; blocks cost one load and store per KB FMAs.
constexpr int64_t KB = 32;

template <int R>
FASTVIT_INLINE void rows_dot_block(const float* __restrict a, const float* __restrict X, float* __restrict S,
                                   int64_t D) {
  for (int64_t c = 0; c < NT; c += 2 * VW) {
    for (int64_t e0 = 0; e0 < D; e0 += KB) {
      const int64_t e1 = std::min(D, e0 + KB);
      vwf s[R][2];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = vwf{0};
      for (int64_t e = e0; e < e1; ++e) {
        const vwf x0 = ldv(X + e * NT + c), x1 = ldv(X + e * NT + c + VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const float k = a[r * D + e];
          s[r][0] += k * x0;
          s[r][1] += k * x1;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        float* o = S + r * NT + c;
        if (e0 > 0) {
          s[r][0] += ldv(o);
          s[r][1] += ldv(o + VW);
        }
        stv(o, s[r][0]);
        stv(o + VW, s[r][1]);
      }
    }
  }
}

void rows_dot_f32(const float* __restrict A, const float* __restrict X, float* __restrict S,
                  int64_t M, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= M; j += 4) rows_dot_block<4>(A + j * D, X, S + j * NT, D);
  for (; j < M; ++j) rows_dot_block<1>(A + j * D, X, S + j * NT, D);
}

// Y[e, :] = Σ_j A[j, e] · P[j, :]     (A: M × D, P: M × NT, Y: D × NT)
// Register blocking: E outputs × NV vectors of queries. P (M × NT: 200 KB at M = 784) streams from
// L2 once per block, so larger E reads it fewer times: 6 × 4 with 32 registers (AVX-512), 6 × 2
// with 16 (AVX2). The earlier 2 × 4 blocks read P three times as often and made this loop the
// forward's largest (42% of it at CvT-13 stage 1, twice rows_dot's time for the same FLOPs).
template <int E, int NV>
FASTVIT_INLINE void cols_dot_block(const float* __restrict A, const float* __restrict P, float* __restrict Y,
                                   int64_t M, int64_t D, int64_t e) {
  for (int64_t c = 0; c < NT; c += NV * VW) {
    for (int64_t j0 = 0; j0 < M; j0 += KB) {  // KB keys at a time (see KB)
      const int64_t j1 = std::min(M, j0 + KB);
      vwf acc[E][NV];
#pragma GCC unroll 8
      for (int i = 0; i < E; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = vwf{0};
      for (int64_t j = j0; j < j1; ++j) {
        const float* p = P + j * NT + c;
        vwf pv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) pv[v] = ldv(p + v * VW);
#pragma GCC unroll 8
        for (int i = 0; i < E; ++i) {
          const float u = A[j * D + e + i];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][v] += u * pv[v];
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < E; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          float* y = Y + (e + i) * NT + c + v * VW;
          stv(y, j0 > 0 ? acc[i][v] + ldv(y) : acc[i][v]);
        }
    }
  }
}

void cols_dot_f32(const float* __restrict A, const float* __restrict P, float* __restrict Y,
                  int64_t M, int64_t D) {
  int64_t e = 0;
  if constexpr (kVecRegs < 32) {
    for (; e + 6 <= D; e += 6) cols_dot_block<6, 2>(A, P, Y, M, D, e);
  } else {
    for (; e + 6 <= D; e += 6) cols_dot_block<6, 4>(A, P, Y, M, D, e);
  }
  for (; e + 2 <= D; e += 2) cols_dot_block<2, 4>(A, P, Y, M, D, e);
  for (; e < D; ++e) cols_dot_block<1, 4>(A, P, Y, M, D, e);
}

// outer_acc stays at 8 lanes with every capability: its NT-long dots end in one horizontal sum
// per output, and at 16 lanes those sums (twice the lanes, half the FMAs before each) made the
// backward 10-40% slower on AVX-512 (the two loops above gained 25-40% in the forward).
typedef float v8f __attribute__((vector_size(32)));
static inline v8f ld8(const float* p) { v8f v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
static inline void st8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof(v)); }
static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// R[j, e] += Σ_n P[j, n] · X[e, n]     (P: M × NT, X: D × NT, R: M × D)
// Register blocking: 4 rows of P × 2 rows of X, 8 vector accumulators along n, one horizontal
// sum per output at the end (a plain dot per (j, e) was bound by loads and reductions).
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

// R[j, :] += Σ_n P[j, n] · Xt[n, :]     (P: M × NT, Xt: NT × D, R: M × D), D a multiple of 8:
// outer_acc with the head dim in the vector lanes, so no output needs a horizontal sum (at d = 16
// those sums cost as much as the FMAs). 4 rows of P × 16 (or 8) columns of R in registers.
void outer_acc_t_f32(const float* __restrict P, const float* __restrict Xt, float* __restrict R,
                     int64_t M, int64_t D) {
  int64_t j = 0;
  if (VW > 8 && D % VW == 0) {  // full-width columns: 8 rows of P × one vector of R
    for (; j + 8 <= M; j += 8) {
      const float* p = P + j * NT;
      for (int64_t e = 0; e < D; e += VW) {
        vwf a[8] = {};
        for (int64_t n = 0; n < NT; ++n) {
          const vwf x = ldv(Xt + n * D + e);
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r) a[r] += p[r * NT + n] * x;
        }
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) stv(R + (j + r) * D + e, ldv(R + (j + r) * D + e) + a[r]);
      }
    }
  }
  for (; j + 4 <= M; j += 4) {
    const float* p = P + j * NT;
    int64_t e = 0;
    for (; e + 16 <= D; e += 16) {
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
      for (int64_t n = 0; n < NT; ++n) {
        const v8f x0 = ld8(Xt + n * D + e), x1 = ld8(Xt + n * D + e + 8);
        const float p0 = p[n], p1 = p[NT + n], p2 = p[2 * NT + n], p3 = p[3 * NT + n];
        a0 += p0 * x0; a1 += p1 * x0; a2 += p2 * x0; a3 += p3 * x0;
        b0 += p0 * x1; b1 += p1 * x1; b2 += p2 * x1; b3 += p3 * x1;
      }
      float* r = R + j * D + e;
      st8(r, ld8(r) + a0); st8(r + 8, ld8(r + 8) + b0);
      st8(r + D, ld8(r + D) + a1); st8(r + D + 8, ld8(r + D + 8) + b1);
      st8(r + 2 * D, ld8(r + 2 * D) + a2); st8(r + 2 * D + 8, ld8(r + 2 * D + 8) + b2);
      st8(r + 3 * D, ld8(r + 3 * D) + a3); st8(r + 3 * D + 8, ld8(r + 3 * D + 8) + b3);
    }
    for (; e < D; e += 8) {
      v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int64_t n = 0; n < NT; ++n) {
        const v8f x0 = ld8(Xt + n * D + e);
        a0 += p[n] * x0; a1 += p[NT + n] * x0; a2 += p[2 * NT + n] * x0; a3 += p[3 * NT + n] * x0;
      }
      float* r = R + j * D + e;
      st8(r, ld8(r) + a0); st8(r + D, ld8(r + D) + a1);
      st8(r + 2 * D, ld8(r + 2 * D) + a2); st8(r + 3 * D, ld8(r + 3 * D) + a3);
    }
  }
  for (; j < M; ++j) {
    const float* p = P + j * NT;
    for (int64_t e = 0; e < D; e += 8) {
      v8f a0 = {0};
      for (int64_t n = 0; n < NT; ++n) a0 += p[n] * ld8(Xt + n * D + e);
      float* r = R + j * D + e;
      st8(r, ld8(r) + a0);
    }
  }
}

// S ← e^((S − max)·c) over the M rows of raw dot products (per column), c = scale applied to the
// difference (one rounding at the small magnitude of S − max, not at the logits' — matters for
// large logits), and l[n] = Σ_j e as eight interleaved partial sums (keys j mod 8) added pairwise.
// One fp32 running sum over the M keys (eager sums a row in 8-16 vector-lane partials) scaled
// every output of the query, and the backward's P, by its error. Measured at FAT-tiny's check case
// (with the backward changes below): seeds over the 2x rule 10 of 40 -> 2 (0 with the sums in
// double, which cost 3-4% of the AVX-512 forward; the eight independent chains instead made it
// 1-9% faster than the single one). The forward and the backward (with the saved max) run this same
// code, so the backward's e, Σ and pre-gate output are bitwise the forward's.
void exp_cols_f32(float* __restrict S, const float* __restrict mx, float* __restrict l, float c, int64_t M) {
  constexpr int64_t W = fVec::size();
  const fVec cl(c);
  for (int64_t n = 0; n < NT; n += W) {
    const fVec m = fVec::loadu(mx + n);
    fVec a[8];
    for (int q = 0; q < 8; ++q) a[q] = fVec(0.0f);
    int64_t j = 0;
    for (; j + 8 <= M; j += 8) {
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        const fVec e = exp_nonpos((fVec::loadu(S + (j + q) * NT + n) - m) * cl);
        e.store(S + (j + q) * NT + n);
        a[q] = a[q] + e;
      }
    }
    for (int q = 0; j < M; ++j, ++q) {
      const fVec e = exp_nonpos((fVec::loadu(S + j * NT + n) - m) * cl);
      e.store(S + j * NT + n);
      a[q] = a[q] + e;
    }
    (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))).store(l + n);
  }
}

// Forward softmax numerator: the raw max per column, S ← e^((S − max)·c) and the sums l.
void softmax_cols_f32(float* __restrict S, float* __restrict mx, float* __restrict l, float c, int64_t M) {
  constexpr int64_t W = fVec::size();
  for (int64_t n = 0; n < NT; n += W) {
    fVec m = fVec::loadu(S + n);
    for (int64_t j = 1; j < M; ++j) m = vmax(m, fVec::loadu(S + j * NT + n));
    m.store(mx + n);
  }
  exp_cols_f32(S, mx, l, c, M);
}

// S ← S · inv per column (backward: P = e · (1/Σ), the reciprocal per query in double).
void scale_cols_f32(float* __restrict S, const float* __restrict inv, int64_t M) {
  constexpr int64_t W = fVec::size();
  for (int64_t n = 0; n < NT; n += W) {
    const fVec iv = fVec::loadu(inv + n);
    for (int64_t j = 0; j < M; ++j) (fVec::loadu(S + j * NT + n) * iv).store(S + j * NT + n);
  }
}

// dS = P ⊙ (dP − Dn) · scale, in place in dP.
void dscores_f32(const float* __restrict P, float* __restrict dP, const float* __restrict Dn, float scale, int64_t M) {
  for (int64_t j = 0; j < M; ++j) {
    const float* p = P + j * NT;
    float* d = dP + j * NT;
    for (int64_t n = 0; n < NT; ++n) d[n] = p[n] * (d[n] - Dn[n]) * scale;
  }
}

// Forward epilogue: O = Y / sum, correctly rounded in nearly every case (Y·(1/sum) and one FMA
// step on its residual; the plain product rounded twice), then SiLU(O)·gate when gated, with SiLU
// rounded once like eager's x / (1 + e^(−x)): (x ≥ 0 ? x : x·e) / (1 + e), e = e^(−|x|) (no
// overflow). Each extra rounding here showed as output outliers at 2.4x eager's error.
void finish_f32(float* __restrict Y, const float* __restrict sum, const float* __restrict inv,
                const float* __restrict G, int64_t D) {
  constexpr int64_t W = fVec::size();
  const fVec one(1.0f), zero(0.0f);
  for (int64_t e = 0; e < D; ++e) {
    float* y = Y + e * NT;
    for (int64_t n = 0; n < NT; n += W) {
      const fVec yv = fVec::loadu(y + n), iv = fVec::loadu(inv + n);
      fVec o = yv * iv;
      o = vfma(vfma(zero - o, fVec::loadu(sum + n), yv), iv, o);
      if (G) {
        const fVec ex = exp_nonpos(zero - vabs(o));
        o = vselect(vge(o, zero), o, o * ex) / (one + ex) * fVec::loadu(G + e * NT + n);
      }
      o.store(y + n);
    }
  }
}

// Backward through the gate: G ← dout·SiLU(O) (d gate), dY ← dout·gate·SiLU'(O). SiLU(O) is
// rounded once, as eager's x / (1 + e^(−x)) that its d gate multiplies (o·σ(o) rounds twice: d gate
// outliers at 3x eager's error); σ and 1 − σ as vec.h's sigmoid_c forms them.
void gate_bwd_f32(const float* __restrict Y, float* __restrict G, float* __restrict dY, int64_t n) {
  constexpr int64_t W = fVec::size();
  const fVec one(1.0f), zero(0.0f);
  for (int64_t i = 0; i < n; i += W) {  // n = D·NT, a multiple of W
    const fVec o = fVec::loadu(Y + i), go = fVec::loadu(dY + i), gv = fVec::loadu(G + i);
    const fVec e = exp_nonpos(zero - vabs(o)), den = one + e, inv = one / den;
    const fMask pos = vge(o, zero);
    const fVec s = vselect(pos, one, e) * inv, c = vselect(pos, e, one) * inv;
    (go * (vselect(pos, o, o * e) / den)).store(G + i);
    (go * gv * s * vfma(o, c, one)).store(dY + i);
  }
}

// Dn[n] = Σ_j P[j, n]·dP[j, n]: the softmax backward's row term as eager autograd forms it. It
// equals Σ_e dO·O, but built from the same rounded dP that dS = P ⊙ (dP − Dn) subtracts it from, so
// with a near-one-hot P (large logits) the rounding of dP cancels instead of doubling the error.
// Accumulated in double (exact products, one rounding at the end): an fp32 running sum over the M
// keys put its error into every dS of the query, and dq measured 1.1-1.5x eager's RMS error.
void pdot_f32(const float* __restrict P, const float* __restrict dP, float* __restrict Dn, int64_t M) {
  double acc[NT];
  for (int64_t n = 0; n < NT; ++n) acc[n] = 0.0;
  for (int64_t j = 0; j < M; ++j)
    for (int64_t n = 0; n < NT; ++n) acc[n] += double(P[j * NT + n]) * double(dP[j * NT + n]);
  for (int64_t n = 0; n < NT; ++n) Dn[n] = static_cast<float>(acc[n]);
}

void finish_f64(double* Y, const double* sum, const double*, const double* G, int64_t D) {
  for (int64_t i = 0; i < D * NT; ++i) {
    const double o = Y[i] / sum[i % NT];
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
inline void finish(float* Y, const float* s, const float* i, const float* G, int64_t D) { finish_f32(Y, s, i, G, D); }
inline void finish(double* Y, const double* s, const double* i, const double* G, int64_t D) { finish_f64(Y, s, i, G, D); }
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
      S[j * NT + n] = std::exp((S[j * NT + n] - mx[n]) * c);
      l[n] += S[j * NT + n];
    }
}
// fp64: P = 2^((S − max)·c − log2 Σ), c = scale·log2(e) (double keeps the combined exponent exact
// enough). The max and the log-sum are stored apart: one lse would round at the logits' magnitude.
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
inline void probs_from_lse(double* S, const double* m, const double* l, double c, int64_t M) { probs_from_lse_f64(S, m, l, c, M); }
inline void dscores(const float* P, float* dP, const float* Dn, float s, int64_t M) { dscores_f32(P, dP, Dn, s, M); }
inline void dscores(const double* P, double* dP, const double* Dn, double s, int64_t M) { dscores_f64(P, dP, Dn, s, M); }

}  // namespace
}  // namespace attn
FASTVIT_ISA_END
