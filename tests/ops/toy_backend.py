"""A whole backend in one module, the way CONTRIBUTING.md describes adding one: its availability and
its kernels, registered with the dispatch registry when the module is imported (the one line that
adds it to the package is its name in ``fastvit_ops.ops.EXTRA_BACKENDS``). It computes
``sigmoid_cross_modulation`` with the reference formulas and counts its calls."""
import torch

from fastvit_ops.ops import cross_modulation as cm
from fastvit_ops.ops import dispatch

CALLS = []


def _available(device: torch.device):
    if device.type != "cpu":
        return False, f"the toy backend runs CPU tensors, got a {device.type} tensor"
    return True, "ok"


def _forward(local, global_, mode):
    CALLS.append("forward")
    return cm.reference(local, global_, mode)


def _backward(grad, local, global_, mode):
    CALLS.append("backward")
    return cm._reference_bwd(grad, local, global_, mode)


dispatch.register_backend("toy", _available, "a test backend (tests/ops/toy_backend.py)")
dispatch.register_kernels(cm.OP, "forward", toy=_forward)
dispatch.register_kernels(cm.OP, "backward", toy=_backward)
