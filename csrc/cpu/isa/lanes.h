// One native vector of A per capability (`Lanes<A>::L` lanes: 16/8 fp32 and 8/4 fp64 with AVX-512
// and AVX2, 4/2 on the baseline), with the operations the depthwise and attention kernels need
// beyond arithmetic: loads and stores of the first n lanes, even/odd lane splits (stride-2
// columns) and their inverse, and square transposes (channels ↔ pixels). AVX-512 and AVX2 use
// intrinsics (a measured need: ATen's Vectorized has no masked register transposes and its
// counted loads go through a stack copy); the baseline build uses plain loops, which is also what
// aarch64 compiles.
#pragma once
#include <type_traits>

#include "cpu/isa/vec.h"

FASTVIT_ISA_BEGIN

template <typename A>
struct Lanes {
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(A));
  using V = typename Vec<A, L>::type;
};

#if defined(CPU_CAPABILITY_AVX512)
FASTVIT_INLINE __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
FASTVIT_INLINE __mmask8 mask8(int64_t n) { return n >= 8 ? __mmask8(0xFF) : n <= 0 ? __mmask8(0) : __mmask8((1u << n) - 1); }
#elif defined(CPU_CAPABILITY_AVX2)
FASTVIT_INLINE __m256i mask32x8(int64_t n) {
  const int m = static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTVIT_INLINE __m256i mask64x4(int64_t n) {
  const int64_t m = n < 0 ? 0 : n > 4 ? 4 : n;
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(m), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

// The first n lanes (0 ≤ n; n ≥ L loads all) from p, zeros elsewhere; nothing past p + n is read.
template <typename A>
FASTVIT_INLINE typename Lanes<A>::V load_n(const A* p, int64_t n) {
  using V = typename Lanes<A>::V;
  if (n >= Lanes<A>::L) return vload<A, Lanes<A>::L>(p);  // masked accesses cost more on some CPUs
  V v;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) v = V(_mm512_maskz_loadu_ps(mask16(n), p));
  else v = V(_mm512_maskz_loadu_pd(mask8(n), p));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) v = V(_mm256_maskload_ps(p, mask32x8(n)));
  else v = V(_mm256_maskload_pd(p, mask64x4(n)));
#else
  v = V{};
  for (int l = 0; l < Lanes<A>::L && l < n; ++l) v[l] = p[l];
#endif
  return v;
}

// Stores the first n lanes of v at p (n ≥ L stores all); nothing past p + n is written.
template <typename A>
FASTVIT_INLINE void store_n(A* p, typename Lanes<A>::V v, int64_t n) {
  if (n >= Lanes<A>::L) return vstore<A, Lanes<A>::L>(p, v);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) _mm512_mask_storeu_ps(p, mask16(n), __m512(v));
  else _mm512_mask_storeu_pd(p, mask8(n), __m512d(v));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) _mm256_maskstore_ps(p, mask32x8(n), __m256(v));
  else _mm256_maskstore_pd(p, mask64x4(n), __m256d(v));
#else
  for (int l = 0; l < Lanes<A>::L && l < n; ++l) p[l] = v[l];
#endif
}

