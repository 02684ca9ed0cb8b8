// Depthwise conv, "flat" path (see cpu/dwconv.h) for small planes, fp32 and fp64. On small planes
// the rows path spends most of its time on per-row work (packing, copying out, dispatching row
// blocks of a 7-wide row). Here a padded plane is one 1-D array of pitch Q (Q = Wo + (k−1)/s), so
// output o = i·Q + j is Σ_t w[t] · buf[o + tap[t]]: every tap is one broadcast weight times a
// contiguous run, and a whole small plane's outputs sit in a few vector registers (columns j ≥ Wo
// are garbage, dropped when unpacking). For stride 2 the padded plane is split into its 4 (row
// parity, column parity) sub-planes, so taps stay contiguous at pitch Q. Short rows are packed
// and unpacked with loads/stores of the first n lanes (lanes.h).
#include "cpu/isa/dwconv_common.h"

#include <vector>

FASTVIT_ISA_BEGIN
namespace {

using namespace dw;

// A run of taps whose buffer offsets are consecutive: tap m (0 ≤ m < cnt ≤ L) reads src[o + base + m]
// with weight w[w0 + m·ws]. All taps of a kernel row in one sub-plane form one run (split at L).
struct TapRow {
  int64_t base;
  int cnt, w0, ws;
};

void add_taprow(std::vector<TapRow>& rows, int64_t base, int cnt, int w0, int ws, int L) {
  for (int m0 = 0; m0 < cnt; m0 += L) rows.push_back({base + m0, std::min(L, cnt - m0), w0 + m0 * ws, ws});
}

// Geometry of one flat padded plane: (H, W) input placed at padded (p + i, p + j), conv k, stride s.
struct Flat {
  int64_t H, W, Ho, Wo, Q, SR, S, N, NV, size, out_size;
  int k, s, p, L;
  std::vector<int64_t> tap;  // k·k offsets, tap t = u·k + v
  std::vector<TapRow> rows;  // the same taps as runs
};

Flat make_flat(const DwShape& sh, int L) {
  Flat f;
  const int k = sh.k, s = sh.s, p = sh.p;
  f.H = sh.H;
  f.W = sh.W;
  f.k = k;
  f.s = s;
  f.p = p;
  f.L = L;
  f.Ho = sh.Ho;
  f.Wo = sh.Wo;
  f.Q = f.Wo + (k - 1) / s;
  const int64_t rows = s * (f.Ho - 1) + k;
  f.SR = (rows + s - 1) / s;
  f.S = f.SR * f.Q;
  f.N = f.Ho * f.Q;
  f.NV = (f.N + L - 1) / L;
  const int64_t h = (k - 1) / s;
  // Valid outputs read inside their own sub-plane; garbage lanes may run on by up to a vector block
  // past the last one (max tap offset + all blocks + one vector of slack).
  f.size = (s * s - 1) * f.S + h * f.Q + h + f.NV * L + 2 * L;
  f.out_size = f.NV * L + 2 * L;
  f.tap.resize(static_cast<size_t>(k) * k);
  for (int u = 0; u < k; ++u)
    for (int v = 0; v < k; ++v) f.tap[u * k + v] = ((u % s) * s + (v % s)) * f.S + (u / s) * f.Q + v / s;
  for (int u = 0; u < k; ++u)
    for (int cp = 0; cp < s && cp < k; ++cp)
      add_taprow(f.rows, ((u % s) * s + cp) * f.S + (u / s) * f.Q, (k - cp + s - 1) / s, u * k + cp, s, L);
  return f;
}

// Ask for the next plane's rows while this one computes.
template <typename A>
inline void flat_prefetch(const A* src, int64_t sH, int64_t H, int64_t W) {
  constexpr int64_t kLine = 64 / sizeof(A);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; j += kLine) __builtin_prefetch(src + i * sH + j);
}

