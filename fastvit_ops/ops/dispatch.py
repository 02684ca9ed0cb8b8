"""Which implementation runs: every choice of kernel in the package is made here.

Terms:

* A **backend** is a family of kernels with a device it runs on: ``reference`` (PyTorch
  compositions, any device, the oracle), ``cpu`` (the C++ kernels of ``fastvit_ops._C``), ``cuda``
  (its CUDA kernels), ``triton``. Each is registered once with :func:`register_backend`, which
  says whether it can run on a device here and, if not, why.
* The **requested** backend comes from ``fastvit_ops.backend(name)`` (a context manager), else the
  ``FASTVIT_OPS_BACKEND`` environment variable, else ``auto``. A public op reads it once per call
  and passes it into its custom op, so the backward of that call and ``torch.compile``'s trace
  keep the choice.
* An **implementation** (:class:`Impl`) is one way to run one *stage* of one op, with a
  ``supports(call) -> (ok, reason)`` written once. Each op registers, per stage, one ordered list:

  - ``"call"``: how the public function runs the call — the reference composition as plain eager
    PyTorch (``eager``), a C++ autograd node or a direct C++ kernel call (the CPU fast paths, no
    Python custom-op overhead), or the ``torch.library`` custom op (``custom_op``);
  - ``"forward"`` / ``"backward"``: the kernel the custom op, a fast path or an inference plan
    runs (for example oneDNN or our C++ forward of the depthwise conv, Triton, the reference).

:func:`choose` is the one function that answers "which implementation runs this call":

1. The call's backend (:func:`resolve_backend`): a requested backend that the op has a kernel for
   runs that backend (``RuntimeError`` saying why when it cannot run here); ``auto``, or a backend
   the op has no kernel for, runs the first backend of :data:`AUTO_ORDER` for the device that is
   available and has one.
2. In the stage's list, the first implementation of that backend (or of none in particular, like
   ``custom_op``) whose ``supports`` accepts the call.
3. A kernel stage falls back to its ``reference`` kernel when no kernel of the backend accepts the
   call (e.g. the C++ CvT projection for fp16 inputs).

:func:`explain` gives, for the same call, every candidate with the reason it runs or does not;
``python -m fastvit_ops explain <op> --shape ...`` prints it, ``info --verbose`` prints the lists.
How to add an op or a backend: CONTRIBUTING.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from .. import _availability as avail

Reason = Tuple[bool, str]


# ---- backends -------------------------------------------------------------------------------------
class Backend(NamedTuple):
    name: str
    available: Callable[[torch.device], Reason]
    doc: str = ""
    static: bool = True  # available() depends on the device type only: probed once per type


_BACKENDS: Dict[str, Backend] = {}
_PROBED: Dict[Tuple[str, str], Reason] = {}
_RESOLVED: Dict[tuple, str] = {}  # resolve_backend's answers that cannot change
#: ``auto`` followed by every registered backend (what ``backend()`` and FASTVIT_OPS_BACKEND take).
BACKENDS: Tuple[str, ...] = ("auto",)


def register_backend(name: str, available: Callable[[torch.device], Reason], doc: str = "",
                     static: bool = True) -> Backend:
    """Register backend ``name``; ``available(device)`` says whether it can run there now, and if
    not, why (``static``: the answer depends on the device type only, so it is asked once per
    type). Registering a name again replaces it."""
    global BACKENDS
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"name: expected an identifier other than 'auto', got {name!r}")
    _BACKENDS[name] = Backend(name, available, doc, static)
    BACKENDS = ("auto",) + tuple(_BACKENDS)
    for key in [k for k in _PROBED if k[0] == name]:
        del _PROBED[key]
    _RESOLVED.clear()
    return _BACKENDS[name]


def backend_names() -> Tuple[str, ...]:
    """The registered backends (without ``auto``), in registration order."""
    return tuple(_BACKENDS)


def _check_name(name) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def backend_available(name: str, device: torch.device) -> Reason:
    """Whether backend ``name`` can run on ``device`` here, and if not, why."""
    _check_name(name)
    if name == "auto":
        return True, "ok"
    # A plain dict lookup once probed, so torch.compile traces it as a constant.
    key = (name, device.type)
    found = _PROBED.get(key)
    if found is None:
        b = _BACKENDS[name]
        found = b.available(device)
        if b.static:
            _PROBED[key] = found
    return found


def _cpu_available(device: torch.device) -> Reason:
    if device.type != "cpu":
        return False, f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    ok, why = avail.cpu_extension()
    capability = getattr(avail, "cpu_capability", None)  # which ISA build of the kernels runs
    info = capability() if ok and callable(capability) else None
    return ok, f"ok ({info['in_use']} kernels)" if isinstance(info, dict) else why


def _cuda_available(device: torch.device) -> Reason:
    if device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors, got a {device.type} tensor"
    return avail.cuda_extension()


def _triton_available(device: torch.device) -> Reason:
    ok, why = avail.triton()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, "ok"
    if device.type == "cpu" and avail.interpreting():
        return True, "ok (TRITON_INTERPRET=1)"
    return False, f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


register_backend("triton", _triton_available, "Triton kernels (kernels/); CPU only under TRITON_INTERPRET=1",
                 static=False)
register_backend("cuda", _cuda_available, "CUDA kernels of fastvit_ops._C (csrc/cuda)")
register_backend("cpu", _cpu_available, "C++ kernels of fastvit_ops._C (csrc/cpu), OpenMP, per-ISA builds")
register_backend("reference", lambda device: (True, "ok"), "PyTorch compositions: any device, the oracle")
backend_available("cpu", torch.device("cpu"))  # probed now: a first call under torch.compile reads the answer

# The rule for ``auto``: per device type, backends fastest first. ``auto`` runs our kernels only where
# they were measured faster than eager PyTorch. On CUDA the first GPU run (H200, batch 64;
# bench/results/gpu_h200_2026-12-04/RUN.md) measured the Triton and CUDA kernels slower than cuDNN /
# cuBLAS eager at almost every layer shape (dwconv 0.03-0.44x forward, converted fat_b0 0.16x), so
# on CUDA ``auto`` runs each op's reference composition as plain eager PyTorch (the ``eager``
# implementation of the "call" stage) until a GPU run shows a kernel ahead; backend("triton") and
# backend("cuda") still run ours. Devices not listed run the reference.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("reference",), "cpu": ("cpu", "reference")}

_requested: contextvars.ContextVar = contextvars.ContextVar("fastvit_ops_backend", default=None)


def get_backend() -> str:
    """The backend requested for ops called now (``auto`` unless overridden)."""
    name = _requested.get()
    if name is None:
        name = os.environ.get("FASTVIT_OPS_BACKEND", "auto") or "auto"
        if name != "auto" and name not in _BACKENDS:
            raise ValueError(f"FASTVIT_OPS_BACKEND: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the ops called inside the block on backend ``name``.

    ``name`` is one of ``auto, triton, cuda, cpu, reference`` (or a registered extra backend).
    Raises ``ValueError`` for another name. An op asked for a backend that cannot run on its
    input's device (no extension, no Triton, wrong device) raises ``RuntimeError`` saying why; an
    op that has no kernel for that backend at all uses its ``auto`` choice.
    """
    token = _requested.set(_check_name(name))
    try:
        yield name
    finally:
        _requested.reset(token)


