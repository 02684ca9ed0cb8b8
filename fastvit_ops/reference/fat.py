"""FAT / FASA reference model in pure PyTorch (docs/cross_modulation.md, docs/fat.md).

"Lightweight Vision Transformer with Bidirectional Interaction" (Fan et al., NeurIPS 2023), arXiv
2306.00396 §3 and appendix Tab. 6; released code github qhfan/FAT
``classification/models.py``. Where the two differ the released code is followed, because the
released checkpoints expect it:

* the fine-grained K/V downsampler (``FASA.pool``) is ``DW_5/s2 → BN`` per unit with a 1×1 conv
  between units only (the paper's Eq. 6 has a 1×1 after every unit and no BN);
* the bidirectional interaction is ``SiLU(L0) ⊙ SiLU(G)`` (the paper's extra ``σ(SiLU(L0))``
  factor on the global branch is commented out in the released code), see :meth:`FASA.modulate`;
* stages downsample only inside their last block (``FATBlock.downsample`` shortcut and a
  stride-2 ConvFFN), there is no separate patch-merging layer.

Everything is NCHW ``(B, C, H, W)``; any floating dtype works (the math follows the input
dtype, as in the authors' code). The state_dict of :class:`FAT` built from :data:`CONFIGS` is
key-for-key and shape-for-shape the authors' (``tests/data/checkpoints/fat_b*.txt``); the authors'
``nn.SyncBatchNorm`` is an ``nn.BatchNorm2d`` here (same keys, runs without a process group).

Layer injection: every constructor takes a trailing ``layers=None`` mapping a name of
:data:`REFERENCE_LAYERS` to a replacement class (a subclass with the same constructor and
state_dict), resolved with :func:`fastvit_ops.reference.common.resolve_layers` and passed down.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as _checkpoint

from .common import DepthwiseConv2d, DropPath, GroupNorm1, resolve_layers

__all__ = [
    "DropPath", "FASA", "ConvFFN", "FATBlock", "FATLayer", "ConvBNReLU", "PatchEmbedding", "FAT",
    "REFERENCE_LAYERS", "CONFIGS",
]


class FASA(nn.Module):
    """Fully Adaptive Self-Attention (paper §3.2, Eq. 3–10; released ``FASA``).

    For ``X`` (B, C, H, W), ``h = num_heads``, ``d = C // h`` (``dim_head``):

    1. ``Q̂ = q(X)`` (1×1); ``P = pool(X)`` (B, C, H', W') with ``H' = ceil(H / window_size)``;
       ``K, V = kv(P)[:, :C], kv(P)[:, C:]`` (1×1, C → 2C).
    2. Global branch ``G = softmax(d^-1/2 · Q Kᵀ) V`` per head over the ``M = H'·W'`` pooled keys;
       head ``m`` owns channels ``m·d … m·d+d−1``, tokens are row-major pixels; see
       :meth:`attention`.
    3. Local branch ``L0 = local_mixer(Q̂)`` (``DW_k``, acting on Q̂, not on X).
    4. ``Y = mixer(modulate(L0, G))`` with ``modulate = SiLU(L0) ⊙ SiLU(G)`` (1×1 ``mixer``).

    Output (B, C, H, W), same dtype as ``X``. Works at any H, W (odd included).

    Args:
        dim: channels C (a multiple of ``num_heads``).
        kernel_size: k of the local ``DW_k`` (3, 5, 7, 9 in stages 1–4).
        num_heads: h.
        window_size: the K/V downsampling factor, a power of two: ``2^n`` builds ``n`` units
            ``DW_5/s2 (conv{j}) → BN (bn{j})`` with a 1×1 conv (``linear{j}``) between units
            (none after the last); ``1`` is the identity (no parameters).
        layers: layer-name → class overrides (see :data:`REFERENCE_LAYERS`).
    """

    def __init__(self, dim: int, kernel_size: int, num_heads: int, window_size: int,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"FASA: dim {dim} is not a multiple of num_heads {num_heads}")
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, 2 * dim, 1)
        self.local_mixer = L["DepthwiseConv2d"](dim, kernel_size)
        self.mixer = nn.Conv2d(dim, dim, 1)
        self.num_heads = num_heads
        self.dim_head = dim // num_heads
        self.pool = self.refined_downsample(dim, window_size, 5, layers=layers)
        self.window_size = window_size
        # The released code's name for the softmax scale d^-1/2 (kept for familiarity).
        self.scalor = self.dim_head ** -0.5

    @staticmethod
    def refined_downsample(dim: int, window_size: int, kernel_size: int = 5,
                           layers: Optional[Mapping[str, type]] = None) -> nn.Module:
        """The fine-grained K/V downsampler of the released code (see the class docstring)."""
        if window_size < 1 or window_size & (window_size - 1):
            raise ValueError(f"FASA: window_size must be a power of two, got {window_size}")
        if window_size == 1:
            return nn.Identity()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        n = window_size.bit_length() - 1
        pool = nn.Sequential()
        for j in range(n):
            pool.add_module(f"conv{j}", L["DepthwiseConv2d"](dim, kernel_size, stride=2))
            pool.add_module(f"bn{j}", nn.BatchNorm2d(dim))
            if j != n - 1:
                pool.add_module(f"linear{j}", nn.Conv2d(dim, dim, 1))
        return pool

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention over keys, **without** scaling: ``softmax(q kᵀ, -1) v``.

        ``q`` (B, h, N, d) arrives already multiplied by ``self.scalor`` (= d^-1/2), exactly as
        the released code computes ``softmax((scalor · q) @ kᵀ)``; ``k``, ``v`` (B, h, M, d).
        Returns (B, h, N, d) in the dtype of ``q``. Fused subclasses override this method only.
        """
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return attn @ v

    def modulate(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Bidirectional interaction of the released code: ``SiLU(local) ⊙ SiLU(global_)``.

        (Released: ``silu(L0) · σ(G) · G``; docs/cross_modulation.md, mode ``"silu"``.) Same shape in and out.
        Fused subclasses override this method only.
        """
        return F.silu(local) * F.silu(global_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q_local = self.q(x)                                               # Q̂ (B, C, H, W)
        # (B, C, N) → (B, h, d, N) → (B, h, N, d); the scale multiplies q as in the released code.
        q = q_local.reshape(b, self.num_heads, self.dim_head, h * w).transpose(-1, -2)
        q = q * self.scalor
        kv = self.kv(self.pool(x))                                        # (B, 2C, H', W')
        m = kv.shape[-2] * kv.shape[-1]
        kv = kv.reshape(b, 2, self.num_heads, self.dim_head, m).transpose(-1, -2)
        k, v = kv.unbind(1)                                               # (B, h, M, d) each
        global_feat = self.attention(q, k, v)                             # (B, h, N, d)
        global_feat = global_feat.transpose(-1, -2).reshape(b, c, h, w)
        local_feat = self.local_mixer(q_local)
        return self.mixer(self.modulate(local_feat, global_feat))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, dim_head={self.dim_head}, "
                f"window_size={self.window_size}")


class ConvFFN(nn.Module):
    """Convolutional FFN of FAT (paper §3.3; released ``ConvFFN``).

    ``U = GELU(fc1(Z))`` (1×1, C_in → hidden); stride 1: ``U = U + DW_k(U)``; stride 2:
    ``U = DW_k/s2(U)`` (no inner residual); ``out = fc2(BN(U))`` (1×1, hidden → C_out).
    In (B, C_in, H, W) → out (B, C_out, ceil(H/s), ceil(W/s)); same dtype. GELU is exact (erf).
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, stride: int,
                 out_channels: int, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ConvFFN: stride must be 1 or 2, got {stride}")
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.stride = stride
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.dwconv = L["DepthwiseConv2d"](hidden_channels, kernel_size, stride=stride)
        self.bn = nn.BatchNorm2d(hidden_channels)
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x) if self.stride == 1 else self.dwconv(x)
        return self.fc2(self.bn(x))


