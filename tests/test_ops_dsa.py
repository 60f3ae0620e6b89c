"""attnplug.ops.dsa: indexer top-k, sparse attention and the indexer's KL loss."""

from __future__ import annotations

import math

import pytest
import torch

from attnplug.ops import (
    causal_attention,
    causal_attention_probs,
    dsa_indexer_kl_loss,
    dsa_indexer_topk,
    indexer_scores,
    naive_dsa_indexer_topk,
    naive_sparse_attention,
    sparse_attention,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_indexer_inputs(seed, B, T, S, HI, DI, dtype=torch.float64):
    g = gen(seed)
    q = torch.randn(B, T, HI, DI, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, DI, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, HI, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), w.to(dtype)


def make_attention_inputs(seed, B, T, S, H, Hkv, D, Dv, requires_grad=False):
    g = gen(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, Hkv, Dv, generator=g, dtype=torch.float64)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def random_indices(seed, B, T, S, topk, p_unused=0.3):
    """Distinct key positions per row, some slots −1; topk may exceed S (extra slots −1)."""
    g = gen(seed)
    order = torch.rand(B, T, S, generator=g).argsort(-1)[..., :topk]  # (B, T, min(topk, S))
    idx = order.masked_fill(torch.rand(order.shape, generator=g) < p_unused, -1)
    return torch.cat([idx, idx.new_full((B, T, max(topk - S, 0)), -1)], dim=-1)


def loop_scores(q, k, w, relu=True):
    """I[b, t, s] = Σ_h w[b,t,h]·relu(q[b,t,h]·k[b,s]), one entry at a time (no masking)."""
    B, T, HI, _ = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, S, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                dots = [float(q[b, t, h] @ k[b, s]) for h in range(HI)]
                dots = [max(x, 0.0) for x in dots] if relu else dots
                out[b, t, s] = sum(float(w[b, t, h]) * x for h, x in enumerate(dots))
    return out


def check_selection(indices, ref_scores, topk, visible):
    """indices select distinct visible keys, as many as possible, with the top reference scores.

    ref_scores: float64 (B, T, S); visible: bool (T, S).
    """
    B, T, S = ref_scores.shape
    assert indices.shape == (B, T, topk) and indices.dtype == torch.int64
    for b in range(B):
        for t in range(T):
            row = indices[b, t]
            chosen = row[row >= 0]
            n_visible = int(visible[t].sum())
            assert len(chosen) == min(topk, n_visible)
            assert (row[: len(chosen)] >= 0).all(), "valid slots come first"
            assert len(set(chosen.tolist())) == len(chosen)
            assert visible[t, chosen].all()
            best = ref_scores[b, t][visible[t]].sort(descending=True).values[: len(chosen)]
            torch.testing.assert_close(
                ref_scores[b, t, chosen].sort(descending=True).values, best, rtol=0, atol=1e-9
            )


def visible_mask(T, S):
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


def test_indexer_scores_match_the_formula():
    q, k, w = make_indexer_inputs(0, 2, 4, 6, 3, 5)
    ref = loop_scores(q, k, w)
    torch.testing.assert_close(indexer_scores(q, k, w, causal=False), ref)
    masked = indexer_scores(q, k, w)
    vis = visible_mask(4, 6).expand(2, 4, 6)
    torch.testing.assert_close(masked[vis], ref[vis])
    assert (masked[~vis] == float("-inf")).all()
    torch.testing.assert_close(
        indexer_scores(q, k, w, causal=False, relu=False), loop_scores(q, k, w, relu=False)
    )
    torch.testing.assert_close(indexer_scores(q, k, w, query_start=1, query_end=3), masked[:, 1:3])


TOPK_CASES = [  # B, T, S, HI, DI, topk, query_block
    (2, 1, 1, 2, 4, 1, 256),  # one token
    (1, 1, 9, 4, 8, 4, 256),  # one query against a cache
    (2, 20, 20, 4, 8, 5, 7),  # blocks of 7 queries
    (1, 33, 50, 2, 16, 16, 8),  # S > T
    (2, 12, 12, 3, 4, 30, 5),  # topk > S: unused slots
    (1, 130, 130, 4, 8, 64, 256),
]


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_selects_the_largest_visible_scores(case):
    B, T, S, HI, DI, topk, block = case
    q, k, w = make_indexer_inputs(sum(case), B, T, S, HI, DI)
    ref_scores = loop_scores(q, k, w) if T * S <= 400 else indexer_scores(q, k, w, causal=False)
    got = dsa_indexer_topk(q, k, w, topk=topk, query_block=block)
    check_selection(got, ref_scores, topk, visible_mask(T, S))
    check_selection(
        naive_dsa_indexer_topk(q, k, w, topk=topk), ref_scores, topk, visible_mask(T, S)
    )


def test_topk_without_causal_or_relu():
    q, k, w = make_indexer_inputs(1, 2, 10, 14, 3, 8)
    everything = torch.ones(10, 14, dtype=torch.bool)
    got = dsa_indexer_topk(q, k, w, topk=6, causal=False, relu=False, query_block=4)
    check_selection(got, loop_scores(q, k, w, relu=False), 6, everything)
    got = dsa_indexer_topk(q, k, w, topk=6, causal=False, query_block=3)
    check_selection(got, loop_scores(q, k, w), 6, everything)


def test_topk_on_float32_inputs_picks_the_float64_selection():
    q, k, w = make_indexer_inputs(2, 2, 40, 60, 4, 16)
    ref_scores = indexer_scores(q, k, w, causal=False)  # float64
    got = dsa_indexer_topk(q.float(), k.float(), w.float(), topk=10, query_block=16)
    check_selection(got, ref_scores, 10, visible_mask(40, 60))


SPARSE_CASES = [  # B, T, S, H, Hkv, D, Dv, topk, query_block
    (2, 1, 1, 2, 2, 8, 8, 1, 256),
    (1, 1, 9, 4, 2, 8, 8, 4, 256),
    (2, 30, 30, 4, 1, 8, 8, 6, 256),
    (2, 33, 50, 4, 2, 16, 12, 16, 7),
    (1, 20, 20, 2, 2, 4, 4, 25, 6),  # topk > S
]


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_attention_matches_dense_masked_reference(case):
    B, T, S, H, Hkv, D, Dv, topk, block = case
    q, k, v = make_attention_inputs(sum(case), B, T, S, H, Hkv, D, Dv)
    idx = random_indices(sum(case) + 1, B, T, S, topk)
    ref = naive_sparse_attention(q, k, v, idx)
    torch.testing.assert_close(
        sparse_attention(q, k, v, idx, query_block=block), ref, rtol=0, atol=1e-12
    )
    out32 = sparse_attention(q.float(), k.float(), v.float(), idx.int(), scale=0.5)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(
        out32.double(), naive_sparse_attention(q, k, v, idx, scale=0.5), rtol=0, atol=2e-5
    )


def test_naive_sparse_attention_matches_a_per_query_loop():
    B, T, S, H, Hkv, D, Dv = 1, 5, 7, 4, 2, 3, 2
    q, k, v = make_attention_inputs(3, B, T, S, H, Hkv, D, Dv)
    idx = random_indices(4, B, T, S, 4)
    ref = torch.zeros(B, T, H, Dv, dtype=torch.float64)
    for t in range(T):
        keys = [s for s in idx[0, t].tolist() if s >= 0]
        for h in range(H):
            j = h // (H // Hkv)
            logits = [float(q[0, t, h] @ k[0, s, j]) * D**-0.5 for s in keys]
            w = [math.exp(x) for x in logits]
            if keys:
                ref[0, t, h] = sum(wi * v[0, s, j] for wi, s in zip(w, keys, strict=True)) / sum(w)
    torch.testing.assert_close(naive_sparse_attention(q, k, v, idx), ref)


@pytest.mark.parametrize(("T", "S"), [(17, 17), (9, 23), (1, 5)])
def test_selecting_every_visible_key_equals_dense_causal_attention(T, S):
    q, k, v = make_attention_inputs(5, 2, T, S, 4, 2, 8, 8)
    iq, ik, iw = make_indexer_inputs(6, 2, T, S, 2, 4)
    idx = dsa_indexer_topk(iq, ik, iw, topk=S + 3)
    torch.testing.assert_close(
        sparse_attention(q, k, v, idx, query_block=4), causal_attention(q, k, v), rtol=0, atol=1e-12
    )


def test_unused_slots_and_slot_order_do_not_matter():
    q, k, v = make_attention_inputs(7, 2, 16, 16, 2, 1, 8, 8)
    idx = random_indices(8, 2, 16, 16, 6)
    out = sparse_attention(q, k, v, idx)
    padded = torch.cat([idx.new_full((2, 16, 3), -1), idx], dim=-1)  # (B, T, 9)
    shuffled = padded[..., torch.randperm(9, generator=gen(9))]
    torch.testing.assert_close(sparse_attention(q, k, v, shuffled), out, rtol=0, atol=1e-12)


def test_a_row_without_valid_index_gives_zeros_and_finite_gradients():
    q, k, v = make_attention_inputs(10, 1, 4, 6, 2, 2, 4, 4, requires_grad=True)
    idx = random_indices(11, 1, 4, 6, 3, p_unused=0.0)
    idx[0, 2] = -1
    out = sparse_attention(q, k, v, idx)
    assert (out[0, 2] == 0).all()
    assert (out[0, 1] != 0).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (q.grad[0, 2] == 0).all()


@pytest.mark.parametrize("B,T,S,H,Hkv,topk", [(2, 7, 9, 4, 2, 5), (1, 12, 40, 2, 1, 3),
                                               (1, 5, 5, 3, 3, 8)])
def test_gathered_and_listed_forms_agree_with_repeats_and_empty_rows(B, T, S, H, Hkv, topk):
    from attnplug.ops.dsa import _listed_block, _sparse_block

    q, k, v = make_attention_inputs(14, B, T, S, H, Hkv, 8, 6, requires_grad=True)
    g = gen(15)
    idx = torch.randint(-1, S, (B, T, topk), generator=g)  # repeats and −1 slots
    idx[0, 0] = -1  # a row with no key
    idx[-1, -1, :2] = idx[-1, -1, 2 % topk]  # a key listed more than once
    outs = []
    for block in (_sparse_block, _listed_block):
        o = block(q, k, v, idx, 0.3)
        grads = torch.autograd.grad((o * o.detach().sin()).sum(), (q, k, v))
        outs.append((o, *grads))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=1e-12), (a - b).abs().max()
    assert (outs[1][0][0, 0] == 0).all()


