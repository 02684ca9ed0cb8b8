"""Fused FAT layers: :func:`fused_fasa` and the drop-ins for ``fastvit_ops.reference.fat``'s FASA,
ConvFFN, FATBlock and PatchEmbedding (same constructors and state_dicts).

In CPU inference (eval, fp32, nothing needing gradients) ``FATBlock``, ``FASA``, ``ConvFFN`` and
``PatchEmbedding`` run the plan of :mod:`fastvit_ops.nn.fat_inference` (channels_last, BNs folded,
epilogues in place); under ``torch.compile`` in that mode the block, the FASA module and the stem
are each one opaque op running that plan (:func:`fastvit_ops.nn._plan.module_inference`).
Everything else (training, autograd, autocast, other devices) runs the reference composition on
the fused ops, here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import CHANNELS_FIRST, TOKENS, attention_core
from ..ops.cross_modulation import sigmoid_cross_modulation
from ..ops.dwconv import dwconv2d as _dwconv2d
from ..ops.validate import check_tensor, is_channels_last
from ..reference import fat as ref
from . import _plan
from . import fat_inference as inference
from ._amp import autocast_like_conv
from ._bn import bn_sources, cached_fold, fold_eval_bn, is_eval_bn
from .dwconv import depthwise_arguments
from .fat_inference import FASA_ATTRIBUTES


def _depthwise(x: Tensor, conv: nn.Module, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """``act(DW(x))`` with ``conv``'s stride/padding and the given (possibly BN-folded) weights: the
    fused depthwise conv where it computes ``conv`` (SiLU fused for FASA's local branch), else
    ``F.conv2d``. Under autocast the tensors are cast as ``F.conv2d`` would cast them (the
    reference's policy)."""
    args = depthwise_arguments(conv)
    if args is not None:
        x, weight, bias = autocast_like_conv(x, weight, bias)
        return _dwconv2d(x, weight, bias, args[1], args[2], "silu" if silu else None)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups) \
        if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" else conv(x)
    return F.silu(y) if silu else y


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


def fused_fasa(x: Tensor, fasa: nn.Module) -> Tensor:
    """FAT's Fully Adaptive Self-Attention forward (docs/fat.md) on the fused kernels, for any FASA module.

    ``fasa`` may be :class:`fastvit_ops.nn.FASA`, :class:`fastvit_ops.reference.fat.FASA`, or the
    authors' ``FASA`` (github qhfan/FAT ``classification/models.py``) — anything with the
    attributes of :data:`FASA_ATTRIBUTES`: ``q`` (1×1 conv C→C), ``kv`` (1×1 conv C→2C),
    ``local_mixer`` (depthwise conv DW_k), ``mixer`` (1×1 conv C→C), ``pool`` (the K/V
    downsampler: ``nn.Sequential`` of DW_5/s2, BN, 1×1 units, or ``nn.Identity``), ``num_heads``
    (h), ``dim_head`` (d = C/h), ``window_size`` and ``scalor`` (the softmax scale, d^(−1/2) in
    the released code). The module's own ``forward``/``attention``/``modulate`` are not called: the
    computation is the released code's (paper Eq. 3–10 with the released interaction
    ``SiLU(L0) ⊙ SiLU(G)``, docs/cross_modulation.md, mode "silu")::

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


class FASA(_plan.PlannedModule, ref.FASA):
    """``reference.fat.FASA`` with the global branch fused (docs/attention.md, docs/cross_modulation.md, docs/fat.md).

    Same constructor ``FASA(dim, kernel_size, num_heads, window_size)``, parameters and state_dict
    keys as the authors' FASA, so their checkpoints load unchanged. The forward:

    * queries are read straight from ``Q̂ = q(X)`` (B, C, H, W) and the result written straight to
      (B, C, H, W) by :func:`fastvit_ops.ops.attention.downsampled_attention_nchw`'s kernel, with
      the interaction ``SiLU(G) ⊙ SiLU(L0)`` as its epilogue, so ``G`` never reaches memory;
    * the local branch ``SiLU(DW_k(Q̂))`` is one fused depthwise conv with a SiLU epilogue;
    * the pool's BN is folded into its DW convs in eval mode (batch statistics in training).

    ``forward`` is :func:`fused_fasa` (``self`` as the module), except in CPU inference (module
    docstring), where the module runs its plan: the same computation on a channels_last copy of
    the input, the output channels_last (same values; 12–20% faster than :func:`fused_fasa` at
    FAT-B0 s1–s4 on an NCHW input, AVX2 and AVX-512).

    Input (B, C, H, W) at any H, W; output (B, C, H, W) in the input dtype.
    """

    def modulate(self, local: Tensor, global_: Tensor) -> Tensor:
        return sigmoid_cross_modulation(local, global_, "silu")

    def forward(self, x: Tensor) -> Tensor:
        # A 4-D tensor only: anything else goes on to fused_fasa, which validates and raises.
        if isinstance(x, Tensor) and x.dim() == 4:
            if _plan.compiled_inference(x, self):
                return _plan.module_inference(self, x)  # the plan, opaque to torch.compile
            if inference.applies(x, self):
                return inference.run(self, x)
        return fused_fasa(x, self)

    def inference_output(self, x: Tensor) -> Tensor:
        """An empty channels_last tensor shaped like ``x`` (the plan's output)."""
        return _plan.empty_channels_last(x, x.shape)


def _dw_residual(conv: nn.Module, x: Tensor) -> Tensor:
    """``x + conv(x)``: one depthwise conv with a residual epilogue where the fused kernel runs it."""
    args = depthwise_arguments(conv)
    if args is not None and args[1] == 1 and args[2] == args[0] // 2:
        xc, w, b = autocast_like_conv(x, conv.weight, conv.bias)
        # Under autocast an fp32 x is cast for the conv, but the reference adds the fp32 x itself
        # (and its sum stays fp32): only fuse when the conv sees x as it is.
        if xc is x:
            return _dwconv2d(x, w, b, 1, args[2], None, True)
    return x + conv(x)


class ConvFFN(_plan.PlannedModule, ref.ConvFFN):
    """``reference.fat.ConvFFN`` (same constructor, parameters, state_dict) on the fused ops.

    ``U = GELU(fc1(Z))``; stride 1: ``U + DW_k(U)`` as one depthwise conv with a residual epilogue;
    stride 2: ``DW_k/s2(U)``; ``out = fc2(BN(U))``. In CPU inference (module docstring) the BN is
    folded into ``fc2``, the GELU runs in place on ``fc1``'s output and the output is channels_last.
    In (B, C_in, H, W) → (B, C_out, ceil(H/s), ceil(W/s)), same dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if inference.applies(x, self):
            return inference.run(self, x)
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

    In CPU inference (module docstring) the block runs its plan: channels_last in and out (same
    values), the FASA mixer and ``fc2`` adding their residuals in place, the BNs of ``downsample``
    and the FFN folded. In (B, dim, H, W) → (B, out_dim, ceil(H/stride), ceil(W/stride)), same dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _plan.compiled_inference(x, self) and self.inference_output(x) is not None:
            return _plan.module_inference(self, x)  # the plan, opaque to torch.compile
        if inference.applies(x, self):
            return inference.run(self, x)
        drop_path = getattr(self, "drop_path", None)
        x = _dw_residual(self.cpe, x)
        y = self.attn(self.norm1(x))
        x = x + (drop_path(y) if drop_path is not None else y)
        y = self.ffn(self.norm2(x))
        return self.downsample(x) + (drop_path(y) if drop_path is not None else y)

    def inference_output(self, x: Tensor) -> Optional[Tensor]:
        """An empty tensor shaped like the plan's output (channels_last), or None where the FFN is
        not a ConvFFN whose output shape that is (torch.compile then traces the composition)."""
        shape = _plan.conv_output_shape(getattr(self.ffn, "dwconv", None), x.shape)
        if shape is not None:
            shape = _plan.conv_output_shape(getattr(self.ffn, "fc2", None), shape)
        return None if shape is None else _plan.empty_channels_last(x, shape)


class PatchEmbedding(_plan.PlannedModule, ref.PatchEmbedding):
    """``reference.fat.PatchEmbedding`` (same constructor, parameters, state_dict). In CPU inference
    (module docstring) the image is made channels_last once here, so the whole model runs in that
    layout, and each 3×3 conv+BN+ReLU unit is one conv (BN folded) with an in-place ReLU.
    (B, in, H, W) → (B, C, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2))."""

    def forward(self, x: Tensor) -> Tensor:
        if _plan.compiled_inference(x, self) and self.inference_output(x) is not None:
            return _plan.module_inference(self, x)  # channels_last, BNs folded, also under compile
        if inference.applies(x, self):
            return inference.run(self, x)
        return super().forward(x)

    def inference_output(self, x: Tensor) -> Optional[Tensor]:
        """An empty channels_last tensor shaped like the stem's output, or None where a unit is not
        the conv+BN+ReLU (or a plain conv) whose shape that is."""
        shape = x.shape
        for unit in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            seq = getattr(unit, "conv", unit)
            shape = _plan.conv_output_shape(seq[0] if isinstance(seq, nn.Sequential) else seq, shape)
            if shape is None:
                return None
        return _plan.empty_channels_last(x, shape)
