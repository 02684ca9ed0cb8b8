"""Swap reference (or the authors') layers in a model for the fused drop-ins, weights kept.

``convert`` walks a model and replaces

* every module whose class is a reference layer with a fused drop-in (``fastvit_ops.nn``'s
  ``FAT_LAYERS`` / ``FCVIT_LAYERS`` / ``CVT_LAYERS``: reference class → fused subclass);
* every module of the authors' code with the same class name and attribute names as one of those
  reference layers (duck typing: e.g. a class called ``FASA`` with ``q``, ``kv``, ``local_mixer``,
  ``mixer``, ``pool``, ``num_heads``, ``dim_head``, ``window_size``, ``scalor``), since our
  reference layers keep the authors' attribute names;
* every depthwise ``nn.Conv2d`` the fused depthwise conv runs (odd square k ≤ 31, stride 1 or 2,
  zero padding, no dilation; :func:`fastvit_ops.ops.dwconv.supports_conv`).

The swap moves the module's state (parameters, buffers, submodules, attributes) into an instance
of the fused class, so parameters are the same tensors (``inplace=True``) or deep copies
(``inplace=False``, the default) and outputs are unchanged. ``revert`` swaps fused layers back to
the reference classes.
"""
from __future__ import annotations

import collections
import copy
import logging
from typing import Dict, Tuple, Type

from torch import nn

log = logging.getLogger(__name__)

#: Attributes an authors' module must have to be taken as the reference layer of the same name
#: (our reference layers keep the authors' names). The fused code that reads these attributes from
#: any such module (``fused_fasa``, the FAT inference path) uses this table too.
DUCK_ATTRIBUTES = {
    "FASA": ("q", "kv", "local_mixer", "mixer", "pool", "num_heads", "dim_head", "window_size", "scalor"),
    "ConvFFN": ("fc1", "act", "dwconv", "bn", "fc2"),
    "FATBlock": ("cpe", "norm1", "attn", "norm2", "downsample", "ffn"),
    "PatchEmbedding": ("conv1", "conv2", "conv3", "conv4", "conv5", "layernorm"),
    "GlobalContext": ("rescale_weight", "rescale_bias", "fc1", "fc2"),
    "TokenMixer": ("dw1", "dw2", "gc1", "gc2", "fc1", "fc2"),
    "Attention": ("conv_proj_q", "conv_proj_k", "conv_proj_v", "proj_q", "proj_k", "proj_v", "proj", "num_heads"),
}


def _pairs() -> Dict[Type[nn.Module], Type[nn.Module]]:
    """reference class → fused class, from the layer maps of ``fastvit_ops.nn``."""
    from . import nn as fused
    from .reference import cvt, fat, fcvit, vt_resnet

    out = {}
    for ref_layers, fused_layers in ((fat.REFERENCE_LAYERS, fused.FAT_LAYERS),
                                     (fcvit.REFERENCE_LAYERS, fused.FCVIT_LAYERS),
                                     (cvt.REFERENCE_LAYERS, fused.CVT_LAYERS),
                                     (vt_resnet.REFERENCE_LAYERS, fused.VT_LAYERS),
                                     ({"VTResNet": vt_resnet.VTResNet}, fused.MODELS)):
        for name, fused_cls in fused_layers.items():
            ref_cls = ref_layers.get(name)
            if ref_cls is not None and fused_cls is not ref_cls:
                out[ref_cls] = fused_cls
    return out


def _recast(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """A ``cls`` instance holding ``module``'s state (same parameter tensors)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    if isinstance(new, nn.Conv2d) and isinstance(new.padding, str):  # "same"/"valid" → explicit ints
        k = new.kernel_size[0]
        new.padding = (k // 2, k // 2) if new.padding == "same" else (0, 0)
    hook = getattr(new, "_after_convert", None)
    if callable(hook):
        hook()
    return new


def _fused_for(module: nn.Module, pairs) -> Tuple[str, object]:
    """(label, how) for a module convert() replaces, or ("", None)."""
    cls = type(module)
    if cls in pairs:
        return cls.__name__, pairs[cls]
    if cls in pairs.values():
        return "", None  # already fused
    by_name = {ref.__name__: fused for ref, fused in pairs.items()}
    name = cls.__name__
    if name in by_name and all(hasattr(module, a) for a in DUCK_ATTRIBUTES.get(name, ("__never__",))):
        return f"{name} (duck-typed {cls.__module__})", by_name[name]
    if isinstance(module, nn.Conv2d) and not _is_fused_dw(module):
        from .nn.dwconv import DepthwiseConv2d
        from .ops.dwconv import supports_conv

        if supports_conv(module)[0]:
            return "depthwise nn.Conv2d", DepthwiseConv2d
    return "", None


def _is_fused_dw(module) -> bool:
    try:
        from .nn.dwconv import DepthwiseConv2d
    except ImportError:
        return False
    return isinstance(module, DepthwiseConv2d)


def _walk_replace(model: nn.Module, decide) -> collections.Counter:
    counts = collections.Counter()
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            label, new = decide(child)
            if label:
                setattr(parent, child_name, new)
                counts[label] += 1
    return counts


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every supported layer replaced by its fused drop-in.

    Args:
        model: any ``nn.Module`` — a ``fastvit_ops.models`` reference model, a model built from
            the authors' code (FAT qhfan/FAT, FCViT ma-xu/FCViT, CvT microsoft/CvT), or any model
            containing depthwise ``nn.Conv2d`` layers.
        inplace: modify ``model`` itself; otherwise a deep copy is converted.

    Returns:
        The converted model, with ``fastvit_ops_report``: a ``{layer kind: count}`` dict of what
        was swapped (also logged at INFO). The state_dict keys and values are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    pairs = _pairs()

    def decide(child):
        label, how = _fused_for(child, pairs)
        if not label:
            return "", None
        return label, _recast(child, how)

    counts = _walk_replace(model, decide)
    label, how = _fused_for(model, pairs)  # the root itself may be a convertible layer
    if label:
        model = _recast(model, how)
        counts[label] += 1
    model.fastvit_ops_report = dict(counts)
    log.info("fastvit_ops.convert swapped %s", dict(counts) or "nothing")
    return model


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Undo :func:`convert`: fused layers back to the reference classes (same weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    back = {fused: ref for ref, fused in _pairs().items()}
    from .reference.common import DepthwiseConv2d as RefDW

    def decide(child):
        cls = type(child)
        if cls in back:
            return cls.__name__, _recast(child, back[cls])
        if _is_fused_dw(child):
            return "DepthwiseConv2d", _recast(child, RefDW)
        return "", None

    counts = _walk_replace(model, decide)
    if type(model) in back:
        model = _recast(model, back[type(model)])
        counts[type(model).__name__] += 1
    model.fastvit_ops_report = dict(counts)
    return model
