// Depthwise conv, "rows" path (see cpu/dwconv.h): one (b, c) plane per work item, any shape and
// dtype. Each plane is copied (and converted to the accumulation type) into a zero-padded scratch
// plane, so the inner loops carry no border branches; output rows are computed in blocks of R rows
// × NB vectors held in registers, looping over the k×k taps. For stride 2 the padded columns are
// stored de-interleaved (even columns, then odd ones), so every tap still reads a contiguous run.
// The block shapes follow the capability's vector width and register count (vec.h).
#include "cpu/isa/dwconv_common.h"

#include <cstring>
#include <vector>

FASTVIT_ISA_BEGIN
namespace {

using namespace dw;

// One padded plane in scratch: `rows` rows of `s` column phases, each `wq` wide. Padded
// coordinate (r, c) lives at r * rowlen + (c % s) * wq + c / s.
struct Geo {
  int64_t rows, wq, rowlen, size;
  int s;
};

Geo make_geo(int64_t rows, int64_t wq, int s, int64_t slack) {
  Geo g;
  g.rows = rows;
  g.wq = wq;
  g.s = s;
  g.rowlen = s * wq;
  g.size = rows * g.rowlen + g.rowlen + slack;  // vector blocks may read past the last row
  return g;
}

// What one conv pass over a padded buffer needs.
struct ConvArgs {
  const int64_t* off;  // column offset of tap v within a row (k + 4 entries, padded)
  int64_t rowlen, Ho, Wo, ldo;
  int64_t row_lo, row_hi;  // buffer rows that may be non-zero: [row_lo, row_hi) every `up` rows
  int k, s, up;
};

// Up to 4 vectors per row block with 32 registers (4 rows × 4 accumulators + 4 inputs), 2 with 16.
constexpr int kMaxNB = kVecRegs >= 32 ? 4 : 2;

// Vector width (lanes) and vectors per row block for rows of Wo outputs: narrow rows use
// half-width vectors (where those are still ≥ 4 lanes), so 7-wide planes do not waste most lanes.
template <typename A>
constexpr int half_lanes() {
  return Lanes<A>::L / 2 >= 4 ? Lanes<A>::L / 2 : Lanes<A>::L;
}

// Row stride of a conv output buffer: Wo rounded up to the block width conv_plane_any uses (so
// small planes do not pay epilogue work on wide rows); also a multiple of wgrad's vector width.
template <typename A>
int64_t out_ld(int64_t wo) {
  constexpr int64_t L = Lanes<A>::L;
  if (wo <= half_lanes<A>()) return half_lanes<A>();
  if (wo <= L) return L;
  if (wo <= 2 * L) return 2 * L;
  return round_up(wo, kMaxNB * L);
}

// Adds buffer row `row` (at column block j0) to the output rows LO..HI−1 of a block of R rows:
// acc[ii] += Σ_v w[rel − s·ii, v] · row[tap v]. Each input vector loaded feeds all active rows.
template <typename A, int L, int NB, int R, int LO, int HI>
FASTVIT_INLINE void row_taps(typename Vec<A, L>::type (&acc)[R][NB], const A* __restrict row, const A* __restrict w,
                             int64_t rel, int s, int k, const int64_t* __restrict off) {
  using V = typename Vec<A, L>::type;
  const A* wr[R];
  for (int ii = LO; ii < HI; ++ii) wr[ii] = w + (rel - s * ii) * k;
  for (int v = 0; v < k; ++v) {
    const A* q = row + off[v];
    V xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = vload<A, L>(q + b * L);
    for (int ii = LO; ii < HI; ++ii) {
      const A wv = wr[ii][v];
      for (int b = 0; b < NB; ++b) acc[ii][b] += wv * xv[b];
    }
  }
}

// out[i, j] = init + Σ_{u,v} w[u, v] · buf[s·i + u, tap v at column j], for j < Wo rounded up to
// the block width and i < Ho rounded up to R (the extra lanes/rows are garbage the caller ignores).
// R output rows are computed together, so each input vector loaded feeds up to R rows; the rows a
// buffer row reaches (LO..HI) pick a specialised loop, so no FMA is spent on a missing tap.
// Buffer rows that only hold padding (or the zero rows of an upsampled gradient) are skipped.
template <typename A, int L, int NB, int R>
FASTVIT_INLINE void conv_plane(const A* __restrict buf, const A* __restrict w, A init, A* __restrict out,
                               const ConvArgs& a) {
  using V = typename Vec<A, L>::type;
  constexpr int BW = L * NB;
  const int k = a.k, s = a.s;
  for (int64_t i0 = 0; i0 < a.Ho; i0 += R) {
    const int64_t r_begin = std::max<int64_t>(s * i0, a.row_lo);
    const int64_t r_end = std::min<int64_t>(s * (i0 + R - 1) + k, a.row_hi);
    for (int64_t j0 = 0; j0 < a.Wo; j0 += BW) {
      V acc[R][NB];
      for (int ii = 0; ii < R; ++ii)
        for (int b = 0; b < NB; ++b) acc[ii][b] = V{} + init;
      for (int64_t r = r_begin; r < r_end; ++r) {
        if (a.up == 2 && ((r - a.row_lo) & 1)) continue;
        const A* row = buf + r * a.rowlen + j0;
        const int64_t rel = r - s * i0;  // output row ii uses tap row rel − s·ii
        const int lo = rel < k ? 0 : static_cast<int>((rel - k) / s + 1);
        const int hi = static_cast<int>(std::min<int64_t>(R, rel / s + 1));
#define DW_ROWS(LO, HI)                                                   \
  case (LO) * 16 + (HI):                                                  \
    if constexpr ((HI) <= R) row_taps<A, L, NB, R, LO, HI>(acc, row, w, rel, s, k, a.off); \
    break;
        if constexpr (R == 4) {
          switch (lo * 16 + hi) {
          DW_ROWS(0, 1) DW_ROWS(0, 2) DW_ROWS(0, 3) DW_ROWS(0, 4) DW_ROWS(1, 2) DW_ROWS(1, 3) DW_ROWS(1, 4)
          DW_ROWS(2, 3) DW_ROWS(2, 4) DW_ROWS(3, 4)
            default: break;
          }
        } else {
          switch (lo * 16 + hi) {
          DW_ROWS(0, 1) DW_ROWS(0, 2) DW_ROWS(0, 3) DW_ROWS(0, 4) DW_ROWS(0, 5) DW_ROWS(0, 6) DW_ROWS(0, 7)
          DW_ROWS(0, 8) DW_ROWS(1, 2) DW_ROWS(1, 3) DW_ROWS(1, 4) DW_ROWS(1, 5) DW_ROWS(1, 6) DW_ROWS(1, 7)
          DW_ROWS(1, 8) DW_ROWS(2, 3) DW_ROWS(2, 4) DW_ROWS(2, 5) DW_ROWS(2, 6) DW_ROWS(2, 7) DW_ROWS(2, 8)
          DW_ROWS(3, 4) DW_ROWS(3, 5) DW_ROWS(3, 6) DW_ROWS(3, 7) DW_ROWS(3, 8) DW_ROWS(4, 5) DW_ROWS(4, 6)
          DW_ROWS(4, 7) DW_ROWS(4, 8) DW_ROWS(5, 6) DW_ROWS(5, 7) DW_ROWS(5, 8) DW_ROWS(6, 7) DW_ROWS(6, 8)
          DW_ROWS(7, 8)
            default: break;
          }
        }
#undef DW_ROWS
      }
      for (int ii = 0; ii < R; ++ii)
        for (int b = 0; b < NB; ++b) vstore<A, L>(out + (i0 + ii) * a.ldo + j0 + b * L, acc[ii][b]);
    }
  }
}

// 4 rows per block, or all of a plane of ≤ 8 rows at once when its filter is large (measured on
// AVX-512: 8-row blocks only pay there; a compile-time filter width measured slower, so k stays a
// runtime loop bound).
template <typename A, int L, int NB>
FASTVIT_INLINE void conv_plane_rows(const A* buf, const A* w, A init, A* out, const ConvArgs& a) {
  if constexpr (NB == 1) {
    if (a.Ho <= 8 && a.k >= 7) return conv_plane<A, L, NB, 8>(buf, w, init, out, a);
  }
  conv_plane<A, L, NB, 4>(buf, w, init, out, a);
}

template <typename A>
void conv_plane_any(const A* buf, const A* w, A init, A* out, const ConvArgs& a) {
  constexpr int L = Lanes<A>::L;
  if (a.Wo <= half_lanes<A>()) {
    conv_plane_rows<A, half_lanes<A>(), 1>(buf, w, init, out, a);
  } else if (a.Wo <= L) {
    conv_plane_rows<A, L, 1>(buf, w, init, out, a);
  } else if (a.Wo <= 2 * L) {
    conv_plane_rows<A, L, 2>(buf, w, init, out, a);
  } else {
    conv_plane<A, L, kMaxNB, 4>(buf, w, init, out, a);
  }
}

// dw[u·k + v] = Σ_{i, j<Wo} g[i, j] · buf[s·i + u, tap v at column j]. g rows are zero past Wo
// (up to a multiple of L), so the extra lanes add nothing. Four taps share each load of g.
// Summation order is fixed: deterministic.
template <typename A, int L>
void wgrad_plane(const A* __restrict g, int64_t ldg, const A* __restrict buf, const ConvArgs& a, int64_t x_lo,
                 int64_t x_hi, A* __restrict dw) {
  using V = typename Vec<A, L>::type;
  const int k = a.k, s = a.s;
  for (int u = 0; u < k; ++u) {
    // Output rows whose tap row s·i + u holds input (not padding).
    const int64_t i_lo = std::max<int64_t>(0, (x_lo - u + s - 1) / s);
    const int64_t i_hi = std::min<int64_t>(a.Ho, x_hi - u <= 0 ? 0 : (x_hi - u - 1) / s + 1);
    for (int v0 = 0; v0 < k; v0 += 4) {
      V acc0 = V{}, acc1 = V{}, acc2 = V{}, acc3 = V{};
      const int64_t o0 = a.off[v0], o1 = a.off[v0 + 1], o2 = a.off[v0 + 2], o3 = a.off[v0 + 3];
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const A* gr = g + i * ldg;
        const A* xr = buf + (s * i + u) * a.rowlen;
        for (int64_t j = 0; j < a.Wo; j += L) {
          const V gv = vload<A, L>(gr + j);
          acc0 += gv * vload<A, L>(xr + o0 + j);
          acc1 += gv * vload<A, L>(xr + o1 + j);
          acc2 += gv * vload<A, L>(xr + o2 + j);
          acc3 += gv * vload<A, L>(xr + o3 + j);
        }
      }
      const A sums[4] = {hsum<A, L>(acc0), hsum<A, L>(acc1), hsum<A, L>(acc2), hsum<A, L>(acc3)};
      for (int t = 0; t < 4 && v0 + t < k; ++t) dw[u * k + v0 + t] = sums[t];
    }
  }
}

