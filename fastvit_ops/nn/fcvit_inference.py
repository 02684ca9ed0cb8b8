"""The CPU inference path of the fused FCViT modules (``FCViTBlock``, ``PatchEmbed``).

When it runs: :func:`fastvit_ops.nn._plan.applies` (eval, fp32 plain CPU tensor, nothing needing
gradients, no compiler/autocast/functorch/dispatch mode). Outputs equal the reference's up to fp32
rounding. What it does, and why (measured on converted ``fcvit_tiny``, batch 8, one thread, CPU
time: the channel mixer was 218 of 307 ms per batch, its separate GELU pass 45 ms of that):

* the channel mixer's GELU is the epilogue of its 3×3 depthwise conv, which runs in place on
  ``fc1``'s output where the C++ kernel can (no second hidden-size buffer);
* the layer scales are folded: ``γ2`` into ``fc2``'s weight and bias (no activation follows it),
  and ``x + γ1 ⊙ t`` is one ``addcmul`` written over the token mixer's output ``t``;
* ``fc2`` adds straight into the block's running sum, and on large maps the channel mixer runs a
  few samples at a time so its 8×-wide hidden map stays in cache (:data:`CHANNEL_MIXER_CHUNK_BYTES`);
* the token mixer's two ``Conv1×1 → GELU → Conv1×1 → GELU`` stacks apply both GELUs in place;
  its ``Z + GC(Z)`` and 11×11 depthwise convs are the fused ops (with the global context folded
  into the depthwise conv's input load on large planes, as :class:`fastvit_ops.nn.TokenMixer`);
  the depthwise convs call the forward kernel the dispatch registry picks for the call
  (``ops.dwconv.forward_kernel``, in place through its "inplace" stage), the global-context ops
  their public entry points (which the registry dispatches);
* each eval BatchNorm of the stem and the downsamplers is folded into its convolution.

Layouts: the block's running sum and the channel mixer are channels_last, which oneDNN's 1×1
convolutions take without reordering (56×56, 32 → 256 → 32 with the depthwise conv between, batch 8,
two threads: 227 ms NCHW, 129 ms channels_last on the shared machine); the token mixer reads an NCHW
copy of its normalized input, the layout of the global-context kernels. Any part that is not the layer a step computes (a user's replacement module,
a non-GELU activation, training-mode BN) is called as the module it is. Plans are cached per
module under :func:`fastvit_ops.nn._plan.state_key`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.dwconv import _ACT_ID
from ..ops.dwconv import forward_kernel as dw_forward
from ..ops.dwconv import inplace as dw_inplace
from ..reference import common as ref_common
from ..reference import fcvit as ref
from ._bn import fold_eval_bn, is_eval_bn
from ._plan import detached
from .dwconv import depthwise_arguments

#: The channel mixer's hidden map is produced this many bytes at a time at most, in chunks of
#: whole samples, when the whole batch's would exceed twice that (FAT's FFN measured the same
#: cache effect: fcvit_tiny's 56×56 stage has a 25.7 MB hidden map at batch 8).
CHANNEL_MIXER_CHUNK_BYTES = 4 << 20
_GELU = _ACT_ID["gelu"]


def _exact_gelu(act) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"


def _is_1x1(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and tuple(conv.stride) == (1, 1) and not isinstance(conv.padding, str)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1))


def _dw_same(conv) -> bool:
    """A stride-1 "same"-padded depthwise conv the fused kernels take."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return False
    k = conv.kernel_size[0]
    return (conv.groups == conv.in_channels == conv.out_channels and tuple(conv.kernel_size) == (k, k)
            and k % 2 == 1 and k <= 31 and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (k // 2, k // 2)
            and tuple(conv.dilation) == (1, 1))


def _dw_gelu_(u: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``GELU(DW(u))``, written over ``u`` (a temporary) where the registry's in-place kernel can,
    else by the forward kernel ``dwconv2d`` would run."""
    return dw_inplace(u, w, b, w.shape[-1] // 2, _GELU)


def _dw_map(dw: nn.Module) -> Callable[[Tensor], Tensor]:
    """``dw(x)`` on the forward kernel the dispatch registry picks for the call, where the fused
    depthwise conv computes ``dw``; the module otherwise."""
    args = depthwise_arguments(dw)
    if args is None:
        return dw
    w, b = detached(dw.weight, dw.bias)
    _, s, p = args
    return lambda x: dw_forward(x, w, b, s, p)


def _mlp_gelu(seq: nn.Module, act: nn.Module) -> Callable[[Tensor], Tensor]:
    """``act(seq(z))`` for the token mixer's ``Sequential(Conv1×1, GELU, Conv1×1)`` and GELU, both
    GELUs in place on the conv outputs; any other structure as the modules."""
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if len(mods) == 3 and _is_1x1(mods[0]) and _exact_gelu(mods[1]) and _is_1x1(mods[2]) and _exact_gelu(act):
        w1, b1, w2, b2 = detached(mods[0].weight, mods[0].bias, mods[2].weight, mods[2].bias)
        return lambda z: torch.ops.aten.gelu_(F.conv2d(torch.ops.aten.gelu_(F.conv2d(z, w1, b1)), w2, b2))
    return lambda z: act(seq(z))


def _token_mixer(tm: nn.Module) -> Callable[[Tensor], Tensor]:
    """FCViT's token mixer (reference or fused :class:`fastvit_ops.nn.TokenMixer`): the fused ops for
    ``Z + GC(Z)`` and the depthwise convs, the GELUs in place; another module is called as it is."""
    if not isinstance(tm, ref.TokenMixer):
        return tm
    from .fcvit import _add_context, _context_depthwise, _prologue_pays

    fc1, fc2 = _mlp_gelu(tm.fc1, tm.act), _mlp_gelu(tm.fc2, tm.act)
    gc1, dw1, gc2, dw2 = tm.gc1, tm.dw1, tm.gc2, tm.dw2
    dw1_map, dw2_map = _dw_map(dw1), _dw_map(dw2)

    def mix(z: Tensor) -> Tensor:
        if _prologue_pays(z, tm):
            z = fc1(_context_depthwise(gc1, dw1, z))
            return fc2(_context_depthwise(gc2, dw2, z))
        z = fc1(dw1_map(_add_context(gc1, z)))
        return fc2(dw2_map(_add_context(gc2, z)))
    return mix


def _channel_mixer(cm: nn.Module, gamma: Optional[Tensor]):
    """``(z, x) -> x + γ ⊙ cm(z)`` with ``x`` a temporary of the block, added into in place; the
    released ChannelMixer (1×1 → DW_3 → GELU → Dropout → 1×1 → Dropout) fused, anything else called."""
    parts = [getattr(cm, a, None) for a in ("fc1", "dwconv", "act", "drop", "fc2")]
    fc1, dw, act, drop, fc2 = parts
    fused = (_is_1x1(fc1) and _dw_same(dw) and _exact_gelu(act) and _is_1x1(fc2)
             and (drop is None or isinstance(drop, (nn.Dropout, nn.Identity))))
    if not fused:
        if gamma is None:
            return lambda z, x: x.add_(cm(z))
        g = gamma.detach().view(-1, 1, 1)
        return lambda z, x: x.addcmul_(cm(z), g)
    w1, b1, wd, bd = detached(fc1.weight, fc1.bias, dw.weight, dw.bias)
    w2, b2 = detached(fc2.weight, fc2.bias)
    if gamma is not None:  # γ ⊙ (W u + b) = (γ W) u + γ b
        g = gamma.detach()
        w2 = w2 * g.view(-1, 1, 1, 1)
        b2 = b2 * g if b2 is not None else None
    hidden = fc1.out_channels

    def mix(z: Tensor, x: Tensor) -> Tensor:
        per_sample = hidden * z.shape[2] * z.shape[3] * z.element_size()
        n = z.shape[0] if per_sample * z.shape[0] <= 2 * CHANNEL_MIXER_CHUNK_BYTES \
            else max(1, CHANNEL_MIXER_CHUNK_BYTES // per_sample)
        for i in range(0, z.shape[0], n):
            u = _dw_gelu_(F.conv2d(z[i:i + n], w1, b1), wd, bd)
            x[i:i + n].add_(F.conv2d(u, w2, b2))
            del u
        return x
    return mix


def _norm(norm: nn.Module) -> Callable[[Tensor], Tensor]:
    if isinstance(norm, nn.GroupNorm) and norm.affine:
        g, eps = norm.num_groups, norm.eps
        w, b = detached(norm.weight, norm.bias)
        return lambda x: F.group_norm(x, g, w, b, eps)
    return norm


def block(blk: nn.Module) -> Callable[[Tensor], Tensor]:
    """FCViTBlock: ``x ← x + γ1 ⊙ TokenMixer(GN(x))``; ``x ← x + γ2 ⊙ ChannelMixer(GN(x))``
    (DropPath is the identity in eval mode; another drop_path module is called)."""
    norm1, norm2 = _norm(blk.norm1), _norm(blk.norm2)
    token_mixer = _token_mixer(blk.token_mixer)
    use_ls = bool(getattr(blk, "use_layer_scale", False))
    g1 = blk.layer_scale_1.detach().view(-1, 1, 1) if use_ls else None
    drop_path = blk.drop_path
    plain_path = isinstance(drop_path, (nn.Identity, ref_common.DropPath))
    if not plain_path:
        channel_mixer = (lambda z, x, cm=blk.channel_mixer, g=(blk.layer_scale_2.detach().view(-1, 1, 1)
                                                                if use_ls else None):
                         x + drop_path(cm(z) * g if g is not None else cm(z)))
    else:
        channel_mixer = _channel_mixer(blk.channel_mixer, blk.layer_scale_2 if use_ls else None)

    def run(x: Tensor) -> Tensor:
        # The token mixer reads NCHW (the global-context kernels' layout); the sum and the channel
        # mixer are channels_last (its 1×1 convolutions' layout).
        t = token_mixer(norm1(x).contiguous())
        xs = torch.empty_like(x, memory_format=torch.channels_last)
        if not plain_path:
            torch.add(x, drop_path(t * g1 if g1 is not None else t), out=xs)
        elif g1 is not None:
            torch.addcmul(x, t, g1, out=xs)                      # x + γ1 ⊙ t
        else:
            torch.add(x, t, out=xs)
        del t
        return channel_mixer(norm2(xs), xs)
    return run


def patch_embed(pe: nn.Module) -> Callable[[Tensor], Tensor]:
    """PatchEmbed: ``BN(conv(x))`` as one convolution with the eval BN folded in, channels_last (the
    stem makes the image channels_last once; the blocks keep their running sum in that layout)."""
    conv, bn = pe.proj, pe.norm
    if not (isinstance(conv, nn.Conv2d) and is_eval_bn(bn) and not isinstance(conv.padding, str)
            and conv.padding_mode == "zeros"):
        return lambda x: ref.PatchEmbed.forward(pe, x)
    w, b = detached(*fold_eval_bn(conv, bn))
    s, p, d, g = conv.stride, conv.padding, conv.dilation, conv.groups
    return lambda x: F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, s, p, d, g)