class FATBlock(nn.Module):
    """One FAT block (released ``FATBlock``; docs/fat.md)::

        x ← x + cpe(x)                                  (CPE, DW_k)
        x ← x + drop_path(attn(norm1(x)))               (FASA, GN)
        x ← downsample(x) + drop_path(ffn(norm2(x)))    (ConvFFN, GN)

    ``stride = 1``: ``downsample`` is the identity and ``out_dim`` must equal ``dim``.
    ``stride = 2`` (the last block of stages 1–3): ``downsample = DW_5/s2 → BN → 1×1 (dim →
    out_dim)`` (``mlp_kernel_size`` sets the DW kernel) and the ConvFFN has stride 2.
    In (B, dim, H, W) → out (B, out_dim, ceil(H/stride), ceil(W/stride)); same dtype.
    """

    def __init__(self, dim: int, out_dim: int, kernel_size: int, num_heads: int,
                 window_size: int, mlp_kernel_size: int, mlp_ratio: float, stride: int,
                 drop_path: float = 0.0, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        if stride == 1 and out_dim != dim:
            raise ValueError(f"FATBlock: stride 1 needs out_dim == dim, got {dim} → {out_dim}")
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.dim = dim
        self.mlp_ratio = mlp_ratio
        self.cpe = L["DepthwiseConv2d"](dim, kernel_size)
        self.norm1 = L["GroupNorm1"](dim)
        self.attn = L["FASA"](dim, kernel_size, num_heads, window_size, layers=layers)
        self.drop_path = DropPath(drop_path)
        self.norm2 = L["GroupNorm1"](dim)
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                L["DepthwiseConv2d"](dim, mlp_kernel_size, stride=stride),
                nn.BatchNorm2d(dim),
                nn.Conv2d(dim, out_dim, 1),
            )
        self.ffn = L["ConvFFN"](dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim,
                                layers=layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.downsample(x) + self.drop_path(self.ffn(self.norm2(x)))


class FATLayer(nn.Module):
    """One stage (released ``FATlayer``): ``depth`` blocks in ``blocks``; the last one has
    stride 2 and maps ``dim → out_dim`` when ``downsample`` is true (stages 1–3)."""

    def __init__(self, depth: int, dim: int, out_dim: int, kernel_size: int, num_heads: int,
                 window_size: int, mlp_kernel_size: int, mlp_ratio: float,
                 drop_paths: Sequence[float] = (), downsample: bool = True,
                 use_checkpoint: bool = False, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        drop_paths = list(drop_paths) or [0.0] * depth
        if len(drop_paths) != depth:
            raise ValueError(f"FATLayer: {len(drop_paths)} drop-path rates for depth {depth}")
        self.dim = dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList()
        for j in range(depth):
            last = j == depth - 1
            self.blocks.append(L["FATBlock"](
                dim, out_dim if last else dim, kernel_size, num_heads, window_size,
                mlp_kernel_size, mlp_ratio, 2 if (last and downsample) else 1, drop_paths[j],
                layers=layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = _checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class ConvBNReLU(nn.Module):
    """Stem unit (released ``BasicBlock``): ``conv`` = Sequential(3×3 conv (bias), BN, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PatchEmbedding(nn.Module):
    """Convolutional stem (released ``PatchEmbedding``; paper appendix): four 3×3 conv+BN+ReLU
    (stride 2, 2, 1, 1; ``in → C/2 → C → C → C``), a 1×1 conv (``conv5``) and GN
    (``layernorm``). (B, in, H, W) → (B, C, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2))."""

    def __init__(self, in_channels: int = 3, out_channels: int = 96,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.conv1 = ConvBNReLU(in_channels, out_channels // 2, 3, 2)
        self.conv2 = ConvBNReLU(out_channels // 2, out_channels, 3, 2)
        self.conv3 = ConvBNReLU(out_channels, out_channels, 3, 1)
        self.conv4 = ConvBNReLU(out_channels, out_channels, 3, 1)
        self.conv5 = nn.Conv2d(out_channels, out_channels, 1)
        self.layernorm = L["GroupNorm1"](out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.layernorm(self.conv5(x))


class FAT(nn.Module):
    """FAT classifier (released ``FAT``; paper Tab. 6).

    ``patch_embed`` (stride 4) → 4 stages ``layers.{i}.blocks.{j}`` (stages 1–3 end with a
    stride-2 block, so the feature map is H/32 at the end) → ``norm`` (GN) → ``avgpool``
    (global average) → ``head`` (Linear; ``nn.Identity`` when ``num_classes <= 0``).
    Input (B, in_chans, H, W) float → logits (B, num_classes) in the input dtype.

    ``drop_path_rate``: the stochastic-depth rate, increased linearly over all blocks from 0 (as
    the authors do); 0 here (inference) — the authors trained with 0.05 for B0 (released
    config) and 0.05/0.1/0.1/0.15 or 0.05/0.05/0.1/0.15 for B0–B3 (the paper gives both).
    ``use_checkpoint``: activation checkpointing per block when gradients are on.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: Sequence[int] = (32, 80, 160, 256),
                 depths: Sequence[int] = (2, 2, 6, 2),
                 kernel_sizes: Sequence[int] = (3, 5, 7, 9),
                 num_heads: Sequence[int] = (2, 5, 10, 16),
                 window_sizes: Sequence[int] = (8, 4, 2, 1),
                 mlp_kernel_sizes: Sequence[int] = (5, 5, 5, 5),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        n = len(depths)
        for name, seq in (("embed_dims", embed_dims), ("kernel_sizes", kernel_sizes),
                          ("num_heads", num_heads), ("window_sizes", window_sizes),
                          ("mlp_kernel_sizes", mlp_kernel_sizes), ("mlp_ratios", mlp_ratios)):
            if len(seq) != n:
                raise ValueError(f"FAT: {name} has {len(seq)} entries, depths has {n}")
        self.num_classes = num_classes
        self.num_layers = n
        self.mlp_ratios = list(mlp_ratios)
        self.patch_embed = L["PatchEmbedding"](in_chans, embed_dims[0], layers=layers)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i in range(n):
            last = i == n - 1
            self.layers.append(FATLayer(
                depths[i], embed_dims[i], embed_dims[i] if last else embed_dims[i + 1],
                kernel_sizes[i], num_heads[i], window_sizes[i], mlp_kernel_sizes[i],
                mlp_ratios[i], dpr[start:start + depths[i]], not last, use_checkpoint,
                layers=layers))
            start += depths[i]
        self.norm = L["GroupNorm1"](embed_dims[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → pooled features (B, embed_dims[-1])."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.avgpool(self.norm(x)).flatten(1)

    def forward_feature(self, x: torch.Tensor) -> torch.Tensor:
        """The released code's spelling of :meth:`forward_features`."""
        return self.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


#: Reference classes by layer name; ``layers={name: cls}`` replaces any of them.
REFERENCE_LAYERS = {
    "FASA": FASA,
    "ConvFFN": ConvFFN,
    "FATBlock": FATBlock,
    "DepthwiseConv2d": DepthwiseConv2d,
    "GroupNorm1": GroupNorm1,
    "PatchEmbedding": PatchEmbedding,
}

_COMMON = dict(kernel_sizes=(3, 5, 7, 9), window_sizes=(8, 4, 2, 1),
               mlp_kernel_sizes=(5, 5, 5, 5), mlp_ratios=(4, 4, 4, 4))

#: Variant settings (docs/fat.md table; released ``configs/FAT_b0.yaml`` for B0). Pass as
#: ``FAT(**CONFIGS[name], num_classes=..., layers=...)``.
CONFIGS = {
    "fat_b0": dict(embed_dims=(32, 80, 160, 256), depths=(2, 2, 6, 2),
                   num_heads=(2, 5, 10, 16), **_COMMON),
    "fat_b1": dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 6, 2),
                   num_heads=(3, 6, 12, 24), **_COMMON),
    "fat_b2": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2),
                   num_heads=(2, 4, 8, 16), **_COMMON),
    "fat_b3": dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 16, 4),
                   num_heads=(2, 4, 8, 16), **_COMMON),
}
