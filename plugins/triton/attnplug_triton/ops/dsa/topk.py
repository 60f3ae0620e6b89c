"""The lightning indexer's top-k in Triton, without a ``[B, T, S]`` score tensor.

``dsa_indexer_topk(q[B,T,HI,DI], k[B,S,DI], weights[B,T,HI], *, topk)`` returns, for every query
``t``, the ``topk`` keys with the largest ``Σ_h weights[t,h]·relu(q[t,h]·k[s])`` among those it
sees (DESIGN §8), as ``attnplug.ops.dsa.dsa_indexer_topk`` does. Scores live only in registers,
one ``[BLOCK_M, BLOCK_N]`` tile at a time (:mod:`.scores`); each row's selection is an exact
radix-style search for its ``topk``-th largest score, kept as a key interval ``[lo, hi)``:

1. **min/max** pass: ``lo`` = the row's smallest order key, ``hi`` = its largest + 1. Rows that
   see at most ``topk`` keys take them all (``lo = hi = INT32_MIN``).
2. **count** passes, while some row has more than ``capacity`` keys inside ``[lo, hi)`` and an
   interval wider than one key: count, per row, the keys at or above ``num_edges`` thresholds
   spread over ``[lo, hi)`` (linearly in value the first time, in order keys afterwards), and
   narrow the interval to the two thresholds around the ``topk``-th largest. Invariant:
   ``count(key ≥ lo) ≥ topk > count(key ≥ hi)``. One or two passes on ordinary scores; the
   order-key passes at least halve every interval, so 32 bits bound them.
3. **emit** pass: keys ``≥ hi`` are in the top-k for sure and go straight to the output; keys
   inside ``[lo, hi)`` go to a ``capacity``-slot candidate list per row (or, when the interval is
   one value — ties — the first ones needed go straight to the output).
4. **select**, a few rows per program: an exact multi-way bisection over the candidates' order
   keys finds the ``(topk − count(key ≥ hi))``-th largest, the candidates above it and the
   first ones equal to it fill the free slots, and −1 the unused ones.

Every pass recomputes the scores — one kernel, the pass a constexpr switch, the same code and
blocks — so the passes agree on every score bit for bit. A pass costs one indexer forward
(``2·HI·DI`` FLOPs per visible pair, on tensor cores) plus ``num_edges`` comparisons per pair in
a count pass. A row lists its keys ``≥ hi`` in position order, then its chosen candidates in
position order: no particular order by score.

Peak memory besides the ``[B, T, topk]`` int64 output: the candidate lists, ``B·T·capacity·8``
bytes (int32 key and position; 256 MiB at B·T = 32K with the default capacity 1024), and six
int32 per row — ``O(B·T·capacity)``, never ``O(T·S)`` (the fp32 scores of T = S = 32K would
take 4 GiB).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.dsa.scores import (
    check_indexer_inputs,
    dot_precision,
    key_value,
    load_index_queries,
    order_key,
    unit_last_stride,
)
from attnplug_triton.ops.utils import interpreting, next_power_of_2

__all__ = ["TopkConfig", "default_topk_config", "dsa_indexer_topk", "start_topk"]

_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
# Passes of the one kernel that scores (a constexpr switch, so they share the scoring code).
_MINMAX, _COUNT_VALUE, _COUNT_KEY, _EMIT = 0, 1, 2, 3
# Rows of the per-query state: the interval, the counts at its ends, what emit produced.
_LO, _HI, _C_LO, _C_HI, _FILLED, _N_CAND = (tl.constexpr(i) for i in range(6))
_MAX_COUNT_PASSES = 40  # 32 bits narrowed at least 2x per pass, with room to spare


class TopkConfig(NamedTuple):
    """Blocks of the top-k kernels.

    ``block_m`` queries per program (the dot has ``block_m·HP`` rows), ``block_n`` keys per
    tile, ``num_edges`` thresholds per count pass, ``capacity`` candidate slots per query.
    """

    block_m: int
    block_n: int
    num_edges: int
    capacity: int
    num_warps: int
    num_stages: int


def default_topk_config(heads_padded: int, dtype: torch.dtype) -> TopkConfig:
    """The blocks used when none are given: about 128 packed rows per product on a GPU (64 and
    fewer stages for float32, whose three-TF32 products need more registers and shared memory);
    small under the interpreter, so that test sizes still span several tiles and count passes."""
    if interpreting():
        return TopkConfig(max(1, 32 // heads_padded), 32, 4, 16, 1, 1)
    if dtype == torch.float32:
        return TopkConfig(min(16, max(1, 64 // heads_padded)), 32, 16, 1024, 4, 1)
    return TopkConfig(min(32, max(1, 128 // heads_padded)), 64, 16, 1024, 8, 2)


@triton.jit
def topk_pass_kernel(
    Q, K, W, STATE, OUT, CAND_KEY, CAND_IDX,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_wb, stride_wt, stride_wh,
    T, S, HI, DI, TOPK, CAP, ROWS,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, RELU: tl.constexpr, HP: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_EDGES: tl.constexpr, PRECISION: tl.constexpr,
):
    """One pass (``MODE``) over the visible keys of ``BLOCK_M`` queries of batch element b."""
    b = tl.program_id(1).to(tl.int64)
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows start first
    t = t0 + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,) queries
    row_ok = t < T
    row = b * T + t  # (BM,) rows of STATE and OUT
    if CAUSAL:
        n_vis = tl.minimum(t + (S - T) + 1, S)  # (BM,) keys each query sees
    else:
        n_vis = tl.zeros([BLOCK_M], dtype=tl.int64) + S
    if MODE == 0:
        active = row_ok & (n_vis > TOPK)
    else:
        lo = tl.load(STATE + _LO * ROWS + row, mask=row_ok, other=0)
        hi = tl.load(STATE + _HI * ROWS + row, mask=row_ok, other=0)
        c_lo = tl.load(STATE + _C_LO * ROWS + row, mask=row_ok, other=0)
        c_hi = tl.load(STATE + _C_HI * ROWS + row, mask=row_ok, other=0)
        if MODE == 3:
            active = row_ok
        else:
            wide = hi.to(tl.int64) - lo.to(tl.int64) > 1
            active = row_ok & (c_lo - c_hi > CAP) & wide
    kv_end = tl.max(tl.where(active, n_vis, 0), 0)  # 0 when no row here needs this pass

    q, w = load_index_queries(Q, W, b, t0, T, HI, DI, stride_qb,
                              stride_qt, stride_qh, stride_wb, stride_wt, stride_wh,
                              BLOCK_M, HP, BLOCK_D)  # (BM·HP, BD), (BM·HP,)
    k_base = K + b * stride_kb
    if MODE == 0:
        k_min = tl.full([BLOCK_M], _INT32_MAX, dtype=tl.int32)
        k_max = tl.full([BLOCK_M], _INT32_MIN, dtype=tl.int32)
    if MODE == 1 or MODE == 2:
        j = tl.arange(0, NUM_EDGES).to(tl.int64)
        if MODE == 1:  # linear in value between the smallest and the largest score
            frac = (j + 1).to(tl.float32) / (NUM_EDGES + 1)  # (NE,)
            f_lo = key_value(lo)[:, None]
            f_hi = key_value(hi - 1)[:, None]
            edges = order_key(f_lo * (1.0 - frac[None, :]) + f_hi * frac[None, :])  # (BM, NE)
        else:  # linear in order keys: at least halves any interval wider than one key
            width = hi.to(tl.int64) - lo.to(tl.int64)  # (BM,)
            step = (width[:, None] * (j[None, :] + 1)) // (NUM_EDGES + 1)  # (BM, NE)
            edges = (lo.to(tl.int64)[:, None] + step).to(tl.int32)
        edges = tl.minimum(tl.maximum(edges, lo[:, None] + 1), hi[:, None] - 1)
        counts = tl.zeros([BLOCK_M, NUM_EDGES], dtype=tl.int32)
    if MODE == 3:
        n_sel = tl.zeros([BLOCK_M], dtype=tl.int32)  # keys >= hi written so far
        n_in = tl.zeros([BLOCK_M], dtype=tl.int32)  # keys inside [lo, hi) seen so far
        tie = hi.to(tl.int64) - lo.to(tl.int64) == 1  # the interval is a single value
        lim = tl.minimum(n_vis, TOPK).to(tl.int32)

    d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    last = t + (S - T)  # (BM,) the last key each query sees, if causal
    for start in range(0, kv_end, BLOCK_N):
        # (The score tile is written out, not called: see scores.py.)
        s = start + offs_n  # (BN,) key positions
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :],
                    mask=(s[:, None] < S) & (d[None, :] < DI), other=0.0)  # (BN, BD)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM·HP, BN)
        if RELU:
            x = tl.maximum(x, 0.0)
        score = tl.sum(tl.reshape(x * w[:, None], (BLOCK_M, HP, BLOCK_N)), 1)  # (BM, BN)
        bits = score.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order keys, as order_key()
        seen = active[:, None] & (s[None, :] < S)  # (BM, BN)
        if CAUSAL:
            seen = seen & (s[None, :] <= last[:, None])
        if MODE == 0:
            k_min = tl.minimum(k_min, tl.min(tl.where(seen, key, _INT32_MAX), 1))
            k_max = tl.maximum(k_max, tl.max(tl.where(seen, key, _INT32_MIN), 1))
        if MODE == 1 or MODE == 2:
            above = seen[:, :, None] & (key[:, :, None] >= edges[:, None, :])  # (BM, BN, NE)
            counts += tl.sum(above.to(tl.int32), 1)
        if MODE == 3:
            sure = seen & (key >= hi[:, None])  # in the top-k whatever the rest
            inside = seen & (key >= lo[:, None]) & (key < hi[:, None])
            both = tl.where(sure, 1, 0) | tl.where(inside, 65536, 0)  # two counts in one scan
            running = tl.cumsum(both, 1)  # (BM, BN)
            slot = (running & 0xFFFF) + n_sel[:, None]  # 1-based output slot of a sure key
            rank = (running >> 16) + n_in[:, None]  # 1-based rank of a key inside [lo, hi)
            pos = tl.broadcast_to(s[None, :].to(tl.int32), (BLOCK_M, BLOCK_N))
            out = OUT + row[:, None] * TOPK - 1  # (BM, 1)
            tl.store(out + slot, pos, mask=sure & (slot <= TOPK))
            tie_slot = rank + c_hi[:, None]  # ties: the first ones needed, straight out
            tl.store(out + tie_slot, pos, mask=inside & tie[:, None] & (tie_slot <= lim[:, None]))
            keep = inside & (~tie[:, None]) & (rank <= CAP)
            cand = row[:, None] * CAP - 1 + rank
            tl.store(CAND_KEY + cand, key, mask=keep)
            tl.store(CAND_IDX + cand, pos, mask=keep)
            total = tl.sum(both, 1)
            n_sel += total & 0xFFFF
            n_in += total >> 16

    if MODE == 0:
        tl.store(STATE + _LO * ROWS + row, tl.where(active, k_min, _INT32_MIN), mask=row_ok)
        top = tl.minimum(k_max, _INT32_MAX - 1) + 1
        tl.store(STATE + _HI * ROWS + row, tl.where(active, top, _INT32_MIN), mask=row_ok)
        tl.store(STATE + _C_LO * ROWS + row, n_vis, mask=row_ok)
        tl.store(STATE + _C_HI * ROWS + row, tl.where(active, 0, n_vis), mask=row_ok)
    if MODE == 1 or MODE == 2:
        enough = counts >= TOPK  # (BM, NE); counts fall as the edges rise
        tl.store(STATE + _LO * ROWS + row, tl.max(tl.where(enough, edges, lo[:, None]), 1),
                 mask=active)
        tl.store(STATE + _C_LO * ROWS + row, tl.min(tl.where(enough, counts, c_lo[:, None]), 1),
                 mask=active)
        tl.store(STATE + _HI * ROWS + row, tl.min(tl.where(enough, hi[:, None], edges), 1),
                 mask=active)
        tl.store(STATE + _C_HI * ROWS + row, tl.max(tl.where(enough, c_hi[:, None], counts), 1),
                 mask=active)
    if MODE == 3:
        ties_out = tl.minimum(n_in, tl.maximum(lim - c_hi, 0))
        tl.store(STATE + _FILLED * ROWS + row, n_sel + tl.where(tie, ties_out, 0), mask=row_ok)
        tl.store(STATE + _N_CAND * ROWS + row, tl.where(tie, 0, n_in), mask=row_ok)


@triton.jit
def topk_select_kernel(
    STATE, OUT, CAND_KEY, CAND_IDX, T, S, TOPK, CAP, ROWS,
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_EDGES: tl.constexpr, BLOCK_FILL: tl.constexpr,
):
    """``BLOCK_R`` queries: the largest of their candidates into the free slots, −1 after."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    row_ok = row < ROWS
    t = (row % T).to(tl.int32)
    if CAUSAL:
        n_vis = tl.minimum(t + (S - T) + 1, S)
    else:
        n_vis = t * 0 + S
    lim = tl.minimum(n_vis, TOPK)
    filled = tl.load(STATE + _FILLED * ROWS + row, mask=row_ok, other=TOPK)
    n_cand = tl.minimum(tl.load(STATE + _N_CAND * ROWS + row, mask=row_ok, other=0), CAP)
    need = tl.maximum(tl.minimum(lim - filled, n_cand), 0)  # (BR,) candidates to take
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    ok = c[None, :] < n_cand[:, None]  # (BR, BC)
    key = tl.load(CAND_KEY + row[:, None] * CAP + c[None, :], mask=ok, other=0)  # (BR, BC)
    # The largest v with count(key >= v) >= need, searched in [lo, hi] (the candidates' range)
    # by NUM_EDGES-way splits: count(key >= lo) >= need holds throughout.
    lo = tl.load(STATE + _LO * ROWS + row, mask=row_ok, other=0).to(tl.int64)
    hi = tl.load(STATE + _HI * ROWS + row, mask=row_ok, other=1).to(tl.int64) - 1
    hi = tl.where(need > 0, hi, lo)
    j = tl.arange(0, NUM_EDGES).to(tl.int64)
    while tl.max(hi - lo, 0) > 0:
        width = hi - lo
        edges = lo[:, None] + (width[:, None] * (j[None, :] + 1) + NUM_EDGES) // (NUM_EDGES + 1)
        above = ok[:, :, None] & (key[:, :, None] >= edges.to(tl.int32)[:, None, :])  # (BR,BC,NE)
        enough = tl.sum(above.to(tl.int32), 1) >= need[:, None]  # (BR, NE)
        lo = tl.max(tl.where(enough, edges, lo[:, None]), 1)
        hi = tl.min(tl.where(enough, hi[:, None], edges - 1), 1)
    tau = lo.to(tl.int32)[:, None]  # the need-th largest key
    greater = ok & (key > tau)
    equal = ok & (key == tau)
    running = tl.cumsum(greater.to(tl.int32) + equal.to(tl.int32) * 65536, 1)  # (BR, BC)
    ties = need - tl.sum(greater.to(tl.int32), 1)  # (BR,) equal keys to take, first ones first
    rank = (running & 0xFFFF) + tl.minimum(running >> 16, ties[:, None])
    pick = (greater | (equal & ((running >> 16) <= ties[:, None]))) & (need[:, None] > 0)
    slot = filled[:, None] + rank - 1
    idx = tl.load(CAND_IDX + row[:, None] * CAP + c[None, :], mask=pick, other=0)
    tl.store(OUT + row[:, None] * TOPK + slot, idx.to(tl.int64), mask=pick & (slot < TOPK))
    free_from = filled + need  # (BR,)
    first = tl.min(tl.where(row_ok, free_from, TOPK), 0) // BLOCK_FILL * BLOCK_FILL
    for start in range(first, TOPK, BLOCK_FILL):
        f = start + tl.arange(0, BLOCK_FILL).to(tl.int64)
        tl.store(OUT + row[:, None] * TOPK + f[None, :],
                 tl.full([BLOCK_R, BLOCK_FILL], -1, dtype=tl.int64),
                 mask=row_ok[:, None] & (f[None, :] >= free_from[:, None]) & (f[None, :] < TOPK))