// Even / odd lanes of the 2L-lane concatenation (lo, hi).
template <typename A>
FASTVIT_INLINE void split_even_odd(typename Lanes<A>::V lo, typename Lanes<A>::V hi, typename Lanes<A>::V& even,
                                   typename Lanes<A>::V& odd) {
  using V [[maybe_unused]] = typename Lanes<A>::V;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    even = V(_mm512_permutex2var_ps(__m512(lo), ie, __m512(hi)));
    odd = V(_mm512_permutex2var_ps(__m512(lo), io, __m512(hi)));
  } else {
    even = V(_mm512_permutex2var_pd(__m512d(lo), _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), __m512d(hi)));
    odd = V(_mm512_permutex2var_pd(__m512d(lo), _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), __m512d(hi)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    // Within each 128-bit half: (lo0, lo2, hi0, hi2); then the 64-bit pieces reordered.
    const __m256 e = _mm256_shuffle_ps(__m256(lo), __m256(hi), _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(__m256(lo), __m256(hi), _MM_SHUFFLE(3, 1, 3, 1));
    even = V(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
    odd = V(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
  } else {
    even = V(_mm256_permute4x64_pd(_mm256_unpacklo_pd(__m256d(lo), __m256d(hi)), 0xD8));
    odd = V(_mm256_permute4x64_pd(_mm256_unpackhi_pd(__m256d(lo), __m256d(hi)), 0xD8));
  }
#else
  constexpr int L = Lanes<A>::L;
  for (int l = 0; l < L / 2; ++l) {
    even[l] = lo[2 * l];
    odd[l] = lo[2 * l + 1];
    even[L / 2 + l] = hi[2 * l];
    odd[L / 2 + l] = hi[2 * l + 1];
  }
#endif
}

// The inverse: (e0, o0, e1, o1, …) as two vectors.
template <typename A>
FASTVIT_INLINE void interleave(typename Lanes<A>::V even, typename Lanes<A>::V odd, typename Lanes<A>::V& lo,
                               typename Lanes<A>::V& hi) {
  using V [[maybe_unused]] = typename Lanes<A>::V;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = V(_mm512_permutex2var_ps(__m512(even), il, __m512(odd)));
    hi = V(_mm512_permutex2var_ps(__m512(even), ih, __m512(odd)));
  } else {
    lo = V(_mm512_permutex2var_pd(__m512d(even), _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), __m512d(odd)));
    hi = V(_mm512_permutex2var_pd(__m512d(even), _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), __m512d(odd)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256 a = _mm256_unpacklo_ps(__m256(even), __m256(odd)), b = _mm256_unpackhi_ps(__m256(even), __m256(odd));
    lo = V(_mm256_permute2f128_ps(a, b, 0x20));
    hi = V(_mm256_permute2f128_ps(a, b, 0x31));
  } else {
    const __m256d a = _mm256_unpacklo_pd(__m256d(even), __m256d(odd)), b = _mm256_unpackhi_pd(__m256d(even), __m256d(odd));
    lo = V(_mm256_permute2f128_pd(a, b, 0x20));
    hi = V(_mm256_permute2f128_pd(a, b, 0x31));
  }
#else
  constexpr int L = Lanes<A>::L;
  for (int l = 0; l < L / 2; ++l) {
    lo[2 * l] = even[l];
    lo[2 * l + 1] = odd[l];
    hi[2 * l] = even[L / 2 + l];
    hi[2 * l + 1] = odd[L / 2 + l];
  }
#endif
}

// ---- fp32 square transposes: kLanes × kLanes blocks -------------------------------------------
constexpr int kLanes = Lanes<float>::L;  // 16 (AVX-512), 8 (AVX2), 4 (baseline)
using LaneVec = Lanes<float>::V;

#if defined(CPU_CAPABILITY_AVX512)
// r[i] ← column i of the 16×16 matrix whose rows are r[0..15].
FASTVIT_INLINE void transpose_regs(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
using LaneReg = __m512;
#elif defined(CPU_CAPABILITY_AVX2)
// r[i] ← column i of the 8×8 matrix whose rows are r[0..7].
FASTVIT_INLINE void transpose_regs(__m256 (&r)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}
using LaneReg = __m256;
#endif

// Transposes one block: reads rows r < nrows (src(r) → its first element; ncols ≤ kLanes elements
// each), and writes column c < ncols to dst(c) as a row: its first nrows elements, or all kLanes
// (zeros past nrows) when kFull.
template <bool kFull, typename Src, typename Dst>
FASTVIT_INLINE void transpose_block(Src src, int nrows, int ncols, Dst dst) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  LaneReg r[kLanes];
  for (int i = 0; i < kLanes; ++i) r[i] = i < nrows ? LaneReg(load_n<float>(src(i), ncols)) : LaneReg(LaneVec{});
  transpose_regs(r);
  for (int c = 0; c < ncols; ++c) store_n<float>(dst(c), LaneVec(r[c]), kFull ? kLanes : nrows);
#else
  for (int c = 0; c < ncols; ++c) {
    float* d = dst(c);
    for (int i = 0; i < nrows; ++i) d[i] = src(i)[c];
    if (kFull)
      for (int i = nrows; i < kLanes; ++i) d[i] = 0.0f;
  }
#endif
}

FASTVIT_ISA_END
