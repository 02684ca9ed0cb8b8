// Depthwise conv, "cblock" path (see cpu/dwconv.h): fp32, the vector lanes holding channels. On
// small planes a row is narrower than (or about) one vector, so the per-plane paths leave lanes
// idle and pay their fixed cost per plane. Here a block of kLanes channels (16 with AVX-512, 8 with
// AVX2, 4 on the baseline) is transposed into a zero-padded (rows, cols, kLanes) tile that stays in
// L1, each output pixel is Σ_taps w[tap] · tile[pixel + tap] with every lane useful, kernel rows
// that only see padding are skipped (at 7×7 with k = 9, over 40% of the taps), and the outputs are
// transposed back (NCHW output) or stored as they are (channels_last output: the channels of a
// pixel are contiguous there too). NCHW or channels_last input.
// The backward (stride 1) works on the same tiles: g = dy · act'(pre) with pre recomputed by the
// forward's row loop, dbias and every tap's dweight as lane vectors summed over the plane (no
// horizontal sums, which cost the per-plane kernels most of their time on 7×7 planes), and dx as
// the forward's row loop over g zero-padded by k − 1 − p with the flipped kernel.
#include "cpu/isa/dwconv_common.h"

#include <vector>

FASTVIT_ISA_BEGIN
namespace {

using namespace dw;
using V = LaneVec;

FASTVIT_INLINE V ld(const float* p) { return vload<float, kLanes>(p); }
FASTVIT_INLINE void st(float* p, V v) { vstore<float, kLanes>(p, v); }

// Output pixels per register block: NB accumulators + the inputs and weight of a tap.
constexpr int kMaxNB = kVecRegs >= 32 ? 8 : 6;

// NB outputs of one row from ox0: acc[j] = bias + Σ_{ky in [ky0, ky1), kx} wt[ky, kx] · tile[r0 + ky, s·(ox0 + j) + kx].
template <int NB>
FASTVIT_INLINE void cblock_run(const float* __restrict tile, int64_t cols, const float* __restrict wt, V bv, int k,
                               int s, int64_t r0, int ky0, int ky1, int64_t ox0, float* __restrict out) {
  V acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = bv;
  for (int ky = ky0; ky < ky1; ++ky) {
    const float* row = tile + ((r0 + ky) * cols + s * ox0) * kLanes;
    const float* wr = wt + static_cast<int64_t>(ky) * k * kLanes;
    for (int kx = 0; kx < k; ++kx) {
      const V wv = ld(wr + kx * kLanes);
      const float* q = row + kx * kLanes;
      for (int j = 0; j < NB; ++j) acc[j] += wv * ld(q + j * s * kLanes);
    }
  }
  for (int j = 0; j < NB; ++j) st(out + j * kLanes, acc[j]);
}

// Stride 1 with a compile-time filter width K: the NB + K − 1 input vectors of a tile row are
// loaded once into registers and each feeds up to K outputs, so a row costs NB + 2K − 1 loads for
// NB·K FMAs instead of K·(NB + 1). Only where NB + K − 1 inputs, NB sums and the weight fit the
// registers (K ≤ 13 at NB = 8 with 32; K ≤ 5 at NB = 4 with 16).
template <int NB, int K>
FASTVIT_INLINE void cblock_run_s1(const float* __restrict tile, int64_t cols, const float* __restrict wt, V bv,
                                  int64_t r0, int ky0, int ky1, int64_t ox0, float* __restrict out) {
  V acc[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) acc[j] = bv;
  for (int ky = ky0; ky < ky1; ++ky) {
    const float* row = tile + ((r0 + ky) * cols + ox0) * kLanes;
    const float* wr = wt + static_cast<int64_t>(ky) * K * kLanes;
    V in[NB + K - 1];
#pragma GCC unroll 20
    for (int t = 0; t < NB + K - 1; ++t) in[t] = ld(row + t * kLanes);
#pragma GCC unroll 13
    for (int kx = 0; kx < K; ++kx) {
      const V wv = ld(wr + kx * kLanes);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[j] += wv * in[j + kx];
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) st(out + j * kLanes, acc[j]);
}

template <int K>
constexpr bool s1_fits(int nb) {
  return 2 * nb + K <= kVecRegs;  // NB sums + NB + K − 1 inputs + 1 weight
}

template <int K>
bool cblock_row_s1(int nb, const float* tile, int64_t cols, const float* wt, V bv, int64_t r0, int ky0, int ky1,
                   int64_t ox0, float* out) {
  switch (nb) {
#define DW_CB_S1(N)                                                                         \
  case N:                                                                                   \
    if constexpr (s1_fits<K>(N)) {                                                          \
      cblock_run_s1<N, K>(tile, cols, wt, bv, r0, ky0, ky1, ox0, out);                      \
      return true;                                                                          \
    }                                                                                       \
    return false;
    DW_CB_S1(1) DW_CB_S1(2) DW_CB_S1(3) DW_CB_S1(4) DW_CB_S1(5) DW_CB_S1(6) DW_CB_S1(7) DW_CB_S1(8)
#undef DW_CB_S1
    default:
      return false;
  }
}

bool cblock_row_s1_any(int k, int nb, const float* tile, int64_t cols, const float* wt, V bv, int64_t r0, int ky0,
                       int ky1, int64_t ox0, float* out) {
  switch (k) {
    case 3: return cblock_row_s1<3>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    case 5: return cblock_row_s1<5>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    case 7: return cblock_row_s1<7>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    case 9: return cblock_row_s1<9>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    case 11: return cblock_row_s1<11>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    case 13: return cblock_row_s1<13>(nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, out);
    default: return false;
  }
}

void cblock_row(int nb, const float* tile, int64_t cols, const float* wt, V bv, int k, int s, int64_t r0, int ky0,
                int ky1, int64_t ox0, float* out) {
  switch (nb) {
#define DW_CB_CASE(N)                                                                  \
  case N:                                                                              \
    if constexpr (N <= kMaxNB) cblock_run<N>(tile, cols, wt, bv, k, s, r0, ky0, ky1, ox0, out); \
    break;
    DW_CB_CASE(1) DW_CB_CASE(2) DW_CB_CASE(3) DW_CB_CASE(4) DW_CB_CASE(5) DW_CB_CASE(6) DW_CB_CASE(7) DW_CB_CASE(8)
#undef DW_CB_CASE
    default:
      break;
  }
}

// With 16 vector registers (AVX2, the baseline) and k ≥ 5, two output rows at a time: tile row
// r0 + rel feeds output row oy with weight row rel and row oy + 1 with weight row rel − 1, so each
// input vector loaded serves two FMAs (2 + NB loads per 2·NB FMAs instead of 1 + NB per NB; the
// one-row kernels are load-bound there). NB = 4: 8 sums, 2 weights and an input in 11 registers.
// Per output the taps are summed in the same order as the one-row kernels (ky, then kx).
// Measured (AVX2, one thread, a 32×32 tile in cache): 87 → 125 GFLOP/s at k = 7–11, 102 → 121 at
// k = 5 (the K-specialised row kernel is as fast at k = 5 and twice as fast at k = 3).
constexpr bool kTwoRows = kVecRegs < 32;
constexpr int kTwoRowsNB = 4;

template <int NB, int LO, int HI>
FASTVIT_INLINE void two_rows_step(V (&acc)[2][NB], const float* __restrict row, const float* __restrict wt, int k,
                                  int rel) {
  for (int kx = 0; kx < k; ++kx) {
    const float* q = row + kx * kLanes;
    V wv[2];
    for (int ii = LO; ii < HI; ++ii) wv[ii] = ld(wt + ((rel - ii) * k + kx) * kLanes);
    for (int j = 0; j < NB; ++j) {
      const V x = ld(q + j * kLanes);
      for (int ii = LO; ii < HI; ++ii) acc[ii][j] += wv[ii] * x;
    }
  }
}

// Output rows oy, oy + 1 (stride 1), pixels [ox0, ox0 + NB); tile rows outside [lo, hi) are zeros.
template <int NB>
FASTVIT_INLINE void two_rows_run(const float* __restrict tile, int64_t cols, const float* __restrict wt, V bv, int k,
                                 int64_t oy, int64_t lo, int64_t hi, int64_t ox0, int64_t ld_out,
                                 float* __restrict out) {
  V acc[2][NB];
  for (int ii = 0; ii < 2; ++ii)
    for (int j = 0; j < NB; ++j) acc[ii][j] = bv;
  const int rel0 = static_cast<int>(std::max<int64_t>(0, lo - oy));
  const int rel1 = static_cast<int>(std::min<int64_t>(k + 1, hi - oy));
  for (int rel = rel0; rel < rel1; ++rel) {
    const float* row = tile + ((oy + rel) * cols + ox0) * kLanes;
    if (rel == 0) two_rows_step<NB, 0, 1>(acc, row, wt, k, rel);
    else if (rel == k) two_rows_step<NB, 1, 2>(acc, row, wt, k, rel);
    else two_rows_step<NB, 0, 2>(acc, row, wt, k, rel);
  }
  for (int ii = 0; ii < 2; ++ii)
    for (int j = 0; j < NB; ++j) st(out + ii * ld_out + j * kLanes, acc[ii][j]);
}

void two_rows(int nb, const float* tile, int64_t cols, const float* wt, V bv, int k, int64_t oy, int64_t lo,
              int64_t hi, int64_t ox0, int64_t ld_out, float* out) {
  switch (nb) {
#define DW_CB_2R(N) \
  case N: return two_rows_run<N>(tile, cols, wt, bv, k, oy, lo, hi, ox0, ld_out, out);
    DW_CB_2R(1) DW_CB_2R(2) DW_CB_2R(3) DW_CB_2R(4)
#undef DW_CB_2R
    default:
      break;
  }
}

// The weights as (C / kLanes, k·k, kLanes): one tap of a channel block is one vector.
std::vector<float> block_weights(const float* w, int64_t C, int64_t kk) {
  std::vector<float> wt(C * kk);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kk; ++t) wt[((c / kLanes) * kk + t) * kLanes + c % kLanes] = w[c * kk + t];
  return wt;
}

// Copies kLanes channels (stride sC) of one H × W plane (strides sH, sW) into lanes: dst(i, j) →
// the kLanes floats of pixel (i, j).
template <typename Dst>
void pack_lanes(const float* src, int64_t sC, int64_t sH, int64_t sW, int64_t H, int64_t W, Dst dst) {
  if (sC == 1) {  // channels_last: the channels of a pixel are contiguous
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) st(dst(i, j), ld(src + i * sH + j * sW));
  } else if (sW == 1 && sH == W) {  // each channel's plane is one contiguous run: kLanes pixels at a time
    const int64_t n = H * W;
    for (int64_t p0 = 0; p0 < n; p0 += kLanes) {
      const int m = static_cast<int>(std::min<int64_t>(kLanes, n - p0));
      transpose_block<true>([&](int c) { return src + c * sC + p0; }, kLanes, m,
                            [&](int q) { return dst((p0 + q) / W, (p0 + q) % W); });
    }
  } else {
    for (int c = 0; c < kLanes; ++c)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) dst(i, j)[c] = src[c * sC + i * sH + j * sW];
  }
}

