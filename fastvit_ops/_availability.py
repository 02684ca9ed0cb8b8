"""What this machine can run: the compiled extension, its CUDA half, Triton.

Each probe runs once and remembers why a backend is missing, so ``python -m fastvit_ops info``
and the dispatch errors can say so.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings


@functools.lru_cache(maxsize=None)
def extension():
    """Return ``(module or None, reason)`` for the compiled ``fastvit_ops._C``.

    Importing it registers the C++ kernels under ``torch.ops.fastvit_ops``.
    """
    try:
        mod = importlib.import_module("fastvit_ops._C")
    except ImportError as e:  # not built (pure-Python install) or ABI mismatch
        return None, f"fastvit_ops._C not importable ({e}); build with `pip install -e .`"
    warning = mod.cpu_capability()["warning"]
    if warning:  # FASTVIT_OPS_CPU_CAPABILITY asked for something this CPU or build lacks
        warnings.warn(f"fastvit_ops: {warning}", RuntimeWarning, stacklevel=2)
    return mod, "ok"


def cpu_capability():
    """Which build of the C++ CPU kernels runs, or None without the extension: a dict with
    ``in_use`` (``"default"``, ``"avx2"`` or ``"avx512"``), ``cpu`` (the best this CPU supports),
    ``built`` (the capabilities compiled in), ``reason`` and ``warning``. Chosen once, when the
    extension loads: the best the CPU supports, or ``FASTVIT_OPS_CPU_CAPABILITY`` if lower."""
    mod, _ = extension()
    return None if mod is None else dict(mod.cpu_capability())


def cpu_extension():
    """``(True, "ok")`` when the C++ CPU kernels are built, else ``(False, reason)``."""
    mod, why = extension()
    return mod is not None, why


def cuda_extension():
    """``(True, "ok")`` when the extension was compiled with its CUDA kernels."""
    mod, why = extension()
    if mod is None:
        return False, why
    if not mod.cuda_compiled():
        return False, "fastvit_ops._C was built without CUDA (no nvcc / CPU torch / FASTVIT_OPS_SKIP_CUDA_BUILD)"
    return True, "ok"


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton():
    """``(True, version)`` when Triton imports, else ``(False, reason)``."""
    try:
        import triton as _triton  # noqa: F401  (optional dependency)
    except ImportError as e:
        return False, f"triton not installed ({e})"
    return True, _triton.__version__