def _check_topk(topk: object) -> int:
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"dsa_indexer_topk: topk must be a positive int; got {topk!r}")
    return topk


def start_topk(owner: str, q: Tensor, k: Tensor, weights: Tensor, topk: object,
               causal: bool) -> tuple[Tensor, bool]:
    """Check a top-k call's arguments (``ValueError`` naming them) and allocate its
    ``[B, T, topk]`` int64 output; ``done`` when no kernel is needed (no query, or no key: all
    −1)."""
    check_indexer_inputs(owner, q, k, weights, causal)
    _check_topk(topk)
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


def _check_config(cfg: TopkConfig, heads_padded: int) -> None:
    fine = (cfg.num_edges >= 1 and next_power_of_2(cfg.num_edges) == cfg.num_edges
            and cfg.capacity >= 1 and cfg.block_n >= 16
            and next_power_of_2(cfg.block_n) == cfg.block_n
            and next_power_of_2(cfg.block_m) == cfg.block_m
            and cfg.block_m * heads_padded >= 16)
    if not fine:
        raise ValueError(f"dsa_indexer_topk: {cfg} is not a valid configuration: num_edges, "
                         "block_n (>= 16) and block_m powers of two, block_m x padded heads "
                         f"({heads_padded}) >= 16, capacity >= 1")


