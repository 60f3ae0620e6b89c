"""The DSA kernels against float64 references: indexer top-k, sparse attention, KL loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from triton_cases import DEVICE, HAS_CUDA, assert_matches

from attnplug import TransformerConfig
from attnplug.ops.dsa import indexer_scores

FP32 = torch.float32


def _index_inputs(B: int, T: int, S: int, HI: int, DI: int, dtype: torch.dtype = FP32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(B, T, HI, DI, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, DI, device=DEVICE, dtype=dtype)
    w = torch.randn(B, T, HI, device=DEVICE, dtype=dtype)
    return q, k, w


def _visible_counts(T: int, S: int, causal: bool) -> torch.Tensor:
    t = torch.arange(T, device=DEVICE)
    return (t + (S - T) + 1).clamp(max=S) if causal else torch.full_like(t, S)  # (T,)


def _assert_top_scores(indices: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       w: torch.Tensor, topk: int, causal: bool, relu: bool) -> None:
    """Each row lists distinct visible keys, as many as it can, whose float64 scores are the
    ``topk`` largest (compared as sorted score sets: float32 may swap near-equal keys)."""
    B, T = indices.shape[:2]
    assert indices.shape == (B, T, topk) and indices.dtype == torch.long
    ref = indexer_scores(q.double(), k.double(), w.double(), causal=causal, relu=relu)  # (B,T,S)
    n_vis = _visible_counts(T, k.shape[1], causal)
    scale = ref[ref.isfinite()].abs().max().item() if ref.isfinite().any() else 1.0
    for b in range(B):
        for t in range(T):
            row = indices[b, t]
            n = min(topk, int(n_vis[t]))
            chosen = row[:n]
            assert (row[n:] == -1).all() and (chosen >= 0).all(), f"row {b},{t}: {row.tolist()}"
            assert chosen.unique().numel() == n, f"row {b},{t} repeats a key: {row.tolist()}"
            got = ref[b, t, chosen].sort().values
            best = ref[b, t].topk(n).values.sort().values
            assert got.isfinite().all(), f"row {b},{t} selects a key it cannot see"
            assert torch.allclose(got, best, atol=1e-5 * scale, rtol=0), f"row {b},{t}"


# (B, T, S, HI, DI, topk, causal, relu): one token; S > T; HI and DI not powers of two;
# not causal; no ReLU. On a GPU also bigger bf16 ones, at the blocks used there.
TOPK_CASES = [
    ((1, 1, 5, 4, 16, 3, True, True), FP32),
    ((2, 33, 40, 4, 16, 8, True, True), FP32),
    ((1, 70, 76, 3, 20, 12, True, True), FP32),
    ((1, 24, 30, 4, 16, 8, False, True), FP32),
    ((1, 24, 24, 4, 16, 8, True, False), FP32),
] + ([((2, 1500, 1600, 4, 64, 512, True, True), torch.bfloat16),
      ((1, 1024, 1024, 64, 128, 256, True, True), torch.bfloat16)] if HAS_CUDA else [])


TOPK_METHODS = ["blocked", "threshold", "radix"]


def _topk_method(name: str):
    """The score-then-select top-k through 64-bit keys (``blocked``), the served ``threshold``
    one (float32 scores, ``torch.topk`` for a threshold, then a selection kernel) or the
    experimental ``radix`` one (the threshold by a radix selection in the selection kernel)."""
    from attnplug_triton.ops.dsa import topk_blocked

    return {"blocked": topk_blocked.dsa_indexer_topk_blocked,
            "threshold": topk_blocked.dsa_indexer_topk_threshold,
            "radix": topk_blocked.dsa_indexer_topk_radix}[name]


@pytest.mark.parametrize("method", TOPK_METHODS)
@pytest.mark.parametrize("case,dtype", TOPK_CASES, ids=str)
def test_topk_selects_the_keys_with_the_highest_scores(case, dtype, method) -> None:
    B, T, S, HI, DI, topk, causal, relu = case
    q, k, w = _index_inputs(B, T, S, HI, DI, dtype)
    indices = _topk_method(method)(q, k, w, topk=topk, causal=causal, relu=relu)
    _assert_top_scores(indices, q, k, w, topk, causal, relu)


@pytest.mark.parametrize("method", TOPK_METHODS)
def test_topk_takes_every_visible_key_and_pads_with_minus_one(method) -> None:
    q, k, w = _index_inputs(2, 20, 24, 2, 16)
    indices = _topk_method(method)(q, k, w, topk=30)
    _assert_top_scores(indices, q, k, w, 30, True, True)


@settings(max_examples=12, deadline=None)
@example(T=20, extra=3, topk=10, causal=True, rows=None,
         method="blocked").via("a causal prefix of few queries")
@example(T=5, extra=0, topk=9, causal=False, rows=None,
         method="threshold").via("S < topk: every query")
@example(T=12, extra=2, topk=12, causal=True, rows=None, method="blocked").via("S = topk + 2")
@example(T=20, extra=1, topk=9, causal=True, rows=3,
         method="threshold").via("early blocks narrower than topk")
@example(T=20, extra=1, topk=9, causal=True, rows=3,
         method="radix").via("radix: early blocks narrower than topk")
@given(T=st.integers(1, 20), extra=st.integers(0, 12), topk=st.integers(1, 36),
       causal=st.booleans(), rows=st.sampled_from([1, 3, 7, None]),
       method=st.sampled_from(TOPK_METHODS))
def test_blocked_topk_rows_that_see_few_keys_list_them_in_order(T: int, extra: int, topk: int,
                                                                 causal: bool,
                                                                 rows: int | None,
                                                                 method: str) -> None:
    """Whatever T, S ≥ T, topk and query block (``rows`` queries a block; causally each block
    scores only the keys its last query sees, fewer than topk in early blocks): a query seeing
    fewer than topk keys gets exactly them, in position order, then −1 (counted on the host,
    so a wrong count shows here); the others their topk best-scoring visible keys."""
    S = T + extra
    q, k, w = _index_inputs(1, T, S, 2, 16)
    block_bytes = (1 << 30) if rows is None else rows * S * (8 if method == "blocked" else 4)
    indices = _topk_method(method)(q, k, w, topk=topk, causal=causal, block_bytes=block_bytes)
    _assert_top_scores(indices, q, k, w, topk, causal, True)
    visible = _visible_counts(T, S, causal)
    slots = torch.arange(topk, device=DEVICE)
    few = visible < topk
    expected = torch.where(slots < visible[few, None], slots, -1)
    assert torch.equal(indices[0, few], expected)


_SCORE_VALUES = [float("-inf"), -3.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.25, 1.0, 2.0, 1e30]


def _oracle_selection(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Per row of ``scores [n, width]``: the positions of the ``topk`` largest scores other than
    −inf (equal scores, −0.0 and +0.0 among them: the earlier first), in position order, then
    −1 — by Python's sort."""
    out = []
    for row in scores.tolist():
        ranked = sorted((s for s, x in enumerate(row) if x != float("-inf")),
                        key=lambda s: (-row[s], s))
        chosen = sorted(ranked[:topk])
        out.append(chosen + [-1] * (topk - len(chosen)))
    return torch.tensor(out, dtype=torch.long)


