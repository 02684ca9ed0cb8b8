"""Cached inference plans of fused modules: when a plan may run, its cache key, and its cache.

A plan is a flat closure a module builds once from its (folded) weights and calls instead of its
module-by-module forward on the CPU inference path. It is cached on the module under
:func:`state_key` — every submodule's identity and plain attributes, every parameter's and
buffer's identity, storage, version, dtype, device and requires_grad, read afresh on each call — so
``load_state_dict`` (also ``assign=True``), in-place edits, ``.to()``, swapped submodules and edited
hyperparameters rebuild it before it can run stale; it is dropped when pickling
(:func:`drop_plan`). FAT's (``fat_inference``), FCViT's (``fcvit_inference``) and CvT's
(``cvt_inference``) plans all live here.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

_PLAN = "_fastvit_ops_plan"
_SCALARS = (bool, int, float, str, tuple, type(None))


def tensor_version(t: Tensor):
    """``t``'s version counter, for cache keys; for an inference tensor (made under
    ``torch.inference_mode``, e.g. a model created or loaded there), which has none and can be
    written in place unseen, a fresh object that equals nothing: caches keyed on it recompute on
    every call (correct, slower; a one-time warning says so)."""
    if not t.is_inference():
        return t._version
    warnings.warn("fastvit_ops: a parameter or buffer is an inference tensor (created or loaded under "
                  "torch.inference_mode): its in-place changes cannot be detected, so the fused modules "
                  "rebuild their inference plans and BN folds on every call (slower). Create or load the "
                  "model outside inference_mode (running it inside is fine).", RuntimeWarning, stacklevel=3)
    return object()


def applies(x: Tensor, module: nn.Module) -> bool:
    """Whether ``module`` may run its CPU inference plan on ``x``: eval mode, an fp32 plain CPU
    tensor, nothing that needs gradients, and no compiler, autocast, functorch transform or
    dispatch mode active (those see the differentiable composition of the fused ops)."""
    # x.is_cpu: x.device.type builds a device and a string, on every block call
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32 or module.training:
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return True


def state_key(module: nn.Module, parts=None) -> tuple:
    """Everything a plan of ``module`` was built from (see the module docstring).

    Flat: a submodule's id (an int), then its plain attributes as (name, value) pairs, then a
    6-tuple (or None) per parameter and buffer; the entry types keep the boundaries unambiguous.
    It runs on every block call (13-17 per FAT-B0 / FCViT-tiny / CvT-13 forward): this form costs
    ~0.65 of the nested one's ~1 ms per forward."""
    key = []
    add = key.append
    for m in (module.modules() if parts is None else parts):
        add(id(m))
        for k, v in m.__dict__.items():
            if k[0] != "_" and isinstance(v, _SCALARS):
                add((k, v))
        for t in m._parameters.values():
            add(None if t is None else (id(t), t.data_ptr(), tensor_version(t), t.dtype, t.device, t.requires_grad))
        for t in m._buffers.values():
            add(None if t is None else (id(t), t.data_ptr(), tensor_version(t), t.dtype, t.device, t.requires_grad))
    return tuple(key)


def run(module: nn.Module, build: Callable[[nn.Module], Callable[..., Tensor]], *args, parts=None) -> Tensor:
    """``module``'s plan called on ``args``; the plan is ``build(module)``, rebuilt when the key changed.
    ``parts``: the modules the plan is built from when not all of ``module.modules()`` (a model's
    stem, whose blocks have plans of their own), keyed and held instead."""
    key = state_key(module, parts)
    cached = module.__dict__.get(_PLAN)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            # The source tensors are held with the plan: while it lives, no new tensor can take an
            # old one's id or memory and match the key (a freed parameter's id is reused by Python,
            # its storage by the allocator, and both start at version 0).
            sources = tuple(t for m in (module.modules() if parts is None else parts)
                            for t in (*m._parameters.values(), *m._buffers.values()))
            cached = (key, build(module), sources)
        module.__dict__[_PLAN] = cached
    return cached[1](*args)


def drop_plan(state: dict) -> dict:
    """A module's ``__getstate__`` dict without its plan (a closure: rebuilt on demand)."""
    state = dict(state)
    state.pop(_PLAN, None)
    return state


