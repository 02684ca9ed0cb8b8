"""Which implementation ``auto`` runs on CPU where ours is not the faster everywhere.

Two rules, both read by the registry (``fastvit_ops/ops/dispatch.py``) as the ``supports`` of an
implementation, never beside it:

* :func:`eager_wins` — the ``eager_by_rule`` entry at the head of each op's "call" list: a plain
  CPU call under ``auto`` runs eager PyTorch where, on the capability in use, our kernels measured
  slower than eager for the call's shape class (:data:`EAGER`);
* :func:`dwconv_forward` — ``dwconv2d``'s ``onednn`` forward entry.

A fixed rule per CPU capability (the build of the C++ kernels in use: ``default``, ``avx2`` or
``avx512``, see :func:`fastvit_ops._availability.cpu_capability`), written from measurements on a 2-core
AVX-512 (Zen 4) machine with every capability forced in turn (``bench/cpu_isa_ratios.py``, batch 8,
fp32; ``bench/results/cpu_isa/``). It depends only on the call's shapes, layout, dtype, arguments,
grad mode and on the capability, so every process on the same machine picks the same kernel (and
rounds the same way), nothing is timed at run time and nothing is cached. Under
``torch.use_deterministic_algorithms(True)`` dwconv2d's forward is always ours (eager PyTorch's CPU
ops are deterministic too, so :data:`EAGER` still applies).

The dispatch (``fastvit_ops/ops/dispatch.py`` and each op's module) asks these functions; they
never run anything themselves.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, FrozenSet, Tuple

import torch

from .. import _availability
from . import dispatch


@functools.lru_cache(maxsize=1)
def capability() -> str:
    """The capability of the C++ CPU kernels in use (``"default"`` without the extension)."""
    info = _availability.cpu_capability()
    return info["in_use"] if info else "default"


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


# ---- dwconv2d's forward: ours ("cpu") or PyTorch's oneDNN convolution + our epilogue ("onednn") ----
def dwconv_forward(shape, channels_last: bool, dtype: torch.dtype, kernel_size: int, stride: int, padding: int,
                   activation: int, residual: bool) -> str:
    """``"cpu"`` (our depthwise kernel) or ``"onednn"`` for the forward of one ``dwconv2d`` call.

    ``shape`` is x's (B, C, H, W); ``activation`` 0 / 1 / 2 (none / SiLU / GELU). The backward is
    always ours (3-25× oneDNN's at every measured shape).
    """
    cap = capability()
    table, least = DWCONV_ONEDNN.get(cap), DWCONV_ONEDNN_CHANNELS_LAST_S2.get(cap)
    if (not table and least is None) or dtype != torch.float32 or len(shape) != 4 or _deterministic():
        return "cpu"
    n = shape[0] * shape[1] * shape[2] * shape[3]
    # "small": a plane of at most 14·14 in a call of 64k-256k elements. Below that oneDNN's fixed
    # ~40 µs per call loses (ours 3-4 µs at (1, 8, 9, 9)); above, oneDNN's NCHW path fell to 1.2-2 ms
    # at (8, 256, 14, 14) and (8, 1280, 7, 7).
    small = shape[2] * shape[3] <= 196 and 64 * 1024 <= n <= 256 * 1024
    key = (kernel_size, stride, "small" if small else "large")
    if table and key in table:
        return "onednn"
    if (least is not None and channels_last and kernel_size == 5 and stride == 2 and padding == 2
            and activation == 0 and not residual and n >= least):
        return "onednn"
    return "cpu"


#: capability -> {(k, stride, plane class)} where oneDNN's fp32 forward (with our epilogue after it)
#: measured faster than ours (bench/results/cpu_isa/, batch 8, fp32, forward, NCHW): 0.83-0.95x on
#: avx2 at k = 3/7/9, 0.94-0.99x on avx512 at k = 3. "small": a plane of at most 14·14, where the
#: per-plane setup of our row kernel is not paid back; at k = 5 ours still won there, and at k = 11
#: ours is 45-70x (avx2) oneDNN's forward.
DWCONV_ONEDNN: Dict[str, FrozenSet[Tuple[int, int, str]]] = {
    # default: 0.24x at FAT-B0 s3 CPE k = 7 (ATen at its own best); k ≤ 9 at both strides and plane
    # classes, larger kernels not measured there yet.
    "default": frozenset({(k, s, c) for k in (1, 3, 5, 7, 9) for s in (1, 2) for c in ("small", "large")}),
    # Re-measured on a quiet machine (2 threads, fp32, bias, no activation; ms ours / oneDNN): on
    # avx2 forced, k = 3 and 7 ours won at every shape (1.01-14x); on avx512 ours won every
    # k = 3 / 9 shape (1.07-10x). k = 9 on 7·7-14·14 planes (avx2), once 0.93-0.99x, measured
    # 1.02-1.03x eager with the oneDNN choice at 0.87-0.89x (bench/cpu_isa_ratios.py, which now
    # times both), so every avx2 shape is ours.
    "avx2": frozenset(),
    "avx512": frozenset(),
}


#: capability -> the input size (elements, batch included) from which oneDNN's forward of a
#: channels_last depthwise conv with k = 5, stride 2 and no epilogue (FAT's ConvFFN-down, FASA's
#: pool and the stride-2 shortcut, as the CPU inference plans run them) measured faster than ours.
#: 2 threads, fp32, ms oneDNN / ours, avx2 forced | avx512: (8, 128, 56, 56) 0.59 / 1.01 |
#: 0.41 / 0.85; (8, 320, 28, 28) 0.37 / 0.48 | 0.25 / 0.40; (8, 640, 14, 14) 0.21 / 0.23 |
#: 0.14 / 0.18; (8, 32, 56, 56) 0.14 / 0.17 | 0.12 / 0.14. Ours won below: (8, 80, 28, 28) tied
#: (1.01-1.02x), (8, 160, 14, 14) 1.3x, (8, 32, 28, 28) 1.2x, (8, 32, 14, 14) 2.5x. On NCHW inputs
#: ours won or tied at all of these shapes.
DWCONV_ONEDNN_CHANNELS_LAST_S2: Dict[str, int] = {"avx2": 768 * 1024, "avx512": 768 * 1024}


# ---- whole calls: eager PyTorch where our kernels measured slower ----------------------------------
# Shape classes: what the measurements separate. Elementwise and small-plane work is dominated by
# the per-call cost (threads woken, buffers allocated), where ATen's own vectorized loops are as
# fast; large planes and the fused multi-step ops are ours.
def _cross_modulation_class(args) -> str:
    return "small" if args[0].numel() <= 8 * 160 * 14 * 14 else "large"


def _attention_class(args) -> str:
    q, n = args[0], args[0].shape[-2]
    return f"d{q.shape[-1]}_" + ("short" if n <= 256 else "mid" if n <= 1024 else "long")


def _dwconv_class(args) -> str:
    x, weight, stride = args[0], args[1], args[3]
    plane = x.shape[-2] * x.shape[-1]
    return f"k{weight.shape[-1]}_s{stride}" + ("_small" if plane <= 196 else "_large")


def _global_context_class(args) -> str:
    return "all"


CLASSIFY: Dict[str, Callable[[tuple], str]] = {
    "sigmoid_cross_modulation": _cross_modulation_class,
    "downsampled_attention": _attention_class,
    "dwconv2d": _dwconv_class,
    "global_context": _global_context_class,
    "token_global_similarity": _global_context_class,
}

#: capability -> {(op, shape class, "train" | "inference")} where ``auto`` runs eager PyTorch:
#: the cases our kernels lost to eager in bench/cpu_isa_ratios.py (batch 8, fp32, minimum of 7
#: interleaved rounds, 1 thread: the shared 2-core machine's load made 2-thread timings measure the
#: scheduler; bench/results/cpu_isa/). "train": an autograd graph is recorded (forward+backward
#: measured); "inference": none is.
EAGER: Dict[str, FrozenSet[Tuple[str, str, str]]] = {
    # default (the baseline build, forced on the AVX-512 machine; ATen left at its own best, so a
    # conservative comparison): the gate 0.07x forward / 0.81x forward+backward at FAT-B0 s1, the
    # attention 0.11-0.18x at FAT-B0 s1; "*": every shape class. The global context won (6-20x).
    "default": frozenset({("sigmoid_cross_modulation", "*", "inference"),
                          ("sigmoid_cross_modulation", "*", "train"),
                          ("downsampled_attention", "*", "inference"),
                          ("downsampled_attention", "*", "train")}),
    # avx2 (forced on the AVX-512 machine, ATen and oneDNN forced down too): the attention's
    # forward+backward at 197 queries of d = 64 (CvT-13 s3) 0.88-0.91x through its C++ autograd
    # node, 1 and 2 threads, heap pinned (its forward alone wins; CvT-13 s2's, 0.84x through the
    # custom op, is 1.04x through the node). At d = 16 (FAT-B0 s3/s4) ours won 1.02-1.10x
    # forward+backward, 1 and 2 threads, where eager by this rule ran 0.95-0.98x (its view glue);
    # bench/results/cpu_isa/attention_avx2_forced_*_steady_heap.json;
    # the depthwise forward at k = 5, stride 2 on a 14·14 plane (FAT-B0 s3 ConvFFN-down)
    # 0.78-0.92x in three runs, oneDNN's no better (0.91x). The gate lost 0.90-0.97x at FAT-B0
    # s3/s4 through the Python custom op; under its C++ autograd node it wins 1.05-1.12x forward,
    # 1.16-1.21x forward+backward there (2 threads).
    "avx2": frozenset({("downsampled_attention", "d64_short", "train"),
                       ("dwconv2d", "k5_s2_small", "inference")}),
    # avx512: nothing. The attention's forward+backward at ≤ 256 queries (FAT-B0 s3/s4, CvT-13
    # s3), 0.41-0.88x before the full-width dot loops, the lane-wise dK/dV and the C++ autograd
    # node, is 1.09-1.22x eager with them (2 threads); the gate's 0.87-0.98x at FAT-B0 s3/s4 was
    # the custom op's overhead (its C++ autograd node wins 1.14-1.34x there); the k = 3 depthwise
    # conv's forward+backward on 7·7-14·14 planes, 0.63-0.93x with the per-plane backward, is
    # 1.03-1.15x with the channel-blocked one.
    "avx512": frozenset(),
}


_RULED: Dict[str, Tuple[FrozenSet, FrozenSet[str]]] = {}


def _ruled_ops(cap: str) -> FrozenSet[str]:
    """The ops :data:`EAGER` names on ``cap``, recomputed whenever that entry is another object
    (the tables are frozensets: replacing one is the only way to change it)."""
    table = EAGER.get(cap, frozenset())
    known = _RULED.get(cap)
    if known is None or known[0] is not table:
        known = _RULED[cap] = (table, frozenset(op for op, _, _ in table))
    return known[1]


def _stage(call: "dispatch.Call") -> str:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (*call.args, *call.tensors)):
        return "train"
    return "inference"


def eager_wins(call: "dispatch.Call") -> "dispatch.Reason":
    """Whether a plain CPU call under ``auto`` runs eager PyTorch instead of our kernels: the call's
    (op, shape class, train/inference) is in :data:`EAGER` for the capability in use."""
    if call.backend != "auto":
        return False, f"backend {call.backend!r} was requested: our kernels"
    classify = CLASSIFY.get(call.op)
    if classify is None:
        return False, "no measured loss of ours for this op"
    ok, why = dispatch.plain_cpu(call)  # first: under torch.compile nothing below may be traced
    if not ok:
        return False, why
    if call.op not in _ruled_ops(capability()):  # this runs on every call: skip the classifying
        return False, f"ours measured at least as fast as eager on {capability()} for every {call.op} call (cpu_rules.EAGER)"
    cap, key = capability(), (call.op, classify(call.args), _stage(call))
    table = EAGER.get(cap, ())
    if key in table or (key[0], "*", key[2]) in table:
        return True, f"ours measured slower than eager on {cap} for {key[1]} {key[2]} calls (cpu_rules.EAGER)"
    return False, f"ours measured at least as fast as eager on {cap} for {key[1]} {key[2]} calls (cpu_rules.EAGER)"


def eager_impl(fn: Callable) -> "dispatch.Impl":
    """The "call" entry that runs ``fn(*call.args)`` (the op's eager composition) where
    :func:`eager_wins` accepts the call; registered ahead of the op's C++ entries."""
    return dispatch.Impl("eager_by_rule", "cpu", lambda call: fn(*call.args), eager_wins,
                         "eager PyTorch where ours measured slower on this CPU capability (cpu_rules.EAGER)")