// Writes npix lane vectors (pixel-major) to kLanes contiguous NCHW planes of npix floats.
void unpack_planes(const float* lanes, int64_t npix, float* planes) {
  for (int64_t p0 = 0; p0 < npix; p0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, npix - p0));
    transpose_block<false>([&](int q) { return lanes + (p0 + q) * kLanes; }, n, kLanes,
                           [&](int c) { return planes + c * npix + p0; });
  }
}

// out (Ho × Wo lane vectors) = bias + the conv of a tile (cols wide) whose rows [lo, hi) hold data:
// output row oy reads tile rows s·oy + ky, ky in [0, k), those outside [lo, hi) skipped (zeros).
void conv_tile(const float* tile, int64_t cols, const float* wt, V bv, int k, int s, int64_t lo, int64_t hi,
               int64_t Ho, int64_t Wo, float* out) {
  int64_t oy = 0;
  if (kTwoRows && s == 1 && k >= 5) {
    for (; oy + 1 < Ho; oy += 2)
      for (int64_t ox0 = 0; ox0 < Wo; ox0 += kTwoRowsNB)
        two_rows(static_cast<int>(std::min<int64_t>(kTwoRowsNB, Wo - ox0)), tile, cols, wt, bv, k, oy, lo, hi, ox0,
                 Wo * kLanes, out + (oy * Wo + ox0) * kLanes);
  }
  // An output row is split into near-equal register blocks of at most kMaxNB pixels.
  const int64_t nblocks = (Wo + kMaxNB - 1) / kMaxNB, width = (Wo + nblocks - 1) / nblocks;
  for (; oy < Ho; ++oy) {
    const int64_t r0 = oy * s;
    const int ky0 = static_cast<int>(std::max<int64_t>(0, lo - r0));
    const int ky1 = static_cast<int>(std::max<int64_t>(ky0, std::min<int64_t>(k, hi - r0)));
    for (int64_t ox0 = 0; ox0 < Wo; ox0 += width) {
      const int nb = static_cast<int>(std::min<int64_t>(width, Wo - ox0));
      float* o = out + (oy * Wo + ox0) * kLanes;
      if (s == 1 && cblock_row_s1_any(k, nb, tile, cols, wt, bv, r0, ky0, ky1, ox0, o)) continue;
      cblock_row(nb, tile, cols, wt, bv, k, s, r0, ky0, ky1, ox0, o);
    }
  }
}

