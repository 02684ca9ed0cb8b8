// Downsampled attention (FAT's FASA global branch and CvT's attention with a pooled key/value
// sequence), one build per CPU capability: O = softmax_keys(scale · q kᵀ) v, then optionally
// out = SiLU(O) ⊙ gate (FASA's "silu" cross-modulation with gate = SiLU(L0)).
//
// Layout: a tile of NT queries is gathered into a (d × NT) fp32 buffer, query index fastest, so
// every hot loop (attention_math.h) runs along the queries with K/V entries as broadcast scalars
// and vectorizes whatever the head dim (16, 20, 24, 40, ...). Channels-first queries (FASA, stride
// 1 along the pixels) gather as straight copies, token-major ones through register transposes. All
// M keys of a (b, h) fit in one pass (the score tile is M × NT), so the softmax is exact without an
// online rescale; only the row max and log2 of the row sum per query are saved, and the
// backward recomputes P and the pre-gate output O (no N × M matrix, no O in memory): in fp32 from
// the max alone, bitwise the forward's e, Σ and O (same code, same S). Rounding
// (docs/attention.md): blocked sums (attention_math.h KB), P = e^((S − max)·scale), Σ in eight
// partial sums, the backward's Σ_j P·dP in double, O = Y / Σ and SiLU rounded once, 1/Σ per
// query in double.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/attention.h"
#include "cpu/isa/attention_math.h"
#include "cpu/isa/lanes.h"

FASTVIT_ISA_BEGIN
namespace {

using namespace attn;

constexpr double kLog2e = 1.4426950408889634;

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


// Token-major fp32 views (channels contiguous, sd == 1: FASA's channels_last maps) with D a
// multiple of the vector width gather and scatter through register transposes (kLanes tokens ×
// kLanes channels each) instead of one scalar move per element, which cost the channels_last
// forward ~20% at FAT-B0's shapes (AVX-512). Not on the baseline build, which has no transposes.
template <typename T>
bool tokens(const View4<T>& t, int64_t D) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return std::is_same_v<T, float> && t.sd == 1 && D % kLanes == 0;
#else
  (void)t;
  (void)D;
  return false;
#endif
}

// Tile of (b, h) rows n0 … n0 + cnt − 1 in or out, through the transposes where `tok`, element by
// element otherwise.
template <typename T, typename A>
void gather_any(const View4<T>& t, bool tok, int64_t b, int64_t h, int64_t n0, int64_t cnt, int64_t D, A* X) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (tok) {
      const float* base = t.at(b, h);
      for (int64_t e0 = 0; e0 < D; e0 += kLanes)
        for (int64_t p0 = 0; p0 < NT; p0 += kLanes) {
          const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kLanes, cnt - p0)));
          transpose_block<true>([&](int q) { return base + (n0 + p0 + q) * t.sn + e0; }, rows, kLanes,
                                [&](int i) { return X + (e0 + i) * NT + p0; });
        }
      return;
    }
  }
  gather(t.at(b, h), t.sn, t.sd, n0, cnt, D, X);
}

template <typename T, typename A>
void scatter_any(const A* X, int64_t cnt, int64_t D, const View4<T>& t, bool tok, int64_t b, int64_t h, int64_t n0) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (tok) {
      float* base = t.at(b, h);
      for (int64_t e0 = 0; e0 < D; e0 += kLanes)
        for (int64_t p0 = 0; p0 < cnt; p0 += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, cnt - p0));
          transpose_block<false>([&](int i) { return X + (e0 + i) * NT + p0; }, kLanes, n,
                                 [&](int q) { return base + (n0 + p0 + q) * t.sn + e0; });
        }
      return;
    }
  }
  scatter(X, cnt, D, t.at(b, h), t.sn, t.sd, n0);
}

