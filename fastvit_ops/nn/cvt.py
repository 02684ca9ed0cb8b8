"""Fused CvT layers: drop-ins for ``fastvit_ops.reference.cvt.Attention`` and ``Block`` (same state_dicts)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import TOKENS, attention_core
from ..ops.conv_projection import conv_projection_qkv
from ..reference import cvt as ref
from . import _plan
from ._amp import autocast_like_conv
from ._bn import fold_eval_bn

try:  # the fused depthwise conv (docs/dwconv.md); plain F.conv2d otherwise
    from ..ops.dwconv import dwconv2d as _dwconv2d
except ImportError:  # pragma: no cover - depends on which ops are installed
    _dwconv2d = None


def _folded(proj: nn.Sequential) -> Tuple[Tensor, Tensor]:
    """``conv`` (DW) → eval ``bn`` as one DW conv (weight, bias). Without ``bn`` (already folded by
    :func:`fastvit_ops.fuse_for_inference`) the conv's own."""
    conv, bn = proj.conv, getattr(proj, "bn", None)
    if bn is None:
        return conv.weight, conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return fold_eval_bn(conv, bn)


def _one_pass_ok(*convs: nn.Conv2d) -> bool:
    """The three projections fit :func:`conv_projection_qkv`: one odd k, "same" padding k // 2,
    square strides of 1 or 2, k and v at one stride (CvT's q stride 1, k/v stride 2)."""
    k = convs[0].kernel_size[0]
    return (convs[1].stride == convs[2].stride
            and all(c.kernel_size == (k, k) and c.padding == (k // 2, k // 2) and c.dilation == (1, 1)
                    and c.stride[0] == c.stride[1] and c.stride[0] in (1, 2) for c in convs)
            and k % 2 == 1)


class ConvProjectionAttention(ref.Attention):
    """``reference.cvt.Attention`` (``method="dw_bn"``) on the fused kernels (docs/attention.md, docs/cvt.md).

    Same constructor, parameters and state_dict keys as the authors' ``Attention``.

    * :meth:`forward_conv` in eval mode folds each BN into its DW_3 and computes q (stride 1), k
      and v (stride 2) in one pass over the tokens with
      :func:`fastvit_ops.ops.conv_projection.conv_projection_qkv` (tokens in and out, the cls token
      copied through, no image/token transposes or concatenations). Training mode
      (batch-statistics BN) keeps the reference projections.
    * :meth:`forward` runs the attention with :func:`fastvit_ops.ops.attention.attention_core`
      straight on the (B, T, C) token layout (heads are strided views, no transposes), writing
      the output in (B, T, C) order for ``proj``; the ``dim^(−1/2)`` scale of the released code.
      Attention dropout in training (``attn_drop > 0``) falls back to the reference core.

    ``forward(x, h, w)``: ``(B, [1 +] h·w, dim_in)`` → ``(B, [1 +] h·w, dim_out)``.
    """

    def forward_conv(self, x: Tensor, h: int, w: int) -> Tuple[Tensor, Tensor, Tensor]:
        projs = (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        if self.training or self.method != "dw_bn" or any(p is None for p in projs):
            return super().forward_conv(x, h, w)
        cq, ck, cv = (p.conv for p in projs)
        wq, bq = _folded(self.conv_proj_q)
        if _one_pass_ok(cq, ck, cv):
            # q, k and v in one pass over the tokens, tokens out, cls row copied through
            wk, bk = _folded(self.conv_proj_k)
            wv, bv = _folded(self.conv_proj_v)
            x, wq, bq, wk, bk, wv, bv = autocast_like_conv(x, wq, bq, wk, bk, wv, bv)
            return conv_projection_qkv(x, (h, w), self.with_cls_token, wq, bq, wk, bk, wv, bv,
                                       cq.stride[0], ck.stride[0])
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], dim=1)
        B, _, C = x.shape
        img = x.transpose(1, 2).reshape(B, C, h, w)
        if _dwconv2d is not None and cq.stride[0] == cq.stride[1] and cq.padding[0] == cq.padding[1]:
            q = _dwconv2d(*autocast_like_conv(img, wq, bq), cq.stride[0], cq.padding[0])
        else:
            q = F.conv2d(img, wq, bq, cq.stride, cq.padding, groups=C)
        wk, bk = _folded(self.conv_proj_k)
        wv, bv = _folded(self.conv_proj_v)
        if ck.stride == cv.stride and ck.padding == cv.padding and ck.kernel_size == cv.kernel_size:
            # k and v in one pass: channel multiplier 2, outputs interleaved (c_k, c_v) per channel.
            kv = F.conv2d(img, torch.stack([wk, wv], 1).flatten(0, 1), torch.stack([bk, bv], 1).flatten(),
                          ck.stride, ck.padding, groups=C)
            k, v = kv[:, 0::2], kv[:, 1::2]
        else:
            k = F.conv2d(img, wk, bk, ck.stride, ck.padding, groups=C)
            v = F.conv2d(img, wv, bv, cv.stride, cv.padding, groups=C)
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (q, k, v))
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        return q, k, v

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, h, w)
        if (self.conv_proj_q is not None or self.conv_proj_k is not None
                or self.conv_proj_v is not None):
            q, k, v = self.forward_conv(x, h, w)
        else:
            q = k = v = x
        q = self._split_heads(self.proj_q(q))   # (B, heads, T, d) views of (B, T, C)
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))
        out = attention_core(q, k, v, self.scale, None, TOKENS)
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, self.dim)  # a view: the kernel wrote (B, T, C)
        return self.proj_drop(self.proj(out))


class Block(_plan.PlannedModule, ref.Block):
    """``reference.cvt.Block`` (same constructor, parameters, state_dict). On the CPU inference path
    (:mod:`fastvit_ops.nn.cvt_inference`: eval, fp32, no grad) one cached plan: oneDNN matmuls with
    the residual adds and QuickGELU (as SiLU, its 1.702 folded into the weights) in place on their outputs,
    the BN-folded one-pass conv projections and the fused attention; under torch.compile that plan
    is one opaque op (:func:`fastvit_ops.nn._plan.module_inference`). Elsewhere the reference
    composition of the fused layers. ``forward(x, h, w)``: (B, [1 +] h·w, C) → same shape."""

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        if _plan.compiled_inference(x, self):
            return _plan.module_inference(self, x, h, w)
        if _plan.applies(x, self):
            from . import cvt_inference
            return _plan.run(self, cvt_inference.block, x, h, w)
        return super().forward(x, h, w)

    def inference_output(self, x: Tensor, h: int, w: int) -> Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