// Tasks of (sample, block of kLanes channels). y: NCHW, or channels_last when args.y_cl.
void cblock_forward(const DwForwardArgs<float>& args) {
  const DwShape& sh = args.sh;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w;
  const int k = sh.k, s = sh.s, p = sh.p;
  const int64_t kk = static_cast<int64_t>(k) * k, nblk = sh.C / kLanes, npix = sh.Ho * sh.Wo;
  // Tile extent: padded rows/columns any output or the pack touches.
  const int64_t rows = std::max<int64_t>(s * (sh.Ho - 1) + k, p + sh.H);
  const int64_t cols = std::max<int64_t>(s * (sh.Wo - 1) + k, p + sh.W);
  const std::vector<float> wblk = block_weights(args.w, sh.C, kk);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, npix * kk * kLanes));
  at::parallel_for(0, sh.B * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(rows * cols * kLanes, 0.f), out(npix * kLanes);
    auto tile_at = [&](int64_t i, int64_t j) { return tile.data() + ((i + p) * cols + j + p) * kLanes; };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kLanes;
      const float* wt = wblk.data() + (c0 / kLanes) * kk * kLanes;
      pack_lanes(args.x + b * sB + c0 * sC, sC, sH, sW, sh.H, sh.W, tile_at);
      conv_tile(tile.data(), cols, wt, args.bias ? ld(args.bias + c0) : V{}, k, s, p, p + sh.H, sh.Ho, sh.Wo,
                out.data());
      if (args.act != kActNone) activate(out.data(), npix * kLanes, args.act);
      if (args.residual)  // stride 1, same padding: x[i, j] sits at tile (i + p, j + p)
        for (int64_t i = 0; i < sh.Ho; ++i)
          for (int64_t j = 0; j < sh.Wo; ++j) {
            float* o = out.data() + (i * sh.Wo + j) * kLanes;
            st(o, ld(o) + ld(tile_at(i, j)));
          }
      if (args.y_cl) {
        float* yb = args.y + b * sh.C * npix + c0;
        for (int64_t q = 0; q < npix; ++q) st(yb + q * sh.C, ld(out.data() + q * kLanes));
        continue;
      }
      unpack_planes(out.data(), npix, args.y + (b * sh.C + c0) * npix);
    }
  });
}