// Stride 1: dw[u, v] = Σ_r Σ_j g[r − u, j] · x[r, tap v at j], a U×V block of taps at a time: each
// x vector loaded feeds U tap rows and each g vector V tap columns (U·V FMAs per U + V loads).
// g must have U − 1 zero rows above and below its Ho rows.
template <typename A, int L, int U, int V>
FASTVIT_INLINE void wgrad_block_s1(const A* __restrict g, int64_t ldg, const A* __restrict buf, const ConvArgs& a,
                                   int64_t x_lo, int64_t x_hi, int u0, int v0, A* __restrict dw) {
  using Vt = typename Vec<A, L>::type;
  Vt acc[U][V];
  for (int uu = 0; uu < U; ++uu)
    for (int vv = 0; vv < V; ++vv) acc[uu][vv] = Vt{};
  const int64_t r_begin = std::max<int64_t>(x_lo, u0);
  const int64_t r_end = std::min<int64_t>(x_hi, u0 + U - 1 + a.Ho);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const A* xr = buf + r * a.rowlen;
    const A* gr = g + (r - u0) * ldg;
    for (int64_t j = 0; j < a.Wo; j += L) {
      Vt xv[V];
      for (int vv = 0; vv < V; ++vv) xv[vv] = vload<A, L>(xr + a.off[v0 + vv] + j);
      for (int uu = 0; uu < U; ++uu) {
        const Vt gv = vload<A, L>(gr - uu * ldg + j);
        for (int vv = 0; vv < V; ++vv) acc[uu][vv] += gv * xv[vv];
      }
    }
  }
  for (int uu = 0; uu < U; ++uu)
    for (int vv = 0; vv < V; ++vv) dw[(u0 + uu) * a.k + v0 + vv] = hsum<A, L>(acc[uu][vv]);
}

