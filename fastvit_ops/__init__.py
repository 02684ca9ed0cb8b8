"""fastvit_ops — fused kernels for hybrid convolution/attention vision backbones.

Public API:
    sigmoid_cross_modulation(local, global_, mode="silu")   FASA's gate (docs/cross_modulation.md)
    dwconv2d(x, weight, bias=None, stride=1, padding=None, activation=None, residual=False)
                                                             large-kernel depthwise conv (docs/dwconv.md)
    downsampled_attention(q, k, v, scale=None)               short-KV attention (docs/attention.md)
    downsampled_attention_nchw(q_map, k, v, num_heads, scale=None, gate=None)
                                                             channels-first queries, fused SiLU gate
    conv_projection_qkv(x, hw, cls_token, weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, stride_q=1, stride_kv=2)
                                                             CvT's q/k/v depthwise projections in one pass (docs/cvt.md)
    global_context(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, rescale_weight, rescale_bias, groups=8, eps=1e-5)
                                                             FCViT x + GC(x) (docs/global_context.md)
    token_global_similarity(x, rescale_weight, rescale_bias, groups=8, eps=1e-5)
                                                             S' (B, G, H, W) (docs/global_context.md, steps 1–4)
    backend(name) / get_backend()                            backend selection (auto|triton|cuda|cpu|reference)
    models.create(name), models.list_models()                FAT-B0..B3, FCViT tiny..B48, CvT-13/21, VT-ResNet-18/34
    fused_fasa(x, fasa)                                      FAT's whole FASA forward, fused, for any FASA module (docs/fat.md)
    convert(model) / revert(model)                           swap layers for fused drop-ins, weights kept
    fuse_for_inference(model, inplace=False)                 eval-only BatchNorm folding into adjacent convs
    reference, nn                                            reference layers and fused drop-ins
    timm.create_model("fastvit_ops_<name>", ...)             every model in timm's registry (timm_models)
"""
import importlib

from . import _availability, models, nn, ops, reference
from ._version import __version__
from .ops import BACKENDS, backend, backend_available, get_backend
from .convert import convert, revert
from .fuse import fuse_for_inference
from .nn.fat import fused_fasa
from .ops.attention import downsampled_attention, downsampled_attention_nchw
from .ops.conv_projection import conv_projection_qkv
from .ops.cross_modulation import sigmoid_cross_modulation
from .ops.dwconv import dwconv2d
from .ops.global_context import global_context, token_global_similarity


__all__ = [
    "BACKENDS",
    "convert",
    "fuse_for_inference",
    "fused_fasa",
    "revert",
    "backend",
    "backend_available",
    "get_backend",
    "models",
    "nn",
    "reference",
    "sigmoid_cross_modulation",
    "dwconv2d",
    "downsampled_attention",
    "downsampled_attention_nchw",
    "conv_projection_qkv",
    "global_context",
    "token_global_similarity",
    "__version__",
]

# Importing the extension registers the compiled kernels under torch.ops.fastvit_ops; when it is
# missing the package still works on the reference (and Triton) backends.
_availability.extension()

for _module in ops.EXTRA_BACKENDS:  # each registers its backend and kernels (fastvit_ops/ops/__init__.py)
    importlib.import_module(_module)

# Custom ops run with autocast off on the dtypes they get (see fastvit_ops/_autocast.py).
from . import _autocast  # noqa: E402

_autocast.register()

# fastvit_ops.export.onnx_export lowers each fused custom op to its reference composition for ONNX.
from . import export  # noqa: E402

# With timm installed, every model is registered in timm's registry as ``fastvit_ops_<name>`` once
# timm is imported (see fastvit_ops/timm_models.py).
from . import timm_models  # noqa: E402

timm_models.install()
