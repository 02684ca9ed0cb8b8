"""Sigmoid cross-modulation (FASA bidirectional interaction, docs/cross_modulation.md): custom op, autograd, dispatch."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_rules, dispatch
from .validate import check_choice, check_like, check_tensor, empty_like_layout, same_layout

MODES = ("silu", "full")
_MODE_ID = {"silu": 0, "full": 1}
OP = "sigmoid_cross_modulation"


# ---- reference (the oracle; also the autograd-free composite for every device) -------------------
def reference(local: Tensor, global_: Tensor, mode: str = "silu") -> Tensor:
    """Eager PyTorch: ``SiLU(L0)·SiLU(G)`` (released FAT code) or, for ``mode="full"``,
    ``SiLU(L0)·SiLU(G)·σ(SiLU(L0))`` (paper Table 10, "Additional Sigmoid")."""
    a = F.silu(local)
    out = a * F.silu(global_)
    return out * torch.sigmoid(a) if mode == "full" else out


def _reference_fwd(local, global_, mode):
    return reference(local, global_, mode)


def _reference_bwd(grad, local, global_, mode):
    # Closed form: a custom op's kernel runs below autograd, so no autograd.grad here. Half types
    # are upcast like eager's SiLU backward does internally.
    dtype = grad.dtype
    if dtype in (torch.float16, torch.bfloat16):
        grad, local, global_ = grad.float(), local.float(), global_.float()
    sl = torch.sigmoid(local)
    a = local * sl
    da = sl * (1 + local * (1 - sl))  # d SiLU(l) / dl
    if mode == "full":
        sa = torch.sigmoid(a)
        da = da * sa * (1 + a * (1 - sa))
        a = a * sa
    sg = torch.sigmoid(global_)
    db = sg * (1 + global_ * (1 - sg))
    return (grad * (global_ * sg) * da).to(dtype), (grad * a * db).to(dtype)


# ---- compiled / Triton kernels -------------------------------------------------------------------
def _ext_fwd(local, global_, mode):
    local, global_ = same_layout(local, global_)
    return torch.ops.fastvit_ops._cross_modulation_forward(local, global_, _MODE_ID[mode])


def _ext_bwd(grad, local, global_, mode):
    local, global_, grad = same_layout(local, global_, grad)
    dl, dg = torch.ops.fastvit_ops._cross_modulation_backward(grad, local, global_, _MODE_ID[mode])
    return dl, dg


def _triton_fwd(local, global_, mode):
    from fastvit_ops.kernels import cross_modulation as k

    local, global_ = same_layout(local, global_)
    out = torch.empty_like(local)
    k.cross_modulation_forward(local, global_, out, mode == "full")
    return out


def _triton_bwd(grad, local, global_, mode):
    from fastvit_ops.kernels import cross_modulation as k

    local, global_, grad = same_layout(local, global_, grad)
    dl, dg = torch.empty_like(local), torch.empty_like(local)
    k.cross_modulation_backward(grad, local, global_, dl, dg, mode == "full")
    return dl, dg


dispatch.register_kernels(OP, "forward", cpu=_ext_fwd, cuda=_ext_fwd, triton=_triton_fwd, reference=_reference_fwd)
dispatch.register_kernels(OP, "backward", cpu=_ext_bwd, cuda=_ext_bwd, triton=_triton_bwd, reference=_reference_bwd)
FORWARD = dispatch.KernelTable(OP, "forward")  # read-only views: kernel by name
BACKWARD = dispatch.KernelTable(OP, "backward")


# ---- custom ops ----------------------------------------------------------------------------------
@torch.library.custom_op("fastvit_ops::sigmoid_cross_modulation", mutates_args=())
def _op(local: Tensor, global_: Tensor, mode: str, backend: str) -> Tensor:
    if local.numel() == 0:  # nothing to compute (the kernels' layout checks reject empty tensors' strides)
        return empty_like_layout(local)
    return dispatch.run_kernel(OP, "forward", backend, local, global_, mode)


@_op.register_fake
def _(local, global_, mode, backend):
    return empty_like_layout(local)


@torch.library.custom_op("fastvit_ops::sigmoid_cross_modulation_backward", mutates_args=())
def _op_backward(grad: Tensor, local: Tensor, global_: Tensor, mode: str, backend: str) -> Tuple[Tensor, Tensor]:
    if local.numel() == 0:
        return empty_like_layout(local), empty_like_layout(local)
    return dispatch.run_kernel(OP, "backward", backend, grad, local, global_, mode)


@_op_backward.register_fake
def _(grad, local, global_, mode, backend):
    return empty_like_layout(local), empty_like_layout(local)


def _setup_context(ctx, inputs, output):
    local, global_, mode, backend = inputs
    ctx.save_for_backward(local, global_)
    ctx.mode, ctx.backend = mode, backend


def _backward(ctx, grad):
    local, global_ = ctx.saved_tensors
    dl, dg = _op_backward(grad, local, global_, ctx.mode, ctx.backend)
    return dl, dg, None, None


torch.library.register_autograd("fastvit_ops::sigmoid_cross_modulation", _backward, setup_context=_setup_context)


# ---- how a call runs -------------------------------------------------------------------------------
def _cpu_autograd(call: dispatch.Call) -> Tensor:
    """The C++ autograd node: our forward and backward kernels without the custom op's Python
    dispatch and autograd glue (~10 µs a call, as much as the kernel saves at FASA's 7×7 stage)."""
    local, global_, mode = call.args
    return torch.ops.fastvit_ops._cross_modulation_autograd(local, global_, _MODE_ID[mode])


def _one_layout(call: dispatch.Call) -> dispatch.Reason:
    local, global_ = call.args[0], call.args[1]
    if local.stride() != global_.stride():
        return False, "local and global_ have different strides: the custom op aligns them"
    return dispatch.eager_cpu(call, channels_last=True)


dispatch.register(OP, "call", dispatch.eager_impl(reference), cpu_rules.eager_impl(reference),
                  dispatch.Impl("cpu_autograd", "cpu", _cpu_autograd, _one_layout,
                                "the C++ autograd node _cross_modulation_autograd (our forward and "
                                "backward kernels)"),
                  dispatch.custom_op_impl(_op))


def sigmoid_cross_modulation(local: Tensor, global_: Tensor, mode: str = "silu") -> Tensor:
    """FASA's bidirectional interaction gate, fused (docs/cross_modulation.md).

    Args:
        local: ``L0``, the local branch (depthwise conv of Q̂), any shape, e.g. (B, C, H, W) NCHW
            or channels_last; float16, bfloat16, float32 or float64.
        global_: ``G``, the attention output; same shape, dtype and device as ``local``.
        mode: ``"silu"`` — ``SiLU(L0)·SiLU(G)``, what the released FAT code computes
            (qhfan/FAT ``classification/models.py``, FASA.forward); ``"full"`` — the paper's form
            with the additional sigmoid, ``SiLU(L0)·SiLU(G)·σ(SiLU(L0))`` (FAT paper, Table 10).

    Returns:
        Tensor of ``local``'s shape and dtype, in ``local``'s layout when it is dense (else
        contiguous). Math is fp32 for half inputs (fp64 for fp64). Differentiable in both inputs.

    Raises:
        TypeError: a non-tensor or non-floating input, or dtypes that differ.
        ValueError: shapes or devices that differ, or an unknown ``mode``.
        RuntimeError: the backend requested with ``fastvit_ops.backend`` cannot run here.
    """
    check_tensor("local", local)
    check_tensor("global_", global_)
    check_like("global_", global_, "local", local)
    check_choice("mode", mode, MODES)
    return dispatch.run(OP, dispatch.Call(OP, dispatch.get_backend(), (local, global_, mode)))