// Copies plane src (strides sH, sW) into its place in the flat buffer. Writes the same positions for
// every plane, so the zero padding written at allocation stays.
template <typename A>
void flat_pack(const A* __restrict src, int64_t sH, int64_t sW, A* __restrict buf, const Flat& f) {
  constexpr int L = Lanes<A>::L;
  const int s = f.s, p = f.p;
  const int64_t rows = s * (f.Ho - 1) + f.k;
  const int64_t Wn = std::min<int64_t>(f.W, s * f.Q - p);  // input columns any output reads
  for (int64_t i = 0; i < f.H; ++i) {
    const int64_t r = p + i;
    if (r >= rows) break;
    const A* sr = src + i * sH;
    // Column phase 0 sub-plane row (s is 1 or 2: no integer division per row).
    A* row = s == 1 ? buf + r * f.Q : buf + (r & 1) * 2 * f.S + (r >> 1) * f.Q;
    if (s == 1) {
      A* dst = row + p;
      if (sW == 1) {
        for (int64_t j = 0; j < Wn; j += L) store_n<A>(dst + j, load_n<A>(sr + j, Wn - j), Wn - j);
      } else {
        for (int64_t j = 0; j < Wn; ++j) dst[j] = sr[j * sW];
      }
    } else {
      // Input column j sits at padded column p + j: sub-plane (p + j) % 2, index (p + j) / 2.
      A* dst_e = row + (p % 2) * f.S + p / 2;              // j even
      A* dst_o = row + ((p + 1) % 2) * f.S + (p + 1) / 2;  // j odd
      if (sW == 1) {
        for (int64_t j = 0; j < Wn; j += 2 * L) {
          const auto lo = load_n<A>(sr + j, Wn - j);
          const auto hi = load_n<A>(sr + j + L, Wn - j - L);  // nothing when Wn − j − L ≤ 0
          const int64_t n = std::min<int64_t>(2 * L, Wn - j);
          typename Lanes<A>::V e, o;
          split_even_odd<A>(lo, hi, e, o);
          store_n<A>(dst_e + j / 2, e, (n + 1) / 2);
          store_n<A>(dst_o + j / 2, o, n / 2);
        }
      } else {
        for (int64_t j = 0; j < Wn; ++j) (j % 2 ? dst_o : dst_e)[j / 2] = sr[j * sW];
      }
    }
  }
}

// out[o] = init + Σ_runs Σ_m w[w0 + m·ws] · src[o + base + m] for NV vectors of outputs from o = 0:
// one broadcast weight and NV loads + FMAs per tap. (Making the shifted vectors with lane shuffles
// from NV + 1 loads per run instead measured slower on Zen 4, where 512-bit shuffles are costly.)
template <typename A, int NV>
FASTVIT_INLINE void flat_block(const A* __restrict src, const TapRow* __restrict rows, int nrows,
                               const A* __restrict w, A init, A* __restrict out) {
  constexpr int L = Lanes<A>::L;
  using V = typename Vec<A, L>::type;
  V acc[NV];
  for (int b = 0; b < NV; ++b) acc[b] = V{} + init;
  for (int r = 0; r < nrows; ++r) {
    const TapRow tr = rows[r];
    const A* q = src + tr.base;
    const A* wp = w + tr.w0;
    for (int m = 0; m < tr.cnt; ++m) {
      const A wv = wp[m * tr.ws];
      for (int b = 0; b < NV; ++b) acc[b] += wv * vload<A, L>(q + m + b * L);
    }
  }
  for (int b = 0; b < NV; ++b) vstore<A, L>(out + b * L, acc[b]);
}

// Register blocks of up to 16 output vectors with 32 registers, 12 with 16.
constexpr int kFlatMaxNV = kVecRegs >= 32 ? 16 : 12;

// nv output vectors: one register block when they fit, else blocks of kFlatMaxNV (the last one
// overlapping the previous: recomputing a few outputs beats a remainder loop).
template <typename A>
void flat_run(const A* src, const std::vector<TapRow>& rows, const A* w, A init, int64_t nv, A* out) {
  constexpr int L = Lanes<A>::L;
  const int nr = static_cast<int>(rows.size());
  const TapRow* tr = rows.data();
  switch (nv) {
#define DW_FLAT_CASE(NV) \
  case NV:               \
    if constexpr (NV <= kFlatMaxNV) return flat_block<A, NV>(src, tr, nr, w, init, out); \
    break;
    DW_FLAT_CASE(1) DW_FLAT_CASE(2) DW_FLAT_CASE(3) DW_FLAT_CASE(4) DW_FLAT_CASE(5) DW_FLAT_CASE(6)
    DW_FLAT_CASE(7) DW_FLAT_CASE(8) DW_FLAT_CASE(9) DW_FLAT_CASE(10) DW_FLAT_CASE(11) DW_FLAT_CASE(12)
    DW_FLAT_CASE(13) DW_FLAT_CASE(14) DW_FLAT_CASE(15) DW_FLAT_CASE(16)
#undef DW_FLAT_CASE
    default:
      break;
  }
  for (int64_t b0 = 0; b0 < nv; b0 += kFlatMaxNV) {
    const int64_t b = std::min<int64_t>(b0, nv - kFlatMaxNV);
    flat_block<A, kFlatMaxNV>(src + b * L, tr, nr, w, init, out + b * L);
  }
}

