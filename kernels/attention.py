"""Downsampled attention (SPEC §1.3), flash-style forward and backward with an optional gate.

``O = softmax(scale · q kᵀ) v``; with a gate, ``out = SiLU(O) ⊙ gate``. q, gate, out, dq, dgate
are (B, h, N, d)-indexed with arbitrary strides (channels-first maps, CvT tokens, plain BHND);
k, v, dk, dv (B, h, M, d) likewise. One program owns a tile of queries and loops over K/V tiles
(online softmax in fp32, exp2 with scale·log2(e) folded into (q·k − max)), so M is unbounded and
d is masked up to the next power of two (16, 20, 24, 40, ... need no padding in memory).
The backward recomputes P from the saved base-2 row max and log-sum (and, with a gate, the
pre-gate O from P), writes dq
directly and per-program fp32 partials of dk, dv (summed afterwards: deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from fastvit_ops._availability import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no TF32), as eager matmul does by default.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _kv_tile(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d, mask_d, IEEE: tl.constexpr,
             ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Key/value tile ``start`` (zeros past M) and the raw logits q·kᵀ against it:
    (offs_m, mask_m, mask_kv, k, v, s). Shared by the forward and the backward's recompute."""
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask_kv = mask_m[:, None] & mask_d[None, :]
    k = tl.load(k_base + offs_m[:, None] * skm + offs_d[None, :] * skd, mask=mask_kv, other=0.0)
    v = tl.load(v_base + offs_m[:, None] * svm + offs_d[None, :] * svd, mask=mask_kv, other=0.0)
    return offs_m, mask_m, mask_kv, k, v, _mm(q, tl.trans(k), IEEE).to(ACC)


