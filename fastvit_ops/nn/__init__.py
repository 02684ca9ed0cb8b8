"""Fused drop-in modules: same constructor signature and state_dict as ``fastvit_ops.reference``.

``FAT_LAYERS``, ``FCVIT_LAYERS``, ``CVT_LAYERS``, ``VT_LAYERS`` map a reference layer name to its fused
drop-in; ``fastvit_ops.models`` builds models with them (the reference is used for any name that
has no fused layer yet).
"""
from .fat import FASA, ConvFFN, FATBlock, PatchEmbedding
from .cvt import Block as CvTBlock
from .cvt import ConvProjectionAttention
from .dwconv import DepthwiseConv2d
from .fcvit import ChannelMixer, FCViTBlock, GlobalContext, PatchEmbed, TokenMixer
from .vt import FilterTokenizer, Projector, RecurrentTokenizer, TokenTransformer
from .vt_resnet import BasicBlock, VTResNet

FAT_LAYERS: dict = {"FASA": FASA, "ConvFFN": ConvFFN, "FATBlock": FATBlock, "PatchEmbedding": PatchEmbedding,
                    "DepthwiseConv2d": DepthwiseConv2d}
FCVIT_LAYERS: dict = {"GlobalContext": GlobalContext, "TokenMixer": TokenMixer, "DepthwiseConv2d": DepthwiseConv2d,
                      "ChannelMixer": ChannelMixer, "FCViTBlock": FCViTBlock, "PatchEmbed": PatchEmbed}
CVT_LAYERS: dict = {"Attention": ConvProjectionAttention, "Block": CvTBlock}
VT_LAYERS: dict = {"BasicBlock": BasicBlock, "FilterTokenizer": FilterTokenizer,
                   "RecurrentTokenizer": RecurrentTokenizer, "TokenTransformer": TokenTransformer,
                   "Projector": Projector}
#: reference model class → fused model class, for models whose own forward has a fused part
#: (VT-ResNet's stem).
MODELS: dict = {"VTResNet": VTResNet}

__all__ = ["FASA", "ConvFFN", "FATBlock", "PatchEmbedding", "DepthwiseConv2d", "GlobalContext", "TokenMixer", "ChannelMixer", "FCViTBlock", "PatchEmbed", "ConvProjectionAttention", "CvTBlock", "FilterTokenizer",
           "RecurrentTokenizer", "TokenTransformer", "Projector", "BasicBlock", "VTResNet", "MODELS", "FAT_LAYERS", "FCVIT_LAYERS", "CVT_LAYERS", "VT_LAYERS"]
