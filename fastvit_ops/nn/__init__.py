"""Fused drop-in modules: same constructor signature and state_dict as ``fastvit_ops.reference``.

``FAT_LAYERS``, ``FCVIT_LAYERS``, ``CVT_LAYERS`` map a reference layer name to its fused
drop-in; ``fastvit_ops.models`` builds models with them (the reference is used for any name that
has no fused layer yet).
"""
from .fat import FASA
from .fcvit import GlobalContext, TokenMixer

FAT_LAYERS: dict = {"FASA": FASA}
FCVIT_LAYERS: dict = {"GlobalContext": GlobalContext, "TokenMixer": TokenMixer}
CVT_LAYERS: dict = {}

__all__ = ["FASA", "GlobalContext", "TokenMixer", "FAT_LAYERS", "FCVIT_LAYERS", "CVT_LAYERS"]