def detached(*tensors):
    return tuple(None if t is None else t.detach() for t in tensors)


# ---- the plans under torch.compile -----------------------------------------------------------------
# Dynamo would trace a plan's Python (losing its in-place and oneDNN steps, and reading its folded
# weights as constants it cannot see change), so under torch.compile an inference call of a block
# that has a plan becomes one opaque custom op, ``fastvit_ops::module_inference``, whose kernel runs
# the block's eager forward (and so its cached plan, rebuilt on any change as above) and whose fake
# kernel gives the output's shape and strides from the block's ``inference_output(x, *extra)``.
# Inductor compiles what lies between the blocks (stems, heads, reshapes) around it. The block is
# found through an integer handle baked into the graph (``id`` of the module, looked up in a
# weak registry: the compiled model holds the module alive). Not under torch.export: a saved
# program cannot hold a handle to a live module, so export keeps the per-op custom ops.
import weakref  # noqa: E402

_MODULES: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()


def compiled_inference(x: Tensor, module: nn.Module) -> bool:
    """Whether ``module``'s forward of ``x``, being traced by torch.compile (not torch.export),
    should be the opaque :func:`module_inference` op: eval mode, an fp32 CPU tensor, nothing
    needing gradients, no autocast."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or module.training:
        return False
    if not x.is_cpu or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


@torch.library.custom_op("fastvit_ops::module_inference", mutates_args=())
def _module_inference(x: Tensor, handle: int, extra: list[int]) -> Tensor:
    module = _MODULES.get(handle)
    if module is None:
        raise RuntimeError("fastvit_ops::module_inference: the module of this compiled graph no longer exists")
    y = module(x, *extra)
    fake = module.inference_output(x, *extra)
    return y if y.stride() == fake.stride() else fake.copy_(y)


@_module_inference.register_fake
def _(x, handle, extra):
    return _MODULES[handle].inference_output(x, *extra)


def register(module: nn.Module) -> None:
    """Make ``module`` findable by :func:`module_inference`'s handle; the fused blocks call this on
    construction, after ``convert`` and after unpickling or copying (not while tracing: dynamo
    cannot trace the registry's update)."""
    _MODULES[id(module)] = module


def module_inference(module: nn.Module, x: Tensor, *extra: int) -> Tensor:
    """``module(x, *extra)`` as one ``fastvit_ops::module_inference`` op (see above)."""
    return _module_inference(x, id(module), [int(e) for e in extra])


def conv_output_shape(conv: nn.Module, shape) -> "tuple | None":
    """The (B, C_out, H', W') an ``nn.Conv2d`` ``conv`` gives for input ``shape`` (B, C, H, W);
    None for anything else (or string paddings), whose shape an ``inference_output`` cannot state."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str):
        return None
    b, _, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (b, conv.out_channels, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def conv_gelu(w: Tensor, b, stride: int, padding: int) -> Callable[[Tensor], Tensor]:
    """``x -> GELU(conv2d(x, w, b, stride, padding))`` (the exact, erf GELU) for a plan: oneDNN's
    convolution with the GELU as its post-op where this PyTorch has it, so the output is written
    once instead of written and then rewritten (FAT-B0's ConvFFN fc1 at s1, 2 threads, channels_last
    (8, 32, 56, 56) -> (8, 128, 56, 56): 1.18 -> 0.81 ms on AVX-512, 2.2 -> 1.9 ms on AVX2); else the
    convolution and an in-place GELU."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return lambda x: torch.ops.aten.gelu_(torch.nn.functional.conv2d(x, w, b, stride, padding))
    st, pad = [stride, stride], [padding, padding]
    return lambda x: op(x, w, b, pad, st, [1, 1], 1, "gelu", [], "none")


def empty_channels_last(x: Tensor, shape) -> Tensor:
    """An empty channels_last tensor of ``shape`` with ``x``'s dtype and device (a fake output)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


class PlannedModule:
    """Mixin for fused modules with an inference plan: registers the module for
    :func:`module_inference` (construction, ``convert``, copies, unpickling) and drops the plan
    when pickling. Subclasses define ``inference_output(x, *extra)`` (an empty tensor with the
    plan's output shape and strides)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register(self)

    def _after_convert(self):
        register(self)

    def __getstate__(self):
        return drop_plan(super().__getstate__())

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self)
