"""Depthwise 2-D convolution: forward with a fused epilogue, dgrad, wgrad.

All tensors NCHW contiguous. Forward: ``y = act(conv(x) + bias) [+ x]`` with act 0 none, 1 SiLU,
2 GELU (erf). Backward: ``g = dy · act'(pre)`` (the forward kernel recomputes ``pre`` in
GRAD_MODE), ``dx`` = the transposed conv of g [+ dy], and dw/dbias as per-(channel, split)
partial sums reduced in a fixed order afterwards (deterministic, no atomics). Math in fp32 (fp64
for fp64).

Layout of the work:
* forward and dgrad: one program per (plane, BH×BW output tile), a 1-D grid (its limit is 2³¹ − 1
  programs, so no batch overflows an axis). The K×K taps are visited one at a time, each a
  masked 2-D tile load multiplied by one weight: no padded tap axis, no cross-lane reductions. The
  loads of neighbouring taps overlap and are served from L1.
* stride-2 dgrad: the tile is split by the parity of (row, column); each parity class only visits
  the taps that reach it (about a quarter of K², instead of K² masked taps).
* wgrad: grid (C, SPLIT). Program (c, s) walks every SPLIT-th (sample, tile) of channel c and keeps
  the K×K (+ bias) sums in registers. One filter row at a time is a (BH, BW, BK) product reduced
  over the tile. SPLIT comes from the SM count, so the partial buffer is C·SPLIT·(K²+1) floats (KBs
  to a few MB), not one row per tile.
Block sizes are autotuned per shape on a GPU. The interpreter gets one config: the whole
(tiny) plane as one tile. :data:`GPU_CONFIGS` is what tests run under the interpreter at small
shapes, so that every GPU code path (multi-tile planes, split walks) is executed.
"""
import torch
import triton
import triton.language as tl

from fastvit_ops._availability import interpreting

from .activations import silu_grad

# CUDA's launch-grid limits for axes 0 and 1.
MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535


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
        d = silu_grad(y)
    else:
        d = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
    return d