// Stride 1 only (dwconv.cpp's choice). Tasks of (sample, block of kLanes channels), like the forward.
void cblock_backward(const DwBackwardArgs<float>& args) {
  const DwShape& sh = args.sh;
  const int k = sh.k, p = sh.p, act = args.act;
  const int64_t kk = static_cast<int64_t>(k) * k, nblk = sh.C / kLanes, npix = sh.Ho * sh.Wo, nin = sh.H * sh.W;
  const int64_t rows = std::max<int64_t>(sh.Ho - 1 + k, p + sh.H), cols = std::max<int64_t>(sh.Wo - 1 + k, p + sh.W);
  // dx[i, j] = Σ wflip[ky, kx] · g[i + ky − q, j + kx − q]: g zero-padded by q = k − 1 − p.
  const int64_t q = k - 1 - p, grows = sh.H + k - 1, gcols = sh.W + k - 1;
  const std::vector<float> wblk = block_weights(args.w, sh.C, kk), wfblk = block_weights(args.wflip, sh.C, kk);
  float* dx = args.dx;
  float* dw_part = args.dw_part;
  const bool need_x = act != kActNone || dw_part != nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 3 * npix * kk * kLanes));
  at::parallel_for(0, sh.B * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(need_x ? rows * cols * kLanes : 0, 0.f), dyt(npix * kLanes),
        gbuf(act != kActNone ? npix * kLanes : 0), pre(act != kActNone ? npix * kLanes : 0),
        gt(dx ? grows * gcols * kLanes : 0, 0.f), dxt(dx ? nin * kLanes : 0);
    alignas(64) float lanes[kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kLanes, blk = c0 / kLanes;
      if (need_x)
        pack_lanes(args.x + b * args.xs.b + c0 * args.xs.c, args.xs.c, args.xs.h, args.xs.w, sh.H, sh.W,
                   [&](int64_t i, int64_t j) { return tile.data() + ((i + p) * cols + j + p) * kLanes; });
      pack_lanes(args.dy + b * args.gs.b + c0 * args.gs.c, args.gs.c, args.gs.h, args.gs.w, sh.Ho, sh.Wo,
                 [&](int64_t i, int64_t j) { return dyt.data() + (i * sh.Wo + j) * kLanes; });
      float* g = dyt.data();
      if (act != kActNone) {
        conv_tile(tile.data(), cols, wblk.data() + blk * kk * kLanes, args.bias ? ld(args.bias + c0) : V{}, k, 1,
                  p, p + sh.H, sh.Ho, sh.Wo, pre.data());
        std::copy(dyt.begin(), dyt.end(), gbuf.begin());
        act_backward(pre.data(), gbuf.data(), npix * kLanes, act);
        g = gbuf.data();
      }
      {  // dbias: Σ over the plane, pixels in order
        V acc = V{};
        for (int64_t o = 0; o < npix; ++o) acc += ld(g + o * kLanes);
        st(lanes, acc);
        for (int c = 0; c < kLanes; ++c) args.db_part[b * sh.C + c0 + c] = lanes[c];
      }
      if (dw_part != nullptr) {
        // dweight[ky, kx] = Σ_{oy, ox} g[oy, ox] · x[oy + ky − p, ox + kx − p] over the outputs whose
        // tap lands inside the plane (the rest read padding zeros)
        for (int ky = 0; ky < k; ++ky) {
          const int64_t oy0 = std::max<int64_t>(0, p - ky), oy1 = std::min<int64_t>(sh.Ho, p + sh.H - ky);
          for (int kx = 0; kx < k; ++kx) {
            const int64_t ox0 = std::max<int64_t>(0, p - kx), ox1 = std::min<int64_t>(sh.Wo, p + sh.W - kx);
            V a0 = V{}, a1 = V{};
            for (int64_t oy = oy0; oy < oy1; ++oy) {
              const float* gr = g + oy * sh.Wo * kLanes;
              const float* xr = tile.data() + ((oy + ky) * cols + kx) * kLanes;
              int64_t ox = ox0;
              for (; ox + 1 < ox1; ox += 2) {
                a0 += ld(gr + ox * kLanes) * ld(xr + ox * kLanes);
                a1 += ld(gr + (ox + 1) * kLanes) * ld(xr + (ox + 1) * kLanes);
              }
              if (ox < ox1) a0 += ld(gr + ox * kLanes) * ld(xr + ox * kLanes);
            }
            st(lanes, a0 + a1);
            for (int c = 0; c < kLanes; ++c) dw_part[(b * sh.C + c0 + c) * kk + ky * k + kx] = lanes[c];
          }
        }
      }
      if (dx == nullptr) continue;
      for (int64_t i = 0; i < sh.Ho; ++i)
        std::copy(g + i * sh.Wo * kLanes, g + (i + 1) * sh.Wo * kLanes, gt.data() + ((i + q) * gcols + q) * kLanes);
      conv_tile(gt.data(), gcols, wfblk.data() + blk * kk * kLanes, V{}, k, 1, q, q + sh.Ho, sh.H, sh.W, dxt.data());
      if (args.residual)  // stride 1, same padding: dy[i, j] adds to dx[i, j]
        for (int64_t o = 0; o < nin; ++o) st(dxt.data() + o * kLanes, ld(dxt.data() + o * kLanes) + ld(dyt.data() + o * kLanes));
      unpack_planes(dxt.data(), nin, dx + (b * sh.C + c0) * nin);
    }
  });
}

int cblock_lanes() { return kLanes; }

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(dwconv_cblock_forward.of<float>(), &cblock_forward);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_cblock_backward.of<float>(), &cblock_backward);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_cblock_lanes, &cblock_lanes);

FASTVIT_ISA_END
