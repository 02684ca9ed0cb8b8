"""Fused Visual Transformer blocks: drop-ins for ``fastvit_ops.reference.vt`` (same constructors and
state_dicts), running every softmax-weighted sum on the downsampled-attention kernels (docs/attention.md, docs/vt.md).

* tokenizers (:class:`FilterTokenizer`, :class:`RecurrentTokenizer`): ``L`` token queries over the
  ``H·W`` pixel keys — the softmax over HW is the kernel's softmax over keys (M = HW, streamed in
  KV tiles, any length);
* :class:`Projector`: ``H·W`` pixel queries over ``L`` token keys (M = L = 16, the short side),
  written straight back to (B, C, H, W);
* :class:`TokenTransformer`: ``L × L`` self-attention of the tokens.

Shapes the kernel does not take (head width > 128, or value width ≠ key width, e.g. a
transformer with ``qk_channels ≠ channels``) use the reference composite; so do the VT-ResNet
models' blocks, whose single-head widths are 256–1024.
"""
from __future__ import annotations

from torch import Tensor

from ..ops.attention import BHND, CHANNELS_FIRST, MAX_HEAD_DIM, attention_core
from ..reference import vt as ref


def _fusable(q: Tensor, k: Tensor, v: Tensor, scale: float) -> bool:
    return (q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] == k.shape[-1] == q.shape[-1]
            and k.shape[2] >= 1 and scale > 0 and q.dtype == k.dtype == v.dtype)


class _FusedCore:
    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``softmax_over_M(self.scale · q kᵀ) v`` on (B, 1, N, d) / (B, 1, M, d), fused."""
        if not _fusable(q, k, v, self.scale):
            return super().attention(q, k, v)
        return attention_core(q, k, v, self.scale, None, BHND)


class FilterTokenizer(_FusedCore, ref.FilterTokenizer):
    """``reference.vt.FilterTokenizer`` (paper Eq. 1) with the softmax over HW fused:
    ``x (B, C, H, W)`` → tokens ``(B, L, C_T)``."""


class RecurrentTokenizer(_FusedCore, ref.RecurrentTokenizer):
    """``reference.vt.RecurrentTokenizer`` (paper Eq. 2), fused: ``(x, tokens)`` → ``(B, L, C_T)``."""


class TokenTransformer(_FusedCore, ref.TokenTransformer):
    """``reference.vt.TokenTransformer`` (paper Eqs. 3–4), attention fused: ``(B, L, C)`` → same."""


class Projector(_FusedCore, ref.Projector):
    """``reference.vt.Projector`` (paper Eq. 5): ``X + softmax_L((X W_Q)(T W_K)ᵀ) T``, fused.

    ``forward(x, tokens)``: ``x (B, C, H, W)``, tokens ``(B, L, C_T)`` → ``(B, C_out, H, W)``; the
    kernel writes the attended values channels-first, so no transpose copy precedes the residual.
    """

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        B, C, H, W = x.shape
        X = ref._pixels(x)                                          # (B, HW, C) view
        v = tokens if self.wv is None else self.wv(tokens)          # (B, L, C)
        q = self.q(X).unsqueeze(1)
        k = self.k(tokens).unsqueeze(1)
        v = v.unsqueeze(1)
        if _fusable(q, k, v, self.scale):
            out = attention_core(q, k, v, self.scale, None, CHANNELS_FIRST)  # (B, 1, HW, C'), stored (B, C', HW)
        else:  # the reference composite on the same q, k, v (not the reference forward: it would
            out = super().attention(q, k, v)  # compute them again, 4% of VT-ResNet-18's inference)
        return self.residual(x) + out.squeeze(1).transpose(1, 2).reshape(B, self.out_channels, H, W)


__all__ = ["FilterTokenizer", "RecurrentTokenizer", "TokenTransformer", "Projector"]
