"""The CPU inference path of VT-ResNet's convolutional trunk: drop-ins for
``fastvit_ops.reference.vt_resnet.BasicBlock`` and ``VTResNet`` (same constructors, parameters and
state_dicts) whose stem and basic blocks run a cached plan when :func:`fastvit_ops.nn._plan.applies`
(eval mode, fp32 plain CPU tensor, nothing needing gradients, no compiler/autocast/transform):

* the stem (conv7×7/s2, BN, ReLU, maxpool3×3/s2) runs channels_last and hands an NCHW map on:
  PyTorch's NCHW max-pool is a scalar loop and oneDNN reorders the 3-channel image on every call
  (VT-ResNet-18's stem at batch 8, 224², 2 threads, AVX-512 Zen 4: 37 ms NCHW, 13 ms
  channels_last, a quarter of the whole forward);
* the basic blocks stay NCHW: oneDNN's channels_last 3×3 convolutions measured 2.5× the rounding
  error of its NCHW ones at the trunk's output (2.1e-5 vs 7.5e-6 of a scale of 11, 224², four
  inputs), over the 2× rule, for 25% less time;
* every eval BatchNorm is folded into the convolution before it, the ReLUs and the residual add
  run in place on the convolution's output.

Anything else — training, gradients, torch.compile (which compiles the reference composition), a
BatchNorm without running statistics, a replaced submodule or a non-default convolution (string
padding, padding modes other than zeros) — runs the reference forward. Plans are cached under
:func:`fastvit_ops.nn._plan.state_key` (rebuilt after any change of the weights, statistics,
dtype, device or submodules) and dropped when pickling or copying. Outputs equal the reference's up to fp32
rounding (the folded weights round once more).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reference import vt_resnet as ref
from . import _plan
from ._bn import fold_eval_bn, is_eval_bn

_CL = torch.channels_last


def _plain_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _folded(conv: nn.Conv2d, bn, memory_format=torch.contiguous_format) -> Optional[Callable[[Tensor], Tensor]]:
    """``x -> bn(conv(x))`` as one convolution with the eval BN folded in (weights in
    ``memory_format``), or None where the pair is not a plain conv and an eval BatchNorm."""
    if not (_plain_conv(conv) and is_eval_bn(bn)):
        return None
    w, b = fold_eval_bn(conv, bn)
    w = w.detach().contiguous(memory_format=memory_format)
    b = b.detach().contiguous()
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
    return lambda x: F.conv2d(x, w, b, stride, padding, dilation, groups)


def _block_plan(m: "BasicBlock") -> Callable[[Tensor], Tensor]:
    c1, c2 = _folded(m.conv1, m.bn1), _folded(m.conv2, m.bn2)
    ds = m.downsample
    shortcut: Optional[Callable[[Tensor], Tensor]] = None
    plain_ds = ds is None or (type(ds) is nn.Sequential and len(ds) == 2)
    if ds is not None and plain_ds:
        shortcut = _folded(ds[0], ds[1])
    if c1 is None or c2 is None or type(m.relu) is not nn.ReLU or not plain_ds or (ds is not None and shortcut is None):
        return lambda x: ref.BasicBlock.forward(m, x)

    def run(x: Tensor) -> Tensor:
        y = c2(c1(x).relu_())
        y += x if shortcut is None else shortcut(x)
        return y.relu_()
    return run


def _stem_plan(m: "VTResNet") -> Callable[[Tensor], Tensor]:
    conv = _folded(m.conv1, m.bn1, _CL)
    pool = m.maxpool
    if conv is None or type(m.relu) is not nn.ReLU or type(pool) is not nn.MaxPool2d or pool.return_indices:
        return lambda x: ref.VTResNet.stem(m, x)
    k, s, p, d, ceil = pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode

    def run(x: Tensor) -> Tensor:
        y = conv(x.contiguous(memory_format=_CL)).relu_()
        return F.max_pool2d(y, k, s, p, d, ceil).contiguous()
    return run


class _DropsPlan:
    """Pickling and copying leave the plan behind (a closure; the copy builds its own). Not a
    ``_plan.PlannedModule``: under torch.compile these modules are traced as the reference
    composition (Inductor folds and fuses the trunk itself), not run as opaque plans."""

    def __getstate__(self):
        return _plan.drop_plan(super().__getstate__())


class BasicBlock(_DropsPlan, ref.BasicBlock):
    """``reference.vt_resnet.BasicBlock`` (ResNet basic block, He et al. 2016); in CPU inference the
    plan above: ``(B, C_in, H, W)`` → ``(B, C_out, ⌈H/s⌉, ⌈W/s⌉)`` in the layout oneDNN gives (NCHW
    for an NCHW input)."""

    def forward(self, x: Tensor) -> Tensor:
        if _plan.applies(x, self):
            return _plan.run(self, _block_plan, x)
        return super().forward(x)


class VTResNet(_DropsPlan, ref.VTResNet):
    """``reference.vt_resnet.VTResNet`` (Visual Transformers, arXiv 2006.03677, Table 11) whose stem
    runs the plan above in CPU inference (NCHW output); its blocks are fused
    :class:`BasicBlock` s and the fused VT blocks when built by ``fastvit_ops.models`` or
    :func:`fastvit_ops.convert`. Images ``(B, in_chans, H, W)`` → logits ``(B, num_classes)``."""

    def stem(self, x: Tensor) -> Tensor:
        if _plan.applies(x, self):
            return _plan.run(self, _stem_plan, x, parts=(self.conv1, self.bn1, self.relu, self.maxpool))
        return super().stem(x)


__all__ = ["BasicBlock", "VTResNet"]