// Tap blocks of up to 4×4 with 32 registers (16 accumulators), 3×3 with 16.
constexpr int kWgBlock = kVecRegs >= 32 ? 4 : 3;

template <typename A, int L>
void wgrad_plane_s1(const A* g, int64_t ldg, const A* buf, const ConvArgs& a, int64_t x_lo, int64_t x_hi, A* dw) {
  const int k = a.k;
  for (int u0 = 0; u0 < k; u0 += kWgBlock) {
    const int U = std::min(kWgBlock, k - u0);
    for (int v0 = 0; v0 < k; v0 += kWgBlock) {
      const int V = std::min(kWgBlock, k - v0);
#define DW_WG_CASE(UU, VV)                                                          \
  case (UU) * 8 + (VV):                                                             \
    if constexpr ((UU) <= kWgBlock && (VV) <= kWgBlock)                             \
      wgrad_block_s1<A, L, UU, VV>(g, ldg, buf, a, x_lo, x_hi, u0, v0, dw);         \
    break;
      switch (U * 8 + V) {
        DW_WG_CASE(1, 1) DW_WG_CASE(1, 2) DW_WG_CASE(1, 3) DW_WG_CASE(1, 4)
        DW_WG_CASE(2, 1) DW_WG_CASE(2, 2) DW_WG_CASE(2, 3) DW_WG_CASE(2, 4)
        DW_WG_CASE(3, 1) DW_WG_CASE(3, 2) DW_WG_CASE(3, 3) DW_WG_CASE(3, 4)
        DW_WG_CASE(4, 1) DW_WG_CASE(4, 2) DW_WG_CASE(4, 3) DW_WG_CASE(4, 4)
        default: break;
      }
#undef DW_WG_CASE
    }
  }
}

