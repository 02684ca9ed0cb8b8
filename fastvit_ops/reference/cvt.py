"""CvT reference model (docs/cvt.md), state_dict-identical to the authors' released code.

Source: Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021, and its
released code, github microsoft/CvT ``lib/models/cls_cvt.py`` with the ImageNet settings of
``experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml``. Where paper and code differ the code wins
(docs/cvt.md). This is an independent re-implementation (no timm / einops); parameter names, module
nesting and registration order follow the released code so that ``state_dict()`` lists exactly the
keys of ``tests/data/checkpoints/cvt_13.txt`` / ``cvt_21.txt`` and released checkpoints load with
``strict=True``.

Layouts: images and 2-D token maps are NCHW ``(B, C, H, W)``; token sequences are ``(B, T, C)``
with row-major flattened pixels (``t = i * W + j``) and, in the stage that has one, the cls token at
``t = 0``. Attention tensors are ``(B, heads, T, d)`` with contiguous heads (head ``m`` owns
channels ``m*d … m*d+d-1``). Any float dtype works; LayerNorm is computed in fp32 and cast back to
the input dtype (like the authors' ``LayerNorm`` subclass).

Layer injection (see ``fastvit_ops.reference.common.resolve_layers``): every constructor takes a
trailing keyword ``layers`` mapping a name of :data:`REFERENCE_LAYERS` to the class to build for it;
``fastvit_ops.nn.CVT_LAYERS`` supplies fused drop-ins with the same constructor signature and
state_dict keys.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .common import DepthwiseConv2d, DropPath, resolve_layers

__all__ = [
    "LayerNorm", "QuickGELU", "DropPath", "Mlp", "Attention", "Block", "ConvEmbed",
    "VisionTransformer", "ConvolutionalVisionTransformer", "REFERENCE_LAYERS", "CONFIGS",
]


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim, computed in fp32 and cast back to the input dtype.

    Input ``(..., C)`` of any float dtype; output same shape and dtype as the input. The authors'
    subclass runs ``nn.LayerNorm`` on ``x.float()`` and casts the result back (``eps`` 1e-5, biased
    variance inside the square root). Two deliberate extensions, both identical to the authors'
    code for fp32 parameters and fp32/fp16/bf16 inputs (every case their checkpoints and AMP see):
    float64 inputs are normalized in float64 (the authors would round them to fp32, which would
    make a float64 oracle impossible), and the affine parameters are upcast too, so a module cast
    to bf16/fp16 still normalizes in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        out = F.layer_norm(x.to(compute), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """``x · σ(1.702 x)`` elementwise (the activation the released CvT models use); any shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout; ``(B, T, C_in) → (B, T, C_out)``.

    Params ``fc1`` (C_in → hidden) and ``fc2`` (hidden → C_out), both with bias. The released
    models use QuickGELU and hidden = 4·C (docs/cvt.md).
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer: Optional[type] = None,
                 drop: float = 0.0, *, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        act_layer = act_layer or L["QuickGELU"]
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """CvT convolutional-projection attention (``method="dw_bn"``), docs/attention.md, docs/cvt.md.

    ``forward(x, h, w)``: ``x (B, [1 +] h·w, dim_in)`` (cls token first when ``with_cls_token``)
    → ``(B, [1 +] h·w, dim_out)``.

    1. :meth:`forward_conv`: the spatial tokens are reshaped to ``(B, dim_in, h, w)``; q, k, v are
       each ``DW_k (no bias, given stride/padding) → BN → flatten`` (``conv_proj_{q,k,v}.{conv,bn}``;
       q stride 1, k/v stride 2 in the released models, so ``M = ceil(h/2)·ceil(w/2)`` keys). The
       cls token bypasses the convolution and is prepended to each of q, k, v.
    2. ``proj_{q,k,v}`` Linear (bias iff ``qkv_bias``); heads split contiguously → ``(B, heads, T, d)``.
    3. :meth:`attention`: ``softmax(q kᵀ · scale) v`` over the keys, with
       ``scale = dim_out^(-1/2)`` — the **full** embedding width, not the head width (released code).
    4. heads merged back to ``(B, T, dim_out)``; ``proj`` Linear (bias).

    ``method="avg"`` (avg-pool k/v, linear q) and ``"linear"`` (plain ViT projections) are the
    released code's other options; the released checkpoints use ``"dw_bn"`` everywhere.
    """

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, method: str = "dw_bn",
                 kernel_size: int = 3, stride_kv: int = 1, stride_q: int = 1, padding_kv: int = 1,
                 padding_q: int = 1, with_cls_token: bool = True, *,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} is not divisible by num_heads={num_heads}")
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.stride_kv = stride_kv
        self.stride_q = stride_q
        self.dim = dim_out
        self.num_heads = num_heads
        self.scale = dim_out ** -0.5  # full width, as the released code (not head_dim ** -0.5)
        self.with_cls_token = with_cls_token
        self.method = method

        self.conv_proj_q = self._build_projection(
            dim_in, kernel_size, padding_q, stride_q, "linear" if method == "avg" else method, L)
        self.conv_proj_k = self._build_projection(
            dim_in, kernel_size, padding_kv, stride_kv, method, L)
        self.conv_proj_v = self._build_projection(
            dim_in, kernel_size, padding_kv, stride_kv, method, L)

        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)

        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _build_projection(dim_in: int, kernel_size: int, padding: int, stride: int, method: str,
                          L: Mapping[str, type]) -> Optional[nn.Module]:
        """``dw_bn``: Sequential(conv=DW_k/s no bias, bn=BN) → keys ``conv.weight``, ``bn.*``."""
        if method == "dw_bn":
            return nn.Sequential(OrderedDict([
                ("conv", L["DepthwiseConv2d"](dim_in, kernel_size, stride=stride, bias=False,
                                              padding=padding)),
                ("bn", nn.BatchNorm2d(dim_in)),
            ]))
        if method == "avg":
            return nn.Sequential(OrderedDict([
                ("avg", nn.AvgPool2d(kernel_size=kernel_size, padding=padding, stride=stride,
                                     ceil_mode=True)),
            ]))
        if method == "linear":
            return None
        raise ValueError(f"unknown projection method {method!r}")

    def forward_conv(self, x: torch.Tensor, h: int, w: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolutional projections: ``(B, [1 +] h·w, C)`` → q ``(B, [1 +] h·w, C)``,
        k and v ``(B, [1 +] h_kv·w_kv, C)`` (cls token, if any, prepended unchanged)."""
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], dim=1)
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, h, w)

        def project(proj: Optional[nn.Module]) -> torch.Tensor:
            y = x if proj is None else proj(x)
            return y.flatten(2).transpose(1, 2)  # (B, C, h', w') -> (B, h'·w', C)

        q = project(self.conv_proj_q)
        k = project(self.conv_proj_k)
        v = project(self.conv_proj_v)
        if self.with_cls_token:
            q = torch.cat((cls_token, q), dim=1)
            k = torch.cat((cls_token, k), dim=1)
            v = torch.cat((cls_token, v), dim=1)
        return q, k, v

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention core: q ``(B, heads, N, d)``, k and v ``(B, heads, M, d)`` → ``(B, heads, N, d)``.

        ``softmax_over_keys(q kᵀ · self.scale)`` (attention dropout in training) times v; computed in
        the input dtype. A fused subclass overrides only this method.
        """
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        return torch.matmul(attn, v)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.reshape(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if (self.conv_proj_q is not None or self.conv_proj_k is not None
                or self.conv_proj_v is not None):
            q, k, v = self.forward_conv(x, h, w)
        else:
            q = k = v = x
        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))
        out = self.attention(q, k, v)  # (B, heads, N, d)
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, self.dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Convolutional Transformer block: ``x ← x + Attn(LN1(x)); x ← x + MLP(LN2(x))``.

    ``forward(x, h, w)``: ``(B, [1 +] h·w, dim_in) → (B, [1 +] h·w, dim_out)`` (the released models
    have ``dim_in == dim_out``). Params ``norm1``, ``attn`` (:class:`Attention`), ``norm2``, ``mlp``
    (hidden ``int(dim_out · mlp_ratio)``). Extra keywords (``method``, ``kernel_size``, strides,
    paddings, ``with_cls_token``) go to :class:`Attention`.
    """

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: Optional[type] = None,
                 norm_layer: Optional[type] = None, *, layers: Optional[Mapping[str, type]] = None,
                 **kwargs):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        norm_layer = norm_layer or L["LayerNorm"]
        act_layer = act_layer or L["QuickGELU"]
        self.with_cls_token = kwargs.get("with_cls_token", True)
        self.norm1 = norm_layer(dim_in)
        self.attn = L["Attention"](dim_in, dim_out, num_heads, qkv_bias, attn_drop, drop,
                                   layers=layers, **kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = L["Mlp"](in_features=dim_out, hidden_features=int(dim_out * mlp_ratio),
                            act_layer=act_layer, drop=drop, layers=layers)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Convolutional token embedding: ``(B, C_in, H, W) → (B, C, H', W')``.

    ``proj`` = Conv2d(C_in → C, k = patch_size, stride, padding, bias), then ``norm`` (LayerNorm
    over channels, applied per pixel) when ``norm_layer`` is given. Output stays NCHW.
    """

    def __init__(self, patch_size: int = 7, in_chans: int = 3, embed_dim: int = 64,
                 stride: int = 4, padding: int = 2, norm_layer: Optional[type] = None, *,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        resolve_layers(REFERENCE_LAYERS, layers)  # validate names
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=stride,
                              padding=padding)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.norm is not None:
            B, C, H, W = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2))  # (B, H·W, C)
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x