@settings(max_examples=25, deadline=None)
@example(rows=[[-0.0, 0.0, -0.0, 0.0]], topk=3).via("signed zeros tie")
@example(rows=[[float("-inf")] * 5], topk=2).via("nothing visible")
@example(rows=[[1.0, float("-inf"), 2.0]], topk=5).via("fewer visible than topk")
@given(rows=st.lists(st.lists(st.sampled_from(_SCORE_VALUES) | st.floats(-1e3, 1e3, width=32),
                              min_size=1, max_size=40), min_size=1, max_size=4),
       topk=st.integers(1, 45))
def test_radix_selection_matches_a_sorted_selection(rows: list[list[float]], topk: int) -> None:
    """The radix selection kernel on any float32 scores (negative, ±0, tiny, huge, −inf for
    keys not seen, many ties): exactly the positions a full sort would pick, in order; and the
    same as the ``torch.topk`` threshold's selection kernel."""
    from attnplug_triton.ops.dsa import topk_blocked as tb

    width = max(len(r) for r in rows)
    scores = torch.tensor([r + [float("-inf")] * (width - len(r)) for r in rows],
                          dtype=torch.float32, device=DEVICE)[None]  # (1, n, width)
    n = scores.shape[1]
    got = torch.empty(1, n, topk, dtype=torch.long, device=DEVICE)
    tb.select_rows(scores, got, topk, radix=True)
    assert torch.equal(got[0].cpu(), _oracle_selection(scores[0].cpu(), topk))
    by_threshold = torch.empty_like(got)
    tb.select_rows(scores, by_threshold, topk, radix=False)
    assert torch.equal(got, by_threshold)


