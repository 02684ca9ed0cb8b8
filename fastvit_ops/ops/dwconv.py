"""Depthwise 2-D convolution with fused epilogues (docs/dwconv.md): custom op, autograd, dispatch.

``y = act(conv(x, weight) + bias) [+ x]`` with ``conv`` the depthwise (groups = C) cross-correlation
of ``nn.Conv2d(C, C, k, stride, padding, groups=C)``. The backward recomputes the pre-activation
instead of storing it, and reduces dweight/dbias from per-block partial sums in a fixed order
(deterministic, no atomics) on every backend.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dispatch
from .validate import check_choice, check_like, check_tensor, is_channels_last

ACTIVATIONS = (None, "silu", "gelu")
_ACT_ID = {None: 0, "silu": 1, "gelu": 2}
_ACT_NAME = {0: None, 1: "silu", 2: "gelu"}
MAX_KERNEL = 31
OP = "dwconv2d"


def output_size(n: int, k: int, stride: int, padding: int) -> int:
    """Output length of one spatial dim: ``(n + 2·padding − k) // stride + 1``."""
    return (n + 2 * padding - k) // stride + 1


def _empty_out(like: Tensor, shape, dtype=None) -> Tensor:
    """Uninitialised output in ``like``'s layout: channels_last if ``like`` is, else contiguous."""
    fmt = torch.channels_last if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _in_layout(like: Tensor, t: Tensor) -> Tensor:
    """``t`` with exactly the strides ``_empty_out(like, t.shape)`` has (what register_fake promises)."""
    out = _empty_out(like, t.shape, t.dtype)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)


def _out_shape(x: Tensor, k: int, stride: int, padding: int):
    B, C, H, W = x.shape
    return (B, C, output_size(H, k, stride, padding), output_size(W, k, stride, padding))


# ---- reference (the oracle; autograd-free composite on every device) ------------------------------
def _act(y: Tensor, act: int) -> Tensor:
    if act == 1:
        return F.silu(y)
    if act == 2:
        return F.gelu(y)
    return y


def _act_grad(pre: Tensor, act: int) -> Tensor:
    """d act / d pre, closed form (a custom op's kernel runs below autograd)."""
    if act == 1:
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    cdf = 0.5 * (1 + torch.erf(pre * 0.7071067811865476))
    return cdf + pre * torch.exp(-0.5 * pre * pre) * 0.3989422804014327


def reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
              padding: Optional[int] = None, activation: Optional[str] = None, residual: bool = False) -> Tensor:
    """Eager PyTorch: ``act(F.conv2d(x, weight, bias, stride, padding, groups=C)) [+ x]``."""
    k = weight.shape[-1]
    p = k // 2 if padding is None else padding
    y = _act(F.conv2d(x, weight, bias, stride, p, 1, x.shape[1]), _ACT_ID[activation])
    return y + x if residual else y


def _reference_fwd(x, weight, bias, stride, padding, act, residual):
    y = _act(F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1]), act)
    return y + x if residual else y


def _reference_bwd(grad, x, weight, bias, stride, padding, act, residual, need_dx=True, need_dw=True):
    C = x.shape[1]
    g = grad
    if act:
        # Recompute the pre-activation; the activation's derivative in fp32 for half types, rounded
        # back like eager's SiLU/GELU backward does before the conv backward.
        pre = F.conv2d(x, weight, bias, stride, padding, 1, C)
        wide = pre.dtype in (torch.float16, torch.bfloat16)
        g = (grad.float() * _act_grad(pre.float(), act)).to(grad.dtype) if wide else grad * _act_grad(pre, act)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # torch 2.14's CPU bf16 weight gradient read uninitialised memory (NaN / 1e31) for a
        # channels_last (1, 2, 2, 1) input at stride 2 (CvT's k/v projection of a 2×1 map).
        g, x = g.contiguous(), x.contiguous()
    dx, dw, db = torch.ops.aten.convolution_backward(
        g, x, weight, [C], [stride, stride], [padding, padding], [1, 1], False, [0, 0], C, [need_dx, need_dw, True])
    dx = torch.zeros_like(x) if dx is None else dx
    dw = torch.zeros_like(weight) if dw is None else dw
    if residual:
        dx = dx + grad
    return dx, dw, db


