"""Fused FAT layers: :func:`fused_fasa` and the drop-ins for ``fastvit_ops.reference.fat``'s FASA,
ConvFFN, FATBlock and PatchEmbedding (same constructors and state_dicts).

CPU inference path. In eval mode with nothing needing gradients, on fp32 CPU tensors and outside
the compiler, the block, FFN and stem drop-ins run a fused inference forward (same outputs up to
fp32 rounding): activations are kept channels_last (oneDNN's 1×1 convolutions run on that layout
without reordering: 5.5× faster than NCHW for FAT-B0's 56×56 ``fc1``, 1.1× at 14×14); every eval
BatchNorm is folded into a convolution next to it (cached until its parameters change); GELU,
ReLU and the residual adds run in place on the output of the convolution before them
(:mod:`._pointwise`); ``x + DW(x)`` (CPE, ConvFFN) is one depthwise conv with a residual epilogue,
in place on the FFN's hidden map; the FFN runs a few samples at a time on large maps and adds
straight into the block's shortcut.
Everything else (training, autograd, ``torch.compile``, autocast, other devices) runs the
reference composition on the fused ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import dispatch
from ..ops.attention import CHANNELS_FIRST, TOKENS, attention_core
from ..ops.cross_modulation import sigmoid_cross_modulation
from ..ops.validate import check_tensor, is_channels_last
from ..reference import fat as ref
from . import _plan
from ._amp import autocast_like_conv
from ._bn import bn_sources, cached_fold, fold_bn_into_next_1x1, fold_eval_bn, is_eval_bn
from ._pointwise import conv_add_, conv_epilogue

try:  # the fused depthwise conv (SPEC §1.1) with a SiLU epilogue; the module's own convs otherwise
    from ..ops.dwconv import dwconv2d as _dwconv2d
except ImportError:  # pragma: no cover - depends on which ops are installed
    _dwconv2d = None


def _dw_shape_ok(conv) -> bool:
    """``conv`` is a depthwise ``nn.Conv2d`` the fused kernel runs (odd square k ≤ 31, equal
    stride 1/2 and padding in [0, k), no dilation, zero padding)."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str):
        return False
    c = conv.in_channels
    k, kw = conv.kernel_size
    return (conv.groups == c == conv.out_channels and k == kw and k % 2 == 1 and k <= 31
            and conv.stride[0] == conv.stride[1] and conv.stride[0] in (1, 2)
            and conv.padding[0] == conv.padding[1] and 0 <= conv.padding[0] < k
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


def _depthwise(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """``act(DW(x))`` with ``conv``'s stride/padding and the given (possibly BN-folded) weights.

    The fused depthwise conv serves the local branch (SiLU fused) and the stride-2 pool convs (on
    CPU ``auto`` still times it against oneDNN per shape and keeps the faster forward). Under
    autocast the tensors are cast as ``F.conv2d`` would cast them (the reference's policy).
    """
    if _dwconv2d is not None and _dw_shape_ok(conv):
        x, weight, bias = autocast_like_conv(x, weight, bias)
        return _dwconv2d(x, weight, bias, conv.stride[0], conv.padding[0], "silu" if silu else None)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups) \
        if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" else conv(x)
    return F.silu(y) if silu else y


def _inference(x: Tensor, module: nn.Module) -> bool:
    """Whether ``module`` may take the fused CPU inference path (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or module.training:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return True


def _folded_after(conv: nn.Conv2d, bn):
    """``fold_eval_bn(conv, bn)``, cached when nothing needs its graph."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a graph through the fold is wanted
        return fold_eval_bn(conv, bn)
    return cached_fold(conv, f"bn_after_{bn.eps}", (conv.weight, conv.bias) + bn_sources(bn),
                       lambda: fold_eval_bn(conv, bn))


def _pool(pool: nn.Module, x: Tensor) -> Tensor:
    """FASA's K/V downsampler; each eval-mode BN is folded into the depthwise conv before it
    (train-mode BN keeps batch statistics: the modules run as they are)."""
    if not isinstance(pool, nn.Sequential):
        return pool(x)
    mods = list(pool.children())
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels:
            if is_eval_bn(nxt):
                w, b = _folded_after(m, nxt)
                x = _depthwise(x, m, w, b, silu=False)
                i += 2
                continue
            x = _depthwise(x, m, m.weight, m.bias, silu=False)   # e.g. after fuse_for_inference
        else:
            x = m(x)
        i += 1
    return x


#: What :func:`fused_fasa` reads from a FASA module (the authors' attribute names).
FASA_ATTRIBUTES = ("q", "kv", "local_mixer", "mixer", "pool", "num_heads", "dim_head", "window_size",
                   "scalor")


def fused_fasa(x: Tensor, fasa: nn.Module) -> Tensor:
    """FAT's Fully Adaptive Self-Attention forward (SPEC §2) on the fused kernels, for any FASA module.

    ``fasa`` may be :class:`fastvit_ops.nn.FASA`, :class:`fastvit_ops.reference.fat.FASA`, or the
    authors' ``FASA`` (github qhfan/FAT ``classification/models.py``) — anything with the
    attributes of :data:`FASA_ATTRIBUTES`: ``q`` (1×1 conv C→C), ``kv`` (1×1 conv C→2C),
    ``local_mixer`` (depthwise conv DW_k), ``mixer`` (1×1 conv C→C), ``pool`` (the K/V
    downsampler: ``nn.Sequential`` of DW_5/s2, BN, 1×1 units, or ``nn.Identity``), ``num_heads``
    (h), ``dim_head`` (d = C/h), ``window_size`` and ``scalor`` (the softmax scale, d^(−1/2) in
    the released code). The module's own ``forward``/``attention``/``modulate`` are not called: the
    computation is the released code's (paper Eq. 3–10 with the released interaction
    ``SiLU(L0) ⊙ SiLU(G)``, SPEC §1.4 mode "silu")::

        Q̂ = q(X);  K, V = split(kv(pool(X)));  G = softmax(scalor · Q̂ Kᵀ) V  (per head)
        L0 = local_mixer(Q̂);  Y = mixer(SiLU(L0) ⊙ SiLU(G))

    in the fewest passes: the 1×1 convs are GEMMs; ``SiLU(DW_k(Q̂))`` is one fused depthwise conv;
    eval-mode BatchNorms of ``pool`` are folded into their DW convs (train mode uses batch
    statistics and updates the running ones, as the module would); the attention reads the
    queries straight from Q̂ (B, C, H, W) and applies ``SiLU(G) ⊙ SiLU(L0)`` in its epilogue,
    writing (B, C, H, W), so G never reaches memory.

    Args:
        x: (B, C, H, W) with C = ``num_heads · dim_head``, any H, W ≥ 1 (odd sizes included),
            NCHW or channels_last; float16, bfloat16, float32 or float64 — the module's
            parameters in the same dtype, or fp32 under ``torch.autocast`` (cast as the
            reference's convolutions are cast).
        fasa: the FASA module (see above).

    Returns:
        (B, C, H, W) in ``x``'s dtype (the autocast dtype under autocast), equal to the reference
        ``FASA(x)``. Differentiable in ``x`` and every parameter of ``fasa`` (training works).

    Raises:
        TypeError: ``fasa`` is not an ``nn.Module`` or lacks FASA attributes (the message lists
            the missing ones); ``x`` is not a floating tensor.
        ValueError: ``x`` is not 4-D, or its channels differ from ``num_heads · dim_head``; the
            underlying ops raise for a head width d > 128.
    """
    gated = _fasa_gated(x, fasa)  # validates fasa and x first
    return fasa.mixer(gated)


def _fasa_gated(x: Tensor, fasa: nn.Module) -> Tensor:
    """FASA up to the mixer: ``SiLU(L0) ⊙ SiLU(G)`` (B, C, H, W), in ``x``'s layout (validated)."""
    if not isinstance(fasa, nn.Module):
        raise TypeError(f"fasa: expected an nn.Module with FASA's attributes, got {type(fasa).__name__}")
    missing = [a for a in FASA_ATTRIBUTES if not hasattr(fasa, a)]
    if missing:
        raise TypeError(f"fasa: {type(fasa).__name__} lacks the FASA attribute(s) {', '.join(missing)} "
                        f"(needs {', '.join(FASA_ATTRIBUTES)})")
    check_tensor("x", x, 4)
    b, c, h, w = x.shape
    heads, d = int(fasa.num_heads), int(fasa.dim_head)
    if c != heads * d:
        raise ValueError(f"x: expected {heads * d} channels (num_heads {heads} × dim_head {d}), got {c}")
    q_local = fasa.q(x)                                                 # Q̂ (B, C, H, W)
    kv = fasa.kv(_pool(fasa.pool, x))                                   # (B, 2C, H', W')
    m = kv.shape[-2] * kv.shape[-1]
    k, v = kv.reshape(b, 2, heads, d, m).transpose(-1, -2).unbind(1)
    lm = fasa.local_mixer
    if isinstance(lm, nn.Conv2d):
        gate = _depthwise(q_local, lm, lm.weight, lm.bias, silu=True)  # SiLU(L0)
    else:
        gate = F.silu(lm(q_local))
    if is_channels_last(q_local) and is_channels_last(gate):
        # channels_last maps are (B, H·W, C) in memory: heads are strided views of that token
        # layout, and the kernel writes its output in the same layout, so nothing is transposed.
        q = q_local.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2)
        g = gate.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2)
        out = attention_core(q, k, v, float(fasa.scalor), g, TOKENS)        # SiLU(G)·SiLU(L0)
        return out.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    q = q_local.reshape(b, heads, d, h * w).transpose(2, 3)
    g = gate.reshape(b, heads, d, h * w).transpose(2, 3)
    out = attention_core(q, k, v, float(fasa.scalor), g, CHANNELS_FIRST)   # SiLU(G)·SiLU(L0)
    return out.transpose(2, 3).reshape(b, c, h, w)