# ---- implementations ------------------------------------------------------------------------------
def _always(call: "Call") -> Reason:
    return True, "accepts every call"


class Impl(NamedTuple):
    """One implementation of one stage of an op.

    ``backend``: the backend it belongs to, or None for one that serves every backend (the custom
    op, which chooses its kernel itself). ``fn``: for the "call" stage ``fn(call)``; for kernel
    stages the kernel, called with the stage's arguments. ``supports(call) -> (ok, reason)``.
    """
    name: str
    backend: Optional[str]
    fn: Callable
    supports: Callable[["Call"], Reason] = _always
    doc: str = ""


class Call:
    """What an implementation is chosen for: the op, the requested backend and the arguments of
    the stage (``args[0]`` is a tensor on the call's device). ``tensors``: the other tensors of
    the call (parameters), which the fast paths' checks read."""
    __slots__ = ("op", "backend", "args", "tensors", "_resolved")

    def __init__(self, op: str, backend: str, args: tuple, tensors: tuple = ()):
        self.op, self.backend, self.args, self.tensors = op, backend, args, tensors
        self._resolved = None

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    @property
    def device(self) -> torch.device:
        return self.args[0].device

    def with_args(self, *args) -> "Call":
        """The same call (op, requested and resolved backend) with a stage's own arguments."""
        other = Call(self.op, self.backend, args)
        other._resolved = self._resolved
        return other

    def resolved(self) -> str:
        """The backend this call runs on (:func:`resolve_backend`)."""
        if self._resolved is None:
            x = self.args[0]
            # x.is_cpu is ~20x cheaper than x.device.type, and this runs on every call
            self._resolved = resolve_backend(self.op, self.backend, x.device, "cpu" if x.is_cpu else None)
        return self._resolved


_TABLE: Dict[str, Dict[str, List[Impl]]] = {}
_KERNEL_BACKENDS: Dict[str, frozenset] = {}