# ---- compiled (C++ CPU / CUDA) and Triton kernels --------------------------------------------------
def _ext_fwd(x, weight, bias, stride, padding, act, residual):
    return torch.ops.fastvit_ops._dwconv2d_forward(x, weight, bias, stride, padding, act, residual)


def _ext_bwd(grad, x, weight, bias, stride, padding, act, residual, need_dx=True, need_dw=True):
    return torch.ops.fastvit_ops._dwconv2d_backward(grad, x, weight, bias, stride, padding, act, residual,
                                                    need_dx, need_dw)


def _triton_fwd(x, weight, bias, stride, padding, act, residual):
    from fastvit_ops.kernels import dwconv as k

    # x is read through its strides (channels_last without a copy)
    return k.dwconv_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                            stride, padding, act, residual)


def _triton_bwd(grad, x, weight, bias, stride, padding, act, residual, need_dx=True, need_dw=True):
    from fastvit_ops.kernels import dwconv as k

    return k.dwconv_backward(grad, x, weight.contiguous(),
                             None if bias is None else bias.contiguous(), stride, padding, act, residual,
                             need_dx, need_dw)


def _onednn_fwd(x, weight, bias, stride, padding, act, residual):
    """PyTorch's own CPU convolution (oneDNN) with the epilogue applied in place afterwards."""
    y = F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
    if act == 1:
        F.silu(y, inplace=True)
    elif act == 2:
        torch.ops.aten.gelu_(y)
    return y.add_(x) if residual else y




# ---- per-shape choice of the CPU forward under ``auto`` ------------------------------------------------
# Our kernel wins by 3-30x on large planes and large k, but oneDNN's channel-blocked forward can win
# on small planes and at stride 2 (per-plane overhead). Under ``auto`` on CPU each distinct call
# signature is timed once (both forwards, a few runs each, like cudnn.benchmark) and the faster is
# kept; the backward is always ours. ``backend("cpu")`` always runs our kernel, and
# FASTVIT_OPS_DWCONV_TUNE=0 turns the timing off (our kernel everywhere, run-to-run identical choice);
# so does torch.use_deterministic_algorithms(True): two processes could time differently and round
# differently. A choice, once made, holds for the process; past MAX_CHOICES signatures new ones
# take our kernel untimed (stable too, and the table stays bounded).
CPU_FORWARD = {"cpu": _ext_fwd, "onednn": _onednn_fwd}
_cpu_choice: Dict[tuple, str] = {}
MAX_CHOICES = 4096
_TUNE_MAX_KERNEL = 11
_TUNE_WARMUP = 3   # oneDNN's first calls after building its primitive run slower
_TUNE_ROUNDS = 9


def _tuning_enabled() -> bool:
    if torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("FASTVIT_OPS_DWCONV_TUNE", "1") not in ("0", "false", "False", "")


