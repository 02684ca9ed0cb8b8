"""Benchmark and check cases behind ``python -m fastvit_ops bench`` / ``check``.

Each fused op has one module here that defines

* ``bench_cases(batch, device) -> list[Case]`` — the real layer shapes (FAT-B0 stages at 224², ...);
* ``check_cases(device) -> list[Case]`` — small random shapes for ``check``.

and is listed in :data:`OP_MODULES`. The runner (``timing.py``) times ``eager`` (the reference
layer as eager PyTorch), ``torch.compile(eager)`` and ``fused`` side by side in one run.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, List, Sequence

import torch


@dataclasses.dataclass
class Case:
    """One op at one shape.

    ``make_inputs()`` returns fresh input tensors (those that need gradients already have
    ``requires_grad``); ``eager(*inputs)`` and ``fused(*inputs)`` return one tensor. ``backends``
    lists the fused backends ``check`` runs on this device.
    """

    op: str
    shape: str
    make_inputs: Callable[[], Sequence[torch.Tensor]]
    eager: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    backward: bool = True
    flops: float = 0.0          # forward FLOPs (0 when not meaningful)
    bytes: float = 0.0          # forward minimum bytes moved (read inputs once, write output once)
    # The error rule's factor (docs/numerics.md): 2 for one op; numerics.COMPOUNDED_FACTOR (4) for
    # a whole block of several ops, whose deep gradients carry every later layer's rounding.
    factor: float = 2.0


# op name → module (relative to this package) with bench_cases / check_cases.
OP_MODULES = {
    "sigmoid_cross_modulation": ".cross_modulation",
    "global_context": ".global_context",
    "dwconv2d": ".dwconv",
    "downsampled_attention": ".attention",
    "fasa_module": ".fasa",
}


def op_names() -> List[str]:
    return list(OP_MODULES)


def load(op: str):
    return importlib.import_module(OP_MODULES[op], __name__)
