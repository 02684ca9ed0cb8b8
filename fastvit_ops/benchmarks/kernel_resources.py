"""Registers, local-memory (spill) bytes and shared memory of every Triton kernel this process
has compiled for a GPU, read from Triton's own kernel caches.

``check`` and ``bench`` on a CUDA device record this table in their JSON: it is the ground truth
for what the launched specializations cost (the ahead-of-time estimate cannot see autotuning or the
exact specializations the ops pick at run time).
"""
from __future__ import annotations

import importlib
from typing import Dict, List

KERNEL_MODULES = ("attention", "cross_modulation", "dwconv", "global_context")


def _jit_functions():
    """(module, name, JITFunction) for every Triton kernel in ``fastvit_ops.kernels``."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    out, seen = [], set()
    for mod_name in KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"fastvit_ops.kernels.{mod_name}")
        except Exception:  # noqa: BLE001  (a kernel module that fails to import has nothing cached)
            continue
        for name, obj in vars(mod).items():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # Autotuner / Heuristics
                fn = fn.fn
            if isinstance(fn, JITFunction) and id(fn) not in seen:  # an autotuner wraps a kernel also listed
                seen.add(id(fn))
                out.append((mod_name, fn.fn.__name__, fn))
    return out


def _caches(fn) -> List[Dict]:
    """The compiled kernels of ``fn`` per device, across Triton versions (3.3+: device_caches)."""
    caches = []
    if hasattr(fn, "device_caches"):
        for entry in fn.device_caches.values():
            caches.append(entry[0])
    elif hasattr(fn, "cache"):
        caches.extend(fn.cache.values())
    return caches


def _constants(kernel) -> str:
    src = getattr(kernel, "src", None)
    for attr in ("constants", "constexprs"):
        c = getattr(src, attr, None)
        if isinstance(c, dict) and c:
            items = []
            for k, v in c.items():
                key = k[0] if isinstance(k, tuple) and len(k) == 1 else k
                if isinstance(key, (int, tuple)) and hasattr(src, "fn"):
                    try:
                        key = src.fn.arg_names[key if isinstance(key, int) else key[0]]
                    except Exception:  # noqa: BLE001
                        pass
                items.append(f"{key}={v}")
            return ",".join(items)
    return ""


def launched_kernels() -> List[Dict]:
    """One row per compiled kernel: module, kernel, constexprs, num_warps, num_stages, registers
    per thread, local-memory (spill) bytes per thread, shared memory bytes, target."""
    rows = []
    for mod_name, name, fn in _jit_functions():
        for cache in _caches(fn):
            for kernel in list(cache.values()):
                row = {"module": mod_name, "kernel": name, "constexprs": _constants(kernel)}
                md = getattr(kernel, "metadata", None)
                for field in ("num_warps", "num_stages", "shared"):
                    row[field] = getattr(md, field, None)
                row["target"] = str(getattr(md, "target", ""))
                try:
                    kernel._init_handles()  # n_regs / n_spills are filled when the binary loads
                    row["registers"] = int(kernel.n_regs)
                    row["spill_bytes"] = int(kernel.n_spills)
                except Exception as e:  # noqa: BLE001  (interpreter kernels have no binary)
                    row["registers"] = row["spill_bytes"] = None
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
    return rows