def _time_ms(fn, args, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def cpu_forward_choice(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                       activation: int, residual: bool) -> str:
    """``"cpu"`` (our kernel) or ``"onednn"``: the faster CPU forward for this call signature.

    Measured on first use and cached per (shape, layout, dtype, kernel, stride, padding, epilogue,
    bias, thread count): both forwards are warmed up (oneDNN's first call builds its primitive and
    the next few still run slow), then timed alternately over 9 rounds, and the smaller minimum
    wins (with 5 rounds and one warm-up call it kept the slower kernel at 2 of 11 FAT-B0 shapes). Kernels above 11 always take ours
    (measured 13-38x faster there; timing oneDNN would cost seconds at k = 31). Our kernel, untimed,
    under ``torch.use_deterministic_algorithms(True)``, with FASTVIT_OPS_DWCONV_TUNE=0, and for new
    signatures once ``MAX_CHOICES`` are cached.
    """
    if not _tuning_enabled():
        return "cpu"
    key = (tuple(x.shape), is_channels_last(x), x.dtype, weight.shape[-1], stride, padding, activation, residual,
           bias is None, torch.get_num_threads())
    choice = _cpu_choice.get(key)
    if choice is None:
        choice = "cpu"
        if len(_cpu_choice) >= MAX_CHOICES:
            return choice
        if weight.shape[-1] <= _TUNE_MAX_KERNEL:
            args = (x, weight, bias, stride, padding, activation, residual)
            ours = CPU_FORWARD["cpu"]
            try:
                _onednn_fwd(*args)  # builds oneDNN's primitive
            except RuntimeError:  # a dtype/layout PyTorch's CPU conv does not take
                ours = None
            if ours is not None:
                for _ in range(_TUNE_WARMUP):
                    ours(*args)
                    _onednn_fwd(*args)
                t_ours = t_onednn = float("inf")
                for _ in range(_TUNE_ROUNDS):
                    t_ours = min(t_ours, _time_ms(ours, args, 1))
                    t_onednn = min(t_onednn, _time_ms(_onednn_fwd, args, 1))
                choice = "onednn" if t_onednn < t_ours else "cpu"
        _cpu_choice[key] = choice
    return choice


def onednn_forward(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                   activation: int, residual: bool) -> bool:
    """Whether the C++ fast path should run oneDNN's forward for this call: only under ``auto``,
    where :func:`cpu_forward_choice` timed it faster (``backend("cpu")`` always runs ours)."""
    return backend == "auto" and cpu_forward_choice(x, weight, bias, stride, padding, activation, residual) == "onednn"


def cpu_forward_choices() -> Dict[tuple, str]:
    """A copy of the cached per-shape CPU forward choices (for inspection and tests)."""
    return dict(_cpu_choice)


def clear_cpu_forward_choices() -> None:
    """Forget the cached choices; the next call of each signature is timed again."""
    _cpu_choice.clear()


# ---- the kernels, in the order dispatch.choose tries them within a backend -------------------------------
# Forward: (x, weight, bias, stride, padding, activation, residual); backward: (grad, x, ..., need_dx, need_dw).
def _onednn_wins(call: dispatch.Call):
    if call.backend != "auto":
        return False, f"backend {call.backend!r} was requested: oneDNN runs only under auto"
    if onednn_forward(call.backend, *call.args[:7]):
        return True, "auto's CPU forward choice for this call signature (cpu_forward_choice)"
    return False, "auto's CPU forward choice for this call signature is our kernel (cpu_forward_choice)"


dispatch.register(OP, "forward", dispatch.Impl("onednn", "cpu", _onednn_fwd, _onednn_wins,
                                                "PyTorch's oneDNN convolution, epilogue in place"))
dispatch.register_kernels(OP, "forward", cpu=_ext_fwd, cuda=_ext_fwd, triton=_triton_fwd, reference=_reference_fwd)
dispatch.register_kernels(OP, "backward", cpu=_ext_bwd, cuda=_ext_bwd, triton=_triton_bwd, reference=_reference_bwd)
FORWARD = dispatch.KernelTable(OP, "forward")  # read-only views: kernel by name
BACKWARD = dispatch.KernelTable(OP, "backward")


# ---- custom ops ------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit_ops::dwconv2d", mutates_args=())
def _op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int, activation: int,
        residual: bool, backend: str) -> Tensor:
    out = dispatch.run_kernel(OP, "forward", backend, x, weight, bias, stride, padding, activation, residual)
    return _in_layout(x, out)


@_op.register_fake
def _(x, weight, bias, stride, padding, activation, residual, backend):
    return _empty_out(x, _out_shape(x, weight.shape[-1], stride, padding))