// K or V of one (b, h) → contiguous M × D in the accumulation type, times `mul`.
template <typename T, typename A>
void load_kv(const View4<T>& t, int64_t b, int64_t h, int64_t M, int64_t D, A mul, A* out) {
  const T* base = t.at(b, h);
  for (int64_t j = 0; j < M; ++j)
    for (int64_t e = 0; e < D; ++e) out[j * D + e] = static_cast<A>(base[j * t.sn + e * t.sd]) * mul;
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
void forward(const AttnForwardArgs<T>& g) {
  using A = AttnAcc<T>;
  const View4<T>&Q = g.q, &K = g.k, &V = g.v, &O = g.out, &G = g.gate;
  const bool has_gate = G.p != nullptr;
  A* L = g.lse;
  const double scale = g.scale;
  const int64_t tiles = (g.N + NT - 1) / NT;
  const int64_t M = g.M, D = g.D;
  const bool q_tok = tokens(Q, D), g_tok = has_gate && tokens(G, D), o_tok = tokens(O, D);
  // Work item = (b, h, tile); K/V of the item's head are reloaded only when the head changes.
  at::parallel_for(0, g.B * g.H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kbuf(M * D), vbuf(M * D), X(D * NT), S(M * NT), Y(D * NT), Gt(D * NT), mx(NT), l(NT), inv(NT);
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
      softmax_cols(S.data(), mx.data(), l.data(), static_cast<A>(scale), M);  // e^((S − max)·scale)
      cols_dot(vbuf.data(), S.data(), Y.data(), M, D);
      for (int64_t n = 0; n < NT; ++n) inv[n] = A(1) / l[n];
      if (has_gate) gather_any(G, g_tok, b, h, n0, cnt, D, Gt.data());
      finish(Y.data(), l.data(), inv.data(), has_gate ? Gt.data() : nullptr, D);
      scatter_any(Y.data(), cnt, D, O, o_tok, b, h, n0);
      A* lrow = L + (bh * g.N + n0) * 2;
      for (int64_t n = 0; n < cnt; ++n) {
        lrow[2 * n] = mx[n];
        lrow[2 * n + 1] = std::log2(l[n]);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------------
// Xt (NT × D) ← X (D × NT), the head dim fastest: register transposes of kLanes × kLanes blocks
// where D allows (the scalar strided copy took a quarter of the dK/dV accumulation's time).
void transpose_tile(const float* X, float* Xt, int64_t D) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (D % kLanes == 0) {
    for (int64_t e0 = 0; e0 < D; e0 += kLanes)
      for (int64_t n0 = 0; n0 < NT; n0 += kLanes)
        transpose_block<true>([&](int r) { return X + (e0 + r) * NT + n0; }, kLanes, kLanes,
                              [&](int c) { return Xt + (n0 + c) * D + e0; });
    return;
  }
#endif
  for (int64_t n = 0; n < NT; ++n)
    for (int64_t e = 0; e < D; ++e) Xt[n * D + e] = X[e * NT + n];
}

// R += P · Xᵀ (P: M × NT, X: D × NT): through the transposed tile (scratch Xt) when by_rows.
template <typename A>
void acc_outer(const A* P, const A* X, A* Xt, A* R, int64_t M, int64_t D, bool by_rows) {
  if constexpr (std::is_same_v<A, float>) {
    if (by_rows) {
      transpose_tile(X, Xt, D);
      return outer_acc_t_f32(P, Xt, R, M, D);
    }
  }
  outer_acc(P, X, R, M, D);
}

template <typename T>
void backward(const AttnBackwardArgs<T>& g) {
  using A = AttnAcc<T>;
  const View4<T>&Q = g.q, &K = g.k, &V = g.v, &dO = g.grad, &dQ = g.dq, &dK = g.dk, &dV = g.dv, &G = g.gate,
              &dG = g.dgate;
  const bool has_gate = G.p != nullptr;
  const A* L = g.lse;
  const double scale = g.scale;
  const int64_t M = g.M, D = g.D, BH = g.B * g.H;
  const int64_t tiles = (g.N + NT - 1) / NT;
  // dK, dV reduce over the queries: split each head's tiles into `chunks` with their own fp32
  // partials (deterministic: fixed chunking, summed in order below), enough items to feed all threads.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(tiles, (want + BH - 1) / BH));
  const int64_t per = (tiles + chunks - 1) / chunks;
  // One chunk per head (every FAT-B0 / CvT-13 shape at batch 8): each item writes its head's dK,
  // dV itself from a per-thread buffer, with no shared partials and no second pass.
  const bool direct = chunks == 1;
  // fp32 math with D a multiple of 8: dK and dV accumulate with the head dim in the vector lanes
  // (outer_acc_t on transposed query-side tiles), no horizontal sum per output.
  const bool by_rows = std::is_same_v<A, float> && D % 8 == 0;
  std::vector<A> part(direct ? 0 : static_cast<size_t>(BH * chunks * 2 * M * D), A(0));
  const A qk_scale = static_cast<A>(scale * kLog2e);
  const A sc = static_cast<A>(scale);
  const bool q_tok = tokens(Q, D), o_tok = tokens(dO, D), g_tok = has_gate && tokens(G, D),
             dg_tok = has_gate && tokens(dG, D), dq_tok = tokens(dQ, D);

  at::parallel_for(0, BH * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kraw(M * D), vbuf(M * D), X(D * NT), S(M * NT), dP(M * NT), Y(D * NT),
        dY(D * NT), Gt(D * NT), Dn(NT), mrow(NT), lrow(NT), lsum(NT), inv(NT), finv(NT), own(direct ? 2 * M * D : 0),
        Xt(by_rows ? NT * D : 0);
    int64_t loaded = -1;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / chunks, c = it % chunks, b = bh / g.H, h = bh % g.H;
      if (bh != loaded) {
        load_kv(K, b, h, M, D, A(1), kraw.data());
        load_kv(V, b, h, M, D, A(1), vbuf.data());
        loaded = bh;
      }
      A* pdk = direct ? own.data() : part.data() + (it * 2) * M * D;
      A* pdv = pdk + M * D;
      if (direct) std::fill(own.begin(), own.end(), A(0));
      for (int64_t t = c * per; t < std::min(tiles, (c + 1) * per); ++t) {
        const int64_t n0 = t * NT, cnt = std::min(NT, g.N - n0);
        gather_any(Q, q_tok, b, h, n0, cnt, D, X.data());
        for (int64_t n = 0; n < NT; ++n) {
          mrow[n] = n < cnt ? L[(bh * g.N + n0 + n) * 2] : A(0);
          if constexpr (!std::is_same_v<A, float>) lrow[n] = n < cnt ? L[(bh * g.N + n0 + n) * 2 + 1] : A(0);
        }
        rows_dot(kraw.data(), X.data(), S.data(), M, D);
        if constexpr (std::is_same_v<A, float>) {
          // The forward's e, Σ and pre-gate O, bitwise (the same code from the same S and saved
          // max; the saved log2 Σ is not used: its fp32 rounding is ~3 ulp of Σ, and P or O built
          // from it measured 2.4-4.5x eager's error in outliers), then P = e · (1/Σ in double).
          exp_cols_f32(S.data(), mrow.data(), lsum.data(), static_cast<A>(scale), M);  // S ← e, Σ
          for (int64_t n = 0; n < NT; ++n) inv[n] = n < cnt ? static_cast<A>(1.0 / double(lsum[n])) : A(0);
          if (has_gate) {
            cols_dot(vbuf.data(), S.data(), Y.data(), M, D);
            for (int64_t n = 0; n < NT; ++n) finv[n] = A(1) / lsum[n];  // as the forward's finish
            finish(Y.data(), lsum.data(), finv.data(), nullptr, D);     // Y ← O (pre-gate)
          }
          scale_cols_f32(S.data(), inv.data(), M);                       // S ← P
        } else {
          probs_from_lse(S.data(), mrow.data(), lrow.data(), qk_scale, M);  // S ← P
          if (has_gate) cols_dot(vbuf.data(), S.data(), Y.data(), M, D);    // Y ← O (pre-gate)
        }
        gather_any(dO, o_tok, b, h, n0, cnt, D, dY.data());
        if (has_gate) {
          // out = SiLU(O)·gate: d gate = dout·SiLU(O); dO = dout·gate·SiLU'(O).
          gather_any(G, g_tok, b, h, n0, cnt, D, Gt.data());
          gate_bwd(Y.data(), Gt.data(), dY.data(), D * NT);
          scatter_any(Gt.data(), cnt, D, dG, dg_tok, b, h, n0);
        }
        acc_outer(S.data(), dY.data(), Xt.data(), pdv, M, D, by_rows);  // dV += Pᵀ dO
        rows_dot(vbuf.data(), dY.data(), dP.data(), M, D);      // dP = dO Vᵀ
        pdot(S.data(), dP.data(), Dn.data(), M);                // Dn = Σ_j P ⊙ dP
        dscores(S.data(), dP.data(), Dn.data(), sc, M);         // dP ← scale · P ⊙ (dP − D)
        acc_outer(dP.data(), X.data(), Xt.data(), pdk, M, D, by_rows);  // dK += dSᵀ Q
        cols_dot(kraw.data(), dP.data(), Y.data(), M, D);       // dQ = dS K
        scatter_any(Y.data(), cnt, D, dQ, dq_tok, b, h, n0);
      }
      if (direct) {
        T* kd = dK.at(b, h);
        T* vd = dV.at(b, h);
        for (int64_t j = 0; j < M; ++j)
          for (int64_t e = 0; e < D; ++e) {
            kd[j * dK.sn + e * dK.sd] = static_cast<T>(pdk[j * D + e]);
            vd[j * dV.sn + e * dV.sd] = static_cast<T>(pdv[j * D + e]);
          }
      }
    }
  });
  if (direct) return;
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

}  // namespace

FASTVIT_REGISTER_CPU_KERNEL(attention_forward.of<float>(), &forward<float>);
FASTVIT_REGISTER_CPU_KERNEL(attention_forward.of<double>(), &forward<double>);
FASTVIT_REGISTER_CPU_KERNEL(attention_forward.of<c10::Half>(), &forward<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(attention_forward.of<c10::BFloat16>(), &forward<c10::BFloat16>);
FASTVIT_REGISTER_CPU_KERNEL(attention_backward.of<float>(), &backward<float>);
FASTVIT_REGISTER_CPU_KERNEL(attention_backward.of<double>(), &backward<double>);
FASTVIT_REGISTER_CPU_KERNEL(attention_backward.of<c10::Half>(), &backward<c10::Half>);
FASTVIT_REGISTER_CPU_KERNEL(attention_backward.of<c10::BFloat16>(), &backward<c10::BFloat16>);

FASTVIT_ISA_END
