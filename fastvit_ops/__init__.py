"""fastvit_ops — fused kernels for hybrid convolution/attention vision backbones.

Public API:
    sigmoid_cross_modulation(local, global_, mode="silu")   FASA's gate (SPEC §1.4)
    backend(name) / get_backend()                            backend selection (auto|triton|cuda|cpu|reference)
    models.create(name), models.list_models()                FAT-B0..B3, FCViT tiny..B48, CvT-13/21
    convert(model) / revert(model)                           swap layers for fused drop-ins, weights kept
    reference, nn                                            reference layers and fused drop-ins
"""
from . import _availability, models, nn, reference
from .ops import BACKENDS, backend, backend_available, get_backend
from .convert import convert, revert
from .ops.cross_modulation import sigmoid_cross_modulation

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "convert",
    "revert",
    "backend",
    "backend_available",
    "get_backend",
    "models",
    "nn",
    "reference",
    "sigmoid_cross_modulation",
    "__version__",
]

# Importing the extension registers the compiled kernels under torch.ops.fastvit_ops; when it is
# missing the package still works on the reference (and Triton) backends.
_availability.extension()
