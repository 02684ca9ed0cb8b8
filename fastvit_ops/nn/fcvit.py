"""Fused FCViT layers: drop-ins for ``fastvit_ops.reference.fcvit`` (same constructors and
state_dicts, so the authors' ``fcvit_*`` checkpoints load unchanged)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.context_dwconv import context_dwconv2d
from ..ops.dwconv import dwconv2d
from ..ops.global_context import _global_context, _mlp, token_global_similarity
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


def _context_depthwise(gc, dw, x: Tensor) -> Tensor:
    """``dw(x + gc(x))`` with the global-context apply fused into the conv's input load
    (:func:`fastvit_ops.ops.context_dwconv.context_dwconv2d`): S' from the similarity op, c from
    GC's MLP in torch, and ``x + S'·c`` never written. Other layer types compose as written."""
    if not (isinstance(gc, ref.GlobalContext) and isinstance(dw, ref_common.DepthwiseConv2d)):
        return _depthwise(dw, _add_context(gc, x))
    x, w, b = autocast_like_conv(x, dw.weight, dw.bias)
    sp = token_global_similarity(x, gc.rescale_weight, gc.rescale_bias, gc.groups, gc.eps)
    g = x.mean(dim=(2, 3), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    c = _mlp(g, gc.fc1.weight, gc.fc1.bias, gc.fc2.weight, gc.fc2.bias)[0]
    return context_dwconv2d(x, sp, c, w, b, dw.stride[0], dw.padding[0])


# Measured on the 2-core CI CPU (batch 8, fp32): folding x + GC(x) into the 11×11 conv's input load
# makes the token mixer's forward 1.19× faster at 56×56 but 0.93–0.97× at 28² and below (the
# separate similarity / mean / MLP calls cost more than the z pass they save there), and its
# forward+backward (z recomputed, dS'/dc reductions in torch) 0.9–1.0×. So: inference on CPU,
# planes of at least 48×48.
_PROLOGUE_MIN_PIXELS = 48 * 48


def _prologue_pays(x: Tensor, mixer) -> bool:
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mixer.parameters()))
    return x.device.type == "cpu" and not needs_grad and x.shape[-2] * x.shape[-1] >= _PROLOGUE_MIN_PIXELS


class GlobalContext(ref.GlobalContext):
    """``reference.fcvit.GlobalContext`` (docs/global_context.md) on the fused kernels of
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
    In CPU inference on large planes (≥ 48×48) each ``x + GC(x)`` is folded into the following
    conv's input load (:func:`fastvit_ops.ops.context_dwconv.context_dwconv2d`) and never written;
    elsewhere it is written once by the fused global-context op (faster there, see
    ``_PROLOGUE_MIN_PIXELS``).
    """

    def forward(self, x: Tensor) -> Tensor:
        if _prologue_pays(x, self):
            x = self.act(self.fc1(_context_depthwise(self.gc1, self.dw1, x)))
            return self.act(self.fc2(_context_depthwise(self.gc2, self.dw2, x)))
        x = _add_context(self.gc1, x)
        x = self.act(self.fc1(_depthwise(self.dw1, x)))
        x = _add_context(self.gc2, x)
        return self.act(self.fc2(_depthwise(self.dw2, x)))


__all__ = ["GlobalContext", "TokenMixer"]
