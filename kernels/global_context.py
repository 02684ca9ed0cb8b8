"""FCViT grouped token-global similarity with normalization (FCViT's global context): forward and backward.

The algorithm and its derivation are in ``fastvit_ops/ops/global_context.py``. Every kernel runs
on a (sample, token block) grid and loops over the G groups, loading a (d, BLOCK_N) tile of x per
group; math in fp32 (fp64 for fp64 inputs). Cross-block sums go through small per-block partial
buffers (no atomics: deterministic), reduced by the next kernel or by torch.

* forward: ``_fwd_sim_kernel`` writes D = S − T̄ (B, G, N) and per-block shifted sums;
  ``_fwd_apply_kernel`` reduces them to (mean, σ) and writes ``[x] + S'·c`` or ``S'``.
* backward: ``_bwd_reduce_kernel`` writes Ŝ, dS' and per-block channel/group sums;
  ``_bwd_apply_kernel`` writes ``dx = [dy] + gs·(a1·dS' + a0 + a2·Ŝ) + bias``.
"""
import torch
import triton
import triton.language as tl

from fastvit_ops import _availability
from fastvit_ops.ops.global_context import group_offsets


@triton.jit
def _similarity_tile(x_ptr, g_ptr, off_ptr, b, gamma, offs_n, mask_n, C, N, G, d, s,
                     BLOCK_D: tl.constexpr, F64: tl.constexpr):
    """D[γ, offs_n] = s·Σ_e (x − g)·g + (T_γ − T̄) for one group (the offsets T_γ − T̄, (B, G),
    from ops/global_context.py group_offsets); also x − g (masked to 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    ch = gamma * d + offs_d
    gg = tl.load(g_ptr + b * C + ch, mask=mask_d, other=0.0)
    rows = (b * C + ch).to(tl.int64) * N
    mask = mask_d[:, None] & mask_n[None, :]
    xt = tl.load(x_ptr + rows[:, None] + offs_n[None, :], mask=mask, other=0.0)
    if F64:
        xt = xt.to(tl.float64)
    else:
        xt = xt.to(tl.float32)
    xc = tl.where(mask, xt - gg[:, None], 0.0)
    dval = s * tl.sum(xc * gg[:, None], 0) + tl.load(off_ptr + b * G + gamma)
    return dval, xc, xt, gg, rows, mask


@triton.jit
def _fwd_sim_kernel(x_ptr, g_ptr, off_ptr, dbuf_ptr, part_ptr, C, N, G, d, s, nblk,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, F64: tl.constexpr):
    b = tl.program_id(0) // nblk  # a 1-D grid over (sample, token block): no 65,535 cap on either
    blk = tl.program_id(0) % nblk
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cnt_t = tl.sum(mask_n.to(tl.int32), 0).to(tl.float64 if F64 else tl.float32)
    # This block's (count, mean, M2 = Σ(D − mean)²) over its tokens of every group: each tile
    # two-pass in registers (shifted by its first value: exact for constant input), merged into
    # the running moments exactly (Chan et al.). No one-pass Σ D² − (Σ D)²/n cancellation.
    cnt = cnt_t * 0.0
    mean = cnt_t * 0.0
    m2 = cnt_t * 0.0
    for gamma in range(G):
        dval, _xc, _xt, _gg, _rows, _m = _similarity_tile(x_ptr, g_ptr, off_ptr, b, gamma, offs_n, mask_n,
                                                          C, N, G, d, s, BLOCK_D, F64)
        tl.store(dbuf_ptr + (b * G + gamma).to(tl.int64) * N + offs_n, dval, mask=mask_n)
        k = tl.sum(tl.where(offs_n == blk * BLOCK_N, dval, 0.0), 0)
        t = tl.where(mask_n, dval - k, 0.0)
        mt = tl.sum(t, 0) / cnt_t
        e = tl.where(mask_n, t - mt, 0.0)
        m2t = tl.sum(e * e, 0)
        mt = k + mt
        tot = cnt + cnt_t
        delta = mt - mean
        mean = mean + delta * (cnt_t / tot)
        m2 = m2 + m2t + delta * delta * (cnt * cnt_t / tot)
        cnt = tot
    base = (b * nblk + blk) * 3
    tl.store(part_ptr + base, cnt)
    tl.store(part_ptr + base + 1, mean)
    tl.store(part_ptr + base + 2, m2)


@triton.jit
def _fwd_apply_kernel(x_ptr, dbuf_ptr, part_ptr, c_ptr, alpha_ptr, beta_ptr, out_ptr, stats_ptr,
                      C, N, G, d, nblk, eps, HAS_C: tl.constexpr, RESIDUAL: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                      F64: tl.constexpr):
    b = tl.program_id(0) // nblk  # a 1-D grid over (sample, token block): no 65,535 cap on either
    blk = tl.program_id(0) % nblk
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < nblk
    pbase = (b * nblk + offs_p) * 3
    # Merge the blocks' moments exactly, without a shift: D is centred.
    cnt_p = tl.load(part_ptr + pbase, mask=pmask, other=0.0)
    mean_p = tl.load(part_ptr + pbase + 1, mask=pmask, other=0.0)
    m2_p = tl.load(part_ptr + pbase + 2, mask=pmask, other=0.0)
    n = G * N
    um = tl.sum(cnt_p * mean_p, 0) / n
    # One correction pass: equal block means (a constant input) give exactly that mean, so σ = 0.
    um = um + tl.sum(tl.where(pmask, cnt_p * (mean_p - um), 0.0), 0) / n
    e = tl.where(pmask, mean_p - um, 0.0)
    var = (tl.sum(m2_p, 0) + tl.sum(cnt_p * e * e, 0)) / (n - 1)  # NaN (n = 1) like torch.std
    mean = um
    sigma = tl.sqrt(var)
    r = 1.0 / (sigma + eps)
    if blk == 0:
        tl.store(stats_ptr + 2 * b, mean)
        tl.store(stats_ptr + 2 * b + 1, sigma)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    for gamma in range(G):
        dval = tl.load(dbuf_ptr + (b * G + gamma).to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
        sp = (dval - mean) * (tl.load(alpha_ptr + gamma) * r) + tl.load(beta_ptr + gamma)
        if HAS_C:
            ch = gamma * d + offs_d
            cc = tl.load(c_ptr + b * C + ch, mask=mask_d, other=0.0)
            rows = (b * C + ch).to(tl.int64) * N
            mask = mask_d[:, None] & mask_n[None, :]
            y = cc[:, None] * sp[None, :]
            if RESIDUAL:
                xt = tl.load(x_ptr + rows[:, None] + offs_n[None, :], mask=mask, other=0.0)
                if F64:
                    y += xt.to(tl.float64)
                else:
                    y += xt.to(tl.float32)
            tl.store(out_ptr + rows[:, None] + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(out_ptr + (b * G + gamma).to(tl.int64) * N + offs_n,
                     sp.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _bwd_reduce_kernel(grad_ptr, x_ptr, g_ptr, off_ptr, c_ptr, alpha_ptr, beta_ptr, stats_ptr, shat_ptr,
                       dsp_ptr, pchan_ptr, pgrp_ptr, C, N, G, d, s, nblk, eps,
                       HAS_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       F64: tl.constexpr):
    b = tl.program_id(0) // nblk  # a 1-D grid over (sample, token block): no 65,535 cap on either
    blk = tl.program_id(0) % nblk
    mean = tl.load(stats_ptr + 2 * b)
    r = 1.0 / (tl.load(stats_ptr + 2 * b + 1) + eps)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    cbase = (b * nblk + blk).to(tl.int64) * 3 * C
    gbase = (b * nblk + blk) * 3 * G
    for gamma in range(G):
        dval, xc, _xt, _gg, rows, mask = _similarity_tile(x_ptr, g_ptr, off_ptr, b, gamma, offs_n, mask_n,
                                                          C, N, G, d, s, BLOCK_D, F64)
        shat = tl.where(mask_n, (dval - mean) * r, 0.0)
        ch = gamma * d + offs_d
        if HAS_C:
            dy = tl.load(grad_ptr + rows[:, None] + offs_n[None, :], mask=mask, other=0.0)
            if F64:
                dy = dy.to(tl.float64)
            else:
                dy = dy.to(tl.float32)
            cc = tl.load(c_ptr + b * C + ch, mask=mask_d, other=0.0)
            dsp = tl.sum(dy * cc[:, None], 0)
            dc = tl.load(alpha_ptr + gamma) * tl.sum(dy * shat[None, :], 1) + \
                tl.load(beta_ptr + gamma) * tl.sum(dy, 1)
            tl.store(pchan_ptr + cbase + 2 * C + ch, dc, mask=mask_d)
        else:
            dsp = tl.load(grad_ptr + (b * G + gamma).to(tl.int64) * N + offs_n, mask=mask_n,
                          other=0.0)
            if F64:
                dsp = dsp.to(tl.float64)
            else:
                dsp = dsp.to(tl.float32)
        moff = (b * G + gamma).to(tl.int64) * N + offs_n
        tl.store(shat_ptr + moff, shat, mask=mask_n)
        tl.store(dsp_ptr + moff, dsp, mask=mask_n)
        tl.store(pchan_ptr + cbase + ch, tl.sum(xc * dsp[None, :], 1), mask=mask_d)
        tl.store(pchan_ptr + cbase + C + ch, tl.sum(xc * shat[None, :], 1), mask=mask_d)
        tl.store(pgrp_ptr + gbase + gamma, tl.sum(dsp, 0))
        tl.store(pgrp_ptr + gbase + G + gamma, tl.sum(dsp * shat, 0))
        tl.store(pgrp_ptr + gbase + 2 * G + gamma, tl.sum(shat, 0))


@triton.jit
def _bwd_apply_kernel(grad_ptr, shat_ptr, dsp_ptr, coef_ptr, gs_ptr, bias_ptr, dx_ptr, C, N, G, d,
                      HAS_DY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      F64: tl.constexpr):
    nblk = tl.cdiv(N, BLOCK_N)
    b = tl.program_id(0) // nblk
    blk = tl.program_id(0) % nblk
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    for gamma in range(G):
        moff = (b * G + gamma).to(tl.int64) * N + offs_n
        shat = tl.load(shat_ptr + moff, mask=mask_n, other=0.0)
        dsp = tl.load(dsp_ptr + moff, mask=mask_n, other=0.0)
        cb = (b * G + gamma) * 3
        t = tl.load(coef_ptr + cb) * dsp + tl.load(coef_ptr + cb + 1) + tl.load(coef_ptr + cb + 2) * shat
        ch = gamma * d + offs_d
        gs = tl.load(gs_ptr + b * C + ch, mask=mask_d, other=0.0)
        bias = tl.load(bias_ptr + b * C + ch, mask=mask_d, other=0.0)
        rows = (b * C + ch).to(tl.int64) * N
        mask = mask_d[:, None] & mask_n[None, :]
        y = gs[:, None] * t[None, :] + bias[:, None]
        if HAS_DY:
            dy = tl.load(grad_ptr + rows[:, None] + offs_n[None, :], mask=mask, other=0.0)
            if F64:
                y += dy.to(tl.float64)
            else:
                y += dy.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] + offs_n[None, :], y.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(d: int, N: int, gpu: bool = None):
    """(BLOCK_D, BLOCK_N); ``gpu=False`` (default under the interpreter): one cheap config."""
    gpu = not _availability.interpreting() if gpu is None else gpu
    block_d = triton.next_power_of_2(max(d, 1))
    if not gpu:
        # One config under the interpreter (every program and op costs ms there).
        block_n = min(triton.next_power_of_2(max(N, 1)), 64)
    else:
        # ≤ 2048 elements per (BLOCK_D, BLOCK_N) tile: at 4096 the backward reduction spilled
        # (120 B/thread at d = 64, sm_90; aot-check).
        block_n = max(16, min(triton.next_power_of_2(max(N, 1)), 2048 // block_d, 256))
    return block_d, block_n


MAX_BLOCKS = 4096  # token blocks per sample: the forward's merge loads them all in one program


def _grid(B: int, nblk: int) -> tuple:
    """One program per (sample, token block), on grid axis 0 (limit 2³¹ − 1); raises
    ``ValueError`` before any launch for maps with more token blocks than the merge can hold."""
    if nblk > MAX_BLOCKS:
        raise ValueError(f"x: {nblk} token blocks per sample exceed the Triton global context's "
                         f"{MAX_BLOCKS} (H·W too large)")
    if B * nblk > 2**31 - 1:
        raise ValueError(f"x: {B * nblk} programs exceed CUDA's grid limit of 2^31 − 1; split the batch")
    return (B * nblk,)


def gc_forward(x, g, c, alpha, beta, groups: int, eps: float, residual: bool):
    """x (B,C,H,W) contiguous; g, c (B,C), alpha, beta (G,) in the accumulation dtype.
    Returns (out, stats): out = [x] + S'·c (B,C,H,W) when c is given, else S' (B,G,H,W)."""
    B, C, H, W = x.shape
    G, N = groups, H * W
    d = C // G
    acc = g.dtype
    out = torch.empty_like(x) if c is not None else torch.empty((B, G, H, W), dtype=x.dtype, device=x.device)
    stats = torch.full((B, 2), float("nan"), dtype=acc, device=x.device)
    if x.numel() == 0 or N == 0:
        return out, stats
    block_d, block_n = _blocks(d, N)
    nblk = triton.cdiv(N, block_n)
    dbuf = torch.empty((B, G, N), dtype=acc, device=x.device)
    part = torch.empty((B, nblk, 3), dtype=acc, device=x.device)
    f64 = acc == torch.float64
    s = d ** -0.5
    off = group_offsets(g.view(B, G, d), s).contiguous()
    _fwd_sim_kernel[_grid(B, nblk)](x, g, off, dbuf, part, C, N, G, d, s, nblk, BLOCK_D=block_d,
                               BLOCK_N=block_n, F64=f64)
    _fwd_apply_kernel[_grid(B, nblk)](x, dbuf, part, c if c is not None else g, alpha, beta, out, stats,
                                 C, N, G, d, nblk, eps, HAS_C=c is not None, RESIDUAL=residual,
                                 BLOCK_D=block_d, BLOCK_N=block_n,
                                 BLOCK_P=triton.next_power_of_2(nblk), F64=f64)
    return out, stats


def gc_backward_reduce(grad, x, g, c, alpha, beta, stats, groups: int, eps: float):
    """Returns Ŝ, dS' (B,G,N) and the sums chan (B,3,C), grp (B,3,G) (see ops/global_context.py)."""
    B, C, H, W = x.shape
    G, N = groups, H * W
    d = C // G
    acc = g.dtype
    shat = torch.empty((B, G, N), dtype=acc, device=x.device)
    dsp = torch.empty((B, G, N), dtype=acc, device=x.device)
    if x.numel() == 0 or N == 0:
        return shat, dsp, x.new_zeros((B, 3, C), dtype=acc), x.new_zeros((B, 3, G), dtype=acc)
    block_d, block_n = _blocks(d, N)
    nblk = triton.cdiv(N, block_n)
    # without c the dc row stays 0 (the kernel does not write it)
    pchan = (torch.empty if c is not None else torch.zeros)((B, nblk, 3, C), dtype=acc,
                                                           device=x.device)
    pgrp = torch.empty((B, nblk, 3, G), dtype=acc, device=x.device)
    off = group_offsets(g.view(B, G, d), d ** -0.5).contiguous()
    _bwd_reduce_kernel[_grid(B, nblk)](grad, x, g, off, c if c is not None else g, alpha, beta, stats, shat,
                                  dsp, pchan, pgrp, C, N, G, d, d ** -0.5, nblk, eps,
                                  HAS_C=c is not None, BLOCK_D=block_d, BLOCK_N=block_n,
                                  F64=acc == torch.float64)
    return shat, dsp, pchan.sum(1), pgrp.sum(1)


def gc_backward_apply(x, grad, shat, dsp, coef, gs, bias):
    """dx = [grad] + gs·(a1·dS' + a0 + a2·Ŝ) + bias, (B,C,H,W) contiguous in x.dtype."""
    B, C, H, W = x.shape
    G, N = shat.shape[1], H * W
    d = C // G
    dx = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    block_d, block_n = _blocks(d, N)
    nblk = triton.cdiv(N, block_n)
    _bwd_apply_kernel[_grid(B, nblk)](grad if grad is not None else x, shat, dsp, coef, gs, bias, dx, C,
                                 N, G, d, HAS_DY=grad is not None, BLOCK_D=block_d,
                                 BLOCK_N=block_n, F64=shat.dtype == torch.float64)
    return dx


__all__ = ["gc_forward", "gc_backward_reduce", "gc_backward_apply"]