class VisionTransformer(nn.Module):
    """One CvT stage: :class:`ConvEmbed`, optional cls token, ``depth`` :class:`Block` s.

    ``forward(x)``: ``(B, C_in, H, W)`` → ``(y (B, C, H', W'), cls (B, 1, C) or None)``.
    Params: ``patch_embed``, ``cls_token (1, 1, C)`` when ``with_cls_token`` (registered on the stage
    itself, hence listed first in its state_dict), ``blocks.{i}``. No positional embedding.
    Stochastic depth grows linearly from 0 to ``drop_path_rate`` over the stage's blocks.
    """

    def __init__(self, patch_size: int = 16, patch_stride: int = 16, patch_padding: int = 0,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act_layer: Optional[type] = None, norm_layer: Optional[type] = None,
                 init: str = "trunc_norm", with_cls_token: bool = False, *,
                 layers: Optional[Mapping[str, type]] = None, **kwargs):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        norm_layer = norm_layer or L["LayerNorm"]
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = L["ConvEmbed"](patch_size=patch_size, in_chans=in_chans,
                                          stride=patch_stride, padding=patch_padding,
                                          embed_dim=embed_dim, norm_layer=norm_layer, layers=layers)
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.cls_token = None
        self.pos_drop = nn.Dropout(p=drop_rate)
        # linspace(0, drop_path_rate, depth) in Python floats (works when built on the meta device)
        dpr = [drop_path_rate * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)]
        self.blocks = nn.ModuleList([
            L["Block"](dim_in=embed_dim, dim_out=embed_dim, num_heads=num_heads,
                       mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                       attn_drop=attn_drop_rate, drop_path=dpr[j], act_layer=act_layer,
                       norm_layer=norm_layer, with_cls_token=with_cls_token, layers=layers,
                       **kwargs)
            for j in range(depth)
        ])
        if self.cls_token is not None:
            _trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_xavier if init == "xavier" else _init_trunc_normal)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, H, W)
        cls_tokens = None
        if self.cls_token is not None:
            cls_tokens, x = torch.split(x, [1, H * W], dim=1)
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return x, cls_tokens


