"""Eval-mode BatchNorm folded into the convolution next to it, shared by the fused modules."""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._plan import tensor_version


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


# owner module → {name: (key, folded tensors)}. Beside the module, not in its __dict__: pickling,
# deepcopy and torch.save of a model carry no folded copies (a copy refolds on its first call).
_FOLDS: "weakref.WeakKeyDictionary[nn.Module, Dict[str, tuple]]" = weakref.WeakKeyDictionary()


def _source_key(t: Optional[Tensor]):
    """What a fold read from ``t``, compared by :func:`cached_fold`: the tensor object and its
    storage (weak references, so a freed tensor whose memory or ``id`` a new one reuses cannot
    match), and its data pointer, version counter, dtype, device, shape and strides."""
    if t is None:
        return None
    return (weakref.ref(t), weakref.ref(t.untyped_storage()), t.data_ptr(), tensor_version(t), t.dtype,
            t.device, tuple(t.shape), t.stride())


def _same(key, t: Optional[Tensor]) -> bool:
    if key is None or t is None:
        return key is None and t is None
    return (key[0]() is t and key[1]() is t.untyped_storage()
            and key[2:] == (t.data_ptr(), tensor_version(t), t.dtype, t.device, tuple(t.shape), t.stride()))


def cached_fold(owner: nn.Module, name: str, sources: Sequence[Optional[Tensor]],
                compute: Callable[[], Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
    """``compute()`` (folded weights, no autograd graph), cached for ``owner`` until one of
    ``sources`` changes: another tensor object (``load_state_dict(assign=True)``, a new
    ``nn.Parameter``, ``.to()``, ``.half()``), new storage (``p.data = t``), an in-place write
    (version counter: optimizer steps, ``load_state_dict`` copies, BN statistics updated in
    training), dtype, device, shape or strides. ``name`` carries the fold's hyperparameters (the
    BN's ``eps``). Not seen: writes through ``p.data`` (``p.data.mul_(2)``), which bypass the
    version counter; assign a new tensor or write under ``torch.no_grad()`` instead.
    For inference only (the result is detached); not a buffer, not in the state_dict, not pickled."""
    cache = _FOLDS.setdefault(owner, {})
    hit = cache.get(name)
    if hit is not None and len(hit[0]) == len(sources) and all(_same(k, t) for k, t in zip(hit[0], sources)):
        return hit[1]
    with torch.no_grad():
        value = tuple(v.detach() for v in compute())
    cache[name] = (tuple(_source_key(t) for t in sources), value)
    return value


def fold_cache(owner: nn.Module) -> Dict[str, Tuple[Tensor, ...]]:
    """The folds cached for ``owner`` now, by name (for inspection and tests)."""
    return {name: hit[1] for name, hit in _FOLDS.get(owner, {}).items()}


def bn_sources(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Optional[Tensor], ...]:
    """The tensors an eval-mode BN fold depends on (for :func:`cached_fold`)."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)
