"""Small building blocks shared by the reference models (notation of docs/README.md)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn


class DepthwiseConv2d(nn.Conv2d):
    """``DW_k/s`` of docs/README.md: ``nn.Conv2d(C, C, k, stride, k // 2, groups=C)``.

    Same parameters and state_dict keys (``weight`` (C, 1, k, k), ``bias`` (C,)) as the
    ``nn.Conv2d`` the authors wrote, so checkpoints load unchanged. ``fastvit_ops.nn`` swaps in a
    fused subclass.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
                 padding: Optional[int] = None):
        super().__init__(channels, channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if padding is None else padding,
                         groups=channels, bias=bias)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``, which FAT, FCViT and CvT all use).

    Input ``(B, ...)``: in training, each sample's branch is zeroed with probability ``drop_prob``
    and the kept ones are scaled by ``1 / (1 - drop_prob)``; identity in eval or at rate 0. No
    parameters, so no state_dict keys.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class GroupNorm1(nn.GroupNorm):
    """``GN`` of docs/README.md: ``nn.GroupNorm(1, C)``, what FAT and FCViT call "LayerNorm"."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(1, channels, eps=eps)


def resolve_layers(defaults: Mapping[str, type], overrides: Optional[Mapping[str, type]]) -> dict:
    """Merge a model's reference layer classes with the caller's replacements.

    Raises ``ValueError`` for a name the model does not use, so a typo cannot silently fall back
    to the reference layer.
    """
    layers = dict(defaults)
    for name, cls in (overrides or {}).items():
        if name not in layers:
            raise ValueError(f"layers: unknown layer name {name!r}; expected one of {sorted(layers)}")
        layers[name] = cls
    return layers
