"""Autocast for the custom ops: run them with autocast off, on the dtypes they are given.

Without an Autocast kernel a custom op is entered with autocast still on, so the ATen calls
*inside* its kernels (e.g. the C++ global-context op's ``at::linear`` on the MLP, the reference
backends' matmuls) get autocast too: fp32 accumulators silently become bf16/fp16, and the C++
global-context op rejects them ("c must have the accumulation dtype"). Each op keeps its own
precision policy (fp32 accumulation for half inputs), and the fused modules of
``fastvit_ops.nn`` cast their inputs as the reference's convolutions are cast
(``fastvit_ops.nn._amp``), so here every ``fastvit_ops::`` op gets an Autocast kernel (CPU and
CUDA) that only re-dispatches with the autocast keys excluded — what
``torch.library.register_autocast`` does, minus its fixed cast.
"""
from __future__ import annotations

import torch

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = None
_DONE: set = set()


def _kernel(op, excluded):
    def kernel(_keyset, *args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)
    return kernel


def register() -> None:
    """Give every registered ``fastvit_ops::`` op without one an autocast pass-through kernel."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("fastvit_ops", "IMPL")
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | \
        torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("fastvit_ops::") or name in _DONE:
            continue
        base, _, overload = name.partition(".")
        packet = getattr(torch.ops.fastvit_ops, base.split("::", 1)[1], None)
        if packet is None:
            continue
        op = getattr(packet, overload or "default", None)
        if op is None:
            continue
        for key in _AUTOCAST_KEYS.values():
            if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                _LIB.impl(name.split("::", 1)[1], _kernel(op, excluded), key, with_keyset=True)
        _DONE.add(name)
