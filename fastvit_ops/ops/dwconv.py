"""Depthwise 2-D convolution with fused epilogues (docs/dwconv.md): custom op, autograd, dispatch.

``y = act(conv(x, weight) + bias) [+ x]`` with ``conv`` the depthwise (groups = C) cross-correlation
of ``nn.Conv2d(C, C, k, stride, padding, groups=C)``. The backward recomputes the pre-activation
instead of storing it, and reduces dweight/dbias from per-block partial sums in a fixed order
(deterministic, no atomics) on every backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_rules, dispatch
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


def _depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """``F.conv2d(..., groups=C)``, except where torch hangs: 2.14.1's oneDNN bf16 depthwise
    forward on a channels_last input never returns at some shapes with a large kernel and a
    padding near k − 1 (k = 31, padding 25 on (3, 4, 8, 11); also k = 31 padding 29, k = 21 padding
    20; none in 280k draws at k ≤ 9 or with "same" padding): its JIT kernel generation spins. Found
    by the property tests, where it hung CI. There (CPU bf16, k > 9, padding ≠ k // 2) the conv runs
    in fp32 and is rounded once, which is what the bf16 conv accumulates in; everywhere else it is
    eager PyTorch's own, so the yardstick of the error rule stays eager's."""
    k = weight.shape[-1]
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and k > 9 and padding != k // 2:
        b = None if bias is None else bias.float()
        return F.conv2d(x.float(), weight.float(), b, stride, padding, 1, x.shape[1]).to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])


def reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
              padding: Optional[int] = None, activation: Optional[str] = None, residual: bool = False) -> Tensor:
    """Eager PyTorch: ``act(F.conv2d(x, weight, bias, stride, padding, groups=C)) [+ x]`` (except
    CPU bf16 shapes where torch's conv hangs, see :func:`_depthwise_conv`)."""
    k = weight.shape[-1]
    p = k // 2 if padding is None else padding
    y = _act(_depthwise_conv(x, weight, bias, stride, p), _ACT_ID[activation])
    return y + x if residual else y


def _reference_fwd(x, weight, bias, stride, padding, act, residual):
    y = _act(_depthwise_conv(x, weight, bias, stride, padding), act)
    return y + x if residual else y


def _reference_bwd(grad, x, weight, bias, stride, padding, act, residual, need_dx=True, need_dw=True):
    C = x.shape[1]
    g = grad
    if act:
        # Recompute the pre-activation; the activation's derivative in fp32 for half types, rounded
        # back like eager's SiLU/GELU backward does before the conv backward.
        pre = _depthwise_conv(x, weight, bias, stride, padding)
        wide = pre.dtype in (torch.float16, torch.bfloat16)
        g = (grad.float() * _act_grad(pre.float(), act)).to(grad.dtype) if wide else grad * _act_grad(pre, act)
    low = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    if low:
        # torch's CPU half-precision depthwise backward leaves the weight gradient of taps that
        # only ever see padding uninitialised (garbage, NaN: bf16, a 1×1 map, k = 3, stride 2,
        # 49 of 50 calls; tests/ops/test_dwconv.py). In fp32, as the kernels accumulate anyway.
        g, xs, ws = g.float(), x.float(), weight.float()
    else:
        xs, ws = x, weight
    dx, dw, db = torch.ops.aten.convolution_backward(
        g, xs, ws, [C], [stride, stride], [padding, padding], [1, 1], False, [0, 0], C, [need_dx, need_dw, True])
    if low:
        dx, dw, db = (None if t is None else t.to(x.dtype) for t in (dx, dw, db))
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
# Our kernel wins by 3-30x on large planes and large k, but oneDNN's forward can win at a few small
# shapes. Under ``auto`` on CPU the forward is the one ``cpu_rules.dwconv_forward`` names for the
# call's shapes and the CPU capability (a fixed rule: the same choice in every process, no timing);
# the backward is always ours. ``backend("cpu")`` always runs our kernel.
def cpu_forward_choice(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                       activation: int, residual: bool) -> str:
    """``"cpu"`` (our kernel) or ``"onednn"``: the CPU forward ``auto`` runs for this call, by
    :func:`fastvit_ops.ops.cpu_rules.dwconv_forward` (a rule on shapes, layout, dtype, arguments and
    the CPU capability; ``"cpu"`` under ``torch.use_deterministic_algorithms(True)``)."""
    return cpu_rules.dwconv_forward(tuple(x.shape), is_channels_last(x), x.dtype, weight.shape[-1], stride, padding,
                                    activation, residual)


def onednn_forward(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int,
                   activation: int, residual: bool) -> bool:
    """Whether oneDNN's forward runs this call: only under ``auto``, where :func:`cpu_forward_choice`
    names it (``backend("cpu")`` always runs ours)."""
    return backend == "auto" and cpu_forward_choice(x, weight, bias, stride, padding, activation, residual) == "onednn"


# ---- the kernels, in the order dispatch.choose tries them within a backend -------------------------------
# Forward: (x, weight, bias, stride, padding, activation, residual); backward: (grad, x, ..., need_dx, need_dw).
def _onednn_wins(call: dispatch.Call):
    if call.backend != "auto":
        return False, f"backend {call.backend!r} was requested: oneDNN runs only under auto"
    if onednn_forward(call.backend, *call.args[:7]):
        return True, f"auto's CPU rule for this shape class on {cpu_rules.capability()} (cpu_rules.dwconv_forward)"
    return False, f"auto's CPU rule for this shape class on {cpu_rules.capability()} is our kernel (cpu_rules.dwconv_forward)"


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


dispatch.register(OP, "call", dispatch.eager_impl(_eager), cpu_rules.eager_impl(_eager),
                  dispatch.Impl("cpu_autograd", "cpu", _cpu_autograd, _contiguous_or_channels_last,
                                "the C++ autograd node _dwconv2d_autograd: forward as the forward "
                                "list picks (oneDNN or ours), backward our C++ kernel"),
                  dispatch.custom_op_impl(_op))


# ``act(DW(u)) [+ u]`` over ``u`` ("inplace" stage, stride 1, "same" padding, inference only):
# fn(u, weight, bias, activation, residual) -> True when done, False when the kernel declines.
def _ext_inplace(u, weight, bias, activation, residual) -> bool:
    return torch.ops.fastvit_ops._dwconv2d_same_(u, weight, bias, activation, residual)


def _inplace_ok(call: dispatch.Call):
    u, weight, bias = call.args[:3]
    if weight.dtype != u.dtype or (bias is not None and bias.dtype != u.dtype):
        return False, "weight/bias dtype differs from the input's"
    return dispatch.eager_cpu(call, channels_last=True)


dispatch.register(OP, "inplace",
                  dispatch.Impl("cpu", "cpu", _ext_inplace, _inplace_ok,
                                "C++ in place where its channel-blocked path runs (fp32), else declines"),
                  dispatch.Impl("none", None, lambda u, weight, bias, activation, residual: False,
                                doc="no in-place kernel"))


def inplace(u: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, activation: int = 0,
            residual: bool = False, backend: Optional[str] = None) -> Tensor:
    """``act(DW(u)) [+ u]`` (stride 1, "same" ``padding``; ``activation`` an id of ``_ACT_ID``) for
    inference, no autograd: written over ``u`` where a kernel of the "inplace" stage can (no second
    buffer of u's size), else by the forward kernel :func:`dwconv2d` would run. ``u`` must be a
    temporary of the caller."""
    backend = dispatch.get_backend() if backend is None else backend
    args = (u, weight, bias, activation, residual)
    if dispatch.choose(OP, "inplace", dispatch.Call(OP, backend, args, (weight, bias))).fn(*args):
        return u
    return forward_kernel(u, weight, bias, 1, padding, activation, residual, backend)


def residual_inplace(u: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int,
                     backend: Optional[str] = None) -> Tensor:
    """``u + DW(u)`` over ``u`` where a kernel can (:func:`inplace` without an activation)."""
    return inplace(u, weight, bias, padding, 0, True, backend)


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

    Backends: under ``auto`` on CPU the forward is our C++ kernel or, at the shapes where a fixed
    rule per CPU capability says it is faster, PyTorch's oneDNN convolution with our epilogue (see
    :func:`cpu_forward_choice`; the same choice in every process); the backward is always the fused
    C++ kernel. ``backend("cpu")`` always runs the C++ kernel.

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


__all__ = ["dwconv2d", "reference", "output_size", "conv_arguments", "supports_conv", "cpu_forward_choice",
           "ACTIVATIONS", "MAX_KERNEL"]
