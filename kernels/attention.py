"""Downsampled attention, flash-style forward and backward with an optional gate.

``O = softmax(scale · q kᵀ) v``; with a gate, ``out = SiLU(O) ⊙ gate``. q, gate, out, dq, dgate
are (B, h, N, d)-indexed with arbitrary strides (channels-first maps, CvT tokens, plain BHND);
k, v, dk, dv (B, h, M, d) likewise. d is masked up to the next power of two (16, 20, 24, 40, ...
need no padding in memory). Math in fp32 (fp64 for fp64, without ``tl.dot``, which not every
Triton the package accepts compiles for fp64). Offsets are int64 wherever a product of sizes or
strides can pass 2³¹.

Forward: one program per (head, query tile), looping over key tiles with an online softmax (exp2,
scale·log2(e) folded into ``q·k − max``). It saves per query the raw row max and the base-2
log-sum, kept apart so that large logits lose no precision.

Backward, ``D = Σ_j P ⊙ dP`` (as eager's softmax backward forms it, so that the rounding of dP
cancels in ``dP − D``):
* all keys in one tile (M ≤ BLOCK_M, FAT's 49 pooled keys): one kernel, grid (B·h, SPLIT).
  Program (bh, s) loads K and V once, walks every SPLIT-th query tile, writes dq (and dgate), and
  keeps dK, dV in registers. It writes them once per program into a SPLIT-deep fp32 partial,
  summed in a fixed order afterwards. SPLIT comes from the SM count.
* more keys (CvT): a query-side kernel (pre-gate O and dgate, the gate-modified dO when gated,
  D, then dq), then a key-side kernel, grid (B·h·key tiles, SPLIT), accumulating dK, dV in
  registers over its share of the query tiles.
No atomics: the result is deterministic.
"""
import torch
import triton
import triton.language as tl

from fastvit_ops._availability import interpreting

from .activations import sigmoid_c

LOG2E = 1.4426950408889634
MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, F64: tl.constexpr):
    """a (P, R) @ b (R, Q). fp32: exact fp32 products (no TF32), as eager matmul does by default."""
    if F64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rows(ptr, b, h, sb, sh, offs, s_row, offs_d, s_d, mask):
    """A (rows, BLOCK_D) tile of a (B, h, rows, d)-indexed tensor at any strides, 0 outside ``mask``."""
    return tl.load(ptr + b * sb + h * sh + offs[:, None].to(tl.int64) * s_row + offs_d[None, :] * s_d,
                   mask=mask, other=0.0)


@triton.jit
def _put(ptr, b, h, sb, sh, offs, s_row, offs_d, s_d, val, mask):
    tl.store(ptr + b * sb + h * sh + offs[:, None].to(tl.int64) * s_row + offs_d[None, :] * s_d,
             val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE: tl.constexpr, F64: tl.constexpr,
           ACC: tl.constexpr):
    """P of a (query tile, key tile) pair from the forward's saved row max and base-2 log-sum."""
    s = _mm(q, tl.trans(k), IEEE, F64).to(ACC)
    p = tl.exp2(tl.minimum((s - row_max[:, None]) * qk_scale - row_log[:, None], 0.0))
    return tl.where(mask_n[:, None] & mask_m[None, :], p, 0.0)


