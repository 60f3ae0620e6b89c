"""The lightning indexer's top-k as score-then-select: a Triton kernel writes every visible
score of a block of queries, ``torch.topk`` picks the largest. Two selections of the same keys:
:func:`dsa_indexer_topk_threshold` (served by the triton backend: float32 scores, a threshold
per row, a selection kernel; see its docstring) and :func:`dsa_indexer_topk_blocked`, which this
docstring describes (int64 keys that order ties by position).

``dsa_indexer_topk_blocked(q[B,T,HI,DI], k[B,S,DI], weights[B,T,HI], *, topk)`` returns, for
every query ``t``, the ``topk`` keys with the largest ``Σ_h weights[t,h]·relu(q[t,h]·k[s])``
among those it sees (DESIGN §8), as ``attnplug.ops.dsa.dsa_indexer_topk`` does. The scores are
computed once, in the packed-head tile :mod:`.scores` describes:

    key[b, t, s] = (order_key(score[t, s]) << 32) | (S − 1 − s)    (int64)

so that comparing keys compares scores first and, between equal scores, prefers the earlier
position — an exact tie rule, with no float compare. Keys a query cannot see
(``s > t + S − T`` with ``causal``) are ``INT64_MIN``; tiles wholly above the diagonal skip the
product. The queries are taken ``query_block`` at a time so the key buffer
``[B, query_block, S]`` (8 bytes a pair) stays within ``block_bytes`` (default 1 GiB); at
T = S = 32K and B = 1 that is 4096 queries a block, 8 blocks. Causally a block's buffer holds
only the keys up to what its last query sees (``width = start + n + S − T``), so the blocks
before the last are narrower: about half the pairs of full rows at T = S.

Cost: one indexer forward over the causal pairs, 8 bytes written a pair, and ``torch.topk``'s
radix selection over 64-bit keys (a few reads of the buffer). Memory: the buffer, not
``O(B·T·S)``. (It replaced a streaming selection that held no score tensor but recomputed the
scores in four or more passes: 5.7× slower on the H200 at T = 32K (small indexer) and wrong
in one fp32 case; removed in session 6.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.dsa.scores import (
    check_indexer_inputs,
    dot_precision,
    load_index_queries,
)
from attnplug_triton.ops.utils import interpreting, next_power_of_2, unit_last_stride

__all__ = ["dsa_indexer_topk_blocked", "dsa_indexer_topk_threshold", "dsa_indexer_topk_radix",
           "indexer_keys", "select_rows", "start_topk"]

_INT64_MIN = tl.constexpr(-(2**63))


@triton.jit
def indexer_keys_kernel(
    Q, K, W, OUT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_wb, stride_wt, stride_wh,
    stride_ob, stride_ot, T, S, HI, DI, Q0, TQ, WIDTH,
    CAUSAL: tl.constexpr, RELU: tl.constexpr, HP: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SCORES: tl.constexpr = False,
):
    """The ``[BLOCK_M, BLOCK_N]`` tile of keys of queries ``Q0 + pid_m·BLOCK_M + i`` (rows of
    ``OUT`` counted from ``Q0``) and key positions ``pid_n·BLOCK_N + j < WIDTH``, batch
    element b. ``SCORES``: the float32 scores themselves instead (−inf where not seen)."""
    b = tl.program_id(2).to(tl.int64)
    t0 = Q0 + tl.program_id(0).to(tl.int64) * BLOCK_M
    t = t0 + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,) queries
    s = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BN,)
    out = OUT + b * stride_ob + (t - Q0)[:, None] * stride_ot + s[None, :]
    in_buffer = (t < Q0 + TQ)[:, None] & (s < WIDTH)[None, :]  # rows: queries < T; WIDTH <= S
    seen = in_buffer
    if CAUSAL:
        seen = seen & (s[None, :] <= t[:, None] + (S - T))
        # the tile's first key is past what its last query sees: nothing to score
        skip = tl.program_id(1).to(tl.int64) * BLOCK_N > t0 + BLOCK_M - 1 + (S - T)
    else:
        skip = False
    if skip:
        if SCORES:
            tl.store(out, tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32), mask=in_buffer)
        else:
            tl.store(out, tl.full([BLOCK_M, BLOCK_N], _INT64_MIN, tl.int64), mask=in_buffer)
    else:
        q, w = load_index_queries(Q, W, b, t0, T, HI, DI, stride_qb, stride_qt, stride_qh,
                                  stride_wb, stride_wt, stride_wh,
                                  BLOCK_M, HP, BLOCK_D)  # (BM·HP, BD), (BM·HP,)
        d = tl.arange(0, BLOCK_D)
        k = tl.load(K + b * stride_kb + s[:, None] * stride_ks + d[None, :],
                    mask=(s[:, None] < S) & (d[None, :] < DI), other=0.0)  # (BN, BD)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM·HP, BN)
        if RELU:
            x = tl.maximum(x, 0.0)
        score = tl.sum(tl.reshape(x * w[:, None], (BLOCK_M, HP, BLOCK_N)), 1)  # (BM, BN)
        if SCORES:
            tl.store(out, tl.where(seen, score, float("-inf")), mask=in_buffer)
        else:
            bits = score.to(tl.int32, bitcast=True)
            key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order keys, as order_key()
            key = (key32.to(tl.int64) << 32) | (S - 1 - s)[None, :]
            tl.store(out, tl.where(seen, key, _INT64_MIN), mask=in_buffer)


@triton.jit
def select_kernel(SC, THR, OUT, stride_sb, stride_st, stride_ob, stride_ot, N, WIDTH, TOPK,
                  BLOCK: tl.constexpr):
    """Row ``i`` of batch element ``b`` of the scores ``SC[B, N, WIDTH]`` given its threshold
    ``THR[b, i]`` (the TOPK-th largest score): the positions of every score above it, then of
    the earliest ones equal to it up to TOPK in all, in position order; −1 in the slots left
    (a row that sees fewer than TOPK keys has threshold −inf: its visible keys, then −1)."""
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = SC + b * stride_sb + i * stride_st
    out = OUT + b * stride_ob + i * stride_ot
    thr = tl.load(THR + b * N + i)
    offs = tl.arange(0, BLOCK)
    above = tl.full([], 0, tl.int32)
    for start in range(0, WIDTH, BLOCK):
        s = start + offs
        x = tl.load(row + s, mask=s < WIDTH, other=float("-inf"))
        above += tl.sum((x > thr).to(tl.int32), 0)
    # equal scores to take, the earliest first; none at −inf (keys the row cannot see)
    _write_selected(row, out, thr, tl.where(thr > float("-inf"), TOPK - above, 0), WIDTH, TOPK,
                    BLOCK)


@triton.jit
def radix_select_kernel(SC, OUT, stride_sb, stride_st, stride_ob, stride_ot, WIDTH, TOPK,
                        BLOCK: tl.constexpr):
    """:func:`select_kernel`'s selection with the threshold found in the same program: row
    ``i`` of batch element ``b`` of the scores ``SC[B, N, WIDTH]``; a radix selection of the
    ``min(TOPK, WIDTH)``-th largest score over the scores' order keys, 8 bits a pass from the
    top (four histogram passes over the row), then one pass writing the positions above it and
    the earliest equal ones, in position order, then −1. −0.0 counts as +0.0 (float
    equality, as :func:`select_kernel` compares)."""
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = SC + b * stride_sb + i * stride_st
    out = OUT + b * stride_ob + i * stride_ot
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    # invariant: the threshold's key starts with ``prefix`` (the bits under ``known``), and
    # ``need`` of the keys starting so are at or above it
    need = tl.minimum(TOPK, WIDTH)
    prefix = tl.full([], 0, tl.uint32)
    known = tl.full([], 0, tl.uint32)
    for step in tl.static_range(4):
        shift = 24 - 8 * step
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, WIDTH, BLOCK):
            s = start + offs
            x = tl.load(row + s, mask=s < WIDTH, other=float("-inf"))
            key = _order_key(x)
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256,
                                 mask=(s < WIDTH) & ((key & known) == prefix))
        # keys at or above each digit, counted from the top; the threshold's digit is the
        # largest with at least ``need`` of them
        at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
        need -= tl.sum(tl.where(bins == digit, at_or_above - hist, 0), 0)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        known = known | (tl.full([], 255, tl.uint32) << shift)
    thr = tl.where((prefix >> 31) == 1, prefix & 0x7FFFFFFF, ~prefix).to(tl.float32,
                                                                          bitcast=True)
    # ``need`` equal scores to take, the earliest first; none at −inf (keys the row cannot see)
    _write_selected(row, out, thr, tl.where(thr > float("-inf"), need, 0), WIDTH, TOPK, BLOCK)


@triton.jit
def _order_key(x):
    """float32 → uint32 keys ordered as the floats (−0.0 taken as +0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _write_selected(row, out, thr, ties, WIDTH, TOPK, BLOCK: tl.constexpr):
    """Write into ``out`` the positions of the row's scores above ``thr`` and of the first
    ``ties`` equal to it, in position order, then −1 up to ``TOPK`` slots."""
    offs = tl.arange(0, BLOCK)
    taken = tl.full([], 0, tl.int32)
    tied = tl.full([], 0, tl.int32)
    for start in range(0, WIDTH, BLOCK):
        s = start + offs
        x = tl.load(row + s, mask=s < WIDTH, other=float("-inf"))
        eq = (x == thr) & (s < WIDTH)
        eq_rank = tied + tl.cumsum(eq.to(tl.int32), 0) - 1
        sel = (x > thr) | (eq & (eq_rank < ties))
        slot = taken + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(out + slot, s.to(tl.int64), mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
        tied += tl.sum(eq.to(tl.int32), 0)
    for start in range(0, TOPK, BLOCK):
        j = start + offs
        tl.store(out + j, tl.full([BLOCK], -1, tl.int64), mask=(j >= taken) & (j < TOPK))


def _blocks(hp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: about 128 packed rows per product on a GPU (64 for
    float32), small under the interpreter so that test sizes span several tiles."""
    if interpreting():
        return max(1, 16 // hp), 16, 1
    rows = 64 if dtype == torch.float32 else 128
    return max(1, rows // hp), 64, 4 if dtype == torch.float32 else 8


def indexer_keys(q: Tensor, k: Tensor, weights: Tensor, out: Tensor, *, query_start: int,
                 causal: bool, relu: bool) -> Tensor:
    """Fill ``out[B, n, W]`` with the keys (``out`` int64) or the float32 scores (``out``
    float32; −inf where not seen) of queries ``query_start .. query_start + n`` and positions
    ``< W`` (``W <= S``; checked inputs, unit last strides); returns ``out``."""
    B, T, HI, DI = q.shape
    S = k.shape[1]
    n, width = out.shape[1:]
    hp = next_power_of_2(HI)
    block_m, block_n, warps = _blocks(hp, q.dtype)
    if block_m * hp < 16:  # the dot needs 16 rows
        block_m = 16 // hp
    grid = (triton.cdiv(n, block_m), triton.cdiv(width, block_n), B)
    indexer_keys_kernel[grid](
        q, k, weights, out, *q.stride()[:3], *k.stride()[:2], *weights.stride(),
        out.stride(0), out.stride(1), T, S, HI, DI, query_start, n, width,
        CAUSAL=bool(causal), RELU=bool(relu), HP=hp, BLOCK_D=max(16, next_power_of_2(DI)),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        SCORES=out.dtype == torch.float32, num_warps=warps,
        num_stages=1 if interpreting() else 2,
    )
    return out


def _check_topk(owner: str, topk: object) -> int:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{owner}: topk must be a positive int; got {topk!r}")
    return topk


def start_topk(owner: str, q: Tensor, k: Tensor, weights: Tensor, topk: object,
               causal: bool) -> tuple[Tensor, bool]:
    """Check a top-k call's arguments (``ValueError`` naming them) and allocate its
    ``[B, T, topk]`` int64 output; ``done`` when no kernel is needed (no query, or no key: all
    −1)."""
    check_indexer_inputs(owner, q, k, weights, causal)
    _check_topk(owner, topk)
    B, T, HI, DI = q.shape
    out = torch.empty((B, T, topk), dtype=torch.long, device=q.device)
    if B * T == 0:
        return out, True
    if HI == 0 or DI == 0:
        raise ValueError(f"{owner}: q must have at least one index head and one channel; got "
                         f"{tuple(q.shape)}")
    if k.shape[1] == 0:
        return out.fill_(-1), True
    return out, False


def _query_blocks(owner: str, q: Tensor, k: Tensor, weights: Tensor, *, topk: object,
                  causal: bool, relu: bool, block_bytes: object,
                  dtype: torch.dtype) -> tuple[Tensor, Iterator[tuple[int, Tensor]] | None]:
    """Check a top-k call's arguments and allocate its output; ``(out, blocks)``, ``blocks``
    yielding ``(start, part[B, n, width])`` per block of queries ``start .. start + n``: their
    keys (``dtype`` int64) or float32 scores, in one reused buffer of at most ``block_bytes``.
    Causally no query of a block sees past its last query's keys, so ``width`` stops there
    (at T = S about half the pairs of full rows). ``blocks`` is None when ``out`` is complete
    without a kernel (no query, or no key)."""
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(f"{owner}: block_bytes must be a positive int; got {block_bytes!r}")
    out, done = start_topk(owner, q, k, weights, topk, causal)
    if done:
        return out, None
    q, k = unit_last_stride(q), unit_last_stride(k)
    B, T = q.shape[:2]
    S = k.shape[1]
    block = max(1, min(T, block_bytes // (B * S * dtype.itemsize)))
    buffer = torch.empty(B * block * S, dtype=dtype, device=q.device)

    def blocks() -> Iterator[tuple[int, Tensor]]:
        for start in range(0, T, block):
            n = min(block, T - start)
            width = min(S, start + n + S - T) if causal else S
            yield start, indexer_keys(q, k, weights, buffer[:B * n * width].view(B, n, width),
                                      query_start=start, causal=causal, relu=relu)

    return out, blocks()


def dsa_indexer_topk_blocked(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    topk: int,
    causal: bool = True,
    relu: bool = True,
    block_bytes: int = 1 << 30,
) -> Tensor:
    """The ``topk`` keys with the largest indexer score for each query (score-then-select).

    Args:
        q: indexer queries ``[B, T, HI, DI]`` (float16, bfloat16 or float32).
        k: indexer keys ``[B, S, DI]``, one per position, shared by the ``HI`` heads.
        weights: per-head weights ``[B, T, HI]``.
        topk: keys to select per query.
        causal: only keys ``s <= t + S − T`` are candidates (needs ``S >= T``).
        relu: apply ReLU to ``q·k`` before weighting.
        block_bytes: bound on the key buffer (at least one query's row is always taken).

    Returns:
        ``indices[B, T, topk]`` int64: the selected key positions, in no particular order, then
        −1 in the slots beyond the number of visible keys. Scores are float32; equal scores are
        broken by position (the earlier key first).

    Raises:
        ValueError: shapes, dtypes, devices, ``topk`` or ``block_bytes`` the kernel does not take.
    """
    out, blocks = _query_blocks("dsa_indexer_topk_blocked", q, k, weights, topk=topk,
                                causal=causal, relu=relu, block_bytes=block_bytes,
                                dtype=torch.long)
    if blocks is None:
        return out
    T, S = q.shape[1], k.shape[1]
    for start, part in blocks:  # (B, n, width) keys
        # take < topk only where every query of the block sees fewer than topk keys: such
        # rows are all rewritten below
        take = min(topk, part.shape[2])
        best = torch.topk(part, take, dim=-1, sorted=False).values  # (B, n, take)
        pos = (S - 1) - (best & 0xFFFFFFFF)
        out[:, start:start + part.shape[1], :take] = torch.where(best == _INT64_MIN.value, -1,
                                                                 pos)
    # Queries that see fewer than ``topk`` keys take them all, in position order, then −1: the
    # slots of the ones they cannot see must come last, which an unsorted top-k does not give.
    # They are the first ``n_few`` queries (a query sees min(t + S − T + 1, S) keys causally, S
    # otherwise), counted on the host: no device synchronisation.
    n_few = T if S < topk else (min(T, max(0, topk - (S - T + 1))) if causal else 0)
    if n_few:
        t = torch.arange(n_few, device=q.device)
        n_vis = (t + (S - T + 1)).clamp(max=S) if causal else torch.full_like(t, S)  # (n_few,)
        slots = torch.arange(topk, device=q.device)
        out[:, :n_few] = torch.where(slots < n_vis[:, None], slots, -1)  # (B, n_few, topk)
    return out


def select_rows(part: Tensor, rows: Tensor, topk: int, *, radix: bool) -> None:
    """Write into ``rows[B, n, topk]`` (int64) each row's selection from the float32 scores
    ``part[B, n, width]`` (−inf where not seen): the positions of the ``topk`` largest, equal
    ones the earliest first, in position order, then −1. The row's threshold from
    ``torch.topk`` then :func:`select_kernel`, or with ``radix`` from
    :func:`radix_select_kernel`'s own radix selection."""
    B, n, width = part.shape
    block, warps = (16, 1) if interpreting() else (1024, 4)
    if radix:
        radix_select_kernel[(n, B)](part, rows, part.stride(0), part.stride(1), rows.stride(0),
                                    rows.stride(1), width, topk, BLOCK=block, num_warps=warps)
        return
    threshold = torch.topk(part, min(topk, width), dim=-1, sorted=False).values.amin(-1)
    select_kernel[(n, B)](part, threshold.contiguous(), rows, part.stride(0), part.stride(1),
                          rows.stride(0), rows.stride(1), n, width, topk, BLOCK=block,
                          num_warps=warps)


def _scored_topk(owner: str, q: Tensor, k: Tensor, weights: Tensor, *, topk: object,
                 causal: bool, relu: bool, block_bytes: object, radix: bool) -> Tensor:
    """The threshold and radix top-k: float32 scores a block of queries at a time
    (:func:`_query_blocks`), each block's rows selected by :func:`select_rows`."""
    out, blocks = _query_blocks(owner, q, k, weights, topk=topk, causal=causal, relu=relu,
                                block_bytes=block_bytes, dtype=torch.float32)
    if blocks is None:
        return out
    for start, part in blocks:  # (B, n, width) scores
        select_rows(part, out[:, start:start + part.shape[1]], topk, radix=radix)
    return out


def dsa_indexer_topk_threshold(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    topk: int,
    causal: bool = True,
    relu: bool = True,
    block_bytes: int = 1 << 30,
) -> Tensor:
    """:func:`dsa_indexer_topk_blocked`'s selection through float32 scores and a threshold:
    the one the triton backend serves (on the H200 at T = 32K, B = 1: 13.1 ms with the 4 × 64
    indexer, 63 ms with DeepSeek's 64 × 128, against 19.9 and 70 ms for the 64-bit keys).

    Per block of queries the kernel writes the float32 scores (4 bytes a pair where the keys
    take 8), ``torch.topk`` over them gives each row's ``topk``-th largest score — a radix
    selection over 32-bit values instead of 64-bit keys — and :func:`select_kernel` writes the
    positions above that threshold and the earliest ones equal to it. Same arguments and
    selection rule (the ``topk`` largest scores; equal scores: the earlier key), indices in
    position order, −1 after a row's visible keys.
    """
    return _scored_topk("dsa_indexer_topk_threshold", q, k, weights, topk=topk, causal=causal,
                        relu=relu, block_bytes=block_bytes, radix=False)


def dsa_indexer_topk_radix(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    topk: int,
    causal: bool = True,
    relu: bool = True,
    block_bytes: int = 1 << 30,
) -> Tensor:
    """:func:`dsa_indexer_topk_threshold`'s selection with each row's threshold found by a
    radix selection in the selection kernel itself (:func:`radix_select_kernel`: four 256-bin
    histogram passes over the row's float32 order keys, then the selection pass) instead of
    by ``torch.topk`` — one kernel a block of queries after the scores, no sort. Not served:
    right on the H200 (session 8, ``gpu_check_dsa.py``) but slower there (T = 32K, B = 1:
    16.4 ms against 13.1 with the 4 × 64 indexer, 66.6 against 63.7 with DeepSeek's); it
    peaks about 200 MiB lower (1536 against 1744 MiB beyond the inputs). Same arguments,
    selection rule and output as :func:`dsa_indexer_topk_threshold`.
    """
    return _scored_topk("dsa_indexer_topk_radix", q, k, weights, topk=topk, causal=causal,
                        relu=relu, block_bytes=block_bytes, radix=True)
