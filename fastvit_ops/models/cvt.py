"""CvT-13 / CvT-21 factories (docs/cvt.md), built from the fused drop-ins of ``fastvit_ops.nn``.

The models are :class:`fastvit_ops.reference.cvt.ConvolutionalVisionTransformer` with
``layers=fastvit_ops.nn.CVT_LAYERS`` (any layer without a fused version stays the reference one),
so their state_dict equals the authors' (``tests/data/checkpoints/cvt_{13,21}.txt``) and released
checkpoints load with ``strict=True``. Input images ``(B, 3, H, W)`` (trained at 224²), output
logits ``(B, num_classes)``; dtype follows the input (LayerNorm runs in fp32 inside).
"""
from __future__ import annotations

from fastvit_ops.reference.cvt import CONFIGS, ConvolutionalVisionTransformer

__all__ = ["cvt_13", "cvt_21"]


def _build(name: str, num_classes: int, reference: bool, **kwargs) -> ConvolutionalVisionTransformer:
    if reference:
        layers = None
    else:
        # Imported at call time: keeps this module free of import cycles with fastvit_ops/__init__
        # and picks up the current contents of the map.
        from fastvit_ops.nn import CVT_LAYERS
        layers = CVT_LAYERS
    return ConvolutionalVisionTransformer(num_classes=num_classes, spec=CONFIGS[name],
                                          layers=layers, **kwargs)


def cvt_13(num_classes: int = 1000, reference: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-13: dims 64/192/384, heads 1/3/6, depths 1/2/10; 19,997,480 parameters at 1000 classes.

    ``reference=True`` builds only the pure-PyTorch reference layers. Extra keywords
    (``in_chans``, ``drop_path_rate``, ``init``) go to the model constructor.
    """
    return _build("cvt_13", num_classes, reference, **kwargs)


def cvt_21(num_classes: int = 1000, reference: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-21: dims 64/192/384, heads 1/3/6, depths 1/4/16; 31,622,696 parameters at 1000 classes.

    ``reference=True`` builds only the pure-PyTorch reference layers. Extra keywords
    (``in_chans``, ``drop_path_rate``, ``init``) go to the model constructor.
    """
    return _build("cvt_21", num_classes, reference, **kwargs)