@triton.jit
def _fwd_tap(acc, x_base, w_base, ih, ow, row_ok, u, v, W, sxh, sxw, P, K: tl.constexpr, S: tl.constexpr):
    iw = ow * S + v - P
    xv = tl.load(x_base + ih * sxh + iw * sxw, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
    return acc + xv.to(acc.dtype) * tl.load(w_base + u * K + v).to(acc.dtype)


@triton.jit
def _dw_fwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, out_ptr, C, H, W, Ho, Wo, P,
                sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, sob, soc, soh, sow,
                K: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                RESIDUAL: tl.constexpr, GRAD_MODE: tl.constexpr, F64: tl.constexpr,
                BH: tl.constexpr, BW: tl.constexpr):
    """y (or, in GRAD_MODE, g = dy·act'(pre)) for one BH×BW tile of one (b, c) plane. x, dy and out
    are read/written through their (b, c, h, w) element strides: NCHW, channels_last or a view."""
    n_tw = tl.cdiv(Wo, BW)
    tiles = tl.cdiv(Ho, BH) * n_tw
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // tiles
    t = pid % tiles
    c = plane % C
    b = plane // C
    oh = (t // n_tw) * BH + tl.arange(0, BH)[:, None]
    ow = (t % n_tw) * BW + tl.arange(0, BW)[None, :]
    omask = (oh < Ho) & (ow < Wo)
    x_base = x_ptr + b * sxb + c * sxc
    w_base = w_ptr + c * K * K
    if F64:
        acc = tl.zeros((BH, BW), dtype=tl.float64)
    else:
        acc = tl.zeros((BH, BW), dtype=tl.float32)
    for u in range(K):
        ih = oh * S + u - P
        row_ok = (ih >= 0) & (ih < H)
        # Unrolled filter rows up to k = 13; beyond, a loop (31 unrolled taps ran out of predicate
        # registers and spilled).
        if K <= 13:
            for v in tl.static_range(K):
                acc = _fwd_tap(acc, x_base, w_base, ih, ow, row_ok, u, v, W, sxh, sxw, P, K, S)
        else:
            for v in range(K):
                acc = _fwd_tap(acc, x_base, w_base, ih, ow, row_ok, u, v, W, sxh, sxw, P, K, S)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(acc.dtype)
    o_ptrs = out_ptr + b * sob + c * soc + oh * soh + ow * sow
    if GRAD_MODE:
        dy = tl.load(dy_ptr + b * sdb + c * sdc + oh * sdh + ow * sdw, mask=omask, other=0.0).to(acc.dtype)
        tl.store(o_ptrs, dy * _act_grad(acc, ACT), mask=omask)
    else:
        y = _act(acc, ACT)
        if RESIDUAL:  # stride 1, same size: x[oh, ow]
            y += tl.load(x_base + oh * sxh + ow * sxw, mask=omask, other=0.0).to(acc.dtype)
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dgrad_tap(acc, g_base, w_base, iw, oh, ok, u, v, Wo, sgh, sgw, P: tl.constexpr, K: tl.constexpr,
               S: tl.constexpr):
    ow = (iw + P - v) // S
    gv = tl.load(g_base + oh * sgh + ow * sgw, mask=ok & (iw + P - v >= 0) & (ow < Wo), other=0.0)
    return acc + gv.to(acc.dtype) * tl.load(w_base + u * K + v).to(acc.dtype)


@triton.jit
def _dw_dgrad_class(g_base, w_base, dy_base, dx_base, i, j, H, W, Ho, Wo, sgh, sgw, sdh, sdw, sxh, sxw,
                 P: tl.constexpr,
                 K: tl.constexpr, S: tl.constexpr, RESIDUAL: tl.constexpr, F64: tl.constexpr,
                 BH: tl.constexpr, BW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """dx at (i·S + PH, j·S + PW): only the taps u ≡ PH + P, v ≡ PW + P (mod S) reach it."""
    ih = i * S + PH
    iw = j * S + PW
    imask = (ih < H) & (iw < W)
    if F64:
        acc = tl.zeros((BH, BW), dtype=tl.float64)
    else:
        acc = tl.zeros((BH, BW), dtype=tl.float32)
    U0: tl.constexpr = (PH + P) % S
    V0: tl.constexpr = (PW + P) % S
    NV: tl.constexpr = (K - V0 + S - 1) // S
    for tu in range((K - U0 + S - 1) // S):
        u = U0 + tu * S
        oh = (ih + P - u) // S  # exact: ih + P − u ≡ 0 (mod S) by the choice of u
        row_ok = (ih + P - u >= 0) & (oh < Ho)
        if K <= 13:  # unrolled; beyond, a loop (see the forward)
            for tv in tl.static_range(NV):
                acc = _dgrad_tap(acc, g_base, w_base, iw, oh, row_ok & imask, u, V0 + tv * S, Wo, sgh, sgw, P, K, S)
        else:
            for tv in range(NV):
                acc = _dgrad_tap(acc, g_base, w_base, iw, oh, row_ok & imask, u, V0 + tv * S, Wo, sgh, sgw, P, K, S)
    if RESIDUAL:
        acc += tl.load(dy_base + ih * sdh + iw * sdw, mask=imask, other=0.0).to(acc.dtype)
    tl.store(dx_base + ih * sxh + iw * sxw, acc.to(dx_base.dtype.element_ty), mask=imask)


@triton.jit
def _dw_dgrad_kernel(g_ptr, w_ptr, dy_ptr, dx_ptr, C, H, W, Ho, Wo,
                  sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, P: tl.constexpr,
                  K: tl.constexpr, S: tl.constexpr, RESIDUAL: tl.constexpr, F64: tl.constexpr,
                  BH: tl.constexpr, BW: tl.constexpr):
    """dx[ih, iw] = Σ_{u,v} w[u, v] · g[(ih + P − u) / S, (iw + P − v) / S] (divisible, in range).

    Stride 1: a BH×BW tile of dx. Stride 2: a 2BH×2BW tile, as four parity classes
    (ih = 2i + ph, iw = 2j + pw), each visiting only the taps that reach it (P is a compile-time
    constant here, so each class's tap list is too)."""
    n_tw = tl.cdiv(W, S * BW)
    tiles = tl.cdiv(H, S * BH) * n_tw
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // tiles
    t = pid % tiles
    c = plane % C
    b = plane // C
    i = (t // n_tw) * BH + tl.arange(0, BH)[:, None]
    j = (t % n_tw) * BW + tl.arange(0, BW)[None, :]
    g_base = g_ptr + b * sgb + c * sgc
    w_base = w_ptr + c * K * K
    for ph in tl.static_range(S):
        for pw in tl.static_range(S):
            _dw_dgrad_class(g_base, w_base, dy_ptr + b * sdb + c * sdc, dx_ptr + b * sxb + c * sxc, i, j, H, W,
                         Ho, Wo, sgh, sgw, sdh, sdw, sxh, sxw, P, K, S, RESIDUAL, F64, BH, BW, ph, pw)


@triton.jit
def _dw_wgrad_kernel(g_ptr, x_ptr, part_ptr, B, C, H, W, Ho, Wo, P,
                  sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, K: tl.constexpr, S: tl.constexpr, F64: tl.constexpr,
                  BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """part[c, s, :K²] = Σ g·x over every SPLIT-th (sample, tile) of channel c; part[c, s, K²] = Σ g."""
    c = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    split = tl.num_programs(1)
    n_tw = tl.cdiv(Wo, BW)
    per_b = tl.cdiv(Ho, BH) * n_tw
    rows = tl.arange(0, BK)[:, None]        # filter row u of the accumulator
    kv = tl.arange(0, BK)[None, None, :]    # taps v of one filter row
    if F64:
        acc = tl.zeros((BK, BK), dtype=tl.float64)
        bias = tl.zeros((BH, BW), dtype=tl.float64)
    else:
        acc = tl.zeros((BK, BK), dtype=tl.float32)
        bias = tl.zeros((BH, BW), dtype=tl.float32)
    for tile in range(s, B * per_b, split):
        b = tile // per_b
        t = tile % per_b
        b = b.to(tl.int64)
        oh = (t // n_tw) * BH + tl.arange(0, BH)[:, None]
        ow = (t % n_tw) * BW + tl.arange(0, BW)[None, :]
        omask = (oh < Ho) & (ow < Wo)
        gv = tl.load(g_ptr + b * sgb + c * sgc + oh * sgh + ow * sgw, mask=omask, other=0.0).to(acc.dtype)
        bias += gv
        x_base = x_ptr + b * sxb + c * sxc
        iw = ow[:, :, None] * S + kv - P
        col_ok = (iw >= 0) & (iw < W) & (kv < K) & omask[:, :, None]
        g3 = gv[:, :, None]
        for u in range(K):
            ih = oh[:, :, None] * S + u - P
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=(ih >= 0) & (ih < H) & col_ok, other=0.0).to(acc.dtype)
            part = tl.sum(tl.sum(g3 * xv, axis=1), axis=0)  # (BK,): filter row u
            acc += tl.where(rows == u, part[None, :], 0.0)
    base = part_ptr + (c * split + s) * (K * K + 1)
    cols = tl.arange(0, BK)[None, :]
    tl.store(base + rows * K + cols, acc, mask=(rows < K) & (cols < K))
    tl.store(base + K * K, tl.sum(tl.sum(bias, axis=1), axis=0))


# ---- configs and grids -----------------------------------------------------------------------------
def _config(bh, bw, warps):
    return triton.Config({"BH": bh, "BW": bw}, num_warps=warps, num_stages=1)


#: Output tiles tried on a GPU, (BH, BW, num_warps): 2-8 outputs per thread, rows of 32-64 columns
#: so each load instruction covers whole 128-byte lines; and 8×8 / 16×16 tiles for the 7×7 and
#: 14×14 planes of the last stages, where a 32-wide tile would leave most lanes idle.
GPU_CONFIGS = [_config(8, 32, 4), _config(16, 32, 4), _config(16, 64, 4), _config(32, 32, 4),
               _config(8, 8, 2), _config(16, 16, 4)]


def _interpreter_configs():
    # One config under the interpreter (every launch and op costs ms there): a 16×16 tile covers the
    # tiny test planes in one or a few programs.
    return [_config(16, 16, 4)]


_CONFIGS = _interpreter_configs() if interpreting() else GPU_CONFIGS
_SMALLEST_TILE = min(((c.kwargs["BH"], c.kwargs["BW"]) for c in _CONFIGS), key=lambda t: t[0] * t[1])
# sxw: 1 for NCHW, C for channels_last (a different best tile)
_fwd = triton.autotune(_CONFIGS, key=["C", "Ho", "Wo", "K", "S", "ACT", "GRAD_MODE", "sxw"])(_dw_fwd_kernel)
_dgrad = triton.autotune(_CONFIGS, key=["C", "H", "W", "K", "S", "sxw"])(_dw_dgrad_kernel)


def fwd_grid(B: int, C: int, Ho: int, Wo: int, bh: int, bw: int) -> tuple:
    """Launch grid of the forward (one program per plane × output tile). Raises ``ValueError``
    before any launch when it would exceed CUDA's limit of 2³¹ − 1 programs on axis 0."""
    n = B * C * triton.cdiv(Ho, bh) * triton.cdiv(Wo, bw)
    if n > MAX_GRID_X:
        raise ValueError(f"x: {B}×{C} planes of {Ho}×{Wo} outputs need {n} programs, over CUDA's "
                         f"2^31 − 1; split the batch")
    return (n,)


def dgrad_grid(B: int, C: int, H: int, W: int, stride: int, bh: int, bw: int) -> tuple:
    """Launch grid of the dgrad (one program per plane × (stride·BH)×(stride·BW) tile of dx)."""
    return fwd_grid(B, C, triton.cdiv(H, stride), triton.cdiv(W, stride), bh, bw)


def wgrad_tile(k: int, gpu: bool = None) -> tuple:
    """(BH, BW, BK) of the wgrad: the (BH, BW, BK) row product stays ≤ 2048 elements on a GPU;
    ``gpu=False`` (default under the interpreter): a 16×16 tile, the tiny test planes in one."""
    bk = triton.next_power_of_2(k)
    if not (not interpreting() if gpu is None else gpu):
        return 16, 16, bk
    return max(1, min(8, 64 // bk)), 32, bk


def wgrad_grid(B: int, C: int, Ho: int, Wo: int, bh: int, bw: int, sm_count: int) -> tuple:
    """(C, SPLIT): about 8 programs per SM in all, SPLIT ≤ the (sample, tile) count and ≤ 65,535.
    Raises ``ValueError`` when C itself exceeds axis 0's limit."""
    if C > MAX_GRID_X:
        raise ValueError(f"weight: {C} channels exceed CUDA's grid limit")
    tiles = B * triton.cdiv(Ho, bh) * triton.cdiv(Wo, bw)
    split = max(1, min(tiles, MAX_GRID_Y, triton.cdiv(8 * sm_count, max(C, 1))))
    return (C, split)


def _sm_count(t: torch.Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 2 if interpreting() else 132  # the interpreter: a split walk of a few tiles; else an H100


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _launch(kernel, config, grid_of, *args, **kwargs):
    """``kernel`` autotuned, or (tests) one given config of it run as is."""
    if config is None:
        kernel[lambda meta: grid_of(meta["BH"], meta["BW"])](*args, **kwargs)
    else:
        bh, bw = config.kwargs["BH"], config.kwargs["BW"]
        kernel.fn[grid_of(bh, bw)](*args, **kwargs, **config.all_kwargs())


def _like(x, shape, dtype):
    """An output for ``x``: channels_last when x is (and not also NCHW-contiguous), else NCHW."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, dtype=dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def dwconv_forward(x, weight, bias, stride: int, padding: int, act: int, residual: bool, config=None) -> torch.Tensor:
    """y = act(conv(x) + bias) [+ x]. x (B, C, H, W) in any strides (NCHW, channels_last, a view) is
    read in place; y comes back channels_last when x is, else NCHW. weight (C, 1, k, k) contiguous."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    Ho = (H + 2 * padding - K) // stride + 1
    Wo = (W + 2 * padding - K) // stride + 1
    fwd_grid(B, C, Ho, Wo, *_SMALLEST_TILE)  # too large for any config: raises before any work
    y = _like(x, (B, C, Ho, Wo), x.dtype)
    if y.numel() == 0:
        return y
    _launch(_fwd, config, lambda bh, bw: fwd_grid(B, C, Ho, Wo, bh, bw),
            x, weight, x if bias is None else bias, x, y, C, H, W, Ho, Wo, padding,
            *x.stride(), *x.stride(), *y.stride(), K=K, S=stride, ACT=act, HAS_BIAS=bias is not None, RESIDUAL=residual, GRAD_MODE=False,
            F64=x.dtype == torch.float64)
    return y


def dwconv_backward(grad, x, weight, bias, stride: int, padding: int, act: int, residual: bool,
                    need_dx: bool = True, need_dw: bool = True, config=None):
    """(dx, dweight, dbias) of :func:`dwconv_forward`; grad and x in any strides (read in place), dx
    in x's layout, weight and bias contiguous. dx (dweight) is zeros when ``need_dx`` (``need_dw``) is
    False; dbias is always computed."""
    B, C, H, W = x.shape
    K = weight.shape[-1]
    Ho, Wo = grad.shape[2], grad.shape[3]
    acc = _acc_dtype(x)
    f64 = x.dtype == torch.float64
    dx = torch.empty_like(x) if need_dx else torch.zeros_like(x)
    if B * C == 0 or Ho * Wo == 0:
        return dx.zero_(), torch.zeros_like(weight), torch.zeros((C,), dtype=x.dtype, device=x.device)
    bh, bw, bk = wgrad_tile(K, gpu=True if config is not None else None)
    # Every grid is checked before the first launch: a too-large input fails before any work.
    fwd_grid(B, C, Ho, Wo, *_SMALLEST_TILE)
    dgrad_grid(B, C, H, W, stride, *_SMALLEST_TILE)
    wgrid = wgrad_grid(B, C, Ho, Wo, bh, bw, _sm_count(x))
    if act:
        g = _like(x, grad.shape, acc)
        _launch(_fwd, config, lambda th, tw: fwd_grid(B, C, Ho, Wo, th, tw),
                x, weight, x if bias is None else bias, grad, g, C, H, W, Ho, Wo, padding,
                *x.stride(), *grad.stride(), *g.stride(), K=K, S=stride, ACT=act, HAS_BIAS=bias is not None, RESIDUAL=False, GRAD_MODE=True, F64=f64)
    else:
        g = grad
    if need_dx:
        _launch(_dgrad, config, lambda th, tw: dgrad_grid(B, C, H, W, stride, th, tw),
                g, weight, grad, dx, C, H, W, Ho, Wo, *g.stride(), *grad.stride(), *dx.stride(), padding, K=K, S=stride, RESIDUAL=residual, F64=f64)
    part = torch.empty((C, wgrid[1], K * K + 1), dtype=acc, device=x.device)
    _dw_wgrad_kernel[wgrid](g, x, part, B, C, H, W, Ho, Wo, padding, *g.stride(), *x.stride(), K=K, S=stride, F64=f64, BH=bh, BW=bw, BK=bk,
                         num_warps=4)
    total = part.sum(dim=1)  # the second, fixed-order pass
    # copy=True: views of `total` would alias each other (an op's outputs must not).
    dweight = total[:, : K * K].reshape(C, 1, K, K).to(weight.dtype, copy=True)
    if not need_dw:  # the partials ran for dbias anyway
        dweight = torch.zeros_like(weight)
    dbias = total[:, K * K].to(x.dtype, copy=True)
    return dx, dweight, dbias


__all__ = ["dwconv_forward", "dwconv_backward", "fwd_grid", "dgrad_grid", "wgrad_grid", "wgrad_tile", "GPU_CONFIGS"]