template <typename A>
void wgrad_any(const A* g, int64_t ldg, const A* buf, const ConvArgs& a, int64_t x_lo, int64_t x_hi, A* dw) {
  constexpr int L = Lanes<A>::L, H = half_lanes<A>();
  if (a.s == 1) {
    if (a.Wo <= H) wgrad_plane_s1<A, H>(g, ldg, buf, a, x_lo, x_hi, dw);
    else wgrad_plane_s1<A, L>(g, ldg, buf, a, x_lo, x_hi, dw);
  } else if (a.Wo <= H) {
    wgrad_plane<A, H>(g, ldg, buf, a, x_lo, x_hi, dw);
  } else {
    wgrad_plane<A, L>(g, ldg, buf, a, x_lo, x_hi, dw);
  }
}

// Σ of a rows × n block (row stride ld): vector lanes then a scalar tail, in a fixed order.
template <typename A>
A sum_block(const A* __restrict p, int64_t ld, int64_t rows, int64_t n) {
  constexpr int L = Lanes<A>::L;
  using V = typename Vec<A, L>::type;
  V acc = V{};
  A tail = 0;
  const int64_t nv = n - n % L;
  for (int64_t i = 0; i < rows; ++i) {
    const A* r = p + i * ld;
    for (int64_t j = 0; j < nv; j += L) acc += vload<A, L>(r + j);
    for (int64_t j = nv; j < n; ++j) tail += r[j];
  }
  return tail + hsum<A, L>(acc);
}

