"""Fused FCViT layers: drop-ins for ``fastvit_ops.reference.fcvit`` (same constructors and
state_dicts, so the authors' ``fcvit_*`` checkpoints load unchanged)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..ops.dwconv import dwconv2d
from ..ops.global_context import _global_context, token_global_similarity
from ..reference import common as ref_common
from ..reference import fcvit as ref
from ._amp import autocast_like_conv


def _amp_args(x: Tensor, gc):
    """x (the autocast dtype under autocast, as the reference's einsum output is) and GC's
    parameters (as they are: the op accepts mixed dtypes and accumulates in fp32)."""
    (x,) = autocast_like_conv(x)
    return (x, gc.fc1.weight, gc.fc1.bias, gc.fc2.weight, gc.fc2.bias, gc.rescale_weight,
            gc.rescale_bias)


def _add_context(gc, x: Tensor) -> Tensor:
    """``x + gc(x)`` in one fused op when ``gc`` is a (reference or fused) GlobalContext."""
    if isinstance(gc, ref.GlobalContext):
        return _global_context(*_amp_args(x, gc), gc.groups, gc.eps, True)
    return x + gc(x)


def _depthwise(dw, x: Tensor) -> Tensor:
    """``dw(x)`` on the fused depthwise-conv kernel whenever ``dw`` is a (reference or fused)
    ``DepthwiseConv2d``, so a mixer built with reference layers still runs fused convs."""
    if isinstance(dw, ref_common.DepthwiseConv2d):
        return dwconv2d(*autocast_like_conv(x, dw.weight, dw.bias), dw.stride[0], dw.padding[0])
    return dw(x)


class GlobalContext(ref.GlobalContext):
    """``reference.fcvit.GlobalContext`` (SPEC §1.2) on the fused kernels of
    :mod:`fastvit_ops.ops.global_context`.

    Same constructor ``GlobalContext(dim, groups=8, reduction=8, eps=1e-5)`` and parameters
    (``rescale_weight``, ``rescale_bias``, ``fc1``, ``fc2``). ``forward`` returns ``GC(x)`` only,
    like the released module; :class:`TokenMixer` fuses the ``x +`` as well.
    (B, C, H, W) → (B, C, H, W), same dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _global_context(*_amp_args(x, self), self.groups, self.eps, False)

    def similarity(self, x: Tensor, g: Optional[Tensor] = None) -> Tensor:
        """``S'`` (B, G, H, W) via :func:`token_global_similarity`; a caller-supplied ``g`` that
        need not be ``x``'s channel means takes the reference path."""
        if g is not None:
            return super().similarity(x, g)
        return token_global_similarity(x, self.rescale_weight, self.rescale_bias, self.groups,
                                       self.eps)


class TokenMixer(ref.TokenMixer):
    """``reference.fcvit.TokenMixer`` with each ``Z + GC(Z)`` as one fused op
    (:func:`fastvit_ops.global_context`) and the 11×11 depthwise convs on the fused
    :func:`fastvit_ops.dwconv2d` (also when ``layers`` left them reference ``DepthwiseConv2d``).
    Same constructor, parameters and state_dict; (B, C, H, W) → (B, C, H, W), same dtype.
    ``x + GC(x)`` is still written once before each conv (not folded into the conv's input load).
    """

    def forward(self, x: Tensor) -> Tensor:
        x = _add_context(self.gc1, x)
        x = self.act(self.fc1(_depthwise(self.dw1, x)))
        x = _add_context(self.gc2, x)
        return self.act(self.fc2(_depthwise(self.dw2, x)))


__all__ = ["GlobalContext", "TokenMixer"]
