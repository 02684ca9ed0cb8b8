"""Fused depthwise conv: drop-in for ``fastvit_ops.reference.common.DepthwiseConv2d`` (docs/dwconv.md)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.dwconv import check_kernel_size, conv_arguments, dwconv2d
from ..reference import common as ref
from ._amp import autocast_like_conv
from ._bn import eval_bn_affine


class DepthwiseConv2d(ref.DepthwiseConv2d):
    """``nn.Conv2d(C, C, k, stride, padding, groups=C)`` running :func:`fastvit_ops.ops.dwconv.dwconv2d`.

    Same constructor ``DepthwiseConv2d(channels, kernel_size, stride=1, bias=True, padding=None)``
    (padding None → k // 2), parameters and state_dict keys (``weight`` (C, 1, k, k), ``bias`` (C,))
    as the reference layer and the authors' ``nn.Conv2d``, so checkpoints load unchanged.
    ``forward(x, activation=None, residual=False)`` optionally fuses SiLU/GELU and ``+ x``.

    Raises ``ValueError`` at construction for an even kernel, k > 31, or a stride other than 1, 2.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
                 padding: Optional[int] = None):
        check_kernel_size("kernel_size", kernel_size)
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        super().__init__(channels, kernel_size, stride=stride, bias=bias, padding=padding)

    def forward(self, x: Tensor, activation: Optional[str] = None, residual: bool = False) -> Tensor:
        # Under autocast: cast like nn.Conv2d's F.conv2d would (the reference's policy).
        x, weight, bias = autocast_like_conv(x, self.weight, self.bias)
        return dwconv2d(x, weight, bias, self.stride[0], self.padding[0], activation, residual)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A fused copy of a depthwise ``nn.Conv2d`` (same weights, device and dtype).

        Raises ``TypeError`` for a non-``nn.Conv2d`` and ``ValueError`` for a conv that is not a
        depthwise one this op runs (:func:`fastvit_ops.ops.dwconv.conv_arguments`: groups ≠ in =
        out channels, non-square or even kernel, k > 31, unequal or unsupported stride/padding,
        dilation ≠ 1, or a padding mode other than zeros).
        """
        kh, sh, padding = conv_arguments(conv)
        C = conv.in_channels
        out = cls(C, kh, stride=sh, bias=conv.bias is not None, padding=padding)
        out = out.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(conv.weight)
            if conv.bias is not None:
                out.bias.copy_(conv.bias)
        out.train(conv.training)
        return out

    @torch.no_grad()
    def fold_bn(self, bn: nn.BatchNorm2d) -> "DepthwiseConv2d":
        """A new conv equal to ``bn(self(x))`` with ``bn`` in eval mode (running statistics).

        ``w' = w·γ/√(var + eps)``, ``b' = (b − mean)·γ/√(var + eps) + β`` (computed in fp64, stored
        in this conv's dtype); the result always has a bias. For inference: the fold is exact only
        for the statistics ``bn`` holds now. Raises ``TypeError`` for a non-BatchNorm2d and
        ``ValueError`` for a channel mismatch or a BatchNorm without running statistics.
        """
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn: expected an nn.BatchNorm2d, got {type(bn).__name__}")
        C = self.weight.shape[0]
        if bn.num_features != C:
            raise ValueError(f"bn: expected {C} features, got {bn.num_features}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn: needs running statistics (track_running_stats=True) to fold")
        scale, shift = eval_bn_affine(bn)
        bias = self.bias.double() * scale + shift if self.bias is not None else shift
        out = type(self)(C, self.kernel_size[0], stride=self.stride[0], bias=True, padding=self.padding[0])
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight.double() * scale.view(C, 1, 1, 1))
        out.bias.copy_(bias)
        out.train(self.training)
        return out


def depthwise_arguments(conv) -> Optional[Tuple[int, int, int]]:
    """``(k, stride, padding)`` when the fused depthwise conv computes ``conv`` (any module), else
    None (:func:`fastvit_ops.ops.dwconv.conv_arguments` says why)."""
    try:
        return conv_arguments(conv)
    except (TypeError, ValueError):
        return None


__all__ = ["DepthwiseConv2d", "depthwise_arguments"]
