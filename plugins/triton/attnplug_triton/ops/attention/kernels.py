"""The Triton kernels of causal flash attention (launched by :mod:`.fused`).

Grouped-query heads are *packed*: for key/value head ``g`` the ``R = H / Hkv`` query heads it
serves form one sequence of ``T·R`` rows, row ``i`` being query position ``t = i // R`` of query
head ``g·R + i % R``. A program's block of rows covers every head of the group, so each K/V tile
it loads serves all of them (K/V are read once per group, not once per query head). Row ``i``
sees key ``s`` when ``s <= i // R + S − T``.

Softmax runs in base 2: scores are ``q·k · softmax_scale · log2(e)``, and the saved
log-sum-exp ``lse`` (float32, ``[B·Hkv, T·R]``) is in that base, so ``p = exp2(score − lse)``.

Hopper note (gpu/README.md): Triton 3.4–3.7.0 miscompiles a dot accumulator that is cast to
16 bits and then transposed as an operand of another dot with 64-wide blocks. No kernel here does
that: the dK/dV kernel computes ``Pᵀ`` and ``dSᵀ`` directly as ``K·Qᵀ`` and ``V·dOᵀ`` (only
tiles loaded from memory are transposed), so ``dV += Pᵀ·dO`` and ``dK += dSᵀ·Q`` use them as they
are; the dQ kernel computes ``P`` and ``dS`` untransposed for ``dQ += dS·K``.

Each kernel's row and key ranges split in two loops: the blocks every row of the program sees
whole (no causal mask), then the diagonal blocks (masked).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "attention_fwd_kernel",
    "attention_bwd_delta_kernel",
    "attention_bwd_dkdv_kernel",
    "attention_bwd_dq_kernel",
]


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a 2-D tile, masking rows and/or columns only where the caller says it must."""
    if ROW_MASK:
        if COL_MASK:
            tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if COL_MASK:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptrs, tile, row_ok, col_ok, COL_MASK: tl.constexpr):
    """Store a 2-D tile, rows always masked, columns when the head dim was padded."""
    if COL_MASK:
        tl.store(ptrs, tile, mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(ptrs, tile, mask=row_ok[:, None])


# -- forward ------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, t_idx, lo, hi, offset, S,
               stride_ks, stride_vs, qk_scale, d_ok, dv_ok,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
               PAD_DV: tl.constexpr, PRECISION: tl.constexpr, K=None, V=None, b=0, g=0,
               BLOCK_D: tl.constexpr = 16, BLOCK_DV: tl.constexpr = 16,
               KV_DESC: tl.constexpr = False):
    """Online softmax over the key blocks ``[lo, hi)``; ``MASKED`` applies the causal rule.
    ``KV_DESC``: the K and V tiles come through the tensor descriptors ``K``, ``V`` (``[B, S,
    Hkv, D]``, blocks ``[1, BLOCK_N, 1, BLOCK_D]``; positions and channels outside read as
    zeros) at batch ``b``, key/value head ``g``, instead of through the pointers."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BN,) key positions
        key_ok = cols < S
        if KV_DESC:
            k = K.load([b, start_n, g, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = _load_tile(k_ptrs + start_n * stride_ks, key_ok, d_ok, MASKED, PAD_D)  # (BN, BD)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
        if MASKED:
            visible = (cols[None, :] <= t_idx[:, None] + offset) & key_ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BM,)
        p = tl.math.exp2(qk - m_new[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_new)  # (BM,)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_DESC:
            v = V.load([b, start_n, g, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = _load_tile(v_ptrs + start_n * stride_vs, key_ok, dv_ok, MASKED, PAD_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh,
    T, S, HKV, qk_scale,
    ROWS_BUCKET, KEYS_BUCKET,  # autotuning keys only
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DESC: tl.constexpr = False,
):
    """o and lse for one block of ``BLOCK_M`` packed rows of one (batch, key/value head).
    ``KV_DESC``: ``K`` and ``V`` are tensor descriptors (TMA on Hopper) rather than pointers;
    their stride arguments are then unused."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    g = pid_bh % HKV
    rows = T * GROUP
    start_m = (tl.num_programs(0) - 1 - pid_m) * BLOCK_M  # the longest rows start first
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_idx = offs_m // GROUP  # (BM,) query positions
    h_idx = g * GROUP + offs_m % GROUP  # (BM,) query heads
    row_ok = offs_m < rows
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q_ptrs = (Q + b * stride_qb + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh
              + offs_d[None, :])
    if not KV_DESC:
        k_ptrs = (K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks
                  + offs_d[None, :])
        v_ptrs = (V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs
                  + offs_dv[None, :])
    q = _load_tile(q_ptrs, row_ok, d_ok, True, BLOCK_D != D)  # (BM, BD)

    offset = S - T
    t_lo = start_m // GROUP
    t_hi = tl.minimum((start_m + BLOCK_M - 1) // GROUP, T - 1)
    full_end = (t_lo + offset + 1) // BLOCK_N * BLOCK_N  # keys every row sees: [0, full_end)
    mask_end = tl.minimum(t_hi + offset + 1, S)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if KV_DESC:  # the K/V tiles through the descriptors (pointer arguments unused)
        b32 = (pid_bh // HKV).to(tl.int32)  # descriptor coordinates are 32-bit
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, None, None, offs_n, t_idx, 0, full_end,
                                   offset, S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok,
                                   BLOCK_N, False, BLOCK_D != D, BLOCK_DV != DV, PRECISION,
                                   K, V, b32, g, BLOCK_D, BLOCK_DV, True)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, None, None, offs_n, t_idx, full_end,
                                   mask_end, offset, S, stride_ks, stride_vs, qk_scale, d_ok,
                                   dv_ok, BLOCK_N, True, BLOCK_D != D, BLOCK_DV != DV,
                                   PRECISION, K, V, b32, g, BLOCK_D, BLOCK_DV, True)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, t_idx, 0, full_end,
                                   offset, S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok,
                                   BLOCK_N, False, BLOCK_D != D, BLOCK_DV != DV, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, t_idx, full_end,
                                   mask_end, offset, S, stride_ks, stride_vs, qk_scale, d_ok,
                                   dv_ok, BLOCK_N, True, BLOCK_D != D, BLOCK_DV != DV,
                                   PRECISION)
    acc = acc / l_i[:, None]  # (BM, BDV); every row sees key 0, so l_i > 0
    o_ptrs = (O + b * stride_ob + t_idx[:, None] * stride_ot + h_idx[:, None] * stride_oh
              + offs_dv[None, :])
    _store_tile(o_ptrs, acc.to(O.dtype.element_ty), row_ok, dv_ok, BLOCK_DV != DV)
    tl.store(LSE + pid_bh.to(tl.int64) * rows + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# -- backward: delta = rowsum(dO · O) -----------------------------------------------------------
@triton.jit
def attention_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, HKV,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``delta[i] = Σ_e o[i, e]·do[i, e]`` (float32) for one block of packed rows."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    g = pid_bh % HKV
    rows = T * GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_idx = offs_m // GROUP
    h_idx = g * GROUP + offs_m % GROUP
    row_ok = offs_m < rows
    dv_ok = offs_dv < DV
    o = _load_tile(O + b * stride_ob + t_idx[:, None] * stride_ot + h_idx[:, None] * stride_oh
                   + offs_dv[None, :], row_ok, dv_ok, True, BLOCK_DV != DV)  # (BM, BDV)
    do = _load_tile(DO + b * stride_dob + t_idx[:, None] * stride_dot
                    + h_idx[:, None] * stride_doh + offs_dv[None, :],
                    row_ok, dv_ok, True, BLOCK_DV != DV)  # (BM, BDV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + pid_bh.to(tl.int64) * rows + offs_m, delta, mask=row_ok)


# -- backward: dK, dV (one program per key block, looping over the group's packed rows) ---------
@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, rows,
                offset, stride_qt, stride_qh, stride_dot, stride_doh, qk_scale, d_ok, dv_ok,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                PAD_DV: tl.constexpr, PRECISION: tl.constexpr, Q=None, DO=None, b=0, g=0,
                QO_DESC: tl.constexpr = False):
    """Accumulate ``dK``/``dV`` of one key block over the row blocks ``[lo, hi)``.
    ``QO_DESC``: the q and dO tiles come through the tensor descriptors ``Q``, ``DO``
    (``[B, T, H, D]``, blocks ``[1, BLOCK_M / GROUP, GROUP, BLOCK_D]``: the packed rows of the
    group's heads; rows past T read as zeros) at batch ``b``, key/value head ``g``."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        t_idx = offs_m // GROUP  # (BM,)
        h_idx = offs_m % GROUP  # (BM,) head within the group
        row_ok = offs_m < rows
        if QO_DESC:
            q = Q.load([b, start_m // GROUP, g * GROUP, 0]).reshape(BLOCK_M, BLOCK_D)
            do = DO.load([b, start_m // GROUP, g * GROUP, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            q = _load_tile(q_base + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh
                           + offs_d[None, :], row_ok, d_ok, True, PAD_D)  # (BM, BD)
            do = _load_tile(do_base + t_idx[:, None] * stride_dot + h_idx[:, None] * stride_doh
                            + offs_dv[None, :], row_ok, dv_ok, True, PAD_DV)  # (BM, BDV)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # (BM,)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # (BM,)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BN, BM)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])  # (BN, BM)
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= t_idx[None, :] + offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BN, BDV)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        ds_t = p_t * (dp_t - delta[None, :])  # (BN, BM)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # (BN, BD)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    T, S, HKV, qk_scale, softmax_scale,
    ROWS_BUCKET, KEYS_BUCKET,  # autotuning keys only
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QO_DESC: tl.constexpr = False,
):
    """dK and dV of one block of ``BLOCK_N`` keys of one (batch, key/value head). ``QO_DESC``:
    ``Q`` and ``DO`` are tensor descriptors (TMA on Hopper; needs ``BLOCK_M % GROUP == 0``)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    g = pid_bh % HKV
    rows = T * GROUP
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < S
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    k = _load_tile(K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks
                   + offs_d[None, :], key_ok, d_ok, True, BLOCK_D != D)  # (BN, BD)
    v = _load_tile(V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs
                   + offs_dv[None, :], key_ok, dv_ok, True, BLOCK_DV != DV)  # (BN, BDV)
    if not QO_DESC:
        q_base = Q + b * stride_qb + g * GROUP * stride_qh
        do_base = DO + b * stride_dob + g * GROUP * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * rows
    delta_base = DELTA + pid_bh.to(tl.int64) * rows

    offset = S - T
    rows_padded = tl.cdiv(rows, BLOCK_M) * BLOCK_M
    t_first = tl.maximum(start_n - offset, 0)  # the first query that sees a key of the block
    lo = t_first * GROUP // BLOCK_M * BLOCK_M
    t_full = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)  # from here on, all keys are seen
    mid = tl.minimum(tl.cdiv(t_full * GROUP, BLOCK_M) * BLOCK_M, rows_padded)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if QO_DESC:  # the q/dO tiles through the descriptors (pointer arguments unused)
        b32 = (pid_bh // HKV).to(tl.int32)  # descriptor coordinates are 32-bit
        dk, dv = _dkdv_inner(dk, dv, k, v, None, None, lse_base, delta_base, offs_n, lo, mid,
                             rows, offset, stride_qt, stride_qh, stride_dot, stride_doh,
                             qk_scale, d_ok, dv_ok, GROUP, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             BLOCK_D != D, BLOCK_DV != DV, PRECISION, Q, DO, b32, g, True)
        dk, dv = _dkdv_inner(dk, dv, k, v, None, None, lse_base, delta_base, offs_n, mid,
                             rows, rows, offset, stride_qt, stride_qh, stride_dot, stride_doh,
                             qk_scale, d_ok, dv_ok, GROUP, BLOCK_M, BLOCK_D, BLOCK_DV, False,
                             BLOCK_D != D, BLOCK_DV != DV, PRECISION, Q, DO, b32, g, True)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo,
                             mid, rows, offset, stride_qt, stride_qh, stride_dot, stride_doh,
                             qk_scale, d_ok, dv_ok, GROUP, BLOCK_M, BLOCK_D, BLOCK_DV, True,
                             BLOCK_D != D, BLOCK_DV != DV, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, mid,
                             rows, rows, offset, stride_qt, stride_qh, stride_dot, stride_doh,
                             qk_scale, d_ok, dv_ok, GROUP, BLOCK_M, BLOCK_D, BLOCK_DV, False,
                             BLOCK_D != D, BLOCK_DV != DV, PRECISION)
    dk_ptrs = (DK + b * stride_dkb + g * stride_dkh + offs_n[:, None] * stride_dks
               + offs_d[None, :])
    dv_ptrs = (DV_OUT + b * stride_dvb + g * stride_dvh + offs_n[:, None] * stride_dvs
               + offs_dv[None, :])
    _store_tile(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), key_ok, d_ok,
                BLOCK_D != D)
    _store_tile(dv_ptrs, dv.to(DV_OUT.dtype.element_ty), key_ok, dv_ok, BLOCK_DV != DV)