@torch.no_grad()
def _trunc_normal_(tensor: torch.Tensor, std: float = 1.0, a: float = -2.0, b: float = 2.0
                   ) -> torch.Tensor:
    """N(0, std²) truncated to the absolute bounds [a, b] (timm's ``trunc_normal_`` defaults).

    With the authors' std = 0.02 the bounds sit 100 σ out, beyond anything PyTorch's normal
    generator can produce (its Box–Muller tails end well below 12 σ), so the truncation is a no-op
    and a plain ``normal_`` draws the same distribution ~10× faster than ``nn.init.trunc_normal_``
    (inverse-CDF) on CPU. Tighter bounds fall back to ``nn.init.trunc_normal_``.
    """
    if min(-a, b) >= 12.0 * std:
        return tensor.normal_(0.0, std)
    return nn.init.trunc_normal_(tensor, std=std, a=a, b=b)


def _init_trunc_normal(m: nn.Module) -> None:
    # The authors' "trunc_norm" init: Linear weights N(0, .02) truncated to [-2, 2], zero bias;
    # LayerNorm / BatchNorm weight 1, bias 0; convolutions keep PyTorch's default.
    if isinstance(m, nn.Linear):
        _trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _init_xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ConvolutionalVisionTransformer(nn.Module):
    """CvT classifier: stages ``stage0 … stage{n-1}``, then ``norm`` and ``head``.

    ``forward(x)``: images ``(B, in_chans, H, W)`` (any size; the released models are trained at
    224²) → logits ``(B, num_classes)``. With a cls token in the last stage the head reads
    ``norm(cls)``; otherwise the mean over the normalized tokens of the last stage.

    ``spec``: a mapping like :data:`CONFIGS` entries (per-stage sequences). ``drop_path_rate``:
    ``None`` keeps ``spec["drop_path_rate"]``; a float sets every stage's maximum rate; a sequence
    gives one per stage (the authors trained with (0, 0, 0.1)).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 spec: Optional[Mapping[str, Sequence]] = None,
                 drop_path_rate: Union[None, float, Sequence[float]] = None,
                 init: str = "trunc_norm", *, layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        spec = dict(CONFIGS["cvt_13"] if spec is None else spec)
        self.num_classes = num_classes
        self.num_stages = spec["num_stages"]
        if drop_path_rate is None:
            dprs = list(spec["drop_path_rate"])
        elif isinstance(drop_path_rate, (int, float)):
            dprs = [float(drop_path_rate)] * self.num_stages
        else:
            dprs = list(drop_path_rate)
        for i in range(self.num_stages):
            stage = L["VisionTransformer"](
                patch_size=spec["patch_size"][i], patch_stride=spec["patch_stride"][i],
                patch_padding=spec["patch_padding"][i], in_chans=in_chans,
                embed_dim=spec["dim_embed"][i], depth=spec["depth"][i],
                num_heads=spec["num_heads"][i], mlp_ratio=spec["mlp_ratio"][i],
                qkv_bias=spec["qkv_bias"][i], drop_rate=spec["drop_rate"][i],
                attn_drop_rate=spec["attn_drop_rate"][i], drop_path_rate=dprs[i],
                with_cls_token=spec["cls_token"][i], method=spec["qkv_proj_method"][i],
                kernel_size=spec["kernel_qkv"][i], padding_q=spec["padding_q"][i],
                padding_kv=spec["padding_kv"][i], stride_kv=spec["stride_kv"][i],
                stride_q=spec["stride_q"][i], init=init, layers=layers)
            setattr(self, f"stage{i}", stage)
            in_chans = spec["dim_embed"][i]
        dim_embed = spec["dim_embed"][-1]
        self.norm = L["LayerNorm"](dim_embed)
        self.cls_token = bool(spec["cls_token"][-1])  # a flag, not a parameter (as released)
        self.head = nn.Linear(dim_embed, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _trunc_normal_(self.head.weight, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f"stage{i}.cls_token" for i in range(self.num_stages)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → pooled features ``(B, dim_embed[-1])``."""
        cls_tokens = None
        for i in range(self.num_stages):
            x, cls_tokens = getattr(self, f"stage{i}")(x)
        if self.cls_token:
            # released code: torch.squeeze(norm(cls)), which also drops the batch dim when B == 1;
            # we drop only the token dim so (B, C) is returned for every B.
            return self.norm(cls_tokens)[:, 0]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


