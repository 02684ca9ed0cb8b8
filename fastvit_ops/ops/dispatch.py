"""Backend selection: ``auto | triton | cuda | cpu | reference``.

The requested backend comes from ``fastvit_ops.backend(name)`` (a context manager), else the
``FASTVIT_OPS_BACKEND`` environment variable, else ``auto``. A public op reads it once per call
and passes the *requested* name into its custom op, so the backward of that call uses the same
choice and ``torch.compile`` keeps the choice in effect when it traced the function.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Dict, Iterator, Tuple

import torch

from .. import _availability as avail

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
_requested: contextvars.ContextVar = contextvars.ContextVar("fastvit_ops_backend", default=None)


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend requested for ops called now (``auto`` unless overridden)."""
    name = _requested.get()
    if name is None:
        name = os.environ.get("FASTVIT_OPS_BACKEND", "auto") or "auto"
        if name not in BACKENDS:
            raise ValueError(f"FASTVIT_OPS_BACKEND: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops called inside the block on backend ``name``.

    ``name`` is one of ``auto, triton, cuda, cpu, reference``. Raises ``ValueError`` for another
    name. An op asked for a backend that cannot run on its input's device (no extension, no
    Triton, wrong device) raises ``RuntimeError`` saying why; an op that has no kernel for that
    backend at all uses its ``auto`` choice.
    """
    token = _requested.set(_check_name(name))
    try:
        yield name
    finally:
        _requested.reset(token)


def backend_available(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` here, and if not, why."""
    _check_name(name)
    dev = device.type
    if name in ("auto", "reference"):
        return True, "ok"
    if name == "cpu":
        if dev != "cpu":
            return False, f"the cpu backend runs CPU tensors, got a {dev} tensor"
        return avail.cpu_extension()
    if name == "cuda":
        if dev != "cuda":
            return False, f"the cuda backend runs CUDA tensors, got a {dev} tensor"
        return avail.cuda_extension()
    ok, why = avail.triton()
    if not ok:
        return False, why
    if dev == "cuda":
        return True, "ok"
    if dev == "cpu" and avail.interpreting():
        return True, "ok (TRITON_INTERPRET=1)"
    return False, f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {dev}"


# Preference order for ``auto``, fastest first, per device type. An op may override it.
# ``auto`` runs our kernels only where they were measured faster than eager PyTorch. On CUDA the
# first GPU run (H200, batch 64; bench/results/gpu_h200_2026-12-04) measured the Triton and CUDA
# kernels slower than cuDNN / cuBLAS eager at almost every layer shape (dwconv 0.03-0.44x forward,
# converted fat_b0 0.16x), so on CUDA ``auto`` runs each op's reference composition as plain eager
# PyTorch (see :func:`eager_reference`) until a GPU run shows a kernel ahead. backend("triton") and
# backend("cuda") still run ours.
AUTO_ORDER = {"cuda": ("reference",), "cpu": ("cpu", "reference")}


def eager_reference(x: torch.Tensor, backend: str) -> bool:
    """True when ``auto`` resolves to ``reference`` on ``x``'s device (CUDA, and devices with no
    kernels of ours): the public op then calls its reference composition directly, as plain eager
    PyTorch (PyTorch's autograd, fusable by torch.compile), instead of the custom op, whose
    per-call dispatch and closed-form backward would only add time."""
    return backend == "auto" and AUTO_ORDER.get(x.device.type, ("reference",))[0] == "reference"


def resolve(op: str, requested: str, device: torch.device, impls: Dict[str, Callable],
            auto_order: Dict[str, tuple] = AUTO_ORDER) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``requested`` on ``device``.

    ``impls`` maps backend name → callable; it must contain ``reference``.
    """
    _check_name(requested)
    if requested != "auto" and requested in impls:
        ok, why = backend_available(requested, device)
        if not ok:
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {why}")
        return requested, impls[requested]
    for name in auto_order.get(device.type, ("reference",)):
        if name in impls and backend_available(name, device)[0]:
            return name, impls[name]
    return "reference", impls["reference"]


def eager_cpu(x: torch.Tensor, backend: str, params, channels_last: bool = False) -> bool:
    """Whether a call may take an op's C++ autograd fast path (a ``torch::autograd::Function``
    registered for AutogradCPU) instead of its Python custom op: the cpu backend is requested or
    picked by ``auto``, ``x`` is a plain contiguous CPU tensor (or channels_last, where the op's
    C++ path takes that layout: ``channels_last=True``), and no compiler, functorch
    transform, dispatch mode or tensor subclass is involved (those keep the custom op, which is
    what ``opcheck`` and the compiler see). Same kernels and results; the custom op's per-call
    Python dispatch and autograd glue (tens to hundreds of µs) are what it saves."""
    if not (x.is_contiguous() or (channels_last and x.is_contiguous(memory_format=torch.channels_last))):
        return False
    return _plain_cpu_call(x, backend, params)


def _plain_cpu_call(x: torch.Tensor, backend: str, params) -> bool:
    """cpu/auto backend, a plain CPU tensor, the extension built, nothing tracing or intercepting."""
    if backend not in ("auto", "cpu") or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack():
        return False
    if any(p is not None and type(p) is not torch.Tensor and type(p) is not torch.nn.Parameter for p in params):
        return False
    return avail.cpu_extension()[0]


def no_grad_cpu(x: torch.Tensor, backend: str, params) -> bool:
    """Whether a call may run an op's C++ CPU kernel directly, without the custom op: like
    :func:`eager_cpu` but for any strides, and only when no autograd graph is being recorded for
    it (grad mode off, or nothing involved requires grad), so there is no backward to set up."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return False
    return _plain_cpu_call(x, backend, params)
