"""Compile the Triton kernels for a GPU this machine does not have, and read what they cost.

:func:`stand_in_target` makes Triton believe a CUDA GPU of a given architecture is active (no
driver, no device: Triton compiles with its bundled ``ptxas``), and :func:`capture` turns every
kernel launch into a compile: the launchers run unchanged (on ``meta`` tensors, so no memory is
touched), each ``kernel[grid](...)`` compiles the exact specialization a real launch would, and
the grid is recorded. Autotuned kernels compile every config. :func:`resources` reads the
registers, stack and spill bytes and shared memory of a compiled kernel with the ``ptxas``
that ships with Triton.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Iterator, List, Optional

import torch

# Largest shared memory one block may use (opt-in), bytes, per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# CUDA's launch-grid limits: x up to 2^31 − 1 blocks, y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclasses.dataclass
class Launch:
    """One captured launch: the kernel, its constexpr specialization, launch options and grid."""

    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple
    ints: dict = dataclasses.field(default_factory=dict)    # the integer arguments, by name
    sizes: dict = dataclasses.field(default_factory=dict)   # element size of each tensor argument
    compiled: object = None
    error: Optional[str] = None
    group: Optional[int] = None  # the configs of one autotuned launch share a group

    def grid_ok(self) -> bool:
        return all(0 < int(g) <= lim for g, lim in zip(self.grid, GRID_LIMITS)) if self.grid else True


class _StandInDriver:
    """What Triton's JIT asks the active driver for when it compiles (never to launch)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):  # asked for by some Triton versions' autotuners; never used here
        def refuse(*args, **kwargs):
            raise RuntimeError("aot-check compiles kernels; it does not time them")
        return refuse


@contextlib.contextmanager
def stand_in_target(arch: int) -> Iterator[None]:
    """Triton compiles for ``sm_<arch>`` inside the block, with or without a GPU here."""
    from triton.runtime import driver

    # Restored as it was (None included: creating the real driver without a GPU would raise).
    prev = driver.__dict__.get("_active")
    driver.set_active(_StandInDriver(arch))
    try:
        yield
    finally:
        driver.__dict__["_active"] = prev


def _constexprs(fn, args, kwargs) -> dict:
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}


@contextlib.contextmanager
def capture() -> Iterator[List[Launch]]:
    """Every Triton launch inside the block compiles instead of running; yields the launches.

    Autotuned kernels compile each of their configs (the launch records one entry per config).
    A kernel that fails to compile is recorded with its error and the launcher goes on."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []
    orig_run, orig_tune = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(dict(zip(self.arg_names, args), **kwargs)) if callable(grid) else grid
        named = dict(zip(self.arg_names, args), **kwargs)
        rec = Launch(self.fn.__name__, _constexprs(self, args, kwargs), kwargs.get("num_warps", 4),
                     kwargs.get("num_stages", 3), tuple(int(v) for v in g) if g is not None else (),
                     ints={k: v for k, v in named.items() if isinstance(v, int) and not isinstance(v, bool)},
                     sizes={k: v.element_size() for k, v in named.items() if isinstance(v, torch.Tensor)})
        try:
            rec.compiled = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001  (reported, and the next launch goes on)
            rec.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        launches.append(rec)
        return rec.compiled

    def tune(self, *args, **kwargs):
        group = len(launches)
        for config in self.configs:
            full = dict(kwargs, **config.all_kwargs())
            grid = full.pop("grid")
            full.pop("warmup", None)
            self.fn.run(*args, grid=grid, warmup=True, **full)
            launches[-1].group = group

    JITFunction.run, Autotuner.run = run, tune
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = orig_run, orig_tune


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_TARGET = re.compile(r"^\.target\s+(sm_\w+)", re.M)
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def resources(compiled) -> dict:
    """``ptxas -v`` on the kernel's PTX (Triton's own ptxas, for the PTX's target): ``registers``
    per thread, ``stack`` bytes per thread (call frames and spills), ``spill`` bytes stored to
    local memory, and ``shared`` bytes per block (Triton's dynamic shared memory)."""
    ptx = compiled.asm["ptx"]
    target = _TARGET.search(ptx)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={target.group(1) if target else 'sm_90'}", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    frame, regs = _FRAME.search(report), _REGS.search(report)
    if proc.returncode != 0 or frame is None or regs is None:
        raise RuntimeError(f"ptxas -v failed or printed no resource usage:\n{report[-2000:]}")
    stack, spill_st, spill_ld = (int(v) for v in frame.groups())
    return {"registers": int(regs.group(1)), "stack": stack, "spill": max(spill_st, spill_ld),
            "shared": int(getattr(compiled.metadata, "shared", 0))}