@pytest.mark.parametrize("method", TOPK_METHODS)
def test_blocked_topk_takes_queries_in_blocks_and_breaks_ties_by_position(method) -> None:
    topk_fn = _topk_method(method)
    # A buffer of 3 query rows (3 · S · 8 or 4 bytes): 24 queries in 8 blocks, same selection.
    q, k, w = _index_inputs(1, 24, 30, 4, 16)
    whole = topk_fn(q, k, w, topk=8)
    parts = topk_fn(q, k, w, topk=8, block_bytes=3 * 30 * (8 if method == "blocked" else 4))
    assert torch.equal(whole.sort(-1).values, parts.sort(-1).values)
    _assert_top_scores(parts, q, k, w, 8, True, True)
    # Coarse scores: many ties at the k-th score; then all 0: the first visible keys, −1 after.
    q, k, w = q.round(), k.round(), torch.ones_like(w)
    _assert_top_scores(topk_fn(q, k, w, topk=8), q, k, w, 8, True, True)
    indices = topk_fn(q, k, torch.zeros_like(w), topk=8)  # (1, 24, 8)
    slots = torch.arange(8, device=DEVICE)
    first = torch.where(slots < _visible_counts(24, 30, True)[:, None], slots, -1)  # (24, 8)
    chosen = torch.where(indices[0] < 0, 99, indices[0]).sort(-1).values
    assert torch.equal(torch.where(chosen == 99, -1, chosen), first)


def _selection(B: int, T: int, S: int, topk: int, drop: float) -> torch.Tensor:
    """Random distinct keys per query (any key, no causal rule), a fraction of slots −1."""
    idx = torch.stack([torch.randperm(S, device=DEVICE)[:topk] for _ in range(B * T)])
    idx = idx.view(B, T, topk)
    return idx.masked_fill(torch.rand(idx.shape, device=DEVICE) < drop, -1)


def _run(fn, q, k, v, indices, do, **kwargs) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, indices, **kwargs)
    o.backward(do)
    return [o] + [x.grad for x in leaves]


# (B, T, S, H, Hkv, D, Dv, topk): one token; GQA H=4/Hkv=2; S > T; topk > BLOCK_N; D != Dv;
# MQA in float16 (with int32 indices). On a GPU also a bigger bf16 one.
SPARSE_CASES = [
    ((1, 1, 9, 4, 2, 16, 16, 5), FP32),
    ((2, 17, 24, 4, 2, 16, 16, 12), FP32),
    ((1, 70, 80, 4, 2, 40, 24, 72), FP32),
    ((1, 33, 40, 4, 1, 16, 16, 20), torch.float16),
] + ([((1, 1024, 1100, 16, 1, 128, 128, 512), torch.bfloat16)] if HAS_CUDA else [])


