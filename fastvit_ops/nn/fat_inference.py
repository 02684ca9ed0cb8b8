"""The CPU inference path of the fused FAT modules (``FATBlock``, ``FASA``, ``ConvFFN``, ``PatchEmbedding``).

When it runs (:func:`applies`): the module in eval mode, an fp32 plain CPU tensor in, nothing that
needs gradients (``torch.no_grad()`` / ``torch.inference_mode()``, or frozen parameters), and no
compiler, autocast, functorch transform or dispatch mode active. Outputs equal the reference's up
to fp32 rounding. What it does, and why:

* the stem makes the image channels_last once and every block keeps that layout (oneDNN's 1×1
  convolutions reorder NCHW operands on every call: FAT-B0's 56×56 ``fc1`` + GELU 19.8 ms NCHW,
  3.6 ms channels_last; 1.1× at 14×14), so blocks return channels_last maps;
* every eval BatchNorm is folded into a convolution next to it (stem convs, FASA's pool convs,
  the stride-2 shortcut's depthwise conv, ConvFFN's ``fc2`` which sees ``BN(U)`` through a 1×1);
* GELU, ReLU and the residual adds run in place on the output of the convolution before them
  (oneDNN's own post-op fusion, ``torch.ops.mkldnn._convolution_pointwise``, what inductor emits
  under ``freezing``, measured no faster on converted FAT-B0: its per-call primitive setup,
  ~30–60 µs, ate the saved pass, and it is a private op);
  ``x + DW(x)`` (CPE) is one depthwise conv with a residual epilogue and the FFN's ``U + DW(U)``
  is written over ``U`` where the C++ kernel can;
* on maps whose FFN hidden activation is large (:data:`FFN_CHUNK_BYTES`) the FFN runs a few
  samples at a time and ``fc2`` adds straight into the block's shortcut, so the hidden map stays
  in cache between ``fc1``, the depthwise conv and ``fc2`` (7.5 → 5.1 ms per FFN, 2-core Zen 4);
* FASA's attention reads the queries from the channels_last map and writes its output in the
  layout ``mixer`` reads, with ``SiLU(G) ⊙ SiLU(L0)`` as its epilogue.

One path for every structure. A module's plan is a flat closure built once from its parts: each
part (CPE, norms, FASA's ``q``/``kv``/``pool``/``local_mixer``/``mixer``, the shortcut, the FFN's
``fc1``/``act``/``dwconv``/``bn``/``fc2``, the stem's units) becomes a fused step when it is the
layer that step computes (a depthwise conv :func:`fastvit_ops.ops.dwconv.conv_arguments` takes,
an ungrouped conv, an affine GroupNorm, an eval BatchNorm, exact GELU) and a call of the
submodule itself otherwise. The reference's, the authors' (duck-typed, see
:data:`fastvit_ops.convert.DUCK_ATTRIBUTES`) and a user's modified blocks all run it, fused
wherever their layers allow. The closure calls the kernels directly (no per-module calls or
checks; a TorchScript trace of a module-by-module version ran 8–10% faster than that version)
and drops each intermediate after its last use; the depthwise and attention kernels are the ones
the dispatch registry picks for the call (:func:`fastvit_ops.ops.dispatch.choose`).

The plan is cached on the module under the key :func:`fastvit_ops.nn._plan.state_key` (every
submodule's identity and plain attributes, every tensor's identity, storage, version, dtype,
device, requires_grad), so ``load_state_dict`` (also ``assign=True``), in-place edits, ``.to()``,
swapped submodules and edited hyperparameters rebuild it on the next call; it is not pickled
(:func:`fastvit_ops.nn._plan.drop_plan`). Under torch.compile a block or stem with a plan is one
opaque op that runs it (:func:`fastvit_ops.nn._plan.module_inference`), the plans of FCViT and
CvT (``fcvit_inference``, ``cvt_inference``) share the same cache and rules.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import DUCK_ATTRIBUTES
from ..ops import dispatch
from ..ops.attention import OP as ATTENTION
from ..ops.dwconv import forward_kernel as dw_forward
from ..ops.dwconv import residual_inplace
from . import _plan
from ._bn import fold_bn_into_next_1x1, fold_eval_bn, is_eval_bn
from ._plan import detached
from .dwconv import depthwise_arguments

FASA_ATTRIBUTES = DUCK_ATTRIBUTES["FASA"]
FFN_ATTRIBUTES = DUCK_ATTRIBUTES["ConvFFN"]
_SILU = 1  # ops.dwconv's activation id

#: The FFN's hidden activation (fc1's output) is produced this many bytes at a time at most, in
#: chunks of whole samples, when the whole batch's would exceed twice that: at FAT-B0's 56×56 stage
#: the hidden map is 12.8 MB at batch 8, and two samples at a time (3.2 MB) stay in cache between
#: fc1, the depthwise conv and fc2 instead of going to DRAM and back; smaller maps gained nothing.
FFN_CHUNK_BYTES = 4 << 20

applies = _plan.applies  # when the path runs (module docstring)


def run(module: nn.Module, x: Tensor) -> Tensor:
    """``module``'s inference forward of ``x`` through its plan (built or rebuilt as needed)."""
    return _plan.run(module, _BUILDERS[_kind(module)], x)


