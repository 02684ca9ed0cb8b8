"""Model factories: FAT-B0..B3, FCViT tiny..B48, CvT-13/21 (state_dicts = the authors' checkpoints),
VT-ResNet-18/34 (built from the paper; no released weights).

Each factory is ``name(num_classes=1000, reference=False, **kwargs)``: fused layers from
``fastvit_ops.nn`` by default, the pure-PyTorch reference with ``reference=True``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .cvt import cvt_13, cvt_21
from .fat import fat_b0, fat_b1, fat_b2, fat_b3
from .fcvit import fcvit_b12, fcvit_b24, fcvit_b48, fcvit_tiny
from .vt import vt_resnet18, vt_resnet34

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (fat_b0, fat_b1, fat_b2, fat_b3, fcvit_tiny, fcvit_b12, fcvit_b24, fcvit_b48,
                            cvt_13, cvt_21, vt_resnet18, vt_resnet34)
}


def list_models() -> List[str]:
    """Names accepted by :func:`create`, in a stable order."""
    return list(_REGISTRY)


def create(name: str, num_classes: int = 1000, reference: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` (see :func:`list_models`); raises ``ValueError`` for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown model {name!r}; expected one of {list_models()}")
    return _REGISTRY[name](num_classes=num_classes, reference=reference, **kwargs)


__all__ = ["create", "list_models"] + list(_REGISTRY)
