"""DeepSeek Sparse Attention (DSA): the indexer's top-k and the sparse attention (DESIGN §8).

Index score of query ``t`` for key ``s``: ``I[t, s] = Σ_h weights[t, h] · relu(q[t, h] · k[s])``;
under the causal rule key ``s`` is visible to query ``t`` when ``s <= t + S − T``. The sparse
attention of a query is a softmax over the keys its row of ``indices`` selects (``−1`` slots are
ignored; every head of a query uses the same keys).

The fast forms work in query blocks, so memory is ``O(block · S)`` for the indexer and
``O(T · topk · heads · dim)`` for the attention; the ``naive_`` forms build the dense ``[T, S]``
scores and masks and serve as test references. Scores are computed in float32 for low-precision
inputs (float64 stays float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnplug.ops.attention import causal_mask

__all__ = [
    "indexer_scores",
    "dsa_indexer_topk",
    "sparse_attention",
    "dsa_indexer_kl_loss",
    "dsa_indexer_loss",
    "naive_dsa_indexer_topk",
    "naive_sparse_attention",
]

_QUERY_BLOCK = 256
_LISTED_RATIO = 12  # sparse_attention: dense products over the keys when S <= 12·topk


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_block(query_block: int) -> None:
    if not isinstance(query_block, int) or query_block < 1:
        raise ValueError(f"query_block must be a positive int; got {query_block!r}")


# --------------------------------------------------------------------------------------------
# Indexer


def _check_indexer_args(q: Tensor, k: Tensor, weights: Tensor, causal: bool) -> None:
    """Raise ``ValueError`` unless q[B,T,HI,DI], k[B,S,DI], weights[B,T,HI] fit together."""
    for name, x, dims in (("q", q, 4), ("k", k, 3), ("weights", weights, 3)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if x.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D; got shape {tuple(x.shape)}")
    B, T, HI, DI = q.shape
    if k.shape[0] != B or k.shape[2] != DI:
        raise ValueError(f"k must be [B={B}, S, DI={DI}] (one key per token); got {tuple(k.shape)}")
    if weights.shape != (B, T, HI):
        raise ValueError(f"weights must be [B, T, HI] = {(B, T, HI)}; got {tuple(weights.shape)}")
    if causal and k.shape[1] < T:
        raise ValueError(
            f"with causal=True, k needs at least as many positions as q: S={k.shape[1]} < T={T}"
        )


def _block_scores(q: Tensor, k: Tensor, weights: Tensor, relu: bool) -> Tensor:
    """``Σ_h weights[h]·relu(q[h]·k)`` for a block of queries, one head at a time.

    q: (B, t, HI, DI); k: (B, S, DI); weights: (B, t, HI) -> scores (B, t, S).
    """
    kt = k.transpose(1, 2)  # (B, DI, S)
    scores = None
    # unbind, not indexing: its gradient is one stack, not a zero-filled full-size tensor a head
    for q_h, w_h in zip(q.unbind(2), weights.unbind(2), strict=True):
        logits = q_h @ kt  # (B, t, S)
        if relu:
            logits = logits.clamp(min=0)
        term = w_h[..., None] * logits  # (B, t, S)
        scores = term if scores is None else scores + term
    return scores


def indexer_scores(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    causal: bool = True,
    relu: bool = True,
    query_start: int = 0,
    query_end: int | None = None,
) -> Tensor:
    """The indexer scores of queries ``query_start:query_end``, densely over the keys.

    Args:
        q: indexer queries ``[B, T, HI, DI]``.
        k: indexer keys ``[B, S, DI]`` (one per token, shared by the HI heads).
        weights: per-head weights ``[B, T, HI]``.
        causal: set invisible keys (``s > t + S − T``) to ``−inf``.
        relu: apply ReLU to ``q·k`` before weighting (DeepSeek's indexer does).
        query_start, query_end: the block of queries to score (default all).

    Returns:
        ``scores[B, query_end − query_start, S]`` in float32 (float64 for float64 q).
        Differentiable in q, k and weights.

    Raises:
        ValueError: shapes that do not fit, or ``causal`` with ``S < T``.
    """
    _check_indexer_args(q, k, weights, causal)
    T, S = q.shape[1], k.shape[1]
    end = T if query_end is None else query_end
    dtype = _compute_dtype(q)
    scores = _block_scores(
        q[:, query_start:end].to(dtype), k.to(dtype), weights[:, query_start:end].to(dtype), relu
    )  # (B, t, S)
    if causal:
        visible = causal_mask(T, S, q.device)[query_start:end]  # (t, S)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _topk_of_scores(scores: Tensor, topk: int, visible: Tensor | None) -> Tensor:
    """Indices of the ``topk`` largest scores per row, ``−1`` where fewer keys are visible.

    scores: (B, t, S) with ``−inf`` at invisible keys; visible: (t, S) or None (all visible).
    """
    B, t, S = scores.shape
    idx = scores.topk(min(topk, S), dim=-1).indices  # (B, t, min(topk, S))
    if visible is not None:
        n_visible = visible.sum(-1)  # (t,)
        slot = torch.arange(idx.shape[-1], device=idx.device)  # (min(topk, S),)
        idx = idx.masked_fill(slot >= n_visible[:, None], -1)  # topk sorts visible keys first
    if topk > S:
        idx = torch.cat([idx, idx.new_full((B, t, topk - S), -1)], dim=-1)  # (B, t, topk)
    return idx


def _check_topk(topk: int) -> None:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"topk must be a positive int; got {topk!r}")


def dsa_indexer_topk(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    topk: int,
    causal: bool = True,
    relu: bool = True,
    query_block: int = _QUERY_BLOCK,
) -> Tensor:
    """The ``topk`` keys with the largest indexer score for each query, in query blocks.

    Args:
        q: ``[B, T, HI, DI]``; k: ``[B, S, DI]``; weights: ``[B, T, HI]``.
        topk: keys to select per query.
        causal: only keys ``s <= t + S − T`` are candidates (needs ``S >= T``).
        relu: as in :func:`indexer_scores`.
        query_block: queries scored at a time; peak memory is ``O(B · query_block · S)``.

    Returns:
        ``indices[B, T, topk]`` int64, by decreasing score; ``−1`` in the slots beyond the number
        of visible keys. Ties between equal scores are broken arbitrarily.

    Raises:
        ValueError: bad shapes, ``topk`` or ``query_block``, or ``causal`` with ``S < T``.
    """
    _check_indexer_args(q, k, weights, causal)
    _check_topk(topk)
    _check_block(query_block)
    T, S = q.shape[1], k.shape[1]
    mask = causal_mask(T, S, q.device) if causal else None  # (T, S)
    blocks = []
    with torch.no_grad():
        for start in range(0, T, query_block):
            end = min(start + query_block, T)
            scores = indexer_scores(
                q, k, weights, causal=causal, relu=relu, query_start=start, query_end=end
            )  # (B, t, S)
            blocks.append(_topk_of_scores(scores, topk, None if mask is None else mask[start:end]))
    if not blocks:
        return torch.empty((q.shape[0], 0, topk), dtype=torch.long, device=q.device)
    return torch.cat(blocks, dim=1)  # (B, T, topk)


def naive_dsa_indexer_topk(
    q: Tensor, k: Tensor, weights: Tensor, *, topk: int, causal: bool = True, relu: bool = True
) -> Tensor:
    """:func:`dsa_indexer_topk` from the dense ``[B, T, S]`` scores (a test reference)."""
    _check_indexer_args(q, k, weights, causal)
    _check_topk(topk)
    dtype = _compute_dtype(q)
    logits = torch.einsum("bthd,bsd->bths", q.to(dtype), k.to(dtype))  # (B, T, HI, S)
    if relu:
        logits = logits.clamp(min=0)
    scores = (weights.to(dtype)[..., None] * logits).sum(2)  # (B, T, S)
    mask = causal_mask(q.shape[1], k.shape[1], q.device) if causal else None  # (T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return _topk_of_scores(scores, topk, mask)


# --------------------------------------------------------------------------------------------
# Sparse attention


def _check_sparse_args(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> None:
    """Raise ``ValueError`` unless q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv], indices[B,T,topk]
    fit together and every index is −1 or a key position."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D floating-point tensor (batch, seq, heads, dim)")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, S, Hkv, D={D}]; got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [B, S, Hkv, Dv] matching k {tuple(k.shape)}; got {tuple(v.shape)}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"the query heads H={H} (q) must be a multiple of the key/value heads Hkv={Hkv} (k, v)"
        )
    _check_indices(indices, B, T, S)