// Rows i < Ho, columns j < Wo of the flat out (pitch Q) into y (pitch Wo).
template <typename A>
void flat_unpack(const A* __restrict out, const Flat& f, A* __restrict y) {
  constexpr int L = Lanes<A>::L;
  for (int64_t i = 0; i < f.Ho; ++i)
    for (int64_t j = 0; j < f.Wo; j += L) store_n<A>(y + i * f.Wo + j, vload<A, L>(out + i * f.Q + j), f.Wo - j);
}

template <typename A>
void flat_forward(const DwForwardArgs<A>& args) {
  constexpr int L = Lanes<A>::L;
  const DwShape& sh = args.sh;
  const Flat f = make_flat(sh, L);
  const A* x = args.x;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w, C = sh.C;
  const int64_t kk = static_cast<int64_t>(f.k) * f.k;
  const int64_t n = f.NV * L;
  const int64_t res_off = static_cast<int64_t>(f.p) * f.Q + f.p;  // x[i, j] at flat o + res_off (stride 1)
  at::parallel_for(0, sh.B * sh.C, plane_grain(sh), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(f.size), out(f.out_size);
    for (int64_t plane = begin, b = begin / C, c = begin % C; plane < end; ++plane, c = c + 1 == C ? (++b, 0) : c + 1) {
      if (plane + 1 < end && sW == 1) flat_prefetch(x + (c + 1 == C ? (b + 1) * sB : b * sB + (c + 1) * sC), sH, f.H, f.W);
      flat_pack<A>(x + b * sB + c * sC, sH, sW, buf.data(), f);
      flat_run<A>(buf.data(), f.rows, args.w + c * kk, args.bias ? args.bias[c] : A(0), f.NV, out.data());
      if (args.act != kActNone) activate(out.data(), n, args.act);
      if (args.residual)
        for (int64_t o = 0; o < n; ++o) out[o] += buf[o + res_off];
      flat_unpack<A>(out.data(), f, args.y + plane * f.Ho * f.Wo);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------------
// Copies a rows × cols block (strides sH, sW) to dst (row pitch ld).
template <typename A>
void flat_copy_rows(const A* __restrict src, int64_t sH, int64_t sW, int64_t rows, int64_t cols, A* __restrict dst,
                    int64_t ld) {
  constexpr int L = Lanes<A>::L;
  for (int64_t i = 0; i < rows; ++i) {
    const A* sr = src + i * sH;
    A* dr = dst + i * ld;
    if (sW == 1) {
      for (int64_t j = 0; j < cols; j += L) store_n<A>(dr + j, load_n<A>(sr + j, cols - j), cols - j);
    } else {
      for (int64_t j = 0; j < cols; ++j) dr[j] = sr[j * sW];
    }
  }
}

// dw[t] += Σ_{o < NV·L} g[o] · x[o + tap[t]]: g held in NV registers, one lane-sum per tap.
template <typename A, int L, int NV>
FASTVIT_INLINE void flat_wgrad_block(const A* __restrict g, const A* __restrict x, const int64_t* __restrict tap,
                                     int kk, A* __restrict dw) {
  using V = typename Vec<A, L>::type;
  V gv[NV];
  for (int b = 0; b < NV; ++b) gv[b] = vload<A, L>(g + b * L);
  for (int t = 0; t < kk; ++t) {
    const A* q = x + tap[t];
    V a0 = V{}, a1 = V{};
    for (int b = 0; b + 1 < NV; b += 2) {
      a0 += gv[b] * vload<A, L>(q + b * L);
      a1 += gv[b + 1] * vload<A, L>(q + (b + 1) * L);
    }
    if (NV % 2) a0 += gv[NV - 1] * vload<A, L>(q + (NV - 1) * L);
    dw[t] += hsum<A, L>(a0 + a1);
  }
}

// g in registers: up to 16 vectors with 32 registers, 12 with 16.
constexpr int kWgMaxNV = kVecRegs >= 32 ? 16 : 12;

// dw[t] = Σ_o g[o] · x[o + tap[t]] over nv vectors of g, in blocks of ≤ kWgMaxNV (fixed order).
template <typename A, int L>
void flat_wgrad(const A* g, const A* x, const int64_t* tap, int kk, int64_t nv, A* dw) {
  for (int t = 0; t < kk; ++t) dw[t] = 0;
  for (int64_t b0 = 0; b0 < nv; b0 += kWgMaxNV) {
    const int64_t n = std::min<int64_t>(kWgMaxNV, nv - b0);
    const A* gb = g + b0 * L;
    const A* xb = x + b0 * L;
    switch (n) {
#define DW_WG_CASE(NV) \
  case NV:             \
    if constexpr (NV <= kWgMaxNV) flat_wgrad_block<A, L, NV>(gb, xb, tap, kk, dw); \
    break;
      DW_WG_CASE(1) DW_WG_CASE(2) DW_WG_CASE(3) DW_WG_CASE(4) DW_WG_CASE(5) DW_WG_CASE(6)
      DW_WG_CASE(7) DW_WG_CASE(8) DW_WG_CASE(9) DW_WG_CASE(10) DW_WG_CASE(11) DW_WG_CASE(12)
      DW_WG_CASE(13) DW_WG_CASE(14) DW_WG_CASE(15) DW_WG_CASE(16)
#undef DW_WG_CASE
      default:
        break;
    }
  }
}

// Per-channel tables for dgrad, the adjoint of the flat forward: d buf[m] = Σ_t w[t] · g[m − tap[t]],
// split by the sub-plane the tap lands in (for stride 2 only the taps of matching row/column parity
// reach a sub-plane, so each sub-plane is a stride-1 correlation with its share of the kernel).
struct FlatAdj {
  int nsub;
  int64_t first[4];             // first element of the sub-plane computed (row a_lo · Q)
  int64_t nvec[4];              // vectors computed from there
  std::vector<TapRow> rows[4];  // per sub-plane: its taps, offsets −(u/s·Q + v/s), as runs
};

FlatAdj make_adj(const Flat& f) {
  FlatAdj d;
  const int s = f.s, k = f.k, p = f.p;
  d.nsub = s * s;
  for (int sp = 0; sp < d.nsub; ++sp) {
    const int rp = sp / s, cp = sp % s;
    for (int u = rp; u < k; u += s) {
      // v = vmax, vmax − s, …, cp: offsets −(u/s)·Q − v/s ascending, weights walked backwards.
      if (cp >= k) break;
      const int vmax = cp + (k - 1 - cp) / s * s;
      const int cnt = (k - 1 - cp) / s + 1;
      add_taprow(d.rows[sp], -((u / s) * f.Q + vmax / s), cnt, u * k + vmax, -s, f.L);
    }
    // Padded rows r = s·a + rp that hold input (p ≤ r < p + H) and that the forward reads (< rows).
    const int64_t rows = s * (f.Ho - 1) + k;
    const int64_t r_hi = std::min<int64_t>(p + f.H, rows);
    const int64_t a_lo = (p - rp + s - 1) / s;
    const int64_t a_hi = r_hi - 1 - rp < 0 ? 0 : (r_hi - 1 - rp) / s + 1;
    d.first[sp] = a_lo * f.Q;
    d.nvec[sp] = a_hi > a_lo ? ((a_hi - a_lo) * f.Q + f.L - 1) / f.L : 0;
  }
  return d;
}

template <typename A>
void flat_backward(const DwBackwardArgs<A>& args) {
  constexpr int L = Lanes<A>::L;
  const DwShape& sh = args.sh;
  const Flat f = make_flat(sh, L);
  const FlatAdj d = make_adj(f);
  const A* x = args.x;
  const A* gp = args.dy;
  const int64_t sB = args.xs.b, sC = args.xs.c, sH = args.xs.h, sW = args.xs.w;
  const int64_t gB = args.gs.b, gC = args.gs.c, gH = args.gs.h, gW = args.gs.w, C = sh.C;
  const int k = f.k, s = f.s, p = f.p, act = args.act;
  const int kk = k * k;
  const int64_t n = f.NV * L;
  const int64_t h = (k - 1) / s;
  const int64_t F = h * f.Q + h + L;  // zeros in front of g: dgrad reads g[m − tap]
  A* dx = args.dx;
  A* dw_part = args.dw_part;
  const bool need_x = act != kActNone || dw_part != nullptr;
  const int64_t rows = s * (f.Ho - 1) + k;
  const int64_t Wn = std::min<int64_t>(f.W, s * f.Q - p);
  at::parallel_for(0, sh.B * sh.C, plane_grain(sh), [&](int64_t begin, int64_t end) {
    std::vector<A> xbuf(need_x ? f.size : 0), gstore(F + n + f.size + 2 * L),
        pre(act != kActNone ? f.out_size : 0), dbuf(dx ? f.size : 0);
    A* g = gstore.data() + F;  // rows i < Ho at pitch Q; columns ≥ Wo and everything past stay zero
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const A* wc = args.w + c * kk;
      const A* dy = gp + b * gB + c * gC;
      if (plane + 1 < end) {
        const int64_t nb = (plane + 1) / C, nc = (plane + 1) % C;
        if (need_x && sW == 1) flat_prefetch(x + nb * sB + nc * sC, sH, f.H, f.W);
        if (gW == 1) flat_prefetch(gp + nb * gB + nc * gC, gH, f.Ho, f.Wo);
      }
      if (need_x) flat_pack<A>(x + b * sB + c * sC, sH, sW, xbuf.data(), f);
      flat_copy_rows<A>(dy, gH, gW, f.Ho, f.Wo, g, f.Q);
      if (act != kActNone) {
        flat_run<A>(xbuf.data(), f.rows, wc, args.bias ? args.bias[c] : A(0), f.NV, pre.data());
        act_backward(pre.data(), g, n, act);  // g's zero lanes stay zero
      }
      {
        using V = typename Vec<A, L>::type;
        V acc = V{};
        for (int64_t o = 0; o < n; o += L) acc += vload<A, L>(g + o);
        args.db_part[plane] = hsum<A, L>(acc);
      }
      if (dw_part != nullptr) flat_wgrad<A, L>(g, xbuf.data(), f.tap.data(), kk, f.NV, dw_part + plane * kk);
      if (dx == nullptr) continue;
      for (int sp = 0; sp < d.nsub; ++sp)
        if (d.nvec[sp] > 0) flat_run<A>(g + d.first[sp], d.rows[sp], wc, A(0), d.nvec[sp], dbuf.data() + sp * f.S + d.first[sp]);
      // dx[i, j] = dbuf at padded (p + i, p + j); inputs no output reads get 0.
      A* dxp = dx + plane * f.H * f.W;
      for (int64_t i = 0; i < f.H; ++i) {
        A* dr = dxp + i * f.W;
        const int64_t r = p + i;
        if (r >= rows) {
          std::fill(dr, dr + f.W, A(0));
          continue;
        }
        const A* row = s == 1 ? dbuf.data() + r * f.Q : dbuf.data() + (r & 1) * 2 * f.S + (r >> 1) * f.Q;
        if (s == 1) {
          const A* sr = row + p;
          if (args.residual) {
            const A* yr = dy + i * gH;
            for (int64_t j = 0; j < f.W; ++j) dr[j] = sr[j] + yr[j * gW];
          } else {
            for (int64_t j = 0; j < f.W; j += L) store_n<A>(dr + j, vload<A, L>(sr + j), f.W - j);
          }
        } else {
          const A* se = row + (p % 2) * f.S + p / 2;
          const A* so = row + ((p + 1) % 2) * f.S + (p + 1) / 2;
          for (int64_t j = 0; j < f.W; j += 2 * L) {
            typename Lanes<A>::V lo, hi;
            interleave<A>(vload<A, L>(se + j / 2), vload<A, L>(so + j / 2), lo, hi);
            const int64_t nn = std::max<int64_t>(0, std::min<int64_t>(2 * L, Wn - j));
            store_n<A>(dr + j, lo, nn);
            if (nn > L) store_n<A>(dr + j + L, hi, nn - L);
          }
          for (int64_t j = Wn; j < f.W; ++j) dr[j] = 0;
        }
      }
    }
  });
}

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(dwconv_flat_forward.of<float>(), &flat_forward<float>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_flat_forward.of<double>(), &flat_forward<double>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_flat_backward.of<float>(), &flat_backward<float>);
FASTVIT_REGISTER_CPU_KERNEL(dwconv_flat_backward.of<double>(), &flat_backward<double>);

FASTVIT_ISA_END