@torch.library.custom_op("fastvit_ops::dwconv2d_backward", mutates_args=())
def _op_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                 activation: int, residual: bool, need_dx: bool, need_dw: bool,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dx (dweight) is zeros when need_dx (need_dw) is False."""
    dx, dw, db = dispatch.run_kernel(OP, "backward", backend, grad, x, weight, bias, stride, padding, activation,
                                     residual, need_dx, need_dw)
    return _in_layout(x, dx), dw.contiguous(), db.contiguous()


@_op_backward.register_fake
def _(grad, x, weight, bias, stride, padding, activation, residual, need_dx, need_dw, backend):
    C = x.shape[1]
    return (_empty_out(x, x.shape), weight.new_empty(weight.shape),
            weight.new_empty((C,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, activation, residual, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (stride, padding, activation, residual, backend)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    stride, padding, activation, residual, backend = ctx.args
    need = ctx.needs_input_grad
    dx, dw, db = _op_backward(grad, x, weight, bias, stride, padding, activation, residual, need[0], need[1],
                              backend)
    return (dx if need[0] else None, dw if need[1] else None, db if bias is not None and need[2] else None,
            None, None, None, None, None)


torch.library.register_autograd("fastvit_ops::dwconv2d", _backward, setup_context=_setup_context)


# ---- how a call runs -------------------------------------------------------------------------------
# A call is (x, weight, bias, stride, padding, activation, residual), the activation as an int.
def _eager(x, weight, bias, stride, padding, activation, residual):
    return reference(x, weight, bias, stride, padding, _ACT_NAME[activation], residual)


def _cpu_autograd(call: dispatch.Call) -> Tensor:
    """The C++ autograd node: the forward kernel the "forward" list picks (oneDNN or ours) and our
    backward, without the custom op's Python overhead."""
    onednn = dispatch.choose(OP, "forward", call).name == "onednn"
    return torch.ops.fastvit_ops._dwconv2d_autograd(*call.args, onednn)


def _contiguous_or_channels_last(call: dispatch.Call):
    return dispatch.eager_cpu(call, channels_last=True)


dispatch.register(OP, "call", dispatch.eager_impl(_eager),
                  dispatch.Impl("cpu_autograd", "cpu", _cpu_autograd, _contiguous_or_channels_last,
                                "the C++ autograd node _dwconv2d_autograd: forward as the forward "
                                "list picks (oneDNN or ours), backward our C++ kernel"),
                  dispatch.custom_op_impl(_op))


# ``u + DW(u)`` over ``u`` ("residual_" stage, inference only): fn(u, weight, bias) -> True when done.
def _ext_residual_(u, weight, bias) -> bool:
    return torch.ops.fastvit_ops._dwconv2d_same_(u, weight, bias, 0, True)


def _residual_inplace_ok(call: dispatch.Call):
    u, weight, bias = call.args
    if weight.dtype != u.dtype or (bias is not None and bias.dtype != u.dtype):
        return False, "weight/bias dtype differs from the input's"
    return dispatch.eager_cpu(call, channels_last=True)


dispatch.register(OP, "residual_",
                  dispatch.Impl("cpu", "cpu", _ext_residual_, _residual_inplace_ok,
                                "C++ in place where its channel-blocked path runs (fp32), else declines"),
                  dispatch.Impl("none", None, lambda u, weight, bias: False, doc="no in-place kernel"))


def residual_inplace(u: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int,
                     backend: Optional[str] = None) -> Tensor:
    """``u + DW(u)`` (stride 1, "same" ``padding``, no activation) for inference, no autograd: written
    over ``u`` where a kernel can (no second buffer of u's size), else by the forward kernel
    :func:`dwconv2d` would run. ``u`` must be a temporary of the caller."""
    call = dispatch.Call(OP, dispatch.get_backend() if backend is None else backend, (u, weight, bias), (weight, bias))
    if dispatch.choose(OP, "residual_", call).fn(u, weight, bias):
        return u
    args = (u, weight, bias, 1, padding, 0, True)
    return dispatch.choose(OP, "forward", call.with_args(*args)).fn(*args)


