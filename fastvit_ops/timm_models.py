"""timm integration: every ``fastvit_ops.models`` model in timm's registry, as ``fastvit_ops_<name>``.

With timm installed (``pip install fastvit_ops[timm]``), importing ``fastvit_ops`` registers
``fastvit_ops_fat_b0`` … ``fastvit_ops_fat_b3``, ``fastvit_ops_fcvit_tiny`` / ``_b12`` / ``_b24`` /
``_b48``, ``fastvit_ops_cvt_13`` / ``_21`` and ``fastvit_ops_vt_resnet18`` / ``_34`` (the prefix keeps
them apart from timm's own names, e.g. its unrelated ``fastvit_*`` family)::

    import fastvit_ops, timm
    model = timm.create_model("fastvit_ops_fat_b0", pretrained=True,
                              pretrained_cfg_overlay=dict(file="fat_b0.pth"))   # fused layers
    cfg = timm.data.resolve_data_config({}, model=model)      # the authors' eval pipeline
    transform = timm.data.create_transform(**cfg)

Keywords go to the model factory (``num_classes``, ``in_chans``, ``reference=True`` for the
pure-PyTorch layers, ...). ``pretrained=True`` loads a local checkpoint given as
``pretrained_cfg_overlay=dict(file=...)`` through timm's loader (a bare state_dict or one under
``"model"`` / ``"state_dict"``, ``module.`` prefixes stripped; the file is read with
``weights_only=True``, so a training checkpoint that pickles other objects must be re-saved as a
state_dict); timm drops the classifier when ``num_classes`` differs. ``pretrained=True`` with no
weights to load raises ``ValueError`` (timm itself would warn and keep random weights). No URLs are
set: nothing is downloaded.

Each default pretrained config carries the evaluation settings of the paper's released code:

=============  ===========  ========  ==============  ===================================================
model          input        crop_pct  interpolation   source
=============  ===========  ========  ==============  ===================================================
FAT-B0..B3     3×224×224    0.875     bicubic         qhfan/FAT ``classification/config.py``: IMG_SIZE 224,
                                                      INTERPOLATION bicubic, TEST.CROP (resize 256, crop 224)
FCViT tiny/B12 3×224×224    0.9       bicubic         ma-xu/FCViT ``models/fcvit.py`` ``default_cfgs['s']``
FCViT B24/B48  3×224×224    0.95      bicubic         same, ``default_cfgs['m']``
CvT-13/21      3×224×224    0.875     bicubic         microsoft/CvT: ``Resize(int(224 / 0.875))`` + center
                                                      crop, ``TEST.INTERPOLATION: 3`` in the ImageNet yamls
VT-ResNet      3×224×224    0.875     bilinear        no released code; the ResNet convention the paper
                                                      builds on (resize 256, crop 224)
=============  ===========  ========  ==============  ===================================================

All use the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), 1000 classes,
classifier ``head``.

Registration is deferred until timm is imported (a post-import hook), so ``import fastvit_ops``
does not pay timm's own import time; ``register()`` does it explicitly.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Callable, Dict, List

PREFIX = "fastvit_ops_"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FAT = dict(crop_pct=0.875, interpolation="bicubic", first_conv="patch_embed.conv1.conv.0",
            origin_url="https://github.com/qhfan/FAT")
_FCVIT_S = dict(crop_pct=0.9, interpolation="bicubic", first_conv="patch_embed.proj",
                origin_url="https://github.com/ma-xu/FCViT")
_FCVIT_M = dict(_FCVIT_S, crop_pct=0.95)
_CVT = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stage0.patch_embed.proj",
            origin_url="https://github.com/microsoft/CvT")
_VT = dict(crop_pct=0.875, interpolation="bilinear", first_conv="conv1",
           paper_name="Visual Transformers: Token-based Image Representation and Processing for Computer Vision",
           paper_ids="arXiv:2006.03677")

#: model name → its evaluation settings (timm pretrained-cfg fields beyond the common ones).
EVAL_SETTINGS: Dict[str, dict] = {
    "fat_b0": _FAT, "fat_b1": _FAT, "fat_b2": _FAT, "fat_b3": _FAT,
    "fcvit_tiny": _FCVIT_S, "fcvit_b12": _FCVIT_S, "fcvit_b24": _FCVIT_M, "fcvit_b48": _FCVIT_M,
    "cvt_13": _CVT, "cvt_21": _CVT,
    "vt_resnet18": _VT, "vt_resnet34": _VT,
}


def pretrained_cfg(name: str) -> dict:
    """timm's pretrained-config dict for model ``name`` (a ``fastvit_ops.models`` name)."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier="head", license="see origin_url",
                **EVAL_SETTINGS[name])


def _entrypoint(name: str) -> Callable:
    from timm.models import build_model_with_cfg
    from timm.models._registry import get_pretrained_cfg

    from . import models

    variant = PREFIX + name

    def create(pretrained: bool = False, **kwargs):
        if pretrained:
            cfg = get_pretrained_cfg(variant).to_dict()
            cfg.update(kwargs.get("pretrained_cfg") or {})
            cfg.update(kwargs.get("pretrained_cfg_overlay") or {})
            if not (cfg.get("file") or cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("state_dict")):
                raise ValueError(
                    f"pretrained: {variant} has no downloadable weights; pass the released checkpoint as "
                    f"pretrained_cfg_overlay=dict(file='path/to/{name}.pth')")
        return build_model_with_cfg(lambda **kw: models.create(name, **kw), variant, pretrained, **kwargs)

    create.__name__ = variant
    create.__qualname__ = variant
    create.__module__ = __name__
    create.__doc__ = f"timm entrypoint for :func:`fastvit_ops.models.{name}` (fused layers by default)."
    return create


_REGISTERED: List[str] = []


def register() -> List[str]:
    """Register every model in timm's registry (idempotent); returns the registered names.

    Raises:
        ImportError: timm is not installed.
    """
    if _REGISTERED:
        return list(_REGISTERED)
    from timm.models import generate_default_cfgs, register_model

    from . import models

    names = models.list_models()
    mod = sys.modules[__name__]
    # register_model reads the module's ``default_cfgs`` for the architecture's pretrained cfgs.
    mod.default_cfgs = generate_default_cfgs({f"{PREFIX}{n}.in1k": pretrained_cfg(n) for n in names})
    for n in names:
        register_model(_entrypoint(n))
        _REGISTERED.append(PREFIX + n)
    return list(_REGISTERED)


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after the ``timm`` package finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _remove_hook()
            _register_or_warn()
        loader.exec_module = exec_and_register
        return spec


_HOOK = _RegisterAfterTimmImport()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def _register_or_warn() -> None:
    # A timm whose registry API changed must not make ``import timm`` (or fastvit_ops) fail.
    try:
        register()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"fastvit_ops: could not register its models with timm ({type(e).__name__}: {e})",
                      RuntimeWarning, stacklevel=2)


def install() -> None:
    """Register now if timm is imported, else when it is (called by ``import fastvit_ops``)."""
    if "timm" in sys.modules:
        if hasattr(sys.modules["timm"], "create_model"):  # fully imported
            _register_or_warn()
        return
    if importlib.machinery.PathFinder.find_spec("timm") is None:
        return  # timm not installed: nothing to do
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


__all__ = ["PREFIX", "EVAL_SETTINGS", "pretrained_cfg", "register", "install"]
