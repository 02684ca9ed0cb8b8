"""Reference Visual Transformer blocks (docs/vt.md) against the paper's equations, in float64."""
from __future__ import annotations

import pytest
import torch

from fastvit_ops.reference.vt import FilterTokenizer, Projector, RecurrentTokenizer, TokenTransformer

FLAGS = [
    pytest.param(False, False, id="paper"),
    pytest.param(True, False, id="value_proj"),
    pytest.param(False, True, id="scaled"),
    pytest.param(True, True, id="value_proj+scaled"),
]


def _feature_map(B=2, C=12, H=5, W=7):
    return torch.randn(B, C, H, W, dtype=torch.float64)


def _rand_(module, std=0.5):
    # Default inits give near-uniform softmaxes; larger weights make the softmax axis matter.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _softmax(s, dim):
    e = torch.exp(s - s.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def _X(x):
    return torch.einsum("bchw->bhwc", x).reshape(x.shape[0], -1, x.shape[1])  # (B, HW, C)


@pytest.mark.parametrize("value_proj,scale", FLAGS)
def test_filter_tokenizer_eq1(value_proj, scale):
    C, L = 12, 6
    CT = 10 if value_proj else C
    tok = _rand_(FilterTokenizer(C, num_tokens=L, token_channels=CT, value_projection=value_proj,
                                 scale=scale).double())
    x = _feature_map(C=C)
    T = tok(x)
    assert T.shape == (2, L, CT) and T.dtype == torch.float64

    X = _X(x)
    W_A = tok.wa.weight.T                                   # (C, L)
    s = torch.einsum("bpc,cl->bpl", X, W_A) * (C ** -0.5 if scale else 1.0)
    A = _softmax(s, dim=1)                                  # over the HW pixels
    V = X if not value_proj else torch.einsum("bpc,ce->bpe", X, tok.wv.weight.T)
    want = torch.einsum("bpl,bpe->ble", A, V)               # T = Aᵀ X
    torch.testing.assert_close(T, want, rtol=1e-12, atol=1e-12)

    A_mod = tok.spatial_attention(x)
    assert A_mod.shape == (2, 5 * 7, L)
    torch.testing.assert_close(A_mod, A, rtol=1e-12, atol=1e-12)
    # Columns of A sum to 1 over pixels; rows (over tokens) do not.
    torch.testing.assert_close(A_mod.sum(dim=1), torch.ones(2, L, dtype=torch.float64))
    assert not torch.allclose(A_mod.sum(dim=2), torch.ones(2, 35, dtype=torch.float64))


@pytest.mark.parametrize("value_proj,scale", FLAGS)
def test_recurrent_tokenizer_eq2(value_proj, scale):
    C, L = 12, 5
    CT = 9 if value_proj else C
    tok = _rand_(RecurrentTokenizer(C, token_channels=CT, value_projection=value_proj,
                                    scale=scale).double())
    x = _feature_map(C=C, H=6, W=3)
    T_in = torch.randn(2, L, CT, dtype=torch.float64)
    T = tok(x, T_in)
    assert T.shape == (2, L, CT)

    X = _X(x)
    W_R = torch.einsum("ble,ec->blc", T_in, tok.w_tr.weight.T)   # W_R = T_in W_{T→R}, (B, L, C)
    s = torch.einsum("bpc,blc->bpl", X, W_R) * (C ** -0.5 if scale else 1.0)
    A = _softmax(s, dim=1)
    V = X if not value_proj else torch.einsum("bpc,ce->bpe", X, tok.wv.weight.T)
    want = torch.einsum("bpl,bpe->ble", A, V)
    torch.testing.assert_close(T, want, rtol=1e-12, atol=1e-12)

    A_mod = tok.spatial_attention(x, T_in)
    torch.testing.assert_close(A_mod, A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A_mod.sum(dim=1), torch.ones(2, L, dtype=torch.float64))


@pytest.mark.parametrize("value_proj,scale", FLAGS)
@pytest.mark.parametrize("bias", [False, True])
def test_token_transformer_eq3_eq4(value_proj, scale, bias):
    C, L = 8, 7
    tr = _rand_(TokenTransformer(C, value_projection=value_proj, scale=scale, bias=bias).double())
    T = torch.randn(3, L, C, dtype=torch.float64)
    out = tr(T)
    assert out.shape == (3, L, C)

    K, Q = tr.k.weight.T, tr.q.weight.T
    s = torch.einsum("blc,bmc->blm", T @ K, T @ Q) * (C ** -0.5 if scale else 1.0)
    P = _softmax(s, dim=-1)
    V = T if not value_proj else T @ tr.wv.weight.T
    T1 = T + torch.einsum("blm,bmc->blc", P, V)             # Eq. (3)
    h = T1 @ tr.f1.weight.T + (tr.f1.bias if bias else 0.0)
    h = h.clamp_min(0.0) @ tr.f2.weight.T + (tr.f2.bias if bias else 0.0)
    torch.testing.assert_close(out, T1 + h, rtol=1e-12, atol=1e-12)  # Eq. (4)


@pytest.mark.parametrize("value_proj,scale", FLAGS)
def test_projector_eq5(value_proj, scale):
    C, L = 12, 6
    CT = 7 if value_proj else C
    pr = _rand_(Projector(C, token_channels=CT, value_projection=value_proj, scale=scale).double())
    x = _feature_map(C=C, H=4, W=9)
    T = torch.randn(2, L, CT, dtype=torch.float64)
    out = pr(x, T)
    assert out.shape == x.shape

    X = _X(x)
    s = torch.einsum("bpc,blc->bpl", X @ pr.q.weight.T, T @ pr.k.weight.T)
    s = s * (C ** -0.5 if scale else 1.0)
    P = _softmax(s, dim=-1)                                 # over the L tokens
    V = T if not value_proj else T @ pr.wv.weight.T
    X_out = X + torch.einsum("bpl,blc->bpc", P, V)
    want = X_out.reshape(2, 4, 9, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    P_mod = pr.attention_weights(x, T)
    torch.testing.assert_close(P_mod, P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P_mod.sum(dim=-1), torch.ones(2, 36, dtype=torch.float64))
    assert not torch.allclose(P_mod.sum(dim=1), torch.ones(2, L, dtype=torch.float64))


def test_vt_module_chain_shapes_and_dtype():
    # A VT module as in the paper: filter tokenizer → transformer → projector, then a recurrent one.
    B, C, H, W, L = 2, 16, 7, 5, 16
    x = torch.randn(B, C, H, W)
    t1 = FilterTokenizer(C, num_tokens=L)(x)
    t1 = TokenTransformer(C)(t1)
    y = Projector(C)(x, t1)
    t2 = RecurrentTokenizer(C)(y, t1)
    assert t1.shape == (B, L, C) and t2.shape == (B, L, C) and y.shape == (B, C, H, W)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (t1, t2, y))


def test_attention_core_override_is_used():
    calls = []

    def spy(cls):
        class Spy(cls):
            def attention(self, q, k, v):
                calls.append((cls.__name__, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
                return super().attention(q, k, v)
        return Spy

    x = torch.randn(2, 8, 3, 5)
    t = spy(FilterTokenizer)(8, num_tokens=4)(x)
    spy(RecurrentTokenizer)(8)(x, t)
    spy(TokenTransformer)(8)(t)
    spy(Projector)(8)(x, t)
    assert calls == [
        ("FilterTokenizer", (2, 1, 4, 8), (2, 1, 15, 8), (2, 1, 15, 8)),
        ("RecurrentTokenizer", (2, 1, 4, 8), (2, 1, 15, 8), (2, 1, 15, 8)),
        ("TokenTransformer", (2, 1, 4, 8), (2, 1, 4, 8), (2, 1, 4, 8)),
        ("Projector", (2, 1, 15, 8), (2, 1, 4, 8), (2, 1, 4, 8)),
    ]


def test_mismatched_token_width_needs_value_projection():
    with pytest.raises(ValueError):
        FilterTokenizer(8, token_channels=4)
    with pytest.raises(ValueError):
        Projector(8, token_channels=4)
