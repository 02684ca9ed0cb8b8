"""Visual Transformer (VT) reference blocks (docs/vt.md).

Source: Wu et al., "Visual Transformers: Token-based Image Representation and Processing for
Computer Vision", 2020 (arXiv 2006.03677), §3.1–3.3, Eqs. (1)–(5). No official
code exists; these modules implement the paper's equations literally. The paper writes a feature
map as ``X ∈ R^{HW×C}`` and tokens as ``T ∈ R^{L×C}``; here feature maps are NCHW
``(B, C, H, W)`` (pixels flattened row-major, ``p = i·W + j``) and tokens are ``(B, L, C_T)``.

Weights are ``nn.Linear(…, bias=False)`` modules, so a paper matrix ``W ∈ R^{in×out}`` is stored
transposed, as ``weight (out, in)``; e.g. ``W_A = tokenizer.wa.weight.T``.

Two options common in re-implementations, both **off by default** (the paper uses neither):
``value_projection`` (a learned ``W_V`` applied to the attended values instead of the identity;
required when tokens and feature map have different widths) and ``scale`` (multiply the logits by
``1/√C``, ``C`` the width of the dot product).

Every softmax-weighted sum goes through a method ``attention(q, k, v)`` on
``(B, 1, N, d)`` / ``(B, 1, M, d)`` tensors (one head, docs/attention.md layout) with the softmax over
the ``M`` keys, so a fused subclass can override it: the tokenizers are attention with ``L`` filter
(or recurrent) queries over ``HW`` pixel keys (softmax over HW), the projector has ``HW`` pixel
queries over ``L`` token keys (softmax over L). Any float dtype; computed in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["FilterTokenizer", "RecurrentTokenizer", "TokenTransformer", "Projector"]


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H·W, C)`` (row-major pixels)."""
    if x.dim() != 4:
        raise ValueError(f"expected an NCHW feature map (B, C, H, W), got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``softmax_over_keys(scale · q kᵀ) v``; q ``(B, h, N, d)``, k ``(B, h, M, d)``,
    v ``(B, h, M, d_v)`` → ``(B, h, N, d_v)``."""
    logits = torch.matmul(q, k.transpose(-2, -1))
    if scale != 1.0:
        logits = logits * scale
    return torch.matmul(logits.softmax(dim=-1), v)


class _TokenAttention(nn.Module):
    """Shared plumbing: the ``scale`` flag and the overridable attention core."""

    def __init__(self, dot_channels: int, scale: bool):
        super().__init__()
        self.use_scale = bool(scale)
        self.scale = dot_channels ** -0.5 if scale else 1.0

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention core: q ``(B, 1, N, d)``, k ``(B, 1, M, d)``, v ``(B, 1, M, d_v)`` →
        ``(B, 1, N, d_v)``, ``softmax_over_M(self.scale · q kᵀ) v``. Override in fused subclasses."""
        return _softmax_attention(q, k, v, self.scale)


class FilterTokenizer(_TokenAttention):
    """Filter-based tokenizer, paper Eq. (1): ``T = SOFTMAX_HW(X W_A)ᵀ X``.

    ``forward(x)``: ``x (B, C, H, W)`` → tokens ``(B, L, C_T)``. ``A = softmax_HW(X W_A) ∈ R^{HW×L}``
    normalizes each token's column over the ``H·W`` pixels (``A[:, l]`` sums to 1), and token ``l``
    is the A-weighted average of the pixels. With ``value_projection`` the averaged values are
    ``X W_V`` (``W_V ∈ R^{C×C_T}``) instead of ``X``; with ``scale`` the logits are ``/√C``.

    Params: ``wa`` = ``W_Aᵀ`` ``(L, C)`` (the L point-wise filters); ``wv`` = ``W_Vᵀ`` ``(C_T, C)``
    when ``value_projection``. ``token_channels`` (default ``C``) may differ from ``C`` only with
    ``value_projection``.
    """

    def __init__(self, in_channels: int, num_tokens: int = 16, token_channels: Optional[int] = None,
                 value_projection: bool = False, scale: bool = False):
        super().__init__(in_channels, scale)
        token_channels = in_channels if token_channels is None else token_channels
        if token_channels != in_channels and not value_projection:
            raise ValueError("token_channels != in_channels needs value_projection=True")
        self.in_channels = in_channels
        self.num_tokens = num_tokens
        self.token_channels = token_channels
        self.wa = nn.Linear(in_channels, num_tokens, bias=False)
        self.wv = nn.Linear(in_channels, token_channels, bias=False) if value_projection else None

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``A = softmax_HW(X W_A)``: ``(B, C, H, W)`` → ``(B, H·W, L)``, each column sums to 1."""
        logits = self.wa(_pixels(x))
        if self.use_scale:
            logits = logits * self.scale
        return logits.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = _pixels(x)                                       # (B, HW, C)
        B = X.shape[0]
        q = self.wa.weight.to(X.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, L, C): rows of W_Aᵀ
        v = X if self.wv is None else self.wv(X)             # (B, HW, C_T)
        return self.attention(q.unsqueeze(1), X.unsqueeze(1), v.unsqueeze(1)).squeeze(1)


class RecurrentTokenizer(_TokenAttention):
    """Recurrent tokenizer, paper Eq. (2): ``W_R = T_in W_{T→R}``, ``T = SOFTMAX_HW(X W_Rᵀ)ᵀ X``.

    ``forward(x, tokens)``: ``x (B, C, H, W)``, previous tokens ``(B, L, C_T)`` → new tokens
    ``(B, L, C_T)``. Like :class:`FilterTokenizer` but the ``L`` filters ``W_R ∈ R^{L×C}`` are
    computed per sample from the previous layer's tokens. Softmax over the ``H·W`` pixels.

    Params: ``w_tr`` = ``W_{T→R}ᵀ`` ``(C, C_T)``; ``wv`` = ``W_Vᵀ`` ``(C_T, C)`` when
    ``value_projection``.
    """

    def __init__(self, in_channels: int, token_channels: Optional[int] = None,
                 value_projection: bool = False, scale: bool = False):
        super().__init__(in_channels, scale)
        token_channels = in_channels if token_channels is None else token_channels
        if token_channels != in_channels and not value_projection:
            raise ValueError("token_channels != in_channels needs value_projection=True")
        self.in_channels = in_channels
        self.token_channels = token_channels
        self.w_tr = nn.Linear(token_channels, in_channels, bias=False)
        self.wv = nn.Linear(in_channels, token_channels, bias=False) if value_projection else None

    def spatial_attention(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``A = softmax_HW(X W_Rᵀ)``: → ``(B, H·W, L)``, each column sums to 1."""
        logits = torch.matmul(_pixels(x), self.w_tr(tokens).transpose(1, 2))
        if self.use_scale:
            logits = logits * self.scale
        return logits.softmax(dim=1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        X = _pixels(x)                                       # (B, HW, C)
        q = self.w_tr(tokens)                                # W_R (B, L, C)
        v = X if self.wv is None else self.wv(X)             # (B, HW, C_T)
        return self.attention(q.unsqueeze(1), X.unsqueeze(1), v.unsqueeze(1)).squeeze(1)


class TokenTransformer(_TokenAttention):
    """Transformer on visual tokens, paper Eqs. (3)–(4).

    ``T' = T + SOFTMAX_L((T K)(T Q)ᵀ) T`` and ``T_out = T' + σ(T' F1) F2`` with σ = ReLU.
    ``forward(tokens)``: ``(B, L, C)`` → ``(B, L, C)``. The softmax normalizes each row of the
    ``L×L`` matrix over the ``L`` columns, so the rows come from ``T K`` — in
    :meth:`attention` terms ``T K`` is the query and ``T Q`` the key (the paper's naming).
    With ``value_projection`` the attended values are ``T W_V``; with ``scale`` the logits are ``/√C``.

    Params (paper names): ``k`` = ``Kᵀ``, ``q`` = ``Qᵀ`` (``C×C``, no bias); ``f1``, ``f2``
    (``C×C``, bias iff ``bias`` — the paper's Eq. (4) has none); ``wv`` when ``value_projection``.
    """

    def __init__(self, channels: int, value_projection: bool = False, scale: bool = False,
                 bias: bool = False):
        super().__init__(channels, scale)
        self.channels = channels
        self.k = nn.Linear(channels, channels, bias=False)
        self.q = nn.Linear(channels, channels, bias=False)
        self.wv = nn.Linear(channels, channels, bias=False) if value_projection else None
        self.f1 = nn.Linear(channels, channels, bias=bias)
        self.f2 = nn.Linear(channels, channels, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        v = tokens if self.wv is None else self.wv(tokens)
        att = self.attention(self.k(tokens).unsqueeze(1), self.q(tokens).unsqueeze(1),
                             v.unsqueeze(1)).squeeze(1)
        t = tokens + att                                     # Eq. (3)
        return t + self.f2(torch.relu(self.f1(t)))           # Eq. (4)


class Projector(_TokenAttention):
    """Projector, paper Eq. (5): ``X_out = X_in + SOFTMAX_L((X_in W_Q)(T W_K)ᵀ) T``.

    ``forward(x, tokens)``: ``x (B, C, H, W)``, tokens ``(B, L, C_T)`` → ``(B, C, H, W)``. Each
    pixel's query attends over the ``L`` tokens (softmax over L, rows sum to 1). With
    ``value_projection`` the values are ``T W_V`` (``W_V ∈ R^{C_T×C}``, needed when ``C_T ≠ C``);
    with ``scale`` the logits are ``/√C``.

    Params: ``q`` = ``W_Qᵀ`` ``(C, C)``; ``k`` = ``W_Kᵀ`` ``(C, C_T)``; ``wv`` = ``W_Vᵀ``
    ``(C, C_T)`` when ``value_projection``.
    """

    def __init__(self, in_channels: int, token_channels: Optional[int] = None,
                 value_projection: bool = False, scale: bool = False):
        super().__init__(in_channels, scale)
        token_channels = in_channels if token_channels is None else token_channels
        if token_channels != in_channels and not value_projection:
            raise ValueError("token_channels != in_channels needs value_projection=True")
        self.in_channels = in_channels
        self.token_channels = token_channels
        self.q = nn.Linear(in_channels, in_channels, bias=False)
        self.k = nn.Linear(token_channels, in_channels, bias=False)
        self.wv = nn.Linear(token_channels, in_channels, bias=False) if value_projection else None

    def attention_weights(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``softmax_L((X W_Q)(T W_K)ᵀ)``: → ``(B, H·W, L)``, each row sums to 1."""
        logits = torch.matmul(self.q(_pixels(x)), self.k(tokens).transpose(1, 2))
        if self.use_scale:
            logits = logits * self.scale
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        X = _pixels(x)                                       # (B, HW, C)
        v = tokens if self.wv is None else self.wv(tokens)   # (B, L, C)
        out = self.attention(self.q(X).unsqueeze(1), self.k(tokens).unsqueeze(1),
                             v.unsqueeze(1)).squeeze(1)      # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)