class FASA(ref.FASA):
    """``reference.fat.FASA`` with the global branch fused (SPEC §1.3, §1.4, §2).

    Same constructor ``FASA(dim, kernel_size, num_heads, window_size)``, parameters and state_dict
    keys as the authors' FASA, so their checkpoints load unchanged. The forward:

    * queries are read straight from ``Q̂ = q(X)`` (B, C, H, W) and the result written straight to
      (B, C, H, W) by :func:`fastvit_ops.ops.attention.downsampled_attention_nchw`'s kernel, with
      the interaction ``SiLU(G) ⊙ SiLU(L0)`` as its epilogue, so ``G`` never reaches memory;
    * the local branch ``SiLU(DW_k(Q̂))`` is one fused depthwise conv with a SiLU epilogue;
    * the pool's BN is folded into its DW convs in eval mode (batch statistics in training).

    ``forward`` is :func:`fused_fasa` (``self`` as the module).

    Input (B, C, H, W) at any H, W; output (B, C, H, W) in the input dtype.
    """

    def modulate(self, local: Tensor, global_: Tensor) -> Tensor:
        return sigmoid_cross_modulation(local, global_, "silu")

    def forward(self, x: Tensor) -> Tensor:
        return fused_fasa(x, self)


# ---- CPU inference path of the block, FFN and stem ------------------------------------------------------
def _is_1x1(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and tuple(conv.stride) == (1, 1) and not isinstance(conv.padding, str)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1))