# ---- parts: a fused step where the layer is the one the step computes, the submodule otherwise --------
def _dense_conv(conv) -> bool:
    """An ungrouped ``nn.Conv2d`` with equal integer strides/paddings, zero padding, no dilation."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and not isinstance(conv.padding, str)
            and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1)
            and conv.stride[0] == conv.stride[1] and conv.padding[0] == conv.padding[1])


def _conv(conv: nn.Module, bn=None, act: Optional[str] = None) -> Tuple[Callable[[Tensor], Tensor], bool]:
    """``act(bn(conv(x)))`` and whether it is fused (a fresh tensor, safe to add into): one
    convolution with ``bn`` (an eval BN) folded in and the activation in place."""
    if not _dense_conv(conv):
        def module_call(x):
            y = bn(conv(x)) if bn is not None else conv(x)
            return y if act is None else (F.relu(y) if act == "relu" else F.gelu(y))
        return module_call, False
    w, b = detached(*(fold_eval_bn(conv, bn) if bn is not None else (conv.weight, conv.bias)))
    s, p = conv.stride[0], conv.padding[0]
    if act == "relu":
        return (lambda x: F.conv2d(x, w, b, s, p).relu_()), True
    if act == "gelu":
        return _plan.conv_gelu(w, b, s, p), True
    return (lambda x: F.conv2d(x, w, b, s, p)), True


def _depthwise(conv: nn.Module, bn=None, act: int = 0, residual: bool = False) -> Callable[[Tensor], Tensor]:
    """``act(bn(DW(x))) [+ x]``: one depthwise conv (``bn``, an eval BN, folded in; the activation
    and residual as its epilogue) on the forward kernel ``dwconv2d`` would run, else the modules."""
    args = depthwise_arguments(conv)
    if args is None or (residual and (args[1] != 1 or args[2] != args[0] // 2)):
        def module_call(x):
            y = bn(conv(x)) if bn is not None else conv(x)
            y = F.silu(y) if act == _SILU else (F.gelu(y) if act else y)
            return y + x if residual else y
        return module_call
    _, s, p = args
    w, b = detached(*(fold_eval_bn(conv, bn) if bn is not None else (conv.weight, conv.bias)))
    return lambda x: dw_forward(x, w, b, s, p, act, residual)


def _norm(norm: nn.Module) -> Callable[[Tensor], Tensor]:
    if isinstance(norm, nn.GroupNorm) and norm.affine:
        g, eps = norm.num_groups, norm.eps
        w, b = detached(norm.weight, norm.bias)
        return lambda x: F.group_norm(x, g, w, b, eps)
    return norm


def _sequence(seq: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
    """An ``nn.Sequential`` of convolutions (each optionally followed by an eval BN, folded) and
    other modules, as one function; None for ``nn.Identity``; any other module as itself."""
    if isinstance(seq, nn.Identity):
        return None
    if not isinstance(seq, nn.Sequential):
        return seq
    mods, steps, i = list(seq.children()), [], 0
    while i < len(mods):
        m = mods[i]
        bn = mods[i + 1] if i + 1 < len(mods) and is_eval_bn(mods[i + 1]) else None
        if depthwise_arguments(m) is not None:
            steps.append(_depthwise(m, bn))
        elif _dense_conv(m):
            steps.append(_conv(m, bn)[0])
        else:
            steps.append(m)
            bn = None
        i += 2 if bn is not None else 1

    def run_steps(x):
        for step in steps:
            x = step(x)
        return x
    return steps[0] if len(steps) == 1 else run_steps


def _residual_dw(conv: nn.Module) -> Callable[[Tensor], Tensor]:
    """``u + conv(u)`` for a temporary ``u``: written over ``u`` where a kernel can."""
    args = depthwise_arguments(conv)
    if args is None or args[1] != 1 or args[2] != args[0] // 2:
        return lambda u: u + conv(u)
    w, b = detached(conv.weight, conv.bias)
    p = args[2]
    return lambda u: residual_inplace(u, w, b, p)


# ---- FASA, FFN, block, stem --------------------------------------------------------------------------
def _fasa(attn: nn.Module) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """``(z, x) -> x + attn(z)`` (``attn(z)`` when x is None) for a FASA module (the released
    code's computation, see :func:`fastvit_ops.nn.fat.fused_fasa`); any other attention module is
    called as it is."""
    if not all(hasattr(attn, a) for a in FASA_ATTRIBUTES):
        return lambda z, x: attn(z) if x is None else x + attn(z)
    heads, d, scale = int(attn.num_heads), int(attn.dim_head), float(attn.scalor)
    q_map, kv_map, mixer = _conv(attn.q)[0], _conv(attn.kv)[0], _conv(attn.mixer)
    pool = _sequence(attn.pool)
    lm = attn.local_mixer
    gate_map = _depthwise(lm, act=_SILU) if depthwise_arguments(lm) is not None else (lambda q: F.silu(lm(q)))
    mixer_map, mixer_fused = mixer

    def fasa(z: Tensor, x: Tensor) -> Tensor:
        b, c, h, w = z.shape
        if c != heads * d:
            raise ValueError(f"x: expected {heads * d} channels (num_heads {heads} × dim_head {d}), got {c}")
        q = q_map(z)                                                          # Q̂
        kv = kv_map(pool(z) if pool is not None else z)
        del z
        m = kv.shape[-2] * kv.shape[-1]
        k, v = kv.reshape(b, 2, heads, d, m).transpose(-1, -2).unbind(1)
        gate = gate_map(q)                                                    # SiLU(L0)
        out = torch.empty((b, h * w, heads, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, heads, h * w, 2), dtype=torch.float32, device=q.device)
        args = (q.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2), k, v,
                gate.permute(0, 2, 3, 1).reshape(b, h * w, heads, d).transpose(1, 2), out.transpose(1, 2), lse, scale)
        dispatch.run_kernel(ATTENTION, "forward", dispatch.get_backend(), *args)  # SiLU(G)·SiLU(L0)
        del q, gate, k, v, kv, lse, args
        y = mixer_map(out.reshape(b, h, w, c).permute(0, 3, 1, 2))
        del out
        if x is None:
            return y
        return y.add_(x) if mixer_fused else y + x                            # x + mixer(·)
    return fasa


def _fasa_module(attn: nn.Module) -> Callable[[Tensor], Tensor]:
    """A FASA module alone: its input made channels_last once (the 1×1 convs and the attention
    read that layout without reorders: FAT-B0 s1–s4, NCHW input, 12–20% faster than the
    module-by-module path on both ISAs), its output channels_last like a block's."""
    fasa = _fasa(attn)
    return lambda x: fasa(x.contiguous(memory_format=torch.channels_last), None)


def _ffn(ffn: nn.Module) -> Callable[[Tensor, Optional[Tensor], bool], Tensor]:
    """``(z, shortcut, own) -> shortcut + ffn(z)`` (``ffn(z)`` when shortcut is None) for a ConvFFN:
    ``fc2(BN(U))`` as one 1×1 conv with the BN folded, the GELU and the inner residual in place;
    ``own``: the shortcut is a temporary of the caller, so ``fc2`` adds into it, a chunk of samples
    at a time on large maps. Any other FFN module is called as it is."""
    if not all(hasattr(ffn, a) for a in FFN_ATTRIBUTES):
        return lambda z, sc, own: ffn(z) if sc is None else sc + ffn(z)
    fc1, act, dw, bn, fc2 = (getattr(ffn, a) for a in FFN_ATTRIBUTES)
    exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none"
    fc1_map = _conv(fc1, act="gelu")[0] if exact_gelu else (lambda z: act(fc1(z)))
    stride = dw.stride[0] if isinstance(dw, nn.Conv2d) else getattr(ffn, "stride", 1)
    dw_map = _residual_dw(dw) if stride == 1 else _depthwise(dw)         # U + DW(U), or DW/s2(U)
    if is_eval_bn(bn) and _dense_conv(fc2) and tuple(fc2.kernel_size) == (1, 1) and fc2.padding[0] == 0:
        w2, b2 = detached(*fold_bn_into_next_1x1(bn, fc2))
        fc2_map, fused = (lambda u: F.conv2d(u, w2, b2)), True
    elif isinstance(bn, nn.Identity):
        fc2_map, fused = _conv(fc2)
    else:
        conv, fused = _conv(fc2)
        fc2_map, fused = (lambda u: conv(bn(u))), fused
    hidden = getattr(fc1, "out_channels", 0)

    def run_ffn(z: Tensor, sc: Optional[Tensor], own: bool) -> Tensor:
        if not (own and sc is not None and fused):
            y = fc2_map(dw_map(fc1_map(z)))                                   # fc2(BN(U))
            return y if sc is None else (y.add_(sc) if fused else y + sc)
        n = _chunk(z, hidden)
        for i in range(0, z.shape[0], n):                                     # sc += fc2(BN(U))
            sc[i:i + n].add_(fc2_map(dw_map(fc1_map(z[i:i + n]))))
        return sc
    return run_ffn


def _chunk(z: Tensor, hidden: int) -> int:
    """Samples per FFN chunk (see :data:`FFN_CHUNK_BYTES`)."""
    per_sample = hidden * z.shape[2] * z.shape[3] * z.element_size()
    if per_sample * z.shape[0] <= 2 * FFN_CHUNK_BYTES:
        return z.shape[0]
    return max(1, FFN_CHUNK_BYTES // per_sample)


def _block(blk: nn.Module) -> Callable[[Tensor], Tensor]:
    """FATBlock: ``x ← x + cpe(x)``; ``x ← x + attn(norm1(x))``; ``downsample(x) + ffn(norm2(x))``."""
    cpe = _depthwise(blk.cpe, residual=True)
    norm1, norm2 = _norm(blk.norm1), _norm(blk.norm2)
    attn, ffn = _fasa(blk.attn), _ffn(blk.ffn)
    shortcut = _sequence(blk.downsample)

    def block(x: Tensor) -> Tensor:
        x = cpe(x.contiguous(memory_format=torch.channels_last))             # x + CPE(x)
        x = attn(norm1(x), x)                                                # x + FASA(GN(x))
        z = norm2(x)
        sc = shortcut(x) if shortcut is not None else x   # a temporary of this forward: fc2 adds into it
        del x
        return ffn(z, sc, True)
    return block


def _ffn_module(ffn: nn.Module) -> Callable[[Tensor], Tensor]:
    run_ffn = _ffn(ffn)
    return lambda x: run_ffn(x.contiguous(memory_format=torch.channels_last), None, False)


def _conv_bn_relu(unit: nn.Module) -> Callable[[Tensor], Tensor]:
    """The stem's ``ReLU(BN(conv(x)))`` unit (``unit.conv`` a Sequential of conv, BN, ReLU, or conv,
    ReLU after ``fuse_for_inference``) as one conv with an in-place ReLU; else the unit itself."""
    seq = getattr(unit, "conv", None)
    mods = list(seq.children()) if isinstance(seq, nn.Sequential) else []
    if len(mods) == 2:
        mods = [mods[0], None, mods[1]]
    if len(mods) == 3 and _dense_conv(mods[0]) and (mods[1] is None or is_eval_bn(mods[1])) \
            and isinstance(mods[2], nn.ReLU):
        return _conv(mods[0], mods[1], act="relu")[0]
    return unit


def _stem(pe: nn.Module) -> Callable[[Tensor], Tensor]:
    """PatchEmbedding: four conv+BN+ReLU units, a 1×1 conv and a GroupNorm, channels_last from here."""
    units = [_conv_bn_relu(getattr(pe, f"conv{i}")) for i in range(1, 5)]
    conv5, norm = _conv(pe.conv5)[0], _norm(pe.layernorm)

    def stem(x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for unit in units:
            x = unit(x)
        return norm(conv5(x))
    return stem


_BUILDERS = {"FATBlock": _block, "ConvFFN": _ffn_module, "PatchEmbedding": _stem, "FASA": _fasa_module}


def _kind(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls.__name__ in _BUILDERS:
            return cls.__name__
    raise TypeError(f"module: no FAT inference plan for {type(module).__name__}")
