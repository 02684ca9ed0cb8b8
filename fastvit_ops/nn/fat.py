"""Fused FAT layers: drop-ins for ``fastvit_ops.reference.fat`` (same constructor and state_dict)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import CHANNELS_FIRST, attention_core
from ..ops.cross_modulation import sigmoid_cross_modulation
from ..reference import fat as ref

try:  # the fused depthwise conv (SPEC §1.1) with a SiLU epilogue; the module's own convs otherwise
    from ..ops.dwconv import dwconv2d as _dwconv2d
except ImportError:  # pragma: no cover - depends on which ops are installed
    _dwconv2d = None


def _depthwise(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """``act(DW(x))`` with ``conv``'s stride/padding and the given (possibly BN-folded) weights.

    The fused depthwise conv serves the stride-1 local branch (SiLU fused; ~10× PyTorch's CPU
    path there); on CPU the stride-2 pool convs stay on PyTorch's oneDNN kernel, faster for them.
    """
    if _dwconv2d is not None and (x.device.type != "cpu" or conv.stride[0] == 1):
        return _dwconv2d(x, weight, bias, conv.stride[0], conv.padding[0], "silu" if silu else None)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, groups=conv.groups)
    return F.silu(y) if silu else y


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Eval-mode BN folded into the preceding conv: ``w·γ/σ``, ``(b − μ)·γ/σ + β``."""
    inv = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = conv.weight * inv.view(-1, 1, 1, 1)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return w, (b - bn.running_mean) * inv + bn.bias


class FASA(ref.FASA):
    """``reference.fat.FASA`` with the global branch fused (SPEC §1.3, §1.4, §2).

    Same constructor ``FASA(dim, kernel_size, num_heads, window_size)``, parameters and state_dict
    keys as the authors' FASA, so their checkpoints load unchanged. The forward:

    * queries are read straight from ``Q̂ = q(X)`` (B, C, H, W) and the result written straight to
      (B, C, H, W) by :func:`fastvit_ops.ops.attention.downsampled_attention_nchw`'s kernel, with
      the interaction ``SiLU(G) ⊙ SiLU(L0)`` as its epilogue, so ``G`` never reaches memory;
    * the local branch ``SiLU(DW_k(Q̂))`` is one fused depthwise conv with a SiLU epilogue;
    * the pool's BN is folded into its DW convs in eval mode (batch statistics in training).

    Input (B, C, H, W) at any H, W; output (B, C, H, W) in the input dtype.
    """

    def modulate(self, local: Tensor, global_: Tensor) -> Tensor:
        return sigmoid_cross_modulation(local, global_, "silu")

    def _pool(self, x: Tensor) -> Tensor:
        if not isinstance(self.pool, nn.Sequential):
            return self.pool(x)
        if self.training:
            return self.pool(x)
        mods = list(self.pool.children())
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and isinstance(nxt, nn.BatchNorm2d):
                w, b = _fold_bn(m, nxt)
                x = _depthwise(x, m, w, b, silu=False)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q_local = self.q(x)                                                 # Q̂ (B, C, H, W)
        kv = self.kv(self._pool(x))                                         # (B, 2C, H', W')
        m = kv.shape[-2] * kv.shape[-1]
        k, v = kv.reshape(b, 2, self.num_heads, self.dim_head, m).transpose(-1, -2).unbind(1)
        lm = self.local_mixer
        gate = _depthwise(q_local, lm, lm.weight, lm.bias, silu=True)      # SiLU(L0)
        q = q_local.reshape(b, self.num_heads, self.dim_head, h * w).transpose(2, 3)
        g = gate.reshape(b, self.num_heads, self.dim_head, h * w).transpose(2, 3)
        out = attention_core(q, k, v, self.scalor, g, CHANNELS_FIRST)      # SiLU(G)·SiLU(L0)
        return self.mixer(out.transpose(2, 3).reshape(b, c, h, w))