def _dw_residual(conv: nn.Module, x: Tensor) -> Tensor:
    """``x + conv(x)``: one depthwise conv with a residual epilogue where the fused kernel runs it."""
    if (_dwconv2d is not None and _dw_shape_ok(conv) and conv.stride[0] == 1
            and conv.padding[0] == conv.kernel_size[0] // 2):
        xc, w, b = autocast_like_conv(x, conv.weight, conv.bias)
        # Under autocast an fp32 x is cast for the conv, but the reference adds the fp32 x itself
        # (and its sum stays fp32): only fuse when the conv sees x as it is.
        if xc is x:
            return _dwconv2d(x, w, b, 1, conv.padding[0], None, True)
    return x + conv(x)


def _dw_residual_(conv: nn.Module, u: Tensor) -> Tensor:
    """``u + conv(u)`` written over ``u`` (a temporary of the inference path) where the C++ kernel
    can (fp32 channel-blocked path: no second buffer of u's size), else :func:`_dw_residual`."""
    if (_dwconv2d is not None and _dw_shape_ok(conv) and conv.stride[0] == 1
            and conv.padding[0] == conv.kernel_size[0] // 2 and conv.weight.dtype == u.dtype
            and (conv.bias is None or conv.bias.dtype == u.dtype)
            and dispatch.eager_cpu(u, dispatch.get_backend(), (conv.weight, conv.bias), channels_last=True)
            and torch.ops.fastvit_ops._dwconv2d_same_(u, conv.weight, conv.bias, 0, True)):
        return u
    return _dw_residual(conv, u)


def _downsample_inference(ds: nn.Module, x: Tensor) -> Tensor:
    """FATBlock's shortcut: identity, or ``1×1(BN(DW_5/s2(x)))`` with the BN folded into the DW."""
    if isinstance(ds, nn.Identity):
        return x
    mods = list(ds.children()) if isinstance(ds, nn.Sequential) else []
    if (len(mods) == 3 and _dw_shape_ok(mods[0]) and is_eval_bn(mods[1]) and isinstance(mods[2], nn.Conv2d)
            and _is_1x1(mods[2])):
        w, b = _folded_after(mods[0], mods[1])
        y = _depthwise(x, mods[0], w, b, silu=False)
        return conv_epilogue(y, mods[2].weight, mods[2].bias)
    return ds(x)


#: The FFN's hidden activation (fc1's output) is produced this many bytes at a time at most, in
#: chunks of whole samples, when the whole batch's would exceed it: at FAT-B0's 56×56 stage the
#: hidden map is 12.8 MB at batch 8, and two samples at a time (3.2 MB) stay in cache between
#: fc1, the depthwise conv and fc2 instead of going to DRAM and back (7.5 → 5.1 ms per FFN, 2-core
#: Zen 4); smaller maps gained nothing and run whole.
FFN_CHUNK_BYTES = 4 << 20


def _ffn_chunk(z: Tensor, hidden: int) -> int:
    per_sample = hidden * z.shape[2] * z.shape[3] * z.element_size()
    if per_sample * z.shape[0] <= 2 * FFN_CHUNK_BYTES:
        return z.shape[0]
    return max(1, FFN_CHUNK_BYTES // per_sample)


def _standard_ffn(ffn: nn.Module):
    """(fc1, dwconv, bn, fc2) of a ConvFFN the inference path runs (1×1 fc1/fc2, exact GELU, a
    depthwise conv the fused kernel takes, an eval BN or one already folded away), else None."""
    fc1, act, dw, bn, fc2 = (getattr(ffn, n, None) for n in ("fc1", "act", "dwconv", "bn", "fc2"))
    if (_is_1x1(fc1) and isinstance(act, nn.GELU) and act.approximate == "none" and _dw_shape_ok(dw)
            and (is_eval_bn(bn) or isinstance(bn, nn.Identity)) and _is_1x1(fc2)):
        return fc1, dw, bn, fc2
    return None


def _ffn_inference(ffn: nn.Module, z: Tensor, shortcut: Optional[Tensor], own_shortcut: bool = False) -> Tensor:
    """``shortcut + ConvFFN(z)`` with ``fc2(BN(U))`` folded into one 1×1 conv and the GELU and the
    shortcut add in place (falls back to the module for anything unexpected).
    ``own_shortcut``: ``shortcut`` is a temporary of the caller, so ``fc2`` may accumulate into it
    in place, a chunk of samples at a time on large maps (see :data:`FFN_CHUNK_BYTES`)."""
    parts = _standard_ffn(ffn)
    if parts is None:
        y = _ffn_composite(ffn, z) if isinstance(ffn, ConvFFN) else ffn(z)
        return y if shortcut is None else shortcut + y
    fc1, dw, bn, fc2 = parts
    if isinstance(bn, nn.Identity):  # already folded by fuse_for_inference
        w2, b2 = fc2.weight, fc2.bias
    else:
        w2, b2 = cached_fold(fc2, f"bn_before_{bn.eps}", (fc2.weight, fc2.bias) + bn_sources(bn),
                             lambda: fold_bn_into_next_1x1(bn, fc2))

    def hidden(zc: Tensor) -> Tensor:
        u = conv_epilogue(zc, fc1.weight, fc1.bias, activation="gelu")                # GELU(fc1(Z))
        if dw.stride[0] == 1:
            return _dw_residual_(dw, u)                                               # U + DW(U)
        return _depthwise(u, dw, dw.weight, dw.bias, silu=False)                      # DW/s2(U)

    if not (own_shortcut and shortcut is not None):
        return conv_epilogue(hidden(z), w2, b2, residual=shortcut)                    # fc2(BN(U)) (+ shortcut)
    n = _ffn_chunk(z, fc1.out_channels)
    for i in range(0, z.shape[0], n):                                                 # shortcut += fc2(BN(U))
        conv_add_(shortcut[i:i + n], hidden(z[i:i + n]), w2, b2)
    return shortcut


def _conv_bn_relu_inference(unit: nn.Module, x: Tensor) -> Tensor:
    """FAT stem unit ``ReLU(BN(conv(x)))`` as one conv (BN folded) and an in-place ReLU."""
    seq = getattr(unit, "conv", None)
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if len(mods) == 2:  # after fuse_for_inference: (conv, ReLU), the BN already folded
        mods = [mods[0], None, mods[1]]
    if (len(mods) == 3 and isinstance(mods[0], nn.Conv2d) and mods[0].groups == 1
            and (mods[1] is None or is_eval_bn(mods[1])) and isinstance(mods[2], nn.ReLU)
            and not isinstance(mods[0].padding, str) and mods[0].padding_mode == "zeros"
            and len(set(mods[0].stride)) == 1 and len(set(mods[0].padding)) == 1
            and tuple(mods[0].dilation) == (1, 1)):
        conv = mods[0]
        w, b = _folded_after(conv, mods[1]) if mods[1] is not None else (conv.weight, conv.bias)
        return conv_epilogue(x, w, b, conv.stride[0], conv.padding[0], activation="relu")
    return unit(x)


# ---- the block's inference forward as one flat function ---------------------------------------------
# The module-by-module inference path above spends about 1 ms per block outside the kernels
# (module calls, argument checks, fold-cache lookups, intermediates kept alive until their frame
# ends); a TorchScript trace of the same ops ran 8–10% faster. For the standard FAT block
# structure (reference / authors' modules) the block instead builds, once, a flat closure over the
# folded weights that calls the ops directly and drops each intermediate as soon as it is used; it
# is rebuilt when any tensor it read changes (storage or version counter). Anything else keeps the
# module path.
def _dw_step(conv, bn, act: int = 0, residual: bool = False):
    """(tensors read, fn(x)) for ``act(DW(x)) [+ x]`` with ``bn`` (eval, or None) folded in; the
    forward ``auto`` timed faster for the call's signature, as :func:`dwconv2d` picks it."""
    from ..ops.dwconv import onednn_forward

    w, b = fold_eval_bn(conv, bn) if bn is not None else (conv.weight, conv.bias)
    w, b = w.detach(), (b.detach() if b is not None else None)
    s, p = conv.stride[0], conv.padding[0]
    op = torch.ops.fastvit_ops._dwconv2d_autograd.default

    def run(x: Tensor) -> Tensor:
        return op(x, w, b, s, p, act, residual, onednn_forward(dispatch.get_backend(), x, w, b, s, p, act, residual))
    return [conv.weight, conv.bias] + (list(bn_sources(bn)) if bn is not None else []), run


def _seq_steps(seq) -> Optional[list]:
    """Steps of an nn.Sequential of depthwise convs (each optionally followed by an eval BN) and
    1×1 convs, or None for anything else."""
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else None
    if mods is None:
        return None
    steps, i = [], 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if _dw_shape_ok(m):
            bn = nxt if is_eval_bn(nxt) else None
            steps.append(_dw_step(m, bn))
            i += 2 if bn is not None else 1
        elif _is_1x1(m):
            w, b = m.weight.detach(), (m.bias.detach() if m.bias is not None else None)
            steps.append(([m.weight, m.bias], lambda x, w=w, b=b: F.conv2d(x, w, b)))
            i += 1
        else:
            return None
    return steps


def _block_plan(blk: nn.Module):
    """(tensors read, fn(x)) for a standard FAT block's inference forward, or None."""
    cpe, n1, attn, n2, ds, ffn = (getattr(blk, a, None) for a in ("cpe", "norm1", "attn", "norm2", "downsample", "ffn"))
    if not (_dw_shape_ok(cpe) and cpe.stride[0] == 1 and cpe.padding[0] == cpe.kernel_size[0] // 2):
        return None
    if not all(isinstance(n, nn.GroupNorm) and n.affine for n in (n1, n2)):
        return None
    if not (all(hasattr(attn, a) for a in FASA_ATTRIBUTES) and _is_1x1(attn.q) and _is_1x1(attn.kv)
            and _is_1x1(attn.mixer) and _dw_shape_ok(attn.local_mixer) and attn.local_mixer.stride[0] == 1):
        return None
    pool = [] if isinstance(attn.pool, nn.Identity) else _seq_steps(attn.pool)
    shortcut = [] if isinstance(ds, nn.Identity) else _seq_steps(ds)
    parts = _standard_ffn(ffn)
    if pool is None or shortcut is None or parts is None:
        return None
    fc1, dw, bn, fc2 = parts
    tensors = [n1.weight, n1.bias, n2.weight, n2.bias]
    cpe_t, cpe_run = _dw_step(cpe, None, residual=True)
    lm_t, lm_run = _dw_step(attn.local_mixer, None, act=1)
    tensors += cpe_t + lm_t
    for t, _ in pool + shortcut:
        tensors += t
    folded_fc2 = fold_bn_into_next_1x1(bn, fc2) if is_eval_bn(bn) else (fc2.weight, fc2.bias)
    w2, b2 = (t.detach() if t is not None else None for t in folded_fc2)
    tensors += [fc1.weight, fc1.bias, dw.weight, dw.bias, fc2.weight, fc2.bias]
    tensors += list(bn_sources(bn)) if is_eval_bn(bn) else []
    for conv in (attn.q, attn.kv, attn.mixer):
        tensors += [conv.weight, conv.bias]
    g1 = (n1.num_groups, n1.weight.detach(), n1.bias.detach(), n1.eps)
    g2 = (n2.num_groups, n2.weight.detach(), n2.bias.detach(), n2.eps)
    qw, qb, kvw, kvb, mw, mb, f1w, f1b = (None if t is None else t.detach() for t in (
        attn.q.weight, attn.q.bias, attn.kv.weight, attn.kv.bias, attn.mixer.weight, attn.mixer.bias,
        fc1.weight, fc1.bias))
    heads, d, scale = int(attn.num_heads), int(attn.dim_head), float(attn.scalor)
    dw_stride1 = dw.stride[0] == 1 and dw.padding[0] == dw.kernel_size[0] // 2
    _, dw_run = _dw_step(dw, None, residual=dw_stride1)
    dww, dwb = dw.weight.detach(), (dw.bias.detach() if dw.bias is not None else None)
    same_ = torch.ops.fastvit_ops._dwconv2d_same_.default
    attn_fwd = torch.ops.fastvit_ops._downsampled_attention_forward.default
    hidden = fc1.out_channels

    def run(x: Tensor) -> Tensor:
        x = cpe_run(x.contiguous(memory_format=torch.channels_last))           # x + CPE(x)
        b, c, h, w = x.shape
        if c != heads * d:
            raise ValueError(f"x: expected {heads * d} channels (num_heads {heads} × dim_head {d}), got {c}")
        z = F.group_norm(x, g1[0], g1[1], g1[2], g1[3])
        q = F.conv2d(z, qw, qb)                                               # Q̂
        for _, step in pool:
            z = step(z)
        kv = F.conv2d(z, kvw, kvb)
        del z
        m = kv.shape[-2] * kv.shape[-1]
        k, v = kv.reshape(b, 2, heads, d, m).transpose(-1, -2).unbind(1)
        gate = lm_run(q)                                                      # SiLU(L0)
        out = torch.empty((b, h * w, heads, d), dtype=x.dtype)
        lse = torch.empty((b, heads, h * w, 2), dtype=torch.float32)
        attn_fwd(q.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2), k, v,
                 gate.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2),
                 out.transpose(1, 2), lse, scale)                             # SiLU(G)·SiLU(L0)
        del q, gate, k, v, kv, lse
        y = F.conv2d(out.reshape(b, h, w, c).permute(0, 3, 1, 2), mw, mb)
        del out
        x = y.add_(x)                                                         # x + mixer(·)
        del y
        z = F.group_norm(x, g2[0], g2[1], g2[2], g2[3])
        sc = x
        for _, step in shortcut:
            sc = step(sc)
        del x
        n = _ffn_chunk(z, hidden)
        for i in range(0, b, n):                                              # sc += fc2(BN(U))
            u = F.conv2d(z[i:i + n], f1w, f1b)
            torch.ops.aten.gelu_(u)
            if not (dw_stride1 and same_(u, dww, dwb, 0, True)):
                u = dw_run(u)
            sc[i:i + n].add_(F.conv2d(u, w2, b2))
        return sc
    return tensors, run


_SCALARS = (bool, int, float, str, tuple, type(None))


def _state_key(module: nn.Module) -> tuple:
    """Everything a cached inference plan of ``module`` was built from, read afresh: each submodule
    (identity, mode, plain hyperparameter attributes such as ``eps``, ``stride``, ``num_heads``) and
    each parameter and buffer (identity, storage, version, dtype, device, requires_grad). A plan
    whose key differs is rebuilt, so replaced tensors (``load_state_dict(assign=True)``,
    ``to_empty()``), in-place edits, ``.to()``/``.half()``, swapped submodules and edited attributes
    can never leave a stale plan running."""
    key = []
    for m in module.modules():
        key.append((id(m), tuple((k, v) for k, v in vars(m).items()
                                 if not k.startswith("_") and isinstance(v, _SCALARS))))
        for t in (*m._parameters.values(), *m._buffers.values()):
            key.append(None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device, t.requires_grad))
    return tuple(key)


