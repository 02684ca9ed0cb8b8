"""Inference-only folding: eval-mode BatchNorms folded into the convolutions next to them.

In eval mode ``BN(y) = y·s + t`` per channel with ``s = γ/√(var + eps)``, ``t = β − mean·s``, so

* a BN directly **after** a conv ``y = W∗x + b`` (any groups: depthwise or dense) folds into it:
  ``W' = W·s`` (per output channel), ``b' = b·s + t``;
* a BN directly **before** a 1×1 conv without padding, ``z = W·BN(u) + b``, folds into that conv:
  ``W' = W·s`` (per input channel), ``b' = b + W·t``.

Where this happens (nothing else is touched):

* any ``nn.Sequential`` holding a ``Conv2d`` immediately followed by a ``BatchNorm2d`` (or
  ``SyncBatchNorm``): the BN is removed from the Sequential (other children keep their names).
  In our models: FAT's stem ``patch_embed.conv{1..4}.conv``, FASA's ``pool`` (``conv{j}``,
  ``bn{j}``), FAT's stride-2 ``downsample``, CvT's ``conv_proj_{q,k,v}`` (conv, bn);
* modules of these known classes (matched by class name and attribute types, so the authors'
  classes of the same name are covered): ``PatchEmbed`` / ``OverlapPatchEmbed`` (FCViT:
  ``norm(proj(x))``) — ``norm`` folds into ``proj``; ``ConvFFN`` (FAT: ``fc2(bn(u))``) — ``bn``
  folds into the 1×1 ``fc2``. The folded BN attribute becomes ``nn.Identity``.

The folded model computes the same eval-mode outputs (fold in float64, stored in the conv's
dtype) with fewer modules and one op fewer per BN; its state_dict no longer has the BN entries,
so it is for inference (and export), not for further training or checkpoint saving.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .nn._bn import eval_bn_affine, fold_bn_into_next_1x1

__all__ = ["fuse_for_inference"]

#: class name → (conv attribute, BN attribute, "after": BN follows the conv | "before": BN precedes it)
KNOWN_PATTERNS: Dict[str, Tuple[str, str, str]] = {
    "PatchEmbed": ("proj", "norm", "after"),
    "OverlapPatchEmbed": ("proj", "norm", "after"),
    "ConvFFN": ("fc2", "bn", "before"),
}


def _foldable(bn, conv, where: str) -> bool:
    if not (isinstance(bn, _BatchNorm) and isinstance(conv, nn.Conv2d)):
        return False
    if bn.running_mean is None or bn.running_var is None:  # track_running_stats=False: batch stats always
        return False
    if where == "after":
        return conv.out_channels == bn.num_features
    # BN before the conv: only a 1×1, unpadded, ungrouped conv sees BN(u) pixel by pixel.
    return (conv.in_channels == bn.num_features and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and not isinstance(conv.padding, str) and tuple(conv.padding) == (0, 0))


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: _BatchNorm, where: str) -> None:
    if where == "after":
        s, t = eval_bn_affine(bn)
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                         device=w.device)
        w_new, b_new = w * s.view(-1, 1, 1, 1), b * s + t
    else:
        w_new, b_new = fold_bn_into_next_1x1(bn, conv)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(w_new.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(b_new.to(dtype), requires_grad=conv.weight.requires_grad)


def _fold_sequential(seq: nn.Sequential) -> int:
    names = list(seq._modules)
    drop = []
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if _foldable(bn, conv, "after"):
            _fold(conv, bn, "after")
            drop.append(b)
    for name in drop:
        del seq._modules[name]
    return len(drop)


def _fold_known(module: nn.Module) -> int:
    pattern = KNOWN_PATTERNS.get(type(module).__name__)
    if pattern is None:
        return 0
    conv_name, bn_name, where = pattern
    conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
    if not _foldable(bn, conv, where):
        return 0
    _fold(conv, bn, where)
    setattr(module, bn_name, nn.Identity())
    return 1


def fuse_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm that sits next to a convolution into it (see the module doc).

    Works on reference, converted (:func:`fastvit_ops.convert`) and fused models alike, and on
    the authors' models for the patterns listed in the module docstring.

    Args:
        model: an ``nn.Module`` in eval mode (``model.eval()``; every submodule must be in eval,
            since a train-mode BN normalizes with batch statistics, which cannot be folded).
        inplace: fold into ``model`` itself; otherwise (default) into a deep copy.

    Returns:
        The folded model (eval mode), with ``fastvit_ops_fuse_report = {"bn_folded": n}``. Eval
        outputs equal the input model's (up to fp32 rounding, ≤1e-5 relative in our tests).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` (or any submodule) is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"model: fuse_for_inference needs eval mode (call model.eval()); in training mode: "
                         f"{', '.join(training[:3])}{', ...' if len(training) > 3 else ''}")
    if not inplace:
        model = copy.deepcopy(model)
    folded = 0
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential):
            folded += _fold_sequential(m)
        else:
            folded += _fold_known(m)
    model.fastvit_ops_fuse_report = {"bn_folded": folded}
    return model


def count_batchnorms(model: nn.Module, kind: Optional[type] = None) -> int:
    """Number of BatchNorm modules left in ``model`` (a helper for checks)."""
    return sum(isinstance(m, kind or _BatchNorm) for m in model.modules())