@triton.jit
def _attn_fwd_kernel(Q, K, V, G, O, LSE,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                     sgb, sgh, sgn, sgd, sob, soh, son, sod,
                     H, N, M, D, qk_scale,
                     HAS_GATE: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_q = mask_n[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_q, other=0.0)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start in range(0, M, BLOCK_M):
        # Raw dot products; the scale multiplies (s − max), so large logits keep their precision.
        _, mask_m, _, _, v, s = _kv_tile(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d, mask_d,
                                         IEEE, ACC, BLOCK_M)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)
        p = tl.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE).to(ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    if HAS_GATE:
        g = tl.load(G + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd,
                    mask=mask_q, other=0.0).to(ACC)
        acc = acc / (1.0 + tl.exp(-acc)) * g
    tl.store(O + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=mask_q)
    # Max and log-sum kept apart: their sum would round at the logits' magnitude.
    tl.store(LSE + (bh * N + offs_n) * 2, m_i, mask=mask_n)
    tl.store(LSE + (bh * N + offs_n) * 2 + 1, tl.log2(l_i), mask=mask_n)


@triton.jit
def _kv_tile_probs(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d, mask_d, mask_n, row_max,
                   row_log, qk_scale, IEEE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """The backward's view of key tile ``start``: (offs_m, mask_kv, k, v, P), P recomputed from
    the forward's saved base-2 row max and log-sum (0 outside the valid queries and keys)."""
    offs_m, mask_m, mask_kv, k, v, s = _kv_tile(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d,
                                                 mask_d, IEEE, ACC, BLOCK_M)
    p = tl.exp2(tl.minimum((s - row_max[:, None]) * qk_scale - row_log[:, None], 0.0))
    p = tl.where(mask_m[None, :] & mask_n[:, None], p, 0.0)
    return offs_m, mask_kv, k, v, p


@triton.jit
def _attn_bwd_kernel(DO, Q, K, V, G, LSE, DQ, DG, DKP, DVP,
                     sdb, sdh, sdn, sdd, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                     svb, svh, svm, svd, sgb, sgh, sgn, sgd,
                     sqgb, sqgh, sqgn, sqgd, sggb, sggh, sggn, sggd,
                     H, N, M, D, qk_scale, scale, BH, TILES_PER_PROG,
                     HAS_GATE: tl.constexpr, SINGLE_M: tl.constexpr, IEEE: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # This program's own fp32 partial slice of dK, dV: (M, D) contiguous.
    part = (chunk * BH + bh) * M * D
    for t in range(0, TILES_PER_PROG):
        offs_n = (chunk * TILES_PER_PROG + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_q = mask_n[:, None] & mask_d[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_q, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd,
                     mask=mask_q, other=0.0).to(ACC)
        row_max = tl.load(LSE + (bh * N + offs_n) * 2, mask=mask_n, other=0.0)
        row_log = tl.load(LSE + (bh * N + offs_n) * 2 + 1, mask=mask_n, other=0.0)
        if HAS_GATE:
            # Pass 1: the pre-gate output O, which the gate derivative needs.
            o = tl.zeros((BLOCK_N, BLOCK_D), ACC)
            for start in range(0, M, BLOCK_M):
                offs_m, mask_kv, k, v, p = _kv_tile_probs(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d,
                                                          mask_d, mask_n, row_max, row_log, qk_scale,
                                                          IEEE, ACC, BLOCK_M)
                o += _mm(p.to(v.dtype), v, IEEE).to(ACC)
            g = tl.load(G + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd,
                        mask=mask_q, other=0.0).to(ACC)
            sg = 1.0 / (1.0 + tl.exp(-o))
            tl.store(DG + b * sggb + h * sggh + offs_n[:, None] * sggn + offs_d[None, :] * sggd,
                     (do * o * sg).to(DG.dtype.element_ty), mask=mask_q)
            do = do * g * sg * (1.0 + o * (1.0 - sg))
        do_in = do.to(q.dtype)
        # D = Σ_j P ⊙ dP, as eager's softmax backward forms it (not rowsum(dO ⊙ O), equal in exact
        # arithmetic): built from the same rounded dP that dS subtracts it from, so with a
        # near-one-hot P (large logits) dP's rounding cancels instead of doubling dQ's error. One
        # key tile: formed in pass 2 itself; more: one extra sweep over the key tiles.
        delta = tl.zeros((BLOCK_N,), ACC)
        if not SINGLE_M:
            for start in range(0, M, BLOCK_M):
                offs_m, mask_kv, k, v, p = _kv_tile_probs(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d,
                                                          mask_d, mask_n, row_max, row_log, qk_scale,
                                                          IEEE, ACC, BLOCK_M)
                dp = _mm(do_in, tl.trans(v), IEEE).to(ACC)
                delta += tl.sum(p * dp, 1)
        dq = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        # Pass 2: dS = P ⊙ (dO Vᵀ − D); dq += dS K; this tile's dK += dSᵀ Q, dV += Pᵀ dO.
        for start in range(0, M, BLOCK_M):
            offs_m, mask_kv, k, v, p = _kv_tile_probs(q, k_base, v_base, skm, skd, svm, svd, start, M, offs_d,
                                                      mask_d, mask_n, row_max, row_log, qk_scale,
                                                      IEEE, ACC, BLOCK_M)
            dp = _mm(do_in, tl.trans(v), IEEE).to(ACC)
            if SINGLE_M:
                delta = tl.sum(p * dp, 1)
            ds = p * (dp - delta[:, None]) * scale
            dq += _mm(ds.to(k.dtype), k, IEEE).to(ACC)
            pidx = part + offs_m[:, None] * D + offs_d[None, :]
            dv_t = _mm(tl.trans(p.to(do_in.dtype)), do_in, IEEE).to(ACC)
            dk_t = _mm(tl.trans(ds.to(q.dtype)), q, IEEE).to(ACC)
            tl.store(DVP + pidx, tl.load(DVP + pidx, mask=mask_kv, other=0.0) + dv_t, mask=mask_kv)
            tl.store(DKP + pidx, tl.load(DKP + pidx, mask=mask_kv, other=0.0) + dk_t, mask=mask_kv)
        tl.store(DQ + b * sqgb + h * sqgh + offs_n[:, None] * sqgn + offs_d[None, :] * sqgd,
                 dq.to(DQ.dtype.element_ty), mask=mask_q)


def _blocks(n: int, m: int, d: int):
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        # Small tiles keep the interpreter cheap and still exercise the loops over N and M.
        return 32, max(16, min(32, triton.next_power_of_2(m))), block_d
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n = 64 if block_d <= 64 else 32
    return block_n, block_m, block_d


def _flags(q):
    f64 = q.dtype == torch.float64
    return dict(IEEE=q.dtype in (torch.float32, torch.float64), ACC=tl.float64 if f64 else tl.float32)


def attention_forward(q, k, v, gate, out, lse, scale: float) -> None:
    """Write ``out`` (B, h, N, d) and ``lse`` (B, h, N, 2 contiguous): per query the max of the raw
    dot products and log2 Σ 2^((q·k − max)·scale·log2 e) (the backward's softmax statistics)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    if out.numel() == 0:
        return
    bn, bm, bd = _blocks(N, M, D)
    g = gate if gate is not None else q
    grid = (triton.cdiv(N, bn), B * H)
    _attn_fwd_kernel[grid](q, k, v, g, out, lse, *q.stride(), *k.stride(), *v.stride(), *g.stride(),
                           *out.stride(), H, N, M, D, scale * LOG2E, HAS_GATE=gate is not None,
                           BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=4, **_flags(q))


def attention_backward(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale: float) -> None:
    """Write dq (and dgate) in place; dk, dv from per-program fp32 partials summed in order."""
    B, H, N, D = q.shape
    M = k.shape[2]
    bn, bm, bd = _blocks(N, M, D)
    tiles = triton.cdiv(N, bn)
    # Enough programs to fill the GPU, few enough that the partials stay small.
    target = 1 if interpreting() else max(1, 264 // max(1, B * H))
    chunks = max(1, min(tiles, target))
    per = triton.cdiv(tiles, chunks)
    chunks = triton.cdiv(tiles, per)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dkp = torch.zeros((chunks, B * H, M, D), dtype=acc, device=q.device)
    dvp = torch.zeros((chunks, B * H, M, D), dtype=acc, device=q.device)
    g = gate if gate is not None else q
    dg = dgate if gate is not None else dq
    _attn_bwd_kernel[(chunks, B * H)](
        grad, q, k, v, g, lse, dq, dg, dkp, dvp, *grad.stride(), *q.stride(), *k.stride(), *v.stride(),
        *g.stride(), *dq.stride(), *dg.stride(), H, N, M, D, scale * LOG2E, scale, B * H, per,
        HAS_GATE=gate is not None, SINGLE_M=M <= bm, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=4,
        **_flags(q))
    dk.copy_(dkp.sum(0).view(B, H, M, D))
    dv.copy_(dvp.sum(0).view(B, H, M, D))


__all__ = ["attention_forward", "attention_backward"]
