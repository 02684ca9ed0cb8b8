"""Which implementation ``auto`` runs on CPU where ours is not the faster everywhere.

A fixed rule per CPU capability (the build of the C++ kernels in use: ``default``, ``avx2`` or
``avx512``, see :func:`fastvit_ops._availability.cpu_capability`), written from measurements on the
project's 2-core CI machines (batch 8, 2 threads, fp32; ``bench/results/cpu_*``). It depends only
on the call's shapes, layout, dtype and arguments and on the capability, so every process on the
same machine picks the same kernel (and rounds the same way), nothing is timed at run time and
nothing is cached. Under ``torch.use_deterministic_algorithms(True)`` the choice is fixed to our
kernels.

The dispatch (``fastvit_ops/ops/dispatch.py`` and each op's module) asks these functions; they
never run anything themselves.
"""
from __future__ import annotations

import functools

import torch

from .. import _availability


@functools.lru_cache(maxsize=1)
def capability() -> str:
    """The capability of the C++ CPU kernels in use (``"default"`` without the extension)."""
    info = _availability.cpu_capability()
    return info["in_use"] if info else "default"


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


# ---- dwconv2d's forward: ours ("cpu") or PyTorch's oneDNN convolution + our epilogue ("onednn") ----
def dwconv_forward(shape, channels_last: bool, dtype: torch.dtype, kernel_size: int, stride: int, padding: int,
                   activation: int, residual: bool) -> str:
    """``"cpu"`` (our depthwise kernel) or ``"onednn"`` for the forward of one ``dwconv2d`` call.

    ``shape`` is x's (B, C, H, W); ``activation`` 0 / 1 / 2 (none / SiLU / GELU). The backward is
    always ours (3-25× oneDNN's at every measured shape).
    """
    if _deterministic():
        return "cpu"
    return "cpu"
