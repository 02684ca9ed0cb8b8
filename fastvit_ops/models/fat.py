"""FAT-B0 … B3 (docs/fat.md), built from the fused layers of ``fastvit_ops.nn``.

Each factory returns :class:`fastvit_ops.reference.fat.FAT` with the variant's settings
(:data:`fastvit_ops.reference.fat.CONFIGS`); its state_dict is the authors' (qhfan/FAT), so a
released checkpoint loads with ``load_state_dict(sd, strict=True)``. ``reference=True`` builds
the pure-PyTorch reference layers instead of the fused drop-ins (same parameters and keys); a
``layers={name: cls}`` keyword replaces single layers on top of either choice. Other keywords
(``in_chans``, ``drop_path_rate``, ``use_checkpoint``) go to ``FAT``.
"""
from __future__ import annotations

from ..reference.fat import CONFIGS, FAT

__all__ = ["fat_b0", "fat_b1", "fat_b2", "fat_b3"]


def _build(name: str, num_classes: int, reference: bool, kwargs: dict) -> FAT:
    if reference:
        layers = {}
    else:
        from .. import nn as fused_nn  # lazy: fastvit_ops.nn may import ops/kernels
        layers = dict(fused_nn.FAT_LAYERS)
    # A caller's ``layers=`` goes on top (unknown names raise ValueError in FAT).
    layers.update(kwargs.pop("layers", None) or {})
    return FAT(**CONFIGS[name], num_classes=num_classes, layers=layers or None, **kwargs)


def fat_b0(num_classes: int = 1000, reference: bool = False, **kwargs) -> FAT:
    """FAT-B0: dims 32/80/160/256, depths 2/2/6/2, heads 2/5/10/16 (4,494,488 params)."""
    return _build("fat_b0", num_classes, reference, kwargs)


def fat_b1(num_classes: int = 1000, reference: bool = False, **kwargs) -> FAT:
    """FAT-B1: dims 48/96/192/384, depths 2/2/6/2, heads 3/6/12/24 (7,819,720 params)."""
    return _build("fat_b1", num_classes, reference, kwargs)


def fat_b2(num_classes: int = 1000, reference: bool = False, **kwargs) -> FAT:
    """FAT-B2: dims 64/128/256/512, depths 2/2/6/2, heads 2/4/8/16 (13,466,728 params)."""
    return _build("fat_b2", num_classes, reference, kwargs)


def fat_b3(num_classes: int = 1000, reference: bool = False, **kwargs) -> FAT:
    """FAT-B3: dims 64/128/256/512, depths 4/4/16/4, heads 2/4/8/16 (29,196,264 params)."""
    return _build("fat_b3", num_classes, reference, kwargs)