class ConvFFN(ref.ConvFFN):
    """``reference.fat.ConvFFN`` (same constructor, parameters, state_dict) on the fused ops.

    ``U = GELU(fc1(Z))``; stride 1: ``U + DW_k(U)`` as one depthwise conv with a residual epilogue;
    stride 2: ``DW_k/s2(U)``; ``out = fc2(BN(U))``. On the CPU inference path (module docstring)
    the BN is folded into ``fc2`` and the GELU runs in place on ``fc1``'s output. In (B, C_in, H, W) →
    (B, C_out, ceil(H/s), ceil(W/s)), same dtype; channels_last on the CPU inference path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _inference(x, self):
            return _ffn_inference(self, x.contiguous(memory_format=torch.channels_last), None)
        return _ffn_composite(self, x)


def _ffn_composite(ffn: nn.Module, x: Tensor) -> Tensor:
    """ConvFFN as the reference composes it (autograd, compile, autocast), the inner residual fused."""
    u = ffn.act(ffn.fc1(x))
    u = _dw_residual(ffn.dwconv, u) if ffn.dwconv.stride[0] == 1 else ffn.dwconv(u)
    return ffn.fc2(ffn.bn(u))


class FATBlock(_plan.PlannedModule, ref.FATBlock):
    """``reference.fat.FATBlock`` (same constructor, parameters, state_dict) on the fused ops::

        x ← x + cpe(x)                                  one depthwise conv, residual epilogue
        x ← x + attn(norm1(x))                          FASA (fused_fasa)
        x ← downsample(x) + ffn(norm2(x))               ConvFFN

    On the CPU inference path (module docstring) the block computes channels_last and returns
    channels_last (same values): the FASA mixer and ``fc2`` add their residuals in place, the BNs
    of ``downsample`` and the FFN are folded. In (B, dim, H, W) → (B, out_dim,
    ceil(H/stride), ceil(W/stride)), same dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _plan.compiled_inference(x, self) and self.inference_output(x) is not None:
            return _plan.module_inference(self, x)  # the inference path below, opaque to torch.compile
        drop_path = getattr(self, "drop_path", None)
        if _inference(x, self):
            plan = self._plan(x)
            if plan is not None:
                return plan(x)
            x = _dw_residual(self.cpe, x.contiguous(memory_format=torch.channels_last))
            attn = self.attn
            if all(hasattr(attn, a) for a in FASA_ATTRIBUTES) and _is_1x1(attn.mixer):
                x = conv_epilogue(_fasa_gated(self.norm1(x), attn), attn.mixer.weight, attn.mixer.bias, residual=x)
            else:
                x = x + attn(self.norm1(x))
            # The shortcut (x, or downsample(x)) is a temporary of this forward: fc2 adds into it.
            return _ffn_inference(self.ffn, self.norm2(x), _downsample_inference(self.downsample, x), True)
        x = _dw_residual(self.cpe, x)
        y = self.attn(self.norm1(x))
        x = x + (drop_path(y) if drop_path is not None else y)
        y = self.ffn(self.norm2(x))
        return self.downsample(x) + (drop_path(y) if drop_path is not None else y)

    def inference_output(self, x: Tensor) -> Optional[Tensor]:
        """An empty tensor shaped like the inference path's output (channels_last), or None where
        the FFN is not the standard one whose shape that is."""
        dw, fc2 = getattr(self.ffn, "dwconv", None), getattr(self.ffn, "fc2", None)
        if not (isinstance(dw, nn.Conv2d) and isinstance(fc2, nn.Conv2d) and not isinstance(dw.padding, str)):
            return None
        (k, _), (s, _), (p, _) = dw.kernel_size, dw.stride, dw.padding
        b, _, h, w = x.shape
        shape = (b, fc2.out_channels, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    def _plan(self, x: Tensor):
        """The flat inference closure (see ``_block_plan``), built or rebuilt as needed; None where
        the block is not the standard structure or the C++ kernels cannot run here."""
        if (type(x) is not torch.Tensor or dispatch.get_backend() not in ("auto", "cpu")
                or not dispatch.no_grad_cpu(x, "cpu", ()) or not x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            return None
        key = _state_key(self)
        cached = self.__dict__.get("_fastvit_ops_plan")
        if cached is not None and cached[0] == key:
            return cached[1]  # None: not a standard block, the module path
        with torch.no_grad():
            built = _block_plan(self)
        run = built[1] if built is not None else None
        self.__dict__["_fastvit_ops_plan"] = (key, run)
        return run

    def __getstate__(self):
        # The plan is a closure (not picklable) over this module's tensors: rebuilt on demand.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_fastvit_ops_plan", None)
        return state


class PatchEmbedding(ref.PatchEmbedding):
    """``reference.fat.PatchEmbedding`` (same constructor, parameters, state_dict). On the CPU
    inference path (module docstring) the image is made channels_last once here, so the whole
    model runs in that layout, and each 3×3 conv+BN+ReLU unit is one conv (BN folded) with an
    in-place ReLU. (B, in, H, W) → (B, C, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2))."""

    def forward(self, x: Tensor) -> Tensor:
        if not _inference(x, self):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for unit in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = _conv_bn_relu_inference(unit, x)
        return self.layernorm(self.conv5(x))
