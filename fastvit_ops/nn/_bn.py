"""Eval-mode BatchNorm folded into the convolution next to it, shared by the fused modules."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

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


def eval_bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """(s, t) in float64 with ``BN(y) = y·s + t`` per channel (eval mode)."""
    s = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def fold_bn_into_next_1x1(bn: nn.modules.batchnorm._BatchNorm, conv: nn.Conv2d) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of one 1×1 conv equal to ``conv(bn(u))`` in eval mode: with ``bn(u) = u·s + t``
    per channel, ``W' = W·s`` (per input channel) and ``b' = b + W·t``. Folded in float64, returned
    in the conv's dtype (FAT's ConvFFN ``fc2(bn(u))``)."""
    s, t = eval_bn_affine(bn)
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    w2 = w[:, :, 0, 0]
    return (w * s.view(1, -1, 1, 1)).to(conv.weight.dtype), (b + w2 @ t).to(conv.weight.dtype)


def cached_fold(owner: nn.Module, name: str, sources: Sequence[Optional[Tensor]],
                compute: Callable[[], Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
    """``compute()`` (folded weights, no autograd graph), cached on ``owner`` until one of
    ``sources`` changes: the key is each source's storage pointer and version counter, so an
    optimizer step, ``load_state_dict``, ``.to()`` or any in-place edit refolds on the next call.
    For inference only (the result is detached); not a registered buffer, so no state_dict entry."""
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    cache = owner.__dict__.setdefault("_fastvit_ops_folds", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = tuple(v.detach() for v in compute())
    cache[name] = (key, value)
    return value


def bn_sources(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Optional[Tensor], ...]:
    """The tensors an eval-mode BN fold depends on (for :func:`cached_fold`)."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)
