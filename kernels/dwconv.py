"""Depthwise 2-D convolution (SPEC §1.1): forward with fused epilogue, dgrad, wgrad.

All tensors NCHW contiguous. Forward: y = act(conv(x) + bias) [+ x], act 0 none / 1 SiLU / 2 GELU
(erf). Backward: g = dy · act'(pre) (pre recomputed by the forward kernel in GRAD_MODE), dx = the
transposed conv of g [+ dy], dw/dbias = per-(channel, tile) partial sums written to a buffer and
summed over tiles in a second pass (fixed order, no atomics). Math in fp32 (fp64 for fp64).
"""
import torch
import triton
import triton.language as tl

from fastvit_ops._availability import interpreting


@triton.jit
def _act(y, ACT: tl.constexpr):
    if ACT == 1:
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def _act_grad(y, ACT: tl.constexpr):
    if ACT == 1:
        s = 1.0 / (1.0 + tl.exp(-y))
        d = s * (1.0 + y * (1.0 - s))
    else:
        d = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
    return d


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, out_ptr, C, H, W, Ho, Wo, P,
                   K: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   RESIDUAL: tl.constexpr, GRAD_MODE: tl.constexpr, F64: tl.constexpr,
                   BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """One (b, c) plane × a BH×BW tile of outputs; the K taps of a filter row are one vector axis
    (BK = next power of 2 ≥ K), the K rows a loop. GRAD_MODE stores dy·act'(pre) instead of y."""
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    oh = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    ow = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    omask = (oh < Ho) & (ow < Wo)
    x_base = x_ptr + plane * H * W
    w_base = w_ptr + c * K * K
    if F64:
        acc = tl.zeros((BH, BW), dtype=tl.float64)
    else:
        acc = tl.zeros((BH, BW), dtype=tl.float32)
    kv = tl.arange(0, BK)[None, None, :]  # the taps of one filter row, vectorised
    iw = ow[:, :, None] * S + kv - P
    col_ok = (iw >= 0) & (iw < W) & (kv < K)
    for u in range(K):
        ih = oh[:, :, None] * S + u - P
        m = (ih >= 0) & (ih < H) & col_ok
        xv = tl.load(x_base + ih * W + iw, mask=m, other=0.0).to(acc.dtype)
        wv = tl.load(w_base + u * K + kv, mask=kv < K, other=0.0).to(acc.dtype)
        acc += tl.sum(xv * wv, axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(acc.dtype)
    o_off = plane * Ho * Wo + oh * Wo + ow
    if GRAD_MODE:
        dy = tl.load(dy_ptr + o_off, mask=omask, other=0.0).to(acc.dtype)
        tl.store(out_ptr + o_off, dy * _act_grad(acc, ACT), mask=omask)
    else:
        y = _act(acc, ACT)
        if RESIDUAL:  # stride 1, same size: x[oh, ow]
            y += tl.load(x_base + oh * W + ow, mask=omask, other=0.0).to(acc.dtype)
        tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dw_dgrad_kernel(g_ptr, w_ptr, dy_ptr, dx_ptr, C, H, W, Ho, Wo, P,
                     K: tl.constexpr, S: tl.constexpr, RESIDUAL: tl.constexpr, F64: tl.constexpr,
                     BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """dx[ih, iw] = Σ_{u,v} w[u, v] · g[(ih + P − u) / S, (iw + P − v) / S] where divisible and in range."""
    plane = tl.program_id(0).to(tl.int64)
    c = plane % C
    ih = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    iw = tl.program_id(2) * BW + tl.arange(0, BW)[None, :]
    imask = (ih < H) & (iw < W)
    g_base = g_ptr + plane * Ho * Wo
    w_base = w_ptr + c * K * K
    if F64:
        acc = tl.zeros((BH, BW), dtype=tl.float64)
    else:
        acc = tl.zeros((BH, BW), dtype=tl.float32)
    kv = tl.arange(0, BK)[None, None, :]
    tw = iw[:, :, None] + P - kv
    ow = tw // S
    col_ok = (tw >= 0) & (ow < Wo) & (kv < K) & imask[:, :, None]
    if S == 2:
        col_ok = col_ok & ((tw % 2) == 0)
    for u in range(K):
        th = ih[:, :, None] + P - u
        oh = th // S
        m = (th >= 0) & (oh < Ho) & col_ok
        if S == 2:
            m = m & ((th % 2) == 0)
        gv = tl.load(g_base + oh * Wo + ow, mask=m, other=0.0).to(acc.dtype)
        wv = tl.load(w_base + u * K + kv, mask=kv < K, other=0.0).to(acc.dtype)
        acc += tl.sum(gv * wv, axis=2)
    i_off = plane * H * W + ih * W + iw
    if RESIDUAL:
        acc += tl.load(dy_ptr + i_off, mask=imask, other=0.0).to(acc.dtype)
    tl.store(dx_ptr + i_off, acc.to(dx_ptr.dtype.element_ty), mask=imask)


@triton.jit
def _dw_wgrad_kernel(g_ptr, x_ptr, part_ptr, C, H, W, Ho, Wo, P, n_th, n_tw,
                     K: tl.constexpr, S: tl.constexpr, F64: tl.constexpr,
                     BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """Partial dw (K·K values) and dbias (1) of channel c over one output tile of one sample.

    g is read once per program; part[c, tile, :] is summed over tiles afterwards."""
    c = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    n_tiles = tl.num_programs(1)
    per_b = n_th * n_tw
    b = tile // per_b
    th = (tile % per_b) // n_tw
    tw = tile % n_tw
    plane = b * C + c
    oh = th * BH + tl.arange(0, BH)[:, None]
    ow = tw * BW + tl.arange(0, BW)[None, :]
    omask = (oh < Ho) & (ow < Wo)
    if F64:
        gv = tl.load(g_ptr + plane * Ho * Wo + oh * Wo + ow, mask=omask, other=0.0).to(tl.float64)
    else:
        gv = tl.load(g_ptr + plane * Ho * Wo + oh * Wo + ow, mask=omask, other=0.0).to(tl.float32)
    x_base = x_ptr + plane * H * W
    p_base = part_ptr + (c * n_tiles + tile) * (K * K + 1)
    kv = tl.arange(0, BK)[None, None, :]
    iw = ow[:, :, None] * S + kv - P
    col_ok = (iw >= 0) & (iw < W) & (kv < K) & omask[:, :, None]
    g3 = gv[:, :, None]
    for u in range(K):
        ih = oh[:, :, None] * S + u - P
        m = (ih >= 0) & (ih < H) & col_ok
        xv = tl.load(x_base + ih * W + iw, mask=m, other=0.0).to(gv.dtype)
        part = tl.sum(tl.sum(g3 * xv, axis=1), axis=0)  # (BK,): one filter row
        tl.store(p_base + u * K + tl.arange(0, BK), part, mask=tl.arange(0, BK) < K)
    tl.store(p_base + K * K, tl.sum(tl.sum(gv, axis=1), axis=0))


def _tile(h, w, k):
    """Output tile: the whole (tiny) plane under the interpreter (few launches); on a GPU 32 columns
    × up to 8 rows, fewer rows for wide filters so the (rows, 32, BK) tap block stays ≤ 2048."""
    if interpreting():
        return triton.next_power_of_2(max(h, 1)), triton.next_power_of_2(max(w, 1))
    return max(1, min(8, 64 // triton.next_power_of_2(k))), 32


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dwconv_forward(x, weight, bias, stride: int, padding: int, act: int, residual: bool) -> torch.Tensor:
    """y = act(conv(x) + bias) [+ x]; x (B, C, H, W) and weight (C, 1, k, k) contiguous."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    Ho = (H + 2 * padding - K) // stride + 1
    Wo = (W + 2 * padding - K) // stride + 1
    y = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    bh, bw = _tile(Ho, Wo, K)
    grid = (B * C, triton.cdiv(Ho, bh), triton.cdiv(Wo, bw))
    _dw_fwd_kernel[grid](x, weight, x if bias is None else bias, x, y, C, H, W, Ho, Wo, padding,
                         K=K, S=stride, ACT=act, HAS_BIAS=bias is not None, RESIDUAL=residual, GRAD_MODE=False,
                         F64=x.dtype == torch.float64, BH=bh, BW=bw, BK=triton.next_power_of_2(K))
    return y


def dwconv_backward(grad, x, weight, bias, stride: int, padding: int, act: int, residual: bool,
                    need_dx: bool = True, need_dw: bool = True):
    """(dx, dweight, dbias) of :func:`dwconv_forward`; all inputs contiguous. dx (dweight) is zeros
    when ``need_dx`` (``need_dw``) is False; dbias is always computed."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    Ho, Wo = grad.shape[2], grad.shape[3]
    acc = _acc_dtype(x)
    f64 = x.dtype == torch.float64
    dx = torch.empty_like(x) if need_dx else torch.zeros_like(x)
    if B * C == 0 or Ho * Wo == 0:
        return dx.zero_(), torch.zeros_like(weight), torch.zeros((C,), dtype=x.dtype, device=x.device)
    bh, bw = _tile(Ho, Wo, K)
    if act:
        g = torch.empty(grad.shape, dtype=acc, device=x.device)
        grid = (B * C, triton.cdiv(Ho, bh), triton.cdiv(Wo, bw))
        _dw_fwd_kernel[grid](x, weight, x if bias is None else bias, grad, g, C, H, W, Ho, Wo, padding,
                             K=K, S=stride, ACT=act, HAS_BIAS=bias is not None, RESIDUAL=False, GRAD_MODE=True,
                             F64=f64, BH=bh, BW=bw, BK=triton.next_power_of_2(K))
    else:
        g = grad
    if need_dx:
        dh, dw_ = _tile(H, W, K)
        _dw_dgrad_kernel[(B * C, triton.cdiv(H, dh), triton.cdiv(W, dw_))](
            g, weight, grad, dx, C, H, W, Ho, Wo, padding, K=K, S=stride, RESIDUAL=residual, F64=f64, BH=dh, BW=dw_,
            BK=triton.next_power_of_2(K))
    n_th, n_tw = triton.cdiv(Ho, bh), triton.cdiv(Wo, bw)
    n_tiles = B * n_th * n_tw
    part = torch.empty((C, n_tiles, K * K + 1), dtype=acc, device=x.device)
    _dw_wgrad_kernel[(C, n_tiles)](g, x, part, C, H, W, Ho, Wo, padding, n_th, n_tw,
                                   K=K, S=stride, F64=f64, BH=bh, BW=bw, BK=triton.next_power_of_2(K))
    total = part.sum(dim=1)  # the second, fixed-order pass
    # copy=True: views of `total` would alias each other (an op's outputs must not).
    dweight = total[:, : K * K].reshape(C, 1, K, K).to(weight.dtype, copy=True)
    if not need_dw:  # the partials ran for dbias anyway
        dweight = torch.zeros_like(weight)
    dbias = total[:, K * K].to(x.dtype, copy=True)
    return dx, dweight, dbias


__all__ = ["dwconv_forward", "dwconv_backward"]
