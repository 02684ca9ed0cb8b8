// Depthwise conv, "cblock" path (see cpu/dwconv.h): fp32 forward with the vector lanes holding
// channels. On small planes a row is narrower than (or about) one vector, so the per-plane paths
// leave lanes idle and pay their fixed cost per plane. Here a block of kLanes channels (16 with
// AVX-512, 8 with AVX2, 4 on the baseline) is transposed into a zero-padded (rows, cols, kLanes)
// tile that stays in L1, each output pixel is Σ_taps w[tap] · tile[pixel + tap] with every lane
// useful, kernel rows that only see padding are skipped (at 7×7 with k = 9, over 40% of the taps),
// and the outputs are transposed back (NCHW output) or stored as they are (channels_last output:
// the channels of a pixel are contiguous there too). NCHW or channels_last input.
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

// The weights as (C / kLanes, k·k, kLanes): one tap of a channel block is one vector.
std::vector<float> block_weights(const float* w, int64_t C, int64_t kk) {
  std::vector<float> wt(C * kk);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kk; ++t) wt[((c / kLanes) * kk + t) * kLanes + c % kLanes] = w[c * kk + t];
  return wt;
}

// Tasks of (sample, block of kLanes channels). y: NCHW, or channels_last when args.y_cl.
void cblock_forward(const DwForwardArgs<float>& args) {
  const DwShape& sh = args.sh;
  const float* x = args.x;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w;
  const int k = sh.k, s = sh.s, p = sh.p;
  const int64_t kk = static_cast<int64_t>(k) * k, nblk = sh.C / kLanes, npix = sh.Ho * sh.Wo, nin = sh.H * sh.W;
  // Tile extent: padded rows/columns any output or the pack touches.
  const int64_t rows = std::max<int64_t>(s * (sh.Ho - 1) + k, p + sh.H);
  const int64_t cols = std::max<int64_t>(s * (sh.Wo - 1) + k, p + sh.W);
  const std::vector<float> wblk = block_weights(args.w, sh.C, kk);
  // An output row is split into near-equal register blocks of at most kMaxNB pixels.
  const int64_t nblocks = (sh.Wo + kMaxNB - 1) / kMaxNB, width = (sh.Wo + nblocks - 1) / nblocks;
  const bool dense_planes = sW == 1 && sH == sh.W;  // each channel's plane is one contiguous run
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, npix * kk * kLanes));
  at::parallel_for(0, sh.B * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(rows * cols * kLanes, 0.f), out(npix * kLanes);
    auto tile_at = [&](int64_t i, int64_t j) { return tile.data() + ((i + p) * cols + j + p) * kLanes; };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kLanes;
      const float* wt = wblk.data() + (c0 / kLanes) * kk * kLanes;
      const float* xb = x + b * sB + c0 * sC;
      if (sC == 1) {  // channels_last: the channels of a pixel are contiguous
        for (int64_t i = 0; i < sh.H; ++i)
          for (int64_t j = 0; j < sh.W; ++j) st(tile_at(i, j), ld(xb + i * sH + j * sW));
      } else if (dense_planes) {  // kLanes pixels of the flattened plane at a time
        for (int64_t p0 = 0; p0 < nin; p0 += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, nin - p0));
          transpose_block<true>([&](int c) { return xb + c * sC + p0; }, kLanes, n,
                                [&](int q) { return tile_at((p0 + q) / sh.W, (p0 + q) % sh.W); });
        }
      } else {
        for (int c = 0; c < kLanes; ++c)
          for (int64_t i = 0; i < sh.H; ++i)
            for (int64_t j = 0; j < sh.W; ++j) tile_at(i, j)[c] = xb[c * sC + i * sH + j * sW];
      }
      const V bv = args.bias ? ld(args.bias + c0) : V{};
      for (int64_t oy = 0; oy < sh.Ho; ++oy) {
        const int64_t r0 = oy * s;
        // kernel rows whose input row r0 + ky lies in the plane: p ≤ r0 + ky < p + H
        const int ky0 = static_cast<int>(std::max<int64_t>(0, p - r0));
        const int ky1 = static_cast<int>(std::min<int64_t>(k, p + sh.H - r0));
        for (int64_t ox0 = 0; ox0 < sh.Wo; ox0 += width) {
          const int nb = static_cast<int>(std::min<int64_t>(width, sh.Wo - ox0));
          float* o = out.data() + (oy * sh.Wo + ox0) * kLanes;
          if (s == 1 && cblock_row_s1_any(k, nb, tile.data(), cols, wt, bv, r0, ky0, ky1, ox0, o)) continue;
          cblock_row(nb, tile.data(), cols, wt, bv, k, s, r0, ky0, ky1, ox0, o);
        }
      }
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
      float* yb = args.y + (b * sh.C + c0) * npix;
      for (int64_t p0 = 0; p0 < npix; p0 += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, npix - p0));
        transpose_block<false>([&](int q) { return out.data() + (p0 + q) * kLanes; }, n, kLanes,
                               [&](int c) { return yb + c * npix + p0; });
      }
    }
  });
}

int cblock_lanes() { return kLanes; }

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(dwconv_cblock_forward.of<float>(), &cblock_forward);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_cblock_lanes, &cblock_lanes);

FASTVIT_ISA_END