@pytest.mark.parametrize("case,dtype", SPARSE_CASES, ids=str)
def test_sparse_attention_matches_float64_reference(case, dtype) -> None:
    from attnplug_triton.ops.dsa.naive import naive_sparse_attention
    from attnplug_triton.ops.dsa.sparse import sparse_attention

    B, T, S, H, Hkv, D, Dv, topk = case
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, Hkv, Dv, device=DEVICE, dtype=dtype)
    do = torch.randn(B, T, H, Dv, device=DEVICE, dtype=dtype)
    indices = _selection(B, T, S, topk, drop=0.3)
    indices[0, T // 2] = -1  # a query with no key at all: zero output, zero gradient
    if dtype == torch.float16:
        indices = indices.int()
    outs = _run(sparse_attention, q, k, v, indices, do, scale=0.3)
    refs = _run(naive_sparse_attention, q.double(), k.double(), v.double(), indices,
                do.double(), scale=0.3)
    for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, refs, strict=True):
        assert out.dtype == dtype
        assert_matches(f"{name} {case}", out, ref, dtype)
    assert (outs[0][0, T // 2] == 0).all() and (outs[1][0, T // 2] == 0).all()


@pytest.mark.parametrize("T", [1, 33])
def test_topk_of_every_visible_key_then_sparse_attention_is_dense_causal(T: int) -> None:
    from attnplug_triton.ops.attention.naive import naive_attention
    from attnplug_triton.ops.dsa.sparse import sparse_attention
    from attnplug_triton.ops.dsa.topk_blocked import dsa_indexer_topk_blocked

    S, H, Hkv, D = T + 6, 4, 2, 16
    iq, ik, iw = _index_inputs(1, T, S, 2, 16)
    indices = dsa_indexer_topk_blocked(iq, ik, iw, topk=S)  # every visible key, in some order
    q = torch.randn(1, T, H, D, device=DEVICE)
    k = torch.randn(1, S, Hkv, D, device=DEVICE)
    v = torch.randn(1, S, Hkv, D, device=DEVICE)
    do = torch.randn(1, T, H, D, device=DEVICE)
    outs = _run(sparse_attention, q, k, v, indices, do)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_attention(*leaves)
    ref.backward(do.double())
    for name, out, r in zip(("o", "dq", "dk", "dv"), outs, [ref] + [x.grad for x in leaves],
                            strict=True):
        assert_matches(f"{name} T={T}", out, r, FP32)


# (B, T, S, H, Hkv, D, HI, DI, causal, relu)
KL_CASES = [
    (1, 1, 5, 4, 2, 16, 4, 16, True, True),
    (2, 17, 20, 4, 2, 16, 4, 16, True, True),
    (1, 70, 70, 4, 2, 24, 3, 20, True, True),
    (1, 33, 40, 4, 1, 16, 4, 16, False, True),
    (1, 33, 33, 4, 4, 16, 4, 16, True, False),
]


@pytest.mark.parametrize("case", KL_CASES, ids=str)
def test_indexer_kl_loss_and_its_gradients_match_float64(case) -> None:
    from attnplug_triton.ops.dsa.kl import indexer_kl_loss
    from attnplug_triton.ops.dsa.naive import naive_indexer_kl_loss

    B, T, S, H, Hkv, D, HI, DI, causal, relu = case
    q = torch.randn(B, T, H, D, device=DEVICE)
    k = torch.randn(B, S, Hkv, D, device=DEVICE)
    index = _index_inputs(B, T, S, HI, DI)
    ours = [x.clone().requires_grad_() for x in index]
    refs = [x.double().requires_grad_() for x in index]
    loss = indexer_kl_loss(q, k, *ours, softmax_scale=0.4, causal=causal, relu=relu)
    ref = naive_indexer_kl_loss(q.double(), k.double(), *refs, softmax_scale=0.4,
                                causal=causal, relu=relu)
    loss.backward()
    ref.backward()
    assert loss.dtype == FP32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for name, x, r in zip(("d index_q", "d index_k", "d weights"), ours, refs, strict=True):
        assert_matches(f"{name} {case}", x.grad, r.grad, FP32)


def _dsa_config(**overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  experimental_attention_variant="dsa", dsa_indexer_n_heads=3,
                  dsa_indexer_head_dim=16, dsa_indexer_topk=16, dsa_indexer_loss_coeff=0.3)
    fields.update(overrides)
    return TransformerConfig(**fields)


def test_kl_loss_is_the_loss_the_dsa_layer_records() -> None:
    from attnplug_triton.ops.dsa.kl import indexer_kl_loss
    from attnplug_triton.ops.dsa.naive import naive_indexer_kl_loss

    from attnplug.backends.local import LocalSpecProvider
    from attnplug.spec import build_module
    from attnplug.specs import get_dsa_module_spec_for_backend

    cfg = _dsa_config()
    layer = build_module(get_dsa_module_spec_for_backend(cfg, LocalSpecProvider()), config=cfg,
                         layer_number=1).to(DEVICE)
    x = 8 * torch.randn(2, 11, 32, device=DEVICE)  # peaked distributions, not near-uniform ones
    layer(x)
    recorded = layer.core_attention.aux_losses["dsa_indexer"]
    q, k, _, _ = layer.project_qkv(x)
    index = layer.core_attention.indexer.project(x.detach())
    coeff = cfg.dsa_indexer_loss_coeff
    ours = coeff * indexer_kl_loss(q, k, *index)
    exact = coeff * naive_indexer_kl_loss(q.double(), k.double(), *(x.double() for x in index))
    assert abs(recorded.item() - exact.item()) <= 1e-5 * exact.item()  # the layer's loss is
    assert abs(ours.item() - exact.item()) <= 1e-5 * exact.item()  # this function's
    params = list(layer.core_attention.indexer.parameters())
    expected = torch.autograd.grad(recorded, params)
    for p, got, want in zip(params, torch.autograd.grad(ours, params), expected, strict=True):
        assert_matches(f"grad of {tuple(p.shape)}", got, want, FP32)


def test_triton_dsa_layer_matches_the_local_one() -> None:
    from attnplug_triton.provider import TritonSpecProvider

    from attnplug.backends.local import LocalSpecProvider
    from attnplug.spec import build_module
    from attnplug.specs import get_dsa_module_spec_for_backend

    cfg = _dsa_config()  # topk >= T: the selection is tested above, not here (ties at 0)
    layers = [build_module(get_dsa_module_spec_for_backend(cfg, provider), config=cfg,
                           layer_number=1).to(DEVICE)
              for provider in (LocalSpecProvider(), TritonSpecProvider())]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 12, 32, device=DEVICE)
    outs = [layer(x) for layer in layers]
    grads = [torch.autograd.grad(o.square().sum(), list(layer.parameters()), allow_unused=True)
             for o, layer in zip(outs, layers, strict=True)]
    assert_matches("y", outs[1], outs[0], FP32)
    for (name, _), got, want in zip(layers[0].named_parameters(), grads[1], grads[0],
                                    strict=True):
        if want is None:  # the indexer: trained by its KL loss only
            assert got is None, name
        else:
            assert_matches(name, got, want, FP32)
    # the indexer's KL loss, from the fused kernel (dsa_indexer_loss slot) in the triton layer;
    # peaked attention (a larger input), so that the KL is not a float32 cancellation of ~0
    x = 8 * torch.randn(2, 12, 32, device=DEVICE)
    for layer in layers:
        layer(x)
    losses = [layer.core_attention.aux_losses["dsa_indexer"] for layer in layers]
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * losses[0].item()
    indexers = [list(layer.core_attention.indexer.parameters()) for layer in layers]
    for got, want in zip(torch.autograd.grad(losses[1], indexers[1]),
                         torch.autograd.grad(losses[0], indexers[0]), strict=True):
        assert_matches("indexer grad", got, want, FP32)


def test_provider_serves_the_dsa_kernels_by_default() -> None:
    from attnplug_triton.ops.dsa.kl import indexer_kl_loss
    from attnplug_triton.ops.dsa.sparse import sparse_attention
    from attnplug_triton.ops.dsa.topk_blocked import dsa_indexer_topk_threshold
    from attnplug_triton.provider import TritonSpecProvider

    provider = TritonSpecProvider()
    assert provider.dsa_indexer_topk() is dsa_indexer_topk_threshold
    assert provider.sparse_attention() is sparse_attention
    assert provider.dsa_indexer_loss() is indexer_kl_loss
    for slot in ("dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss"):
        assert provider.served_by(slot) == "triton"  # by default, since session 7


def test_an_indexer_head_dim_the_kernels_do_not_take_gets_local_dsa_ops(caplog) -> None:
    """dsa_indexer_head_dim above 256: the DSA slots come from local (logged, and the plan says
    so), the rest stays triton; at 256 and below the provider is unchanged."""
    import logging

    from attnplug_triton.provider import TritonSpecProvider

    from attnplug.specs import describe_layer_spec, get_dsa_module_spec_for_backend

    provider = TritonSpecProvider()
    assert provider.configure(_dsa_config(dsa_indexer_head_dim=256)) is provider
    wide = _dsa_config(dsa_indexer_head_dim=512)
    with caplog.at_level(logging.INFO, logger="attnplug_triton.provider"):
        configured = provider.configure(wide)
    assert "dsa_indexer_head_dim=512" in caplog.text
    for slot in ("dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss"):
        assert configured.served_by(slot) == "local"
    assert configured.served_by("core_attention") == "triton"
    assert configured.served_by("gated_delta_rule") == "triton"
    slots = describe_layer_spec(get_dsa_module_spec_for_backend(wide, configured))
    dsa_slots = ("dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss")
    assert {v["backend"] for k, v in slots.items() if k.endswith(dsa_slots)} == {"local"}


@pytest.mark.parametrize("bad,message", [
    (lambda q, k, w: (q, k[..., :8], w), "k must be"),
    (lambda q, k, w: (q, k[:, :3], w), "S=3 < T=5"),
    (lambda q, k, w: (q, k, w[..., :1]), "weights must be"),
    (lambda q, k, w: (q.double(), k.double(), w.double()), "float64"),
])
@pytest.mark.parametrize("method", TOPK_METHODS)
def test_topk_bad_arguments_are_named(bad, message, method) -> None:
    topk_fn = _topk_method(method)
    q, k, w = _index_inputs(1, 5, 5, 2, 16)
    with pytest.raises(ValueError, match=message):
        topk_fn(*bad(q, k, w), topk=2)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        topk_fn(q, k, w, topk=0)
    with pytest.raises(ValueError, match="block_bytes must be a positive int"):
        topk_fn(q, k, w, topk=2, block_bytes=0)


def test_sparse_attention_bad_arguments_are_named() -> None:
    from attnplug_triton.ops.dsa.sparse import sparse_attention

    q = torch.randn(1, 5, 4, 16, device=DEVICE)
    k = torch.randn(1, 6, 2, 16, device=DEVICE)
    idx = torch.zeros(1, 5, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        sparse_attention(q[:, :, :3], k, k, idx)
    with pytest.raises(ValueError, match="indices must be"):
        sparse_attention(q, k, k, idx[:, :4])
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_attention(q, k, k, idx.float())