@triton.jit
def _tile(pid, n_tiles, H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``pid`` of a (batch·head, tile) grid → (bh, b, h, offsets along L (queries or keys)
    and along D, their masks, the 2-D mask of the tile)."""
    bh = pid // n_tiles
    offs = (pid % n_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs < L
    mask_d = offs_d < D
    return bh, bh // H, bh % H, offs, offs_d, mask, mask_d, mask[:, None] & mask_d[None, :]


@triton.jit
def _span(start, L, mask_d, BLOCK_L: tl.constexpr):
    """Rows start … start + BLOCK_L of L: (offsets, their mask, the 2-D mask with D)."""
    offs = start + tl.arange(0, BLOCK_L)
    mask = offs < L
    return offs, mask, mask[:, None] & mask_d[None, :]


@triton.jit
def _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv):
    return (_rows(K, b, h, skb, skh, offs_m, skm, offs_d, skd, mask_kv),
            _rows(V, b, h, svb, svh, offs_m, svm, offs_d, svd, mask_kv))


@triton.jit
def _row_stats(LSE, bh, N, offs_n, mask_n):
    """The forward's (row max of the raw scores, log2 of the row sum) of queries ``offs_n``."""
    stat = LSE + (bh * N + offs_n) * 2
    return tl.load(stat, mask=mask_n, other=0.0), tl.load(stat + 1, mask=mask_n, other=0.0)


@triton.jit
def _attn_fwd_kernel(Q, K, V, G, O, LSE,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                     sgb, sgh, sgn, sgd, sob, soh, son, sod,
                     H, N, M, D, qk_scale,
                     HAS_GATE: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, b, h, offs_n, offs_d, mask_n, mask_d, mask_q = _tile(tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK_N),
                                                             H, N, D, BLOCK_N, BLOCK_D)
    q = _rows(Q, b, h, sqb, sqh, offs_n, sqn, offs_d, sqd, mask_q)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, M, BLOCK_M):
        offs_m, mask_m, mask_kv = _span(start, M, mask_d, BLOCK_M)
        k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
        # Raw dot products; the scale multiplies (s − max), so large logits keep their precision.
        s = tl.where(mask_m[None, :], _mm(q, tl.trans(k), IEEE, F64).to(ACC), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)
        p = tl.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, F64).to(ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    if HAS_GATE:
        g = _rows(G, b, h, sgb, sgh, offs_n, sgn, offs_d, sgd, mask_q).to(ACC)
        acc = acc / (1.0 + tl.exp(-acc)) * g
    _put(O, b, h, sob, soh, offs_n, son, offs_d, sod, acc, mask_q)
    stat = LSE + (bh * N + offs_n) * 2
    tl.store(stat, m_i, mask=mask_n)
    tl.store(stat + 1, tl.log2(l_i), mask=mask_n)


@triton.jit
def _gate_grads(do, o, g, ACC: tl.constexpr):
    """(dgate, dO before the gate) from dout, the pre-gate O and the gate: out = SiLU(O)·gate."""
    sg, cg = sigmoid_c(o)  # σ and 1 − σ (activations.py)
    return do * o * sg, do * g * sg * (1.0 + o * cg)


@triton.jit
def _attn_bwd_single_kernel(DO, Q, K, V, G, LSE, DQ, DG, DKP, DVP,
                            sdb, sdh, sdn, sdd, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                            svb, svh, svm, svd, sgb, sgh, sgn, sgd,
                            sqgb, sqgh, sqgn, sqgd, sggb, sggh, sggn, sggd,
                            H, N, M, D, qk_scale, scale,
                            HAS_GATE: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """All M keys in one tile: program (bh, s) walks query tiles s, s + SPLIT, ... of head bh."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_m, mask_m, mask_kv = _span(0, M, mask_d, BLOCK_M)
    k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
    dk = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for t in range(s, tl.cdiv(N, BLOCK_N), split):
        offs_n, mask_n, mask_q = _span(t * BLOCK_N, N, mask_d, BLOCK_N)
        q = _rows(Q, b, h, sqb, sqh, offs_n, sqn, offs_d, sqd, mask_q)
        do = _rows(DO, b, h, sdb, sdh, offs_n, sdn, offs_d, sdd, mask_q).to(ACC)
        row_max, row_log = _row_stats(LSE, bh, N, offs_n, mask_n)
        p = _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE, F64, ACC)
        if HAS_GATE:
            o = _mm(p.to(v.dtype), v, IEEE, F64).to(ACC)
            g = _rows(G, b, h, sgb, sgh, offs_n, sgn, offs_d, sgd, mask_q).to(ACC)
            dg, do = _gate_grads(do, o, g, ACC)
            _put(DG, b, h, sggb, sggh, offs_n, sggn, offs_d, sggd, dg, mask_q)
        do_in = do.to(q.dtype)
        dp = _mm(do_in, tl.trans(v), IEEE, F64).to(ACC)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * scale
        _put(DQ, b, h, sqgb, sqgh, offs_n, sqgn, offs_d, sqgd, _mm(ds.to(k.dtype), k, IEEE, F64), mask_q)
        dv += _mm(tl.trans(p.to(do_in.dtype)), do_in, IEEE, F64).to(ACC)
        dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE, F64).to(ACC)
    part = (s.to(tl.int64) * tl.num_programs(0) + bh) * M * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(DKP + part, dk, mask=mask_kv)
    tl.store(DVP + part, dv, mask=mask_kv)


@triton.jit
def _attn_bwd_q_kernel(DO, Q, K, V, G, LSE, DQ, DG, DO2, DELTA,
                       sdb, sdh, sdn, sdd, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                       svb, svh, svm, svd, sgb, sgh, sgn, sgd,
                       sqgb, sqgh, sqgn, sqgd, sggb, sggh, sggn, sggd,
                       H, N, M, D, qk_scale, scale,
                       HAS_GATE: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query side, several key tiles: [pre-gate O → dgate, dO'], D = Σ P ⊙ dP, then dq."""
    bh, b, h, offs_n, offs_d, mask_n, mask_d, mask_q = _tile(tl.program_id(0).to(tl.int64), tl.cdiv(N, BLOCK_N),
                                                             H, N, D, BLOCK_N, BLOCK_D)
    q = _rows(Q, b, h, sqb, sqh, offs_n, sqn, offs_d, sqd, mask_q)
    do = _rows(DO, b, h, sdb, sdh, offs_n, sdn, offs_d, sdd, mask_q).to(ACC)
    row_max, row_log = _row_stats(LSE, bh, N, offs_n, mask_n)
    if HAS_GATE:
        o = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        for start in range(0, M, BLOCK_M):
            offs_m, mask_m, mask_kv = _span(start, M, mask_d, BLOCK_M)
            k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
            p = _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE, F64, ACC)
            o += _mm(p.to(v.dtype), v, IEEE, F64).to(ACC)
        g = _rows(G, b, h, sgb, sgh, offs_n, sgn, offs_d, sgd, mask_q).to(ACC)
        dg, do = _gate_grads(do, o, g, ACC)
        _put(DG, b, h, sggb, sggh, offs_n, sggn, offs_d, sggd, dg, mask_q)
        tl.store(DO2 + (bh * N + offs_n[:, None]) * D + offs_d[None, :], do, mask=mask_q)
    do_in = do.to(q.dtype)
    delta = tl.zeros((BLOCK_N,), ACC)
    for start in range(0, M, BLOCK_M):
        offs_m, mask_m, mask_kv = _span(start, M, mask_d, BLOCK_M)
        k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
        p = _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE, F64, ACC)
        delta += tl.sum(p * _mm(do_in, tl.trans(v), IEEE, F64).to(ACC), 1)
    tl.store(DELTA + bh * N + offs_n, delta, mask=mask_n)
    dq = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(0, M, BLOCK_M):
        offs_m, mask_m, mask_kv = _span(start, M, mask_d, BLOCK_M)
        k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
        p = _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE, F64, ACC)
        dp = _mm(do_in, tl.trans(v), IEEE, F64).to(ACC)
        ds = p * (dp - delta[:, None]) * scale
        dq += _mm(ds.to(k.dtype), k, IEEE, F64).to(ACC)
    _put(DQ, b, h, sqgb, sqgh, offs_n, sqgn, offs_d, sqgd, dq, mask_q)