def register(op: str, stage: str, *impls: Impl, before: Optional[str] = None) -> None:
    """Add implementations to ``op``'s ordered list for ``stage`` (at the end, or before the one
    named ``before``). A backend's kernels belong to the "forward"/"backward" stages; the backends
    that have a "forward" kernel are the ones :func:`resolve_backend` considers for the op."""
    lst = _TABLE.setdefault(op, {}).setdefault(stage, [])
    at = len(lst) if before is None else next(i for i, m in enumerate(lst) if m.name == before)
    lst[at:at] = impls
    if stage == "forward":
        _KERNEL_BACKENDS[op] = frozenset(m.backend for m in lst if m.backend is not None)
        _RESOLVED.clear()


def register_kernels(op: str, stage: str, **by_backend: Callable) -> None:
    """``register(op, stage, Impl(b, b, fn) ...)`` for ``b=fn`` pairs: one kernel per backend that
    accepts every call of that backend."""
    register(op, stage, *(Impl(name, name, fn, _always, f"{stage} kernel: " + _BACKENDS[name].doc)
                          for name, fn in by_backend.items()))


class KernelTable(Mapping):
    """A read-only view of ``op``'s ``stage`` list by implementation name → kernel (e.g.
    ``dwconv.FORWARD["reference"]``), read from the registry at each lookup. Changing what runs is
    done through :func:`register`, never through this view."""

    def __init__(self, op: str, stage: str):
        self.op, self.stage = op, stage

    def __getitem__(self, name: str) -> Callable:
        for impl in _TABLE[self.op][self.stage]:
            if impl.name == name:
                return impl.fn
        raise KeyError(name)

    def __iter__(self):
        return iter([impl.name for impl in _TABLE[self.op][self.stage]])

    def __len__(self) -> int:
        return len(_TABLE[self.op][self.stage])


def implementations(op: str, stage: str) -> List[Impl]:
    """``op``'s ordered list for ``stage`` (the registry's own list)."""
    return _TABLE[op][stage]


def ops() -> Dict[str, Tuple[str, ...]]:
    """Every registered op and its stages."""
    return {op: tuple(stages) for op, stages in _TABLE.items()}


def resolve_backend(op: str, requested: str, device: torch.device, dev: Optional[str] = None) -> str:
    """The backend a call of ``op`` runs on (rule 1 of the module docstring); ``dev``:
    ``device.type`` when the caller has it."""
    dev = device.type if dev is None else dev
    order = AUTO_ORDER.get(dev, ("reference",))
    key = (op, requested, dev, order)
    found = _RESOLVED.get(key)  # remembered only where every answer involved is static
    if found is not None:
        return found
    kernels = _KERNEL_BACKENDS.get(op, frozenset(("reference",)))
    static = True
    if requested != "auto":
        _check_name(requested)
        if requested in kernels:
            ok, why = backend_available(requested, device)
            if not ok:
                raise RuntimeError(f"{op}: backend {requested!r} is not available: {why}")
            found = requested
            static = _BACKENDS[requested].static
    if found is None:
        found = "reference"
        for name in order:
            static = static and _BACKENDS[name].static
            if name in kernels and backend_available(name, device)[0]:
                found = name
                break
    if static:
        _RESOLVED[key] = found
    return found


class Choice(NamedTuple):
    """One :func:`choose` seen by :func:`recording`; ``reasons`` as :func:`explain` gives them."""
    op: str
    stage: str
    call: "Call"
    impl: Impl
    reasons: list


_recording: Optional[list] = None


def choose(op: str, stage: str, call: Call) -> Impl:
    """The implementation that runs ``call`` at ``stage`` (the rule of the module docstring)."""
    impls = _TABLE[op][stage]
    resolved = call.resolved()
    for impl in impls:
        if (impl.backend is None or impl.backend == resolved) and impl.supports(call)[0]:
            break
    else:
        impl = next((m for m in impls if m.backend == "reference" and m.supports(call)[0]), None)
        if impl is None:
            raise RuntimeError(f"{op}: no {stage} implementation accepts this call on backend {resolved!r}")
    if _recording is not None:
        _recording.append(Choice(op, stage, call, impl, _reasons(op, stage, call, impl)))
    return impl


def run(op: str, call: Call):
    """Run a public op's call: the "call" stage's choice, given the call."""
    return choose(op, "call", call).fn(call)


def explain(op: str, stage: str, call: Call) -> List[Tuple[Impl, bool, str]]:
    """Every implementation of ``op``'s ``stage`` in order, with whether it runs ``call`` and why
    (or why not). The conditions are read now (grad mode, compiler, ...), as :func:`choose` would."""
    return _reasons(op, stage, call, choose(op, stage, call))