def _check_indices(indices: Tensor, B: int, T: int, S: int) -> None:
    """Raise ``ValueError`` unless ``indices`` is an integer [B, T, topk] of −1 or key positions."""
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError("indices must be an int32 or int64 tensor [B, T, topk]")
    if indices.dim() != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"indices must be [B={B}, T={T}, topk]; got {tuple(indices.shape)}")
    if indices.numel() and (indices.min() < -1 or indices.max() >= S):
        raise ValueError(f"indices must be -1 (unused) or a key position in [0, S={S})")


def _sparse_block(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Attention of a block of queries over their selected keys.

    q: (B, t, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, Dv); idx: (B, t, topk) -> o (B, t, H, Dv).
    """
    B, t, H, D = q.shape
    Hkv = k.shape[2]
    valid = idx >= 0  # (B, t, topk)
    rows = torch.arange(B, device=idx.device)[:, None, None]  # (B, 1, 1)
    safe = idx.clamp(min=0)  # (B, t, topk)
    kg, vg = k[rows, safe], v[rows, safe]  # (B, t, topk, Hkv, D), (B, t, topk, Hkv, Dv)
    qg = q.reshape(B, t, Hkv, H // Hkv, D)  # (B, t, Hkv, G, D)
    scores = torch.einsum("btjgd,btkjd->btjgk", qg, kg) * scale  # (B, t, Hkv, G, topk)
    keep = valid[:, :, None, None, :]  # (B, t, 1, 1, topk)
    any_valid = valid.any(-1)[:, :, None, None, None]  # (B, t, 1, 1, 1)
    # Rows with no valid key get a harmless uniform softmax, zeroed below (no NaN, no NaN grads).
    scores = scores.masked_fill(~keep & any_valid, float("-inf")).masked_fill(~any_valid, 0.0)
    p = scores.softmax(-1) * keep  # (B, t, Hkv, G, topk)
    o = torch.einsum("btjgk,btkje->btjge", p, vg)  # (B, t, Hkv, G, Dv)
    return o.reshape(B, t, H, -1)  # (B, t, H, Dv)


def _listed_block(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """:func:`_sparse_block` through dense products over all ``S`` keys: each key's number of
    listings in the row enters as a ``log(count)`` bias (``−inf`` for a key not listed), which
    is the gathered softmax exactly, repeated keys included. Cheaper than gathering when the
    selection is a large part of the keys (products over ``S`` run as large GEMMs; gathering
    and its scatter-add gradient do not).

    q: (B, t, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, Dv); idx: (B, t, topk) -> o (B, t, H, Dv).
    """
    B, t, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    valid = idx >= 0  # (B, t, topk)
    counts = q.new_zeros((B, t, S)).scatter_add_(2, idx.clamp(min=0), valid.to(q.dtype))
    any_valid = valid.any(-1)  # (B, t)
    # Rows with no valid key get a harmless uniform softmax, zeroed below (no NaN, no NaN grads).
    bias = counts.log().masked_fill(~any_valid[..., None], 0.0)  # (B, t, S)
    qg = q.reshape(B, t, Hkv, H // Hkv, D)  # (B, t, Hkv, G, D)
    scores = torch.einsum("btjgd,bsjd->btjgs", qg, k) * scale + bias[:, :, None, None, :]
    p = scores.softmax(-1) * any_valid[:, :, None, None, None]  # (B, t, Hkv, G, S)
    o = torch.einsum("btjgs,bsje->btjge", p, v)  # (B, t, Hkv, G, Dv)
    return o.reshape(B, t, H, -1)  # (B, t, H, Dv)


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    scale: float | None = None,
    query_block: int = _QUERY_BLOCK,
) -> Tensor:
    """Softmax attention of each query over its selected keys only: by gathering them, or,
    when they are at least a twelfth of the keys, by dense products with the keys not selected
    masked out (the same function, faster there).

    Args:
        q: ``[B, T, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``H % Hkv == 0``).
        indices: ``[B, T, topk]`` int32/int64 key positions shared by all heads of a query;
            ``−1`` marks an unused slot. Positions in a row should be distinct (a repeated key
            counts twice). No causal rule is applied here: the indices decide.
        scale: multiplies ``q·k``; default ``D ** -0.5``.
        query_block: queries gathered at a time (memory ``O(B·block·topk·Hkv·(D + Dv))``).

    Returns:
        ``o[B, T, H, Dv]`` in q's dtype (computed in float32, or float64); zeros for a query whose
        row has no valid index. Differentiable in q, k and v.

    Raises:
        ValueError: shapes that do not fit, or an index outside ``[−1, S)``.
    """
    _check_sparse_args(q, k, v, indices)
    _check_block(query_block)
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    idx = indices.long()
    if T == 0:
        return q.new_zeros((B, 0, H, v.shape[-1]))
    # Gathering pays per selected key, dense products per key: the listed form when the
    # selection is at least 1/12 of the keys (this CPU: 2.5-9x faster at S = 8·topk, even at 16).
    block = _listed_block if k.shape[1] <= _LISTED_RATIO * idx.shape[-1] else _sparse_block
    blocks = [  # split, not slicing: one gradient concatenation rather than one per block
        block(q_block, kc, vc, idx_block, scale)
        for q_block, idx_block in zip(
            qc.split(query_block, dim=1), idx.split(query_block, dim=1), strict=True
        )
    ]
    return torch.cat(blocks, dim=1).to(q.dtype)  # (B, T, H, Dv)


def _selection_mask(indices: Tensor, S: int) -> Tensor:
    """Dense boolean ``[B, T, S]``: True where the key is in the query's row of ``indices``."""
    B, T, _ = indices.shape
    slots = indices.long().masked_fill(indices < 0, S)  # (B, T, topk), −1 -> a spare column
    mask = torch.zeros((B, T, S + 1), dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, slots, True)[..., :S]  # (B, T, S)


def naive_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float | None = None
) -> Tensor:
    """:func:`sparse_attention` through a dense ``[B, T, S]`` mask (a test reference; distinct
    indices per row assumed)."""
    _check_sparse_args(q, k, v, indices)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    kh = k.to(dtype).repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
    vh = v.to(dtype).repeat_interleave(H // Hkv, dim=2)  # (B, S, H, Dv)
    scores = torch.einsum("bthd,bshd->bths", q.to(dtype), kh) * scale  # (B, T, H, S)
    selected = _selection_mask(indices, k.shape[1])[:, :, None, :]  # (B, T, 1, S)
    p = scores.masked_fill(~selected, float("-inf")).softmax(-1)  # (B, T, H, S)
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing selected
    return torch.einsum("bths,bshe->bthe", p, vh).to(q.dtype)  # (B, T, H, Dv)


# --------------------------------------------------------------------------------------------
# Indexer training loss


def dsa_indexer_kl_loss(
    index_scores: Tensor,
    attn_probs: Tensor,
    *,
    causal: bool = True,
    indices: Tensor | None = None,
) -> Tensor:
    """KL(p ‖ softmax(index scores)) per query row, averaged over the rows: the indexer's loss.

    ``p`` is the main attention's probabilities summed over heads and L1-normalised per row,
    detached (the main model does not learn from this loss). Both distributions are restricted
    to the allowed keys: the visible ones under ``causal`` (``s <= t + S − T``) and, when
    ``indices`` is given (DeepSeek's sparse training stage), the selected ones.

    Args:
        index_scores: raw indexer scores ``[B, T, S]`` (``Σ_h w·relu(q·k)``, e.g. from
            :func:`indexer_scores` with ``causal=False``; ``−inf`` entries are fine where masked).
        attn_probs: main-attention probabilities ``[B, T, H, S]`` (e.g. from
            :func:`attnplug.ops.attention.causal_attention_probs`); only their head sum matters.
        causal: restrict to visible keys.
        indices: optional ``[B, T, topk]`` selected keys (``−1`` unused) to restrict to.

    Returns:
        A scalar (float32, or float64 for float64 scores), differentiable in ``index_scores``
        only. Rows with no allowed key contribute 0 (they still count in the mean).

    Raises:
        ValueError: shapes that do not fit (named in the message).
    """
    if not isinstance(index_scores, Tensor) or index_scores.dim() != 3:
        raise ValueError("index_scores must be a [B, T, S] tensor")
    B, T, S = index_scores.shape
    if not isinstance(attn_probs, Tensor) or attn_probs.dim() != 4:
        raise ValueError("attn_probs must be a [B, T, H, S] tensor")
    if attn_probs.shape[:2] != (B, T) or attn_probs.shape[3] != S:
        raise ValueError(
            f"attn_probs must be [B={B}, T={T}, H, S={S}] to match index_scores; "
            f"got {tuple(attn_probs.shape)}"
        )
    if causal and S < T:
        raise ValueError(f"with causal=True, index_scores needs S >= T; got S={S}, T={T}")
    allowed = torch.ones((B, T, S), dtype=torch.bool, device=index_scores.device)
    if causal:
        allowed = allowed & causal_mask(T, S, index_scores.device)
    if indices is not None:
        _check_indices(indices, B, T, S)
        allowed = allowed & _selection_mask(indices, S)
    dtype = _compute_dtype(index_scores)

    target = attn_probs.detach().to(dtype).sum(2).masked_fill(~allowed, 0.0)  # (B, T, S)
    total = target.sum(-1, keepdim=True)  # (B, T, 1)
    target = target / torch.where(total > 0, total, torch.ones_like(total))
    has_any = allowed.any(-1, keepdim=True)  # (B, T, 1)
    logits = index_scores.to(dtype).masked_fill(~allowed, float("-inf"))
    logits = logits.masked_fill(~has_any, 0.0)  # empty rows: finite, and their target is 0
    log_q = logits.log_softmax(-1).masked_fill(~allowed, 0.0)  # (B, T, S)
    kl = (torch.xlogy(target, target) - target * log_q).sum(-1)  # (B, T)
    return kl.mean()


def dsa_indexer_loss(
    q: Tensor,
    k: Tensor,
    index_q: Tensor,
    index_k: Tensor,
    index_weights: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    relu: bool = True,
) -> Tensor:
    """The ``dsa_indexer_loss`` kernel slot (DESIGN §8 extension): the indexer's KL loss against
    the head-summed main attention, from the main attention's q, k and the indexer's inputs.

    ``dsa_indexer_kl_loss(indexer_scores(index_q, index_k, index_weights, relu=relu),
    causal_attention_probs(q, k, softmax_scale=softmax_scale))``: the main attention's
    probabilities ``[B, T, H, S]`` are materialised here (without gradient; q and k receive
    none), which a fused kernel (attnplug-triton's) avoids.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, S, Hkv, D]``; index_q: ``[B, T, HI, DI]``;
            index_k: ``[B, S, DI]``; index_weights: ``[B, T, HI]``.
        softmax_scale: the main attention's scale; default ``D ** -0.5``.
        causal: only keys ``s <= t + S − T`` (the only form the main attention has here).
        relu: the indexer's ReLU.

    Returns:
        A scalar, differentiable in ``index_q``, ``index_k`` and ``index_weights``.

    Raises:
        ValueError: shapes that do not fit, or ``causal=False`` (named in the message).
    """
    from attnplug.ops.attention import causal_attention_probs

    if not causal:
        raise ValueError("dsa_indexer_loss: causal=False is not accepted here: the main "
                         "attention is causal; expected causal=True")
    with torch.no_grad():
        dtype = _compute_dtype(q)
        probs = causal_attention_probs(q.to(dtype), k.to(dtype),
                                       softmax_scale=softmax_scale)  # (B, T, H, S)
    scores = indexer_scores(index_q, index_k, index_weights, causal=True, relu=relu)  # (B, T, S)
    return dsa_indexer_kl_loss(scores, probs)
