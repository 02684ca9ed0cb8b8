"""Eval-mode BatchNorm folded into the convolution before it, shared by the fused modules."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def is_eval_bn(bn) -> bool:
    """An eval-mode BatchNorm (``BatchNorm2d`` or the authors' ``SyncBatchNorm``) with running stats."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def fold_eval_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of one conv equal to ``bn(conv(x))`` in eval mode: ``w·γ/σ``,
    ``(b − μ)·γ/σ + β`` with σ = √(var + eps); differentiable in the parameters, conv's dtype."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        inv = inv * bn.weight
    w = conv.weight * inv.view(-1, 1, 1, 1)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    b = (b - bn.running_mean) * inv
    return w, (b + bn.bias if bn.bias is not None else b)