def forward_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                   activation: int = 0, residual: bool = False, backend: Optional[str] = None) -> Tensor:
    """The forward kernel :func:`dwconv2d` would run for this call, called directly (inference: no
    autograd, no checks; the arguments as the custom op takes them)."""
    args = (x, weight, bias, stride, padding, activation, residual)
    return dispatch.run_kernel(OP, "forward", dispatch.get_backend() if backend is None else backend, *args)


# ---- public API --------------------------------------------------------------------------------------
def _check_int_pair(name: str, value, allowed=None) -> int:
    """An int, or a pair of equal ints (``nn.Conv2d`` style); returns the int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}: expected an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value}")
    return value


def check_kernel_size(what: str, k: int) -> None:
    if k % 2 == 0 or not 1 <= k <= MAX_KERNEL:
        raise ValueError(f"{what} must be odd and in [1, {MAX_KERNEL}], got {k}")


def _check_padding(what: str, padding: int, k: int) -> None:
    if not 0 <= padding < k:
        raise ValueError(f"{what}: expected 0 <= padding < k = {k}, got {padding}")


def conv_arguments(conv) -> Tuple[int, int, int]:
    """``(k, stride, padding)`` of a depthwise ``nn.Conv2d`` that :func:`dwconv2d` computes exactly
    (``padding="same"``/``"valid"`` as ints). The one statement of what the depthwise kernels take
    from a module: groups = in = out channels, a square odd kernel k ≤ 31, equal strides of 1 or 2,
    equal paddings in [0, k), no dilation, zero padding mode.

    Raises ``TypeError`` for a non-``nn.Conv2d``, ``ValueError`` naming the first thing it does not take.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
    C = conv.in_channels
    if conv.out_channels != C or conv.groups != C:
        raise ValueError(f"conv: expected a depthwise conv (groups = in = out channels), got in={C}, "
                         f"out={conv.out_channels}, groups={conv.groups}")
    k, kw = conv.kernel_size
    if k != kw:
        raise ValueError(f"conv: expected a square kernel, got {conv.kernel_size}")
    check_kernel_size("conv: kernel_size", k)
    if tuple(conv.dilation) != (1, 1):
        raise ValueError(f"conv: dilation is not supported, got {conv.dilation}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv: padding_mode must be 'zeros', got {conv.padding_mode!r}")
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        raise ValueError(f"conv: expected equal strides of 1 or 2, got {conv.stride}")
    if isinstance(conv.padding, str):
        padding = 0 if conv.padding == "valid" else k // 2
    elif conv.padding[0] != conv.padding[1]:
        raise ValueError(f"conv: expected equal paddings, got {conv.padding}")
    else:
        padding = conv.padding[0]
    _check_padding("conv: padding", padding, k)
    return k, conv.stride[0], padding


def supports_conv(conv) -> Tuple[bool, str]:
    """Whether :func:`dwconv2d` computes ``conv`` (see :func:`conv_arguments`), and if not, why."""
    try:
        conv_arguments(conv)
    except (TypeError, ValueError) as e:
        return False, str(e)
    return True, "ok"