@triton.jit
def _attn_bwd_kv_kernel(DO, Q, K, V, LSE, DO2, DELTA, DKP, DVP,
                        sdb, sdh, sdn, sdd, sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                        H, N, M, D, qk_scale, scale,
                        HAS_GATE: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key side, several key tiles: program (bh·key tile, s) accumulates dK, dV of its key tile
    over query tiles s, s + SPLIT, ... (dO' from DO2 when gated, D from the query side)."""
    n_kt = tl.cdiv(M, BLOCK_M)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    bh, b, h, offs_m, offs_d, mask_m, mask_d, mask_kv = _tile(tl.program_id(0).to(tl.int64), n_kt, H, M, D,
                                                             BLOCK_M, BLOCK_D)
    k, v = _keys_values(K, V, b, h, skb, skh, skm, skd, svb, svh, svm, svd, offs_m, offs_d, mask_kv)
    dk = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for t in range(s, tl.cdiv(N, BLOCK_N), split):
        offs_n, mask_n, mask_q = _span(t * BLOCK_N, N, mask_d, BLOCK_N)
        q = _rows(Q, b, h, sqb, sqh, offs_n, sqn, offs_d, sqd, mask_q)
        if HAS_GATE:
            do = tl.load(DO2 + (bh * N + offs_n[:, None]) * D + offs_d[None, :], mask=mask_q, other=0.0)
        else:
            do = _rows(DO, b, h, sdb, sdh, offs_n, sdn, offs_d, sdd, mask_q).to(ACC)
        do_in = do.to(q.dtype)
        row_max, row_log = _row_stats(LSE, bh, N, offs_n, mask_n)
        delta = tl.load(DELTA + bh * N + offs_n, mask=mask_n, other=0.0)
        p = _probs(q, k, row_max, row_log, qk_scale, mask_n, mask_m, IEEE, F64, ACC)
        dv += _mm(tl.trans(p.to(do_in.dtype)), do_in, IEEE, F64).to(ACC)
        ds = p * (_mm(do_in, tl.trans(v), IEEE, F64).to(ACC) - delta[:, None]) * scale
        dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE, F64).to(ACC)
    part = ((s.to(tl.int64) * (tl.num_programs(0) // n_kt) + bh) * M + offs_m[:, None].to(tl.int64)) * D + offs_d[None, :]
    tl.store(DKP + part, dk, mask=mask_kv)
    tl.store(DVP + part, dv, mask=mask_kv)


# ---- block sizes, grids, launchers -----------------------------------------------------------------
# (BLOCK_N, BLOCK_M, num_warps, one-key-tile backward allowed) per (fp32?, BLOCK_D, several key
# tiles?), found spill-free for sm_80 and sm_90 by compiling the candidates ahead of time (aot-check):
# IEEE fp32 tl.dot needs far more registers than bf16/fp16, and at d = 64 no one-key-tile backward
# (dK, dV, K, V and a query tile in registers) fits at all: those calls take 32-key tiles instead.
_GPU_BLOCKS = {
    (True, 16, False): (32, 64, 8, True), (True, 16, True): (64, 64, 8, True),
    (True, 32, False): (16, 64, 8, True), (True, 32, True): (64, 32, 8, True),
    (True, 64, False): (32, 32, 8, False), (True, 64, True): (32, 32, 8, False),
    (True, 128, False): (16, 32, 8, False), (True, 128, True): (16, 32, 8, False),
    (False, 16, False): (64, 64, 4, True), (False, 16, True): (64, 64, 8, True),
    (False, 32, False): (64, 64, 4, True), (False, 32, True): (32, 64, 8, True),
    (False, 64, False): (32, 32, 4, False), (False, 64, True): (32, 64, 8, True),
    (False, 128, False): (16, 64, 8, True), (False, 128, True): (32, 64, 8, True),
}


def blocks(n: int, m: int, d: int, dtype: torch.dtype, gpu: bool = None):
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, single) for a call; ``single``: the backward may
    use its one-key-tile kernel (when M ≤ BLOCK_M). ``gpu=False`` (default under the interpreter):
    small tiles that keep it cheap and still exercise the loops over N and M."""
    gpu = not interpreting() if gpu is None else gpu
    block_d = max(16, triton.next_power_of_2(d))
    if dtype == torch.float64:  # gradcheck only; no tl.dot, so small tiles
        return 16, 16, block_d, 4, True
    if not gpu:
        return 32, max(16, min(32, triton.next_power_of_2(m))), block_d, 4, True
    bn, bm, warps, single = _GPU_BLOCKS[(dtype == torch.float32, block_d, m > 64)]
    return bn, max(16, min(bm, triton.next_power_of_2(m))), block_d, warps, single


def bwd_split(bh_tiles: int, q_tiles: int, sm_count: int) -> int:
    """Query-tile split of the backward: about 4 programs per SM in all, at most the query tiles
    and CUDA's 65,535 on grid axis 1."""
    return max(1, min(q_tiles, MAX_GRID_Y, triton.cdiv(4 * sm_count, max(1, bh_tiles))))


def _check_grid(n: int, what: str):
    if n > MAX_GRID_X:
        raise ValueError(f"{what}: {n} programs exceed CUDA's grid limit of 2^31 − 1; split the batch")


def _sm_count(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 2 if interpreting() else 132


def _flags(q):
    f64 = q.dtype == torch.float64
    return dict(IEEE=q.dtype in (torch.float32, torch.float64), F64=f64, ACC=tl.float64 if f64 else tl.float32)


def attention_forward(q, k, v, gate, out, lse, scale: float) -> None:
    """Write ``out`` (B, h, N, d) and ``lse`` (B, h, N, 2 contiguous): per query the max of the raw
    dot products and log2 Σ 2^((q·k − max)·scale·log2 e) (the backward's softmax statistics)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    if out.numel() == 0:
        return
    bn, bm, bd, warps, _ = blocks(N, M, D, q.dtype)
    grid = (B * H * triton.cdiv(N, bn),)
    _check_grid(grid[0], "q")
    g = gate if gate is not None else q
    _attn_fwd_kernel[grid](q, k, v, g, out, lse, *q.stride(), *k.stride(), *v.stride(), *g.stride(),
                           *out.stride(), H, N, M, D, scale * LOG2E, HAS_GATE=gate is not None,
                           BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, **_flags(q))


def attention_backward(grad, q, k, v, gate, lse, dq, dk, dv, dgate, scale: float) -> None:
    """Write dq (and dgate), dk, dv. ``lse`` as written by :func:`attention_forward`."""
    B, H, N, D = q.shape
    M = k.shape[2]
    bn, bm, bd, warps, single = blocks(N, M, D, q.dtype)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_tiles = triton.cdiv(N, bn)
    g = gate if gate is not None else q
    dg = dgate if gate is not None else dq
    strides = (*grad.stride(), *q.stride(), *k.stride(), *v.stride())
    flags = dict(HAS_GATE=gate is not None, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, **_flags(q))
    if single and M <= bm:
        split = bwd_split(B * H, q_tiles, _sm_count(q))
        _check_grid(B * H, "q")
        dkp = torch.empty((split, B * H, M, D), dtype=acc, device=q.device)
        dvp = torch.empty((split, B * H, M, D), dtype=acc, device=q.device)
        _attn_bwd_single_kernel[(B * H, split)](
            grad, q, k, v, g, lse, dq, dg, dkp, dvp, *strides, *g.stride(), *dq.stride(), *dg.stride(),
            H, N, M, D, scale * LOG2E, scale, **flags)
    else:
        k_tiles = triton.cdiv(M, bm)
        split = bwd_split(B * H * k_tiles, q_tiles, _sm_count(q))
        _check_grid(B * H * q_tiles, "q")
        _check_grid(B * H * k_tiles, "k")
        delta = torch.empty((B * H * N,), dtype=acc, device=q.device)
        do2 = torch.empty((B * H * N * D,) if gate is not None else (1,), dtype=acc, device=q.device)
        # fp32 dQ tiles at 8 warps spill (ptxas caps the frame at 80 registers); 4 warps fit.
        q_flags = dict(flags, num_warps=4) if q.dtype == torch.float32 else flags
        _attn_bwd_q_kernel[(B * H * q_tiles,)](
            grad, q, k, v, g, lse, dq, dg, do2, delta, *strides, *g.stride(), *dq.stride(), *dg.stride(),
            H, N, M, D, scale * LOG2E, scale, **q_flags)
        dkp = torch.empty((split, B * H, M, D), dtype=acc, device=q.device)
        dvp = torch.empty((split, B * H, M, D), dtype=acc, device=q.device)
        _attn_bwd_kv_kernel[(B * H * k_tiles, split)](
            grad, q, k, v, lse, do2, delta, dkp, dvp, *strides, H, N, M, D, scale * LOG2E, scale, **flags)
    dk.copy_(dkp.sum(0).view(B, H, M, D))  # fixed-order sum over the split
    dv.copy_(dvp.sum(0).view(B, H, M, D))


__all__ = ["attention_forward", "attention_backward", "blocks", "bwd_split"]
