"""VT-ResNet-18 / VT-ResNet-34 (Visual Transformers, arXiv 2006.03677, Table 11), built from the
fused VT blocks of ``fastvit_ops.nn``.

Each factory returns a :class:`fastvit_ops.reference.vt_resnet.VTResNet` (its docstring gives the
architecture, the choices the paper leaves open, and the parameter / FLOP counts against the
paper's Table 2): by default the fused subclass :class:`fastvit_ops.nn.vt_resnet.VTResNet` with
its stem and basic blocks on a CPU inference path (docs/vt.md) and fused VT blocks; ``reference=True`` builds the
pure-PyTorch reference instead (same
parameters and state_dict keys). Input images ``(B, 3, H, W)`` (224² in the paper), output logits
``(B, num_classes)``. No released weights exist.
"""
from __future__ import annotations

from ..reference.vt_resnet import CONFIGS, VTResNet

__all__ = ["vt_resnet18", "vt_resnet34"]


def _build(name: str, num_classes: int, reference: bool, kwargs: dict) -> VTResNet:
    cls = VTResNet
    if reference:
        layers = {}
    else:
        from .. import nn as fused_nn  # lazy: fastvit_ops.nn imports ops/kernels
        layers = dict(fused_nn.VT_LAYERS)
        cls = fused_nn.MODELS["VTResNet"]  # its stem's CPU inference path
    layers.update(kwargs.pop("layers", None) or {})
    return cls(**CONFIGS[name], num_classes=num_classes, layers=layers or None, **kwargs)


def vt_resnet18(num_classes: int = 1000, reference: bool = False, **kwargs) -> VTResNet:
    """VT-ResNet-18: ResNet-18 layers 1–3, then 2 VT modules (C 512, L 16, C_T 1024);
    11,676,200 parameters and 1,585.2M multiply-adds at 224² (paper Table 2: 11.7M, 1570M)."""
    return _build("vt_resnet18", num_classes, reference, kwargs)


def vt_resnet34(num_classes: int = 1000, reference: bool = False, **kwargs) -> VTResNet:
    """VT-ResNet-34: ResNet-34 layers 1–3, then 3 VT modules (C 512, L 16, C_T 1024);
    22,044,456 parameters and 3,337.3M multiply-adds at 224² (paper Table 2: 21.9M, 3280M)."""
    return _build("vt_resnet34", num_classes, reference, kwargs)