def dsa_indexer_topk(
    q: Tensor,
    k: Tensor,
    weights: Tensor,
    *,
    topk: int,
    causal: bool = True,
    relu: bool = True,
    config: TopkConfig | None = None,
) -> Tensor:
    """The ``topk`` keys with the largest indexer score for each query, through Triton kernels.

    Args:
        q: indexer queries ``[B, T, HI, DI]`` (float16, bfloat16 or float32).
        k: indexer keys ``[B, S, DI]``, one per position, shared by the ``HI`` heads.
        weights: per-head weights ``[B, T, HI]``.
        topk: keys to select per query.
        causal: only keys ``s <= t + S − T`` are candidates (needs ``S >= T``).
        relu: apply ReLU to ``q·k`` before weighting.
        config: force the kernels' blocks (tests); default :func:`default_topk_config`.

    Returns:
        ``indices[B, T, topk]`` int64: the selected key positions, in no particular order, then
        −1 in the slots beyond the number of visible keys. Scores are float32; equal scores are
        broken by position (the earlier key first). Memory: the output plus
        ``B·T·(8·capacity + 24)`` bytes (see the module docstring); no ``[B, T, S]`` tensor.

    Raises:
        ValueError: shapes, dtypes, devices or ``topk`` the kernels do not take.
    """
    out, done = start_topk("dsa_indexer_topk", q, k, weights, topk, causal)
    if done:
        return out
    q, k = unit_last_stride(q), unit_last_stride(k)
    B, T, HI, DI = q.shape
    S = k.shape[1]
    hp = next_power_of_2(HI)
    cfg = config or default_topk_config(hp, q.dtype)
    _check_config(cfg, hp)
    rows = B * T
    state = torch.empty((6, rows), dtype=torch.int32, device=q.device)
    cap = cfg.capacity if topk < S else 0  # every query takes all it sees: no candidates
    cand_key = torch.empty((max(rows * cap, 1),), dtype=torch.int32, device=q.device)
    cand_idx = torch.empty_like(cand_key)
    args = (q, k, weights, state, out, cand_key, cand_idx, *q.stride()[:3], *k.stride()[:2],
            *weights.stride(), T, S, HI, DI, topk, cap, rows)
    meta = {"CAUSAL": bool(causal), "RELU": bool(relu), "HP": hp,
            "BLOCK_D": max(16, next_power_of_2(DI)), "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "NUM_EDGES": cfg.num_edges,
            "PRECISION": dot_precision(q.dtype), "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages}
    grid = (triton.cdiv(T, cfg.block_m), B)
    topk_pass_kernel[grid](*args, MODE=_MINMAX, **meta)
    if topk < S:
        mode = _COUNT_VALUE
        for _ in range(_MAX_COUNT_PASSES):
            if not _needs_counting(state, cap):
                break
            topk_pass_kernel[grid](*args, MODE=mode, **meta)
            mode = _COUNT_KEY
        else:  # pragma: no cover - the intervals shrink every pass; a bug otherwise
            raise RuntimeError("dsa_indexer_topk: the top-k thresholds did not converge")
    topk_pass_kernel[grid](*args, MODE=_EMIT, **meta)
    rows_per = 16 if interpreting() else 2
    topk_select_kernel[(triton.cdiv(rows, rows_per),)](
        state, out, cand_key, cand_idx, T, S, topk, cap, rows, CAUSAL=bool(causal),
        BLOCK_R=rows_per, BLOCK_C=max(16, next_power_of_2(max(cap, 1))),
        NUM_EDGES=8 if interpreting() else 2, BLOCK_FILL=min(256, next_power_of_2(topk)),
        num_warps=4 if interpreting() else 8,
    )
    return out


def _needs_counting(state: Tensor, cap: int) -> bool:
    """Whether some query still has more than ``cap`` keys inside an interval of > 1 key."""
    lo, hi = state[_LO.value].long(), state[_HI.value].long()
    c_lo, c_hi = state[_C_LO.value], state[_C_HI.value]
    return bool(((c_lo - c_hi > cap) & (hi - lo > 1)).any())