// Place src[i, j] (strides sH, sW) at padded (off + up·i, off + up·j). Every plane of one call
// writes the same positions, so `buf` is zeroed once (at allocation) and its padding stays zero.
template <typename T, typename A>
void pack_plane(const T* src, int64_t sH, int64_t sW, int64_t H, int64_t W, A* buf, const Geo& g, int64_t off,
                int up) {
  for (int64_t i = 0; i < H; ++i) {
    const int64_t r = off + up * i;
    if (r >= g.rows) break;
    A* row = buf + r * g.rowlen;
    const T* sr = src + i * sH;
    if (g.s == 1 && up == 1) {
      const int64_t n = std::min<int64_t>(W, g.wq - off);
      if (sW == 1) {
        for (int64_t j = 0; j < n; ++j) row[off + j] = static_cast<A>(sr[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) row[off + j] = static_cast<A>(sr[j * sW]);
      }
    } else if (g.s == 1) {  // zero-upsampled (dgrad of a stride-2 conv)
      for (int64_t j = 0; j < W; ++j) {
        const int64_t c = off + up * j;
        if (c >= g.wq) break;
        row[c] = static_cast<A>(sr[j * sW]);
      }
    } else {  // stride 2: even padded columns, then odd ones; padded column 2q + ph = input off + j
      for (int64_t ph = 0; ph < 2; ++ph) {
        const int64_t q0 = (off - ph + 1) / 2;  // first q with 2q + ph − off ≥ 0
        const int64_t last = W - 1 + off - ph;  // 2q + ph − off ≤ W − 1
        const int64_t q1 = last < 0 ? 0 : std::min<int64_t>(g.wq, last / 2 + 1);
        A* dst = row + ph * g.wq;
        const T* s0 = sr + (2 * q0 + ph - off) * sW;
        for (int64_t q = q0; q < q1; ++q) dst[q] = static_cast<A>(s0[2 * (q - q0) * sW]);
      }
    }
  }
}

// Forward geometry: the input padded by p, columns de-interleaved by the stride.
Geo forward_geo(const DwShape& sh) {
  return make_geo(sh.s * (sh.Ho - 1) + sh.k, sh.Wo + (sh.k - 1) / sh.s, sh.s, 128 + sh.k);
}

std::vector<int64_t> tap_offsets(int k, const Geo& g) {
  std::vector<int64_t> off(k + 4);
  for (int v = 0; v < k; ++v) off[v] = (v % g.s) * g.wq + v / g.s;
  for (int v = k; v < k + 4; ++v) off[v] = off[k - 1];
  return off;
}

// ---- the passes over a call's planes ---------------------------------------------------------------
template <typename T>
void rows_forward(const DwForwardArgs<T>& args) {
  using A = DwAcc<T>;
  const DwShape& sh = args.sh;
  const T* xp = args.x;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w;
  const Geo geo = forward_geo(sh);
  const std::vector<int64_t> off = tap_offsets(sh.k, geo);
  const int64_t ldo = out_ld<A>(sh.Wo);
  const ConvArgs a{off.data(), geo.rowlen, sh.Ho, sh.Wo, ldo, sh.p, sh.p + sh.H, sh.k, sh.s, 1};
  const int64_t kk = static_cast<int64_t>(sh.k) * sh.k;
  // conv_plane_any writes whole blocks (rows in multiples of 4 or 8, columns up to ldo): where
  // those tile the output plane exactly, it writes into y itself.
  const bool direct = std::is_same_v<T, A> && ldo == sh.Wo && sh.Ho % 8 == 0;
  at::parallel_for(0, sh.B * sh.C, plane_grain(sh), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(geo.size), acc(direct ? 0 : round_up(sh.Ho, 8) * ldo), z(args.sp ? sh.H * sh.W : 0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / sh.C, c = plane % sh.C;
      if (plane + 1 < end) prefetch_plane(xp + ((plane + 1) / sh.C) * sB + ((plane + 1) % sh.C) * sC, sH, sW, sh.H, sh.W);
      if (args.sp != nullptr) {  // the conv reads z = x + S'[γ]·c, formed one plane at a time in cache
        const A cc = args.c[b * sh.C + c];
        const A* spp = args.sp + (b * args.G + c / (sh.C / args.G)) * sh.H * sh.W;
        const T* xc = xp + b * sB + c * sC;
        for (int64_t i = 0; i < sh.H; ++i)
          for (int64_t j = 0; j < sh.W; ++j) z[i * sh.W + j] = static_cast<A>(xc[i * sH + j * sW]) + cc * spp[i * sh.W + j];
        pack_plane<A, A>(z.data(), sh.W, 1, sh.H, sh.W, buf.data(), geo, sh.p, 1);
      } else {
        pack_plane<T, A>(xp + b * sB + c * sC, sH, sW, sh.H, sh.W, buf.data(), geo, sh.p, 1);
      }
      T* yp = args.y + plane * sh.Ho * sh.Wo;
      if constexpr (std::is_same_v<T, A>) {
        if (direct) {  // the plane's output is exactly the block grid: no staging copy
          conv_plane_any<A>(buf.data(), args.w + c * kk, args.bias ? args.bias[c] : A(0), yp, a);
          if (args.act != kActNone) activate(yp, sh.Ho * sh.Wo, args.act);
          if (args.residual)
            for (int64_t i = 0; i < sh.Ho; ++i) {
              const A* xr = buf.data() + (i + sh.p) * geo.rowlen + sh.p;
              A* yr = yp + i * sh.Wo;
              for (int64_t j = 0; j < sh.Wo; ++j) yr[j] += xr[j];
            }
          continue;
        }
      }
      conv_plane_any<A>(buf.data(), args.w + c * kk, args.bias ? args.bias[c] : A(0), acc.data(), a);
      if (args.act != kActNone) activate(acc.data(), sh.Ho * ldo, args.act);
      for (int64_t i = 0; i < sh.Ho; ++i) {
        const A* ar = acc.data() + i * ldo;
        T* yr = yp + i * sh.Wo;
        if (args.residual) {  // stride 1, same padding: x[i, j] sits at padded (i + p, j + p)
          const A* xr = buf.data() + (i + sh.p) * geo.rowlen + sh.p;
          for (int64_t j = 0; j < sh.Wo; ++j) yr[j] = static_cast<T>(ar[j] + xr[j]);
        } else if constexpr (std::is_same_v<T, A>) {
          std::memcpy(yr, ar, sh.Wo * sizeof(T));
        } else {
          for (int64_t j = 0; j < sh.Wo; ++j) yr[j] = static_cast<T>(ar[j]);
        }
      }
    }
  });
}