REFERENCE_LAYERS = {
    "Attention": Attention,
    "DepthwiseConv2d": DepthwiseConv2d,
    "LayerNorm": LayerNorm,
    "QuickGELU": QuickGELU,
    "Mlp": Mlp,
    "Block": Block,
    "ConvEmbed": ConvEmbed,
    "VisionTransformer": VisionTransformer,
}

_COMMON = dict(
    num_stages=3,
    patch_size=(7, 3, 3),
    patch_stride=(4, 2, 2),
    patch_padding=(2, 1, 1),
    dim_embed=(64, 192, 384),
    num_heads=(1, 3, 6),
    mlp_ratio=(4.0, 4.0, 4.0),
    qkv_bias=(True, True, True),
    drop_rate=(0.0, 0.0, 0.0),
    attn_drop_rate=(0.0, 0.0, 0.0),
    # The released yaml trains with (0.0, 0.0, 0.1); the reference default is deterministic.
    drop_path_rate=(0.0, 0.0, 0.0),
    cls_token=(False, False, True),
    qkv_proj_method=("dw_bn", "dw_bn", "dw_bn"),
    kernel_qkv=(3, 3, 3),
    padding_kv=(1, 1, 1),
    stride_kv=(2, 2, 2),
    padding_q=(1, 1, 1),
    stride_q=(1, 1, 1),
)

#: Per-stage settings of the released ImageNet models (cvt-13-224x224.yaml, cvt-21-224x224.yaml).
CONFIGS = {
    "cvt_13": dict(_COMMON, depth=(1, 2, 10)),   # 19,997,480 parameters
    "cvt_21": dict(_COMMON, depth=(1, 4, 16)),   # 31,622,696 parameters
}
