"""FCViT reference (pure PyTorch), state_dict-identical to the authors' released code.

Paper: "A Close Look at Spatial Modeling: From Attention to Convolution" (FCViT, arXiv 2212.12552;
also circulated as "A Close Look at Token Mixer: From Attention to Convolution"). Released code: github ma-xu/FCViT ``models/fcvit.py`` (``BaseFormer`` built
by the ``fcvit_*`` factories). Where the two differ the released code is followed (docs/fcvit.md);
the settings below are the ones the released factories make effective:

* weighted global context with G = 8 groups, a ``d^-1/2`` similarity scale, per-group
  ``rescale_weight`` / ``rescale_bias`` (the paper has scalars α, β and no scale);
* competitive bottleneck (maxout of the two halves of ``fc1``), reduction 8, ``nn.Linear`` layers;
* two token-mixing rounds, both with an 11×11 depthwise conv;
* a 3×3 depthwise conv in the channel mixer; no spatial or channel attention;
* layer scale initialised to 1e-5 (``basic_blocks`` / ``BaseFormer`` default; ``BasicBlock``'s own
  1e-4 default is never used).

Layout is NCHW throughout. All layers accept float32 / float64 / float16 / bfloat16 and compute in
the input dtype (no internal up-casting, like the released code).

Layer injection: ``REFERENCE_LAYERS`` names the replaceable layers. Composite modules
(``TokenMixer``, ``ChannelMixer``, ``FCViTBlock``, ``FCViT``) take a trailing ``layers=None``
mapping, resolve it with :func:`fastvit_ops.reference.common.resolve_layers`, build their
submodules through it and pass it down. Leaf layers (``GlobalContext``, ``DepthwiseConv2d``) take
no ``layers`` argument. Fused subclasses in ``fastvit_ops.nn`` keep constructors and state_dicts.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .common import DepthwiseConv2d, DropPath, GroupNorm1, resolve_layers

__all__ = [
    "GlobalContext", "TokenMixer", "ChannelMixer", "FCViTBlock", "PatchEmbed", "DropPath",
    "FCViT", "CONFIGS", "REFERENCE_LAYERS",
]


def _init_conv_linear(m: nn.Module) -> None:
    """The released code's ``_init_weights``: Linear ~ trunc_normal(std .02), bias 0;
    Conv2d ~ N(0, 2 / fan_out) with ``fan_out = k_h·k_w·C_out / groups``, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class GlobalContext(nn.Module):
    """Grouped token-global similarity with normalization (docs/global_context.md; paper Eq. 6–8 and the
    competitive information bottleneck; released ``GlobalContext`` with ``weighted_gc=True``,
    ``compete=True``, ``head=8``, ``gc_reduction=8``).

    Input ``Z``: (B, C, H, W), any float dtype. ``N = H·W``, ``G = groups``, ``d = C / G``.

    1. ``g = mean_{H,W} Z`` → (B, C).
    2. ``S[b,γ,i] = d^-1/2 Σ_e Z[b,γd+e,i]·g[b,γd+e]`` → (B, G, N).
    3. ``Ŝ = (S − μ_b) / (σ_b + eps)`` with μ, σ per sample over (G, N) jointly, σ **unbiased**
       (``torch.std_mean`` default); eps is added to the std.
    4. ``S' = rescale_weight[γ]·Ŝ + rescale_bias[γ]`` → reshaped (B, G, H, W).
    5. ``c = fc2(max(fc1(g)[:, :C/r], fc1(g)[:, C/r:]))`` → (B, C)  (maxout of the two halves).
    6. ``GC(Z)[b, γd+e] = S'[b,γ] · c[b, γd+e]`` → (B, C, H, W).

    ``forward`` returns ``GC(Z)`` only — like the released module; the token mixer adds ``Z``.

    Parameters (state_dict): ``rescale_weight`` (G,) init 1, ``rescale_bias`` (G,) init 0,
    ``fc1`` ``nn.Linear(C, 2·C/r)``, ``fc2`` ``nn.Linear(C/r, C)`` (weights trunc_normal std .02,
    biases 0, as after the released code's ``_init_weights``).
    """

    def __init__(self, dim: int, groups: int = 8, reduction: int = 8, eps: float = 1e-5):
        super().__init__()
        if groups <= 0 or dim % groups != 0:
            raise ValueError(f"GlobalContext: groups={groups} must be a positive divisor of "
                             f"dim={dim}")
        if reduction <= 0 or dim // reduction < 1:
            raise ValueError(f"GlobalContext: reduction={reduction} must be positive and at "
                             f"most dim={dim}")
        self.dim = dim
        self.groups = groups
        self.reduction = reduction
        self.hidden = dim // reduction
        self.eps = eps
        self.scale = (dim // groups) ** -0.5
        # Released code: fc1 = Linear(dim, 2*dim//r); equal to 2*(dim//r) for every shipped width.
        self.fc1 = nn.Linear(dim, 2 * self.hidden)
        self.fc2 = nn.Linear(self.hidden, dim)
        self.rescale_weight = nn.Parameter(torch.ones(groups))
        self.rescale_bias = nn.Parameter(torch.zeros(groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.fc1, self.fc2):
            _init_conv_linear(m)
        nn.init.ones_(self.rescale_weight)
        nn.init.zeros_(self.rescale_bias)

    def similarity(self, x: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Steps 1–4: normalized, rescaled similarity ``S'`` (B, G, H, W) in ``x.dtype``.

        ``g`` (B, C), the channel means of ``x``, is computed when not given.
        """
        B, C, H, W = x.shape
        G = self.groups
        if g is None:
            g = x.mean(dim=(2, 3))
        xs = x.reshape(B, G, C // G, H * W)
        s = torch.einsum("bgdn,bgd->bgn", xs, g.reshape(B, G, C // G)) * self.scale
        std, mean = torch.std_mean(s, dim=(1, 2), keepdim=True)  # unbiased
        s = (s - mean) / (std + self.eps)
        s = s * self.rescale_weight.view(1, G, 1) + self.rescale_bias.view(1, G, 1)
        return s.reshape(B, G, H, W)

    def context(self, g: torch.Tensor) -> torch.Tensor:
        """Step 5: competitive bottleneck ``c = fc2(maxout(fc1(g)))``, (B, C) → (B, C)."""
        u = self.fc1(g)
        m = torch.maximum(u[:, : self.hidden], u[:, self.hidden:])
        return self.fc2(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``GC(x)``: (B, C, H, W) → (B, C, H, W), same dtype (not ``x + GC(x)``)."""
        B, C, H, W = x.shape
        G = self.groups
        g = x.mean(dim=(2, 3))
        s = self.similarity(x, g)  # (B, G, H, W)
        c = self.context(g)  # (B, C)
        out = s.unsqueeze(2) * c.reshape(B, G, C // G, 1, 1)
        return out.reshape(B, C, H, W)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, groups={self.groups}, reduction={self.reduction}, "
                f"eps={self.eps}")


class TokenMixer(nn.Module):
    """FCViT token mixer (docs/fcvit.md; paper Eq. 5 applied twice; released ``TokenMixer``).

    ``Z ← Z + gc1(Z); Z ← GELU(fc1(dw1(Z))); Z ← Z + gc2(Z); Z ← GELU(fc2(dw2(Z)))``, where
    ``dw{1,2}`` are ``DW_k`` (k = 11, bias) and ``fc{1,2}`` are
    ``Conv1x1(C→r) → GELU → Conv1x1(r→C)``, ``r = max(C // fc_factor, fc_min)``.
    (B, C, H, W) → (B, C, H, W), same dtype.
    """

    def __init__(self, dim: int, kernel_size: int = 11, groups: int = 8, gc_reduction: int = 8,
                 fc_factor: int = 8, fc_min: int = 16, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        r = max(dim // fc_factor, fc_min)
        self.act = nn.GELU()
        self.gc1 = L["GlobalContext"](dim, groups=groups, reduction=gc_reduction)
        self.dw1 = L["DepthwiseConv2d"](dim, kernel_size)
        self.fc1 = nn.Sequential(nn.Conv2d(dim, r, 1), self.act, nn.Conv2d(r, dim, 1))
        self.gc2 = L["GlobalContext"](dim, groups=groups, reduction=gc_reduction)
        self.dw2 = L["DepthwiseConv2d"](dim, kernel_size)
        self.fc2 = nn.Sequential(nn.Conv2d(dim, r, 1), self.act, nn.Conv2d(r, dim, 1))
        self.apply(_init_conv_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gc1(x)
        x = self.act(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        x = self.act(self.fc2(self.dw2(x)))
        return x


class ChannelMixer(nn.Module):
    """FCViT channel mixer (released ``ChannelMixer`` with ``useDWconv=True``):
    ``Conv1x1(C→hC) → DW_3 → GELU → Dropout → Conv1x1(hC→C) → Dropout``.
    (B, C, H, W) → (B, C, H, W), same dtype.
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, kernel_size: int = 3,
                 drop: float = 0.0, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        hidden_dim = hidden_dim or dim
        self.act = nn.GELU()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = L["DepthwiseConv2d"](hidden_dim, kernel_size)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)
        self.drop = nn.Dropout(drop)
        self.apply(_init_conv_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwconv(self.fc1(x)))
        x = self.drop(x)
        x = self.drop(self.fc2(x))
        return x


class FCViTBlock(nn.Module):
    """FCViT block (released ``BasicBlock``), (B, C, H, W) → (B, C, H, W):
    ``x ← x + DropPath(γ1 ⊙ TokenMixer(GN(x)))``; ``x ← x + DropPath(γ2 ⊙ ChannelMixer(GN(x)))``.

    Keys: ``layer_scale_1``, ``layer_scale_2`` (C,) init ``layer_scale_init_value`` (1e-5),
    ``norm1``, ``token_mixer``, ``norm2``, ``channel_mixer``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 11, groups: int = 8,
                 drop: float = 0.0, drop_path: float = 0.0, use_layer_scale: bool = True,
                 layer_scale_init_value: float = 1e-5,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.layer_scale_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = L["TokenMixer"](dim, kernel_size=kernel_size, groups=groups,
                                           layers=layers)
        self.norm2 = GroupNorm1(dim)
        self.channel_mixer = L["ChannelMixer"](dim, hidden_dim=int(dim * mlp_ratio), drop=drop,
                                               layers=layers)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.token_mixer(self.norm1(x))
        if self.use_layer_scale:
            t = self.layer_scale_1.view(-1, 1, 1) * t
        x = x + self.drop_path(t)
        c = self.channel_mixer(self.norm2(x))
        if self.use_layer_scale:
            c = self.layer_scale_2.view(-1, 1, 1) * c
        return x + self.drop_path(c)


class PatchEmbed(nn.Module):
    """Overlapping patch embedding (released ``OverlapPatchEmbed``): ``Conv_k/s, pad k//2`` + BN.
    Stem: k=7, s=4 (3 → C0); between stages: k=3, s=2. Keys ``proj``, ``norm``.
    (B, C_in, H, W) → (B, C_out, ⌊(H + 2·(k//2) − k)/s⌋ + 1, same for W).
    """

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(embed_dim)
        self.apply(_init_conv_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class FCViT(nn.Module):
    """FCViT classifier (released ``BaseFormer``, ``fork_feat=False``).

    ``patch_embed`` (7×7/s4 + BN) → ``network``: stage blocks (``nn.Sequential`` of
    :class:`FCViTBlock`) interleaved with 3×3/s2 :class:`PatchEmbed` downsamplers
    (indices 0, 2, 4, 6 are stages; 1, 3, 5 downsamplers) → ``norm`` (GN) → spatial mean →
    ``head`` (Linear; Identity when ``num_classes == 0``).

    Input (B, 3, H, W) float; output logits (B, num_classes), same dtype.
    ``depths`` is the released code's ``layers`` argument (renamed: ``layers`` here is the
    layer-class mapping). ``drop_path_rate`` follows the released linear rule
    ``rate · (global block index) / (total blocks − 1)``.
    """

    def __init__(self, depths: Sequence[int], embed_dims: Sequence[int],
                 mlp_ratios: Sequence[float], downsamples: Optional[Sequence[bool]] = None,
                 num_classes: int = 1000, in_chans: int = 3, kernel_size: int = 11,
                 groups: int = 8, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 use_layer_scale: bool = True, layer_scale_init_value: float = 1e-5,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        resolve_layers(REFERENCE_LAYERS, layers)  # validate names early
        depths = list(depths)
        n_stages = len(depths)
        if not (len(embed_dims) == len(mlp_ratios) == n_stages):
            raise ValueError("FCViT: depths, embed_dims and mlp_ratios must have equal lengths")
        downsamples = [True] * n_stages if downsamples is None else list(downsamples)
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.patch_embed = PatchEmbed(7, 4, in_chans, embed_dims[0])
        total = sum(depths)
        network = []
        for i in range(n_stages):
            blocks = []
            for j in range(depths[i]):
                dpr = drop_path_rate * (j + sum(depths[:i])) / max(total - 1, 1)
                blocks.append(FCViTBlock(
                    embed_dims[i], mlp_ratio=mlp_ratios[i], kernel_size=kernel_size,
                    groups=groups, drop=drop_rate, drop_path=dpr,
                    use_layer_scale=use_layer_scale,
                    layer_scale_init_value=layer_scale_init_value, layers=layers))
            network.append(nn.Sequential(*blocks))
            if i == n_stages - 1:
                break
            if downsamples[i] or embed_dims[i] != embed_dims[i + 1]:
                network.append(PatchEmbed(3, 2, embed_dims[i], embed_dims[i + 1]))
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm1(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        # Released BaseFormer.cls_init_weights: every Linear (head and GC fc's) ~ trunc_normal.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_conv_linear(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → last-stage features (B, C_last, H', W') before the final norm."""
        x = self.patch_embed(x)
        for m in self.network:
            x = m(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_last, H', W') → logits (B, num_classes): GN → mean over H', W' → Linear."""
        return self.head(self.norm(x).mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


REFERENCE_LAYERS = {
    "GlobalContext": GlobalContext,
    "TokenMixer": TokenMixer,
    "ChannelMixer": ChannelMixer,
    "DepthwiseConv2d": DepthwiseConv2d,
}

# docs/fcvit.md table (released factories fcvit_tiny / fcvit_b12 / fcvit_b24 / fcvit_b48).
CONFIGS = {
    "fcvit_tiny": dict(depths=(3, 3, 5, 2), embed_dims=(32, 64, 160, 320), mlp_ratios=(8, 8, 4, 4)),
    "fcvit_b12": dict(depths=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4)),
    "fcvit_b24": dict(depths=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512),
                      mlp_ratios=(8, 8, 4, 4)),
    "fcvit_b48": dict(depths=(8, 8, 24, 8), embed_dims=(64, 128, 320, 512),
                      mlp_ratios=(8, 8, 4, 4)),
}