def test_indexer_loss_slot_is_the_kl_of_the_scores_against_the_attention():
    from attnplug.ops import causal_attention_probs, dsa_indexer_loss

    q, k, _ = make_attention_inputs(16, 2, 9, 12, 4, 2, 8, 8)
    g = gen(17)
    iq = torch.randn(2, 9, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ik = torch.randn(2, 12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    iw = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    q.requires_grad_()
    loss = dsa_indexer_loss(q, k, iq, ik, iw, softmax_scale=0.3)
    expected = dsa_indexer_kl_loss(indexer_scores(iq, ik, iw, causal=True),
                                   causal_attention_probs(q, k, softmax_scale=0.3))
    assert torch.allclose(loss, expected, rtol=1e-12)
    loss.backward()
    assert q.grad is None  # the main attention does not learn from the indexer's loss
    assert all(x.grad is not None for x in (iq, ik, iw))
    with pytest.raises(ValueError, match="causal=False is not accepted"):
        dsa_indexer_loss(q, k, iq, ik, iw, causal=False)


def test_no_queries_give_an_empty_output():
    q, k, v = make_attention_inputs(13, 1, 0, 5, 4, 2, 8, 6)
    idx = torch.zeros(1, 0, 3, dtype=torch.long)
    assert sparse_attention(q, k, v, idx).shape == (1, 0, 4, 6)


def test_sparse_gradients_match_naive_in_float64():
    q, k, v = make_attention_inputs(12, 2, 24, 30, 4, 2, 8, 6, requires_grad=True)
    idx = random_indices(13, 2, 24, 30, 10)
    w = torch.randn(2, 24, 4, 6, generator=gen(14), dtype=torch.float64)
    grads = torch.autograd.grad(
        (sparse_attention(q, k, v, idx, query_block=5) * w).sum(), (q, k, v)
    )
    refs = torch.autograd.grad((naive_sparse_attention(q, k, v, idx) * w).sum(), (q, k, v))
    for got, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def kl_loop(scores, probs, allowed):
    """Mean over rows of Σ_s p log(p / softmax(scores)) over the allowed keys, with math.log."""
    B, T, S = scores.shape
    scores, probs = scores.detach(), probs.detach()
    total = 0.0
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(S) if allowed[b, t, s]]
            if not keys:
                continue
            p = [float(probs[b, t, :, s].sum()) for s in keys]
            p = [x / sum(p) for x in p]
            lse = math.log(sum(math.exp(float(scores[b, t, s])) for s in keys))
            total += sum(
                pi * (math.log(pi) - (float(scores[b, t, s]) - lse))
                for pi, s in zip(p, keys, strict=True)
                if pi > 0
            )
    return total / (B * T)


def kl_inputs(seed, B=2, T=6, S=9, H=3):
    q, k, _ = make_attention_inputs(seed, B, T, S, H, H, 4, 4)
    probs = causal_attention_probs(q, k)  # (B, T, H, S)
    scores = torch.randn(B, T, S, generator=gen(seed + 1), dtype=torch.float64)
    return scores.requires_grad_(), probs.requires_grad_()


def test_kl_loss_matches_the_formula_causal_and_sparse():
    scores, probs = kl_inputs(15)
    allowed = visible_mask(6, 9).expand(2, 6, 9)
    loss = dsa_indexer_kl_loss(scores, probs)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(kl_loop(scores, probs, allowed), rel=1e-12)
    idx = random_indices(16, 2, 6, 9, 4)
    idx[0, 0] = -1  # a row with nothing selected contributes 0
    spare = idx.masked_fill(idx < 0, 9)  # −1 goes to a spare 10th column
    selected = torch.zeros(2, 6, 10, dtype=torch.bool).scatter(-1, spare, True)[..., :9]
    sparse_loss = dsa_indexer_kl_loss(scores, probs, indices=idx)
    expect = kl_loop(scores, probs, allowed & selected)
    assert sparse_loss.item() == pytest.approx(expect, rel=1e-12)


def test_kl_loss_is_zero_when_the_indexer_matches_and_its_gradient_is_q_minus_p():
    scores, probs = kl_inputs(17)
    p = probs.detach().sum(2)
    p = p / p.sum(-1, keepdim=True)  # (B, T, S), zero where invisible
    matched = p.clamp(min=1e-300).log()
    assert dsa_indexer_kl_loss(matched, probs).item() == pytest.approx(0.0, abs=1e-12)
    loss = dsa_indexer_kl_loss(scores, probs)
    loss.backward()
    assert probs.grad is None  # the main attention gets no gradient
    visible = visible_mask(6, 9)
    q_dist = scores.detach().masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(scores.grad, (q_dist - p) / (2 * 6), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda q, k, w: dsa_indexer_topk(q, k, w, topk=0), "topk"),
        (lambda q, k, w: dsa_indexer_topk(q, k, w, topk=2, query_block=0), "query_block"),
        (lambda q, k, w: dsa_indexer_topk(q, k[:, :3], w, topk=2), "S=3 < T=5"),
        (lambda q, k, w: dsa_indexer_topk(q, k[..., :2], w, topk=2), "k must be"),
        (lambda q, k, w: dsa_indexer_topk(q, k, w[..., :1], topk=2), "weights must be"),
        (lambda q, k, w: dsa_indexer_topk(q[0], k, w, topk=2), "q must be 4-D"),
    ],
)
def test_bad_indexer_arguments_raise_value_error(call, match):
    q, k, w = make_indexer_inputs(18, 1, 5, 7, 2, 4)
    with pytest.raises(ValueError, match=match):
        call(q, k, w)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda q, k, v, i: sparse_attention(q, k, v, i.float()), "indices must be"),
        (lambda q, k, v, i: sparse_attention(q, k, v, i[:, :2]), "indices must be"),
        (lambda q, k, v, i: sparse_attention(q, k, v, i + 7), "key position"),
        (lambda q, k, v, i: sparse_attention(q, k, v, i - 5), "key position"),
        (lambda q, k, v, i: sparse_attention(q[:, :, :3], k, v, i), "H=3"),
        (lambda q, k, v, i: sparse_attention(q, k, v[:, :4], i), "v must be"),
    ],
)
def test_bad_sparse_arguments_raise_value_error(call, match):
    q, k, v = make_attention_inputs(19, 1, 5, 7, 4, 2, 4, 4)
    idx = random_indices(20, 1, 5, 7, 3)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, idx)


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((2, 6, 9), (2, 6, 3, 8)), {}, "attn_probs must be"),
        (((2, 6, 9), (2, 6, 9)), {}, "attn_probs must be"),
        (((6, 9), (2, 6, 3, 9)), {}, "index_scores must be"),
        (((2, 6, 5), (2, 6, 3, 5)), {}, "S >= T"),
        (((2, 6, 9), (2, 6, 3, 9)), {"indices": torch.zeros(2, 5, 3, dtype=torch.long)}, "indices"),
    ],
)
def test_bad_kl_loss_arguments_raise_value_error(shapes, kwargs, match):
    scores, probs = (torch.rand(s, dtype=torch.float64) for s in shapes)
    with pytest.raises(ValueError, match=match):
        dsa_indexer_kl_loss(scores, probs, **kwargs)