def _reasons(op: str, stage: str, call: Call, chosen: Impl) -> List[Tuple[Impl, bool, str]]:
    resolved = call.resolved()
    rows = []
    for impl in _TABLE[op][stage]:
        if impl.backend is not None and impl.backend != resolved and impl is not chosen:
            rows.append((impl, False, f"a {impl.backend} implementation; the call runs on backend {resolved!r}"))
            continue
        ok, why = impl.supports(call)
        if impl is chosen:
            if impl.backend not in (None, resolved):
                why = f"no {resolved} {stage} implementation accepts the call: the reference"
            rows.append((impl, True, why))
        elif ok:
            rows.append((impl, False, f"accepts the call, but {chosen.name!r} comes first"))
        else:
            rows.append((impl, False, why))
    return rows


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect a :class:`Choice` for every :func:`choose` inside the block, its reasons read at the
    moment of the choice."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


# ---- conditions the implementations share -----------------------------------------------------------
# (looked up once: these run on every call)
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack


def eager_reference(call: Call) -> Reason:
    """``auto`` resolved to the reference (CUDA by :data:`AUTO_ORDER`, devices without kernels of
    ours): the public op then runs its reference composition as plain eager PyTorch (PyTorch's
    autograd, fusable by torch.compile), not the custom op, whose per-call dispatch and closed-form
    backward would only add time. An explicit ``backend("reference")`` keeps the custom op."""
    if call.backend != "auto":
        return False, f"backend {call.backend!r} was requested: the custom op runs it"
    return True, f"auto on {call.device.type} resolves to the reference (dispatch.AUTO_ORDER)"


def plain_cpu(call: Call) -> Reason:
    """A plain CPU call the C++ kernels may take without the custom op: plain tensors (no
    subclass), no compiler, functorch transform or dispatch mode involved (those keep the custom
    op, which is what ``opcheck`` and the compiler see)."""
    x = call.args[0]
    if type(x) is not _Tensor or not x.is_cpu:
        return False, "not a plain CPU tensor"
    if _is_compiling():
        return False, "torch.compile is tracing: the custom op"
    if _functorch_active() or _dispatch_modes():
        return False, "a functorch transform or dispatch mode is active: the custom op"
    for p in call.tensors:
        if p is not None and type(p) is not _Tensor and type(p) is not _Parameter:
            return False, "a parameter is a tensor subclass: the custom op"
    return True, "plain CPU tensors, nothing tracing or intercepting the call"


def eager_cpu(call: Call, channels_last: bool = False) -> Reason:
    """A plain eager CPU call (:func:`plain_cpu`) on a contiguous input (or channels_last, where
    the op's C++ path takes that layout): the op's C++ autograd node (a ``torch::autograd::Function``
    registered for AutogradCPU) runs it. Same kernels and results as the custom op, without its
    per-call Python dispatch and autograd glue (tens to hundreds of µs)."""
    x = call.args[0]
    if not (x.is_contiguous() or (channels_last and x.is_contiguous(memory_format=torch.channels_last))):
        return False, "input neither contiguous nor channels_last" if channels_last else "input not contiguous"
    return plain_cpu(call)


def no_grad_cpu(call: Call) -> Reason:
    """A plain CPU call (:func:`plain_cpu`, any strides) with no autograd graph to record (grad mode
    off, or nothing requires grad): the C++ forward kernel runs directly, no backward to set up."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (call.args[0], *call.tensors)):
        return False, "an autograd graph is recorded: the custom op"
    return plain_cpu(call)


def eager_impl(fn: Callable, doc: str = "the reference composition as plain eager PyTorch") -> Impl:
    """The "call" implementation that runs ``fn(*call.args)`` eagerly under ``auto`` where ``auto``
    resolves to the reference (see :func:`eager_reference`)."""
    return Impl("eager", "reference", lambda call: fn(*call.args), eager_reference, doc)


def custom_op_impl(op_fn: Callable, doc: str = "the torch.library custom op") -> Impl:
    """The "call" implementation that runs the custom op ``op_fn(*call.args, requested backend)``;
    it accepts every call and chooses its kernel with :func:`choose`."""
    return Impl("custom_op", None, lambda call: op_fn(*call.args, call.backend), _always, doc)


def run_kernel(op: str, stage: str, backend: str, *args):
    """Run the ``stage`` kernel of ``op`` that :func:`choose` picks for ``args`` on ``backend``."""
    return choose(op, stage, Call(op, backend, args)).fn(*args)
