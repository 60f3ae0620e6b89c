"""attnplug.ops.attention against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from attnplug.ops import causal_attention, causal_attention_probs, naive_causal_attention


def make_qkv(seed, B, T, S, H, Hkv, D, Dv, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, S, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, S, Hkv, Dv, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def loop_reference(q, k, v, scale=None):
    """One query and one head at a time, with math.exp: an oracle independent of the ops."""
    B, T, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D**-0.5 if scale is None else scale
    o = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                j = h // (H // Hkv)
                visible = range(t + S - T + 1)
                logits = [float(q[b, t, h] @ k[b, s, j]) * scale for s in visible]
                top = max(logits)
                w = [math.exp(x - top) for x in logits]
                o[b, t, h] = sum(wi * v[b, s, j] for wi, s in zip(w, visible, strict=True)) / sum(w)
    return o


SHAPES = [  # B, T, S, H, Hkv, D, Dv
    (2, 1, 1, 2, 2, 8, 8),  # one token
    (1, 1, 7, 4, 2, 8, 8),  # one query against a cache
    (2, 63, 63, 4, 1, 16, 16),  # multi-query
    (2, 65, 130, 4, 2, 16, 12),  # S > T, grouped, Dv != D
    (1, 130, 130, 2, 2, 8, 4),
]


def test_naive_attention_matches_a_per_query_loop():
    q, k, v = make_qkv(0, 2, 5, 9, 4, 2, 3, 5)
    torch.testing.assert_close(naive_causal_attention(q, k, v), loop_reference(q, k, v))
    torch.testing.assert_close(
        naive_causal_attention(q, k, v, softmax_scale=0.7), loop_reference(q, k, v, 0.7)
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_causal_attention_matches_float64_reference(shape):
    q, k, v = make_qkv(1, *shape)
    ref = naive_causal_attention(q, k, v)
    torch.testing.assert_close(causal_attention(q, k, v), ref, rtol=0, atol=1e-12)
    q32, k32, v32 = (x.float() for x in (q, k, v))
    out32 = causal_attention(q32, k32, v32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=2e-5)


def test_bfloat16_inputs_stay_bfloat16_and_close():
    q, k, v = make_qkv(2, 2, 33, 40, 4, 2, 16, 16)
    ref = naive_causal_attention(q, k, v)
    out = causal_attention(*(x.bfloat16() for x in (q, k, v)))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-2)


def test_softmax_scale_is_applied():
    q, k, v = make_qkv(3, 1, 17, 20, 2, 1, 8, 8)
    out = causal_attention(q, k, v, softmax_scale=0.2)
    torch.testing.assert_close(out, naive_causal_attention(q, k, v, softmax_scale=0.2))
    assert not torch.allclose(out, causal_attention(q, k, v))


def test_gradients_match_naive_in_float64():
    q, k, v = make_qkv(4, 2, 20, 27, 4, 2, 8, 6, requires_grad=True)
    w = torch.randn(2, 20, 4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((causal_attention(q, k, v) * w).sum(), (q, k, v))
    refs = torch.autograd.grad((naive_causal_attention(q, k, v) * w).sum(), (q, k, v))
    for got, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_probs_are_causal_with_offset_and_normalised():
    q, k, _ = make_qkv(6, 2, 6, 10, 2, 1, 4, 4)
    p = causal_attention_probs(q, k)  # (B, T, H, S)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6, 2, dtype=torch.float64))
    t = torch.arange(6)[:, None, None]
    s = torch.arange(10)[None, None, :]
    assert (p.masked_select((s > t + 4).expand_as(p)) == 0).all()
    assert (p.masked_select((s <= t + 4).expand_as(p)) > 0).all()


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((1, 5, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "S=4"),  # fewer keys than queries
        (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "H=3"),  # heads not grouped
        (((1, 4, 2, 8), (1, 4, 2, 6), (1, 4, 2, 8)), "k must be"),  # D differs
        (((1, 4, 2, 8), (1, 4, 2, 8), (1, 5, 2, 8)), "v must be"),
        (((4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "q must be 4-D"),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_argument(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        causal_attention(q, k, v)


def test_mixed_dtypes_raise_value_error():
    q, k, v = make_qkv(7, 1, 3, 3, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="dtype"):
        causal_attention(q.float(), k, v)