template <typename T>
void rows_backward(const DwBackwardArgs<T>& args) {
  using A = DwAcc<T>;
  const DwShape& sh = args.sh;
  const T* xp = args.x;
  const T* gp = args.dy;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w;
  const int64_t gB = args.gs.b, gC = args.gs.c, gH = args.gs.h, gW = args.gs.w;
  const int k = sh.k, s = sh.s, p = sh.p, act = args.act;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const A* w = args.w;
  const A* bias = args.bias;
  T* dx = args.dx;
  A* dw_part = args.dw_part;
  A* db_part = args.db_part;

  // Forward (recompute + wgrad) geometry.
  const Geo geo = forward_geo(sh);
  const std::vector<int64_t> off = tap_offsets(k, geo);
  const int64_t ld = out_ld<A>(sh.Wo);
  const ConvArgs fa{off.data(), geo.rowlen, sh.Ho, sh.Wo, ld, p, p + sh.H, k, s, 1};

  // dgrad: g placed at (k-1-p + s·i, k-1-p + s·j) (zero-upsampled for stride 2), then a stride-1
  // correlation with the flipped kernel gives dx over (H, W).
  const int64_t off2 = k - 1 - p;
  const Geo geo2 = make_geo(sh.H + k - 1, sh.W + k - 1, 1, 128 + k);
  const std::vector<int64_t> offd = tap_offsets(k, geo2);
  const int64_t ldx = out_ld<A>(sh.W);
  const ConvArgs da{offd.data(), geo2.rowlen, sh.H, sh.W, ldx, off2, off2 + s * (sh.Ho - 1) + 1, k, 1, s};

  at::parallel_for(0, sh.B * sh.C, plane_grain(sh), [&](int64_t begin, int64_t end) {
    // g keeps 3 zero rows above and below (wgrad_block_s1 reads rows r − u for u up to 3 past).
    std::vector<A> xbuf(geo.size), gstore((sh.Ho + 6) * ld), pre(act != kActNone ? round_up(sh.Ho, 8) * ld : 0),
        gbuf(geo2.size), acc(round_up(sh.H, 8) * ldx);
    A* g = gstore.data() + 3 * ld;  // zero-initialised; rows/lanes past (Ho, Wo) are never written
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / sh.C, c = plane % sh.C;
      // g = dy · act'(pre) is materialised only when the epilogue or wgrad needs it; a dgrad-only
      // pass packs dy straight into the dgrad buffer.
      const bool need_g = act != kActNone || dw_part != nullptr;
      if (need_g) pack_plane<T, A>(xp + b * sB + c * sC, sH, sW, sh.H, sh.W, xbuf.data(), geo, p, 1);
      if (plane + 1 < end) {
        const int64_t nb = (plane + 1) / sh.C, nc = (plane + 1) % sh.C;
        if (need_g) prefetch_plane(xp + nb * sB + nc * sC, sH, sW, sh.H, sh.W);
        prefetch_plane(gp + nb * gB + nc * gC, gH, gW, sh.Ho, sh.Wo);
      }
      const T* dy = gp + b * gB + c * gC;
      if (need_g) {
        // g rows are zero past Wo (wgrad's vector lanes), and the 3 rows around them stay zero.
        for (int64_t i = 0; i < sh.Ho; ++i) {
          A* gr = g + i * ld;
          for (int64_t j = 0; j < sh.Wo; ++j) gr[j] = static_cast<A>(dy[i * gH + j * gW]);
        }
        if (act != kActNone) {
          conv_plane_any<A>(xbuf.data(), w + c * kk, bias ? bias[c] : A(0), pre.data(), fa);
          act_backward(pre.data(), g, sh.Ho * ld, act);
          for (int64_t i = 0; i < sh.Ho; ++i) std::fill(g + i * ld + sh.Wo, g + (i + 1) * ld, A(0));
        }
        db_part[plane] = sum_block<A>(g, ld, sh.Ho, ld);  // zero past Wo: whole vectors
        if (dw_part != nullptr) wgrad_any<A>(g, ld, xbuf.data(), fa, p, p + sh.H, dw_part + plane * kk);
      }
      if (!need_g && dx == nullptr) {  // only dbias asked for
        A sum = 0;
        for (int64_t i = 0; i < sh.Ho; ++i)
          for (int64_t j = 0; j < sh.Wo; ++j) sum += static_cast<A>(dy[i * gH + j * gW]);
        db_part[plane] = sum;
      }
      if (dx != nullptr) {
        if (need_g) {
          pack_plane<A, A>(g, ld, 1, sh.Ho, sh.Wo, gbuf.data(), geo2, off2, s);
        } else {
          pack_plane<T, A>(dy, gH, gW, sh.Ho, sh.Wo, gbuf.data(), geo2, off2, s);
          // gbuf holds dy and zeros only: its sum is dbias's partial.
          db_part[plane] = sum_block<A>(gbuf.data(), geo2.rowlen, geo2.rows, geo2.rowlen);
        }
        conv_plane_any<A>(gbuf.data(), args.wflip + c * kk, A(0), acc.data(), da);
        T* dxp = dx + plane * sh.H * sh.W;
        for (int64_t i = 0; i < sh.H; ++i) {
          const A* ar = acc.data() + i * ldx;
          T* dr = dxp + i * sh.W;
          if (args.residual) {  // stride 1, same size: dy[i, j] flows straight through
            for (int64_t j = 0; j < sh.W; ++j) dr[j] = static_cast<T>(ar[j] + static_cast<A>(dy[i * gH + j * gW]));
          } else {
            for (int64_t j = 0; j < sh.W; ++j) dr[j] = static_cast<T>(ar[j]);
          }
        }
      }
    }
  });
}

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_forward.of<float>(), &rows_forward<float>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_forward.of<double>(), &rows_forward<double>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_forward.of<c10::Half>(), &rows_forward<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_forward.of<c10::BFloat16>(), &rows_forward<c10::BFloat16>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_backward.of<float>(), &rows_backward<float>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_backward.of<double>(), &rows_backward<double>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_backward.of<c10::Half>(), &rows_backward<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_rows_backward.of<c10::BFloat16>(), &rows_backward<c10::BFloat16>);

FASTVIT_ISA_END