def check_args(x, weight, bias, stride, padding, activation, residual) -> Tuple[int, int]:
    """Validate :func:`dwconv2d`'s arguments (raising as its docstring says); (stride, padding)."""
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight)
    check_like("weight", weight, "x", x, shape=False)
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight: expected shape (C, 1, k, k) with C = {C} (x.shape[1]), got {tuple(weight.shape)}")
    k = weight.shape[-1]
    check_kernel_size("weight: kernel size", k)
    if bias is not None:
        check_tensor("bias", bias)
        check_like("bias", bias, "x", x, shape=False)
        if tuple(bias.shape) != (C,):
            raise ValueError(f"bias: expected shape ({C},), got {tuple(bias.shape)}")
    stride = _check_int_pair("stride", stride, (1, 2))
    padding = k // 2 if padding is None else _check_int_pair("padding", padding)
    _check_padding("padding", padding, k)
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
    if residual and (stride != 1 or padding != k // 2):
        raise ValueError(f"residual: needs stride 1 and padding k // 2 = {k // 2} (output the size of x), "
                         f"got stride {stride}, padding {padding}")
    H, W = x.shape[2], x.shape[3]
    if H < 1 or W < 1 or H + 2 * padding < k or W + 2 * padding < k:
        raise ValueError(f"x: spatial size {(H, W)} with padding {padding} is smaller than the kernel ({k}, {k})")
    return stride, padding


def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
             padding: Optional[int] = None, activation: Optional[str] = None, residual: bool = False) -> Tensor:
    """Depthwise 2-D convolution with a fused epilogue (docs/dwconv.md).

    Computes ``y = act(conv(x, weight) + bias)``, plus ``x`` when ``residual`` (FAT's CPE and the
    ConvFFN inner residual, ``x + DW_k(x)``), where ``conv`` is
    ``F.conv2d(x, weight, None, stride, padding, groups=C)``, i.e. the ``nn.Conv2d(C, C, k, stride,
    padding, groups=C)`` the authors' FAT/FCViT/CvT code uses (same weight layout).

    Args:
        x: (B, C, H, W), NCHW or channels_last (any strides); float16, bfloat16, float32 or float64.
            H, W ≥ 1.
        weight: (C, 1, k, k), k odd, 1 ≤ k ≤ 31; same dtype and device as ``x``.
        bias: None or (C,); same dtype and device as ``x``.
        stride: 1 or 2 (or a pair of equal values).
        padding: zero padding on every side, 0 ≤ padding < k; None means k // 2 ("same" at stride 1,
            ``ceil(H/2)`` at stride 2).
        activation: None, ``"silu"`` or ``"gelu"`` (exact, erf), applied after the bias.
        residual: add ``x`` after the activation; needs stride 1 and padding k // 2.

    Backends: under ``auto`` on CPU the forward of each call signature (shape, layout, dtype, k,
    stride, padding, epilogue) is timed once against PyTorch's oneDNN convolution and the faster is
    kept (see :func:`cpu_forward_choice`; ``FASTVIT_OPS_DWCONV_TUNE=0`` disables it); the backward
    is always the fused C++ kernel. ``backend("cpu")`` always runs the C++ kernel.

    Returns:
        (B, C, H_out, W_out) with ``H_out = (H + 2·padding − k) // stride + 1``, in ``x``'s dtype and
        layout (channels_last stays channels_last). fp32 accumulation for half inputs (fp64 for
        fp64). Differentiable in ``x``, ``weight`` and ``bias``; gradients come back in the inputs'
        layouts, dweight/dbias reduced in a fixed order (deterministic).

    Raises:
        TypeError: a non-tensor or non-floating input, dtypes that differ, a non-int stride/padding.
        ValueError: x not 4-D, weight not (C, 1, k, k), even k or k > 31, stride not 1 or 2, padding
            outside [0, k), an input smaller than the kernel, devices that differ, an unknown
            activation, residual with stride 2 or non-"same" padding.
        RuntimeError: the backend requested with ``fastvit_ops.backend`` cannot run here.
    """
    stride, padding = check_args(x, weight, bias, stride, padding, activation, residual)
    call = dispatch.Call(OP, dispatch.get_backend(), (x, weight, bias, stride, padding, _ACT_ID[activation], residual),
                         (weight, bias))
    return dispatch.run(OP, call)


__all__ = ["dwconv2d", "reference", "output_size", "conv_arguments", "supports_conv", "cpu_forward_choice", "cpu_forward_choices",
           "clear_cpu_forward_choices", "ACTIVATIONS", "MAX_KERNEL"]
