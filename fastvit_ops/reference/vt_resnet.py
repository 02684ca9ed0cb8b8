"""VT-ResNet-18 / VT-ResNet-34 (Visual Transformers, arXiv 2006.03677, §4, Appendix A Table 11).

No official code exists; this is built from the paper. A ResNet whose last stage (the 7×7 stage
of 512-channel basic blocks) is replaced by the same number of VT modules (2 for ResNet-18, 3 for
ResNet-34), all working on the 14×14 map that the third stage leaves::

    stem      conv7×7/s2 (3→64) → BN → ReLU → maxpool3×3/s2                 224² → 56²
    layer1-3  basic blocks 64/128/256 (×2/2/2 or ×3/4/6), stride 1/2/2          56² → 14²
    vt.0      filter tokenizer → transformer → projector (256 → 512 channels)
    vt.1 ..   recurrent tokenizer → transformer → projector (512 → 512)
    vt.last   recurrent tokenizer → transformer (no projector)
    head      mean over the L = 16 tokens → Linear(C_T = 1024 → classes)

Each VT module has L = 16 tokens of C_T = 1024 channels (``VT-C512-L16-CT1024``). Choices the
paper leaves open, and why:

* **Feature map 512 channels.** Table 11 says 512, §4's text says 256. 512 is what reproduces the
  paper's Table 2 counts (and Table 4's recurrent-tokenizer cost, ≈ C_T·C = 0.5M per module); the
  first projector widens 256 → 512 with a learned residual ``X W_S``.
* **Tokenizers** pool the map's own channels, then project the 16 pooled tokens to C_T
  (``value_projection``: ``(Aᵀ X) W_V``, equal to ``Aᵀ (X W_V)`` at a 12× smaller cost).
* **Transformer**: F1, F2 ∈ R^{C_T×C_T} as Eq. (4) states; K, Q (whose shapes the paper does not
  give) map the tokens to ``qk_channels = 256``, the width for which both Table 2 rows come out
  (with 1024, VT-R18 would have 14.4M parameters, 23% over the paper's 11.7M).
* **No projector in the last module**: for classification the tokens go to the head (paper Fig. 1:
  "visual tokens are directly used for image classification"), so a last projection would compute
  a map nothing reads.
* No scale on the logits and no normalization inside the VT modules (the paper's Eqs. 1–5 have
  none).

Counts at 224², 1000 classes (parameters: ``sum(p.numel())``; FLOPs: multiply-adds of every
convolution and matrix product, from ``torch.utils.flop_counter.FlopCounterMode`` (which reports
2 per multiply-add) divided by 2, the convention of the paper's ResNet numbers — torchvision's
ResNet-18 counts 1,814,073,344 this way, the paper's 1814M):

==============  ============  ============  =====================  =====================
model           parameters    paper         FLOPs                  paper
==============  ============  ============  =====================  =====================
VT-ResNet-18    11,676,200    11.7M (−0.2%)  1,585.2M (+1.0%)       1570M
VT-ResNet-34    22,044,456    21.9M (+0.7%)  3,337.3M (+1.7%)       3280M
==============  ============  ============  =====================  =====================

The trunk's parameter names are torchvision's ResNet names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0`` …), so a torchvision ResNet-18/34 checkpoint loads into the trunk with
``load_state_dict(sd, strict=False)`` (its ``layer4``/``fc`` keys are then unexpected, ``vt``/``head``
missing). Layout NCHW; any float dtype, computed in the input dtype.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import vt
from .common import resolve_layers

__all__ = ["BasicBlock", "VTModule", "VTResNet", "CONFIGS", "REFERENCE_LAYERS"]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): ``ReLU(BN(conv3×3(ReLU(BN(conv3×3/s(x))))) + sc(x))``,
    ``sc`` = identity or ``BN(conv1×1/s)`` when the stride or width changes.
    (B, C_in, H, W) → (B, C_out, ⌈H/s⌉, ⌈W/s⌉)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class VTModule(nn.Module):
    """One VT module (paper §3, Fig. 1): tokenizer → transformer → projector.

    ``forward(x, tokens=None)``: ``x (B, in_channels, H, W)``, the previous module's tokens
    ``(B, L, C_T)`` (a recurrent tokenizer needs them; a filter tokenizer ignores them) →
    ``(x_out (B, channels, H, W) or None without a projector, tokens (B, L, C_T))``.

    Params: ``tokenizer`` (:class:`~fastvit_ops.reference.vt.FilterTokenizer` or
    :class:`~fastvit_ops.reference.vt.RecurrentTokenizer`, with W_V to C_T), ``transformer``
    (:class:`~fastvit_ops.reference.vt.TokenTransformer` on C_T, K/Q width ``qk_channels``),
    ``projector`` (:class:`~fastvit_ops.reference.vt.Projector` C_T → ``channels``, or None).
    """

    def __init__(self, in_channels: int, channels: int, num_tokens: int = 16, token_channels: int = 1024,
                 qk_channels: int = 256, recurrent: bool = False, projector: bool = True, *,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        L = resolve_layers(REFERENCE_LAYERS, layers)
        self.recurrent = bool(recurrent)
        if recurrent:
            self.tokenizer = L["RecurrentTokenizer"](in_channels, token_channels, value_projection=True)
        else:
            self.tokenizer = L["FilterTokenizer"](in_channels, num_tokens, token_channels, value_projection=True)
        self.transformer = L["TokenTransformer"](token_channels, qk_channels=qk_channels)
        self.projector = (L["Projector"](in_channels, token_channels, value_projection=True, out_channels=channels)
                          if projector else None)

    def forward(self, x: torch.Tensor, tokens: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        if self.recurrent:
            if tokens is None:
                raise ValueError("tokens: a recurrent tokenizer needs the previous module's tokens, got None")
            t = self.tokenizer(x, tokens)
        else:
            t = self.tokenizer(x)
        t = self.transformer(t)
        return (self.projector(x, t) if self.projector is not None else None), t


def _init(m: nn.Module) -> None:
    """Convs: He normal (fan_out); BN: 1, 0; the VT matrices and the head: N(0, .02²), bias 0 (the
    paper states no initialization; these are the usual ResNet / transformer choices — timm's
    ``trunc_normal_(std=.02)`` truncates at ±2, 100σ out, so it draws the same distribution)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class VTResNet(nn.Module):
    """VT-ResNet classifier (module docstring): images ``(B, in_chans, H, W)`` (224² in the paper;
    any size whose stride-16 map is non-empty) → logits ``(B, num_classes)``.

    Args:
        depths: basic blocks in layer1..layer3 ((2, 2, 2) for VT-R18, (3, 4, 6) for VT-R34).
        vt_modules: VT modules replacing layer4 (2 / 3).
        widths: the three stages' channels (64, 128, 256).
        vt_channels: the VT feature map's channels C (512).
        num_tokens, token_channels, qk_channels: L (16), C_T (1024), the transformer's K/Q width (256).
        layers: ``{name: class}`` replacing the basic blocks or VT blocks (:data:`REFERENCE_LAYERS` names).

    Raises:
        ValueError: ``vt_modules < 1``, or a ``layers`` name this model does not use.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 2), vt_modules: int = 2, num_classes: int = 1000,
                 in_chans: int = 3, widths: Sequence[int] = (64, 128, 256), vt_channels: int = 512,
                 num_tokens: int = 16, token_channels: int = 1024, qk_channels: int = 256, *,
                 layers: Optional[Mapping[str, type]] = None):
        super().__init__()
        resolve_layers(REFERENCE_LAYERS, layers)  # validate names early
        if vt_modules < 1:
            raise ValueError(f"vt_modules: expected at least 1, got {vt_modules}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        block = resolve_layers(REFERENCE_LAYERS, layers)["BasicBlock"]
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, depths)):
            blocks = [block(c if j == 0 else w, w, 2 if (j == 0 and i > 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = w
        self.vt = nn.ModuleList([
            VTModule(c if i == 0 else vt_channels, vt_channels, num_tokens, token_channels, qk_channels,
                     recurrent=i > 0, projector=i < vt_modules - 1, layers=layers)
            for i in range(vt_modules)])
        self.head = nn.Linear(token_channels, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv7×7/s2 → BN → ReLU → maxpool3×3/s2: ``(B, in_chans, H, W)`` → ``(B, 64, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` → the last module's tokens ``(B, L, C_T)``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        tokens = None
        for m in self.vt:
            x, tokens = m(x, tokens)
        return tokens

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, C_T)`` → logits: the mean over the L tokens, then the Linear head."""
        return self.head(tokens.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


REFERENCE_LAYERS = {
    "BasicBlock": BasicBlock,
    "FilterTokenizer": vt.FilterTokenizer,
    "RecurrentTokenizer": vt.RecurrentTokenizer,
    "TokenTransformer": vt.TokenTransformer,
    "Projector": vt.Projector,
}

#: Table 11: ResNet-18 / ResNet-34 trunks, their last stage replaced by 2 / 3 VT modules.
CONFIGS = {
    "vt_resnet18": dict(depths=(2, 2, 2), vt_modules=2),
    "vt_resnet34": dict(depths=(3, 4, 6), vt_modules=3),
}