# -- backward: dQ (one program per block of packed rows) ----------------------------------------
@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_n, t_idx, lo, hi, offset, S,
              stride_ks, stride_vs, qk_scale, d_ok, dv_ok,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
              PAD_DV: tl.constexpr, PRECISION: tl.constexpr, K=None, V=None, b=0, g=0,
              BLOCK_D: tl.constexpr = 16, BLOCK_DV: tl.constexpr = 16,
              KV_DESC: tl.constexpr = False):
    """Accumulate ``dQ`` of one row block over the key blocks ``[lo, hi)``; ``KV_DESC`` as in
    :func:`_fwd_inner`."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        key_ok = cols < S
        if KV_DESC:
            k = K.load([b, start_n, g, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, start_n, g, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = _load_tile(k_ptrs + start_n * stride_ks, key_ok, d_ok, MASKED, PAD_D)  # (BN, BD)
            v = _load_tile(v_ptrs + start_n * stride_vs, key_ok, dv_ok, MASKED, PAD_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BM, BN)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # (BM, BN)
        if MASKED:
            visible = (cols[None, :] <= t_idx[:, None] + offset) & key_ok[None, :]
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BM, BD)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T, S, HKV, qk_scale, softmax_scale,
    ROWS_BUCKET, KEYS_BUCKET,  # autotuning keys only
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DESC: tl.constexpr = False,
):
    """dQ of one block of ``BLOCK_M`` packed rows of one (batch, key/value head). ``KV_DESC``:
    ``K`` and ``V`` are tensor descriptors (TMA on Hopper)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    g = pid_bh % HKV
    rows = T * GROUP
    start_m = (tl.num_programs(0) - 1 - pid_m) * BLOCK_M  # the longest rows start first
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    t_idx = offs_m // GROUP
    h_idx = g * GROUP + offs_m % GROUP
    row_ok = offs_m < rows
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = _load_tile(Q + b * stride_qb + t_idx[:, None] * stride_qt + h_idx[:, None] * stride_qh
                   + offs_d[None, :], row_ok, d_ok, True, BLOCK_D != D)  # (BM, BD)
    do = _load_tile(DO + b * stride_dob + t_idx[:, None] * stride_dot
                    + h_idx[:, None] * stride_doh + offs_dv[None, :],
                    row_ok, dv_ok, True, BLOCK_DV != DV)  # (BM, BDV)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * rows + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * rows + offs_m, mask=row_ok, other=0.0)
    if not KV_DESC:
        k_ptrs = (K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks
                  + offs_d[None, :])
        v_ptrs = (V + b * stride_vb + g * stride_vh + offs_n[:, None] * stride_vs
                  + offs_dv[None, :])

    offset = S - T
    t_lo = start_m // GROUP
    t_hi = tl.minimum((start_m + BLOCK_M - 1) // GROUP, T - 1)
    full_end = (t_lo + offset + 1) // BLOCK_N * BLOCK_N
    mask_end = tl.minimum(t_hi + offset + 1, S)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if KV_DESC:  # the K/V tiles through the descriptors (pointer arguments unused)
        b32 = (pid_bh // HKV).to(tl.int32)  # descriptor coordinates are 32-bit
        dq = _dq_inner(dq, q, do, lse, delta, None, None, offs_n, t_idx, 0, full_end, offset,
                       S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok, BLOCK_N, False,
                       BLOCK_D != D, BLOCK_DV != DV, PRECISION, K, V, b32, g, BLOCK_D,
                       BLOCK_DV, True)
        dq = _dq_inner(dq, q, do, lse, delta, None, None, offs_n, t_idx, full_end, mask_end,
                       offset, S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok, BLOCK_N, True,
                       BLOCK_D != D, BLOCK_DV != DV, PRECISION, K, V, b32, g, BLOCK_D,
                       BLOCK_DV, True)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_n, t_idx, 0, full_end,
                       offset, S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok, BLOCK_N, False,
                       BLOCK_D != D, BLOCK_DV != DV, PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_n, t_idx, full_end,
                       mask_end, offset, S, stride_ks, stride_vs, qk_scale, d_ok, dv_ok,
                       BLOCK_N, True, BLOCK_D != D, BLOCK_DV != DV, PRECISION)
    dq_ptrs = (DQ + b * stride_dqb + t_idx[:, None] * stride_dqt + h_idx[:, None] * stride_dqh
               + offs_d[None, :])
    _store_tile(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), row_ok, d_ok,
                BLOCK_D != D)
