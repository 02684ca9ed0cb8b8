"""FCViT tiny / B12 / B24 / B48 (docs/fcvit.md), built from the fused layers of ``fastvit_ops.nn``.

Each factory returns :class:`fastvit_ops.reference.fcvit.FCViT` with the released configuration;
``reference=True`` builds the pure-PyTorch reference layers instead. The state_dict is the
authors' (``tests/data/checkpoints/fcvit_*.txt``) either way, so released weights load with ``strict=True``.
"""
from __future__ import annotations

from fastvit_ops.reference.fcvit import CONFIGS, FCViT

__all__ = ["fcvit_tiny", "fcvit_b12", "fcvit_b24", "fcvit_b48"]


def _build(name: str, num_classes: int, reference: bool, **kwargs) -> FCViT:
    if reference:
        layers = None
    else:
        # Imported here, not at module level, so fastvit_ops.nn may itself import the models.
        from fastvit_ops.nn import FCVIT_LAYERS
        layers = FCVIT_LAYERS
    return FCViT(**CONFIGS[name], num_classes=num_classes, layers=layers, **kwargs)


def fcvit_tiny(num_classes: int = 1000, reference: bool = False, **kwargs) -> FCViT:
    """FCViT-Tiny: depths 3/3/5/2, dims 32/64/160/320, 4,784,752 params (1000 classes)."""
    return _build("fcvit_tiny", num_classes, reference, **kwargs)


def fcvit_b12(num_classes: int = 1000, reference: bool = False, **kwargs) -> FCViT:
    """FCViT-B12: depths 2/2/6/2, dims 64/128/320/512, 14,701,832 params (1000 classes)."""
    return _build("fcvit_b12", num_classes, reference, **kwargs)


def fcvit_b24(num_classes: int = 1000, reference: bool = False, **kwargs) -> FCViT:
    """FCViT-B24: depths 4/4/12/4, dims 64/128/320/512, 26,960,232 params (1000 classes)."""
    return _build("fcvit_b24", num_classes, reference, **kwargs)


def fcvit_b48(num_classes: int = 1000, reference: bool = False, **kwargs) -> FCViT:
    """FCViT-B48: depths 8/8/24/8, dims 64/128/320/512, 51,477,032 params (1000 classes)."""
    return _build("fcvit_b48", num_classes, reference, **kwargs)
