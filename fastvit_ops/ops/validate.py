"""Input checks shared by the ops: clear ``TypeError``/``ValueError`` naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim=None) -> None:
    """``t`` must be a floating tensor (fp16/bf16/fp32/fp64), with ``ndim`` dims if given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape: bool = True) -> None:
    """``t`` must share ``ref``'s dtype and device (and shape when ``shape``)."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(t.shape)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def is_channels_last(t: torch.Tensor) -> bool:
    """Stored channels_last and not also plain contiguous (NCHW wins when both, as at C == 1 or
    H == W == 1)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the storage can be walked flat (NCHW, channels_last, ...)."""
    expected = 1
    # Walk dims from the smallest stride up; each must equal the product of the sizes below it.
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(*tensors: torch.Tensor):
    """Return the tensors in one dense layout, so an elementwise kernel can walk them flat.

    The first tensor's layout wins when it is dense (channels_last stays channels_last); others are
    copied into it only when their strides differ. Otherwise all become contiguous.
    """
    first = tensors[0]
    if is_dense(first):
        out = [first]
        for t in tensors[1:]:
            out.append(t if t.stride() == first.stride() else torch.empty_like(first, dtype=t.dtype).copy_(t))
        return out
    return [t.contiguous() for t in tensors]


def empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised output laid out like ``same_layout`` lays out ``t``."""
    return torch.empty_like(t) if is_dense(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device)
