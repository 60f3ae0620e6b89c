"""Stages 2 and 3: the two kernels that walk a sequence's chunks in order, one program per
(sequence, value head, value block), the state block ``h[K, BV]`` in float32 registers.

``chunk_fwd_h_kernel`` (forward, and again in the backward to recover the states): per chunk
``V_new = A(β⊙V − c⊙(K h))`` with ``c = β e^γ / ‖k‖`` — that is ``U − W h`` without ever forming
``W`` or ``U`` —, the output ``O = r⊙(q h) + (q K̂ᵀ ⊙ Γ) V_new`` (``OUTPUT``; ``r`` the scale,
q's inverse norm and ``e^γ``) and the next state ``h ← e^{γ_C} h + Kᵀ(c'⊙V_new)`` with
``c' = e^{γ_C−γ} / ‖k‖``. q and k enter the dots as loaded; their norms (from
:mod:`.kkt_solve`) and the gates scale the rows and columns of the smaller products instead.
With ``STORE_H`` it writes each chunk's starting state (for the backward) instead of the output.

``chunk_bwd_dh_kernel`` (backward) walks the chunks in reverse with ``dh`` (the gradient of the
state after the chunk): ``dV_new = Pᵀ dO + c'⊙(K dh)`` and
``dh ← e^{γ_C} dh + qᵀ(r⊙dO) − Kᵀ(c⊙Aᵀ dV_new)``; it writes ``dh`` per chunk and the initial
state's gradient.

Hopper miscompilation (shared/gpu/README.md): no dot result is transposed here. ``Pᵀ`` is built
as ``K qᵀ`` from loaded tiles, ``Wᵀ dV_new`` as ``Kᵀ(c⊙Aᵀ dV_new)``; every transposed operand
(``K``, ``q``, ``A``) is a tile loaded from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    block,
    chunk_gates,
    chunk_v_new,
    decay_lower,
    intra_chunk_p,
    intra_chunk_pt,
    launch,
    load_norms,
    load_rows,
    store_rows,
)

__all__ = ["chunk_fwd_h", "chunk_bwd_dh", "chunk_fwd_h_kernel", "chunk_bwd_dh_kernel",
           "CONFIGS", "FEW_PROGRAMS"]

CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=s)
           for bv in (32, 64) for w in (4, 8) for s in (2, 3)]
INTERPRETER_CONFIG = triton.Config({"BV": 16}, num_warps=1, num_stages=1)
# Tuned per head dims and per PARALLELISM: the state walk has one program per (sequence·value
# head, value block), so with few sequences·heads (long sequences at batch 1 or 2) a narrower
# value block — more programs — can win where a wider one wins at batch 8; the autotuner
# chooses separately for each bucket (among the same configurations).
_KEY = ["DK", "DV", "USE_L2NORM", "PARALLELISM", "LEAN"]
# sequence·value-head pairs below which a launch is tuned as "few" (about an H100/H200's SMs)
FEW_PROGRAMS = 128


def parallelism(pairs: int) -> int:
    """The PARALLELISM bucket of a launch over ``pairs`` sequence·value-head pairs: 0 for
    fewer than :data:`FEW_PROGRAMS`, else 1."""
    return 0 if pairs < FEW_PROGRAMS else 1


@triton.jit
def chunk_fwd_h_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, a_ptr, rq_ptr, rk_ptr, h0_ptr, o_ptr, hs_ptr, ht_ptr,
    vn_ptr, cu, chunk_off,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, scale, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, HAS_H0: tl.constexpr, OUTPUT: tl.constexpr,
    STORE_H: tl.constexpr, STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr,
    PARALLELISM: tl.constexpr, LEAN: tl.constexpr = False, STORE_VNEW: tl.constexpr = False,
):
    """One (sequence·value head, value block): the output and/or per-chunk states.

    q and k enter the dots as loaded; their norms and the gates scale the rows and columns of
    the (smaller) products: ``V_new = A(β⊙V − c⊙(K h))`` with ``c = β e^γ / ‖k‖`` (that is
    ``U − W h`` without forming ``W``), ``O = r_q⊙(Q h) + P V_new``,
    ``h ← e^{γ_C} h + Kᵀ(r_k e^{γ_C−γ} ⊙ V_new)``. ``PARALLELISM`` only keys the autotuner.

    ``LEAN``: the same products, ordered so that each of ``r_k``, β and ``r_q`` is needed in
    one register layout (Triton otherwise loads a vector again for each layout it is used in,
    and stages each load in shared memory): ``β`` and ``r_k`` scale rows only — ``r_k`` moves
    from P's columns to V_new's rows (``W_new = r_k ⊙ V_new`` feeds both the output and the
    state) — and ``r_q`` scales the output once. On sm_90 at K = V = 128, BV = 64, four warps
    and two stages that is 115,456 instead of 116,224 bytes of shared memory: two programs a
    SM instead of one (at most 115,712 each), so at 128 sequence·value-head pairs the walk's
    256 programs run in one wave instead of two (``benchmarks/ptxas_report.py``).
    """
    pid_nh = tl.program_id(0)  # sequences × heads on the axis without the 65535 limit
    pid_v = tl.program_id(1)
    n = pid_nh // HV
    hv = pid_nh % HV
    hk = hv // GROUP
    dt = k_ptr.dtype.element_ty
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    slot0 = tl.load(chunk_off + n)
    offs_c = tl.arange(0, 64)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    c_ok = offs_c < 64
    state_offs = offs_k[:, None] * DV + offs_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    h = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + pid_nh.to(tl.int64) * DK * DV + state_offs, mask=state_ok,
                     other=0.0).to(tl.float32)
    for i_t in range(tl.cdiv(eos - bos, 64)):
        rows = bos + i_t * 64 + offs_c
        r_ok = rows < eos
        hd = h.to(dt)
        if STORE_H:
            slot = ((slot0 + i_t).to(tl.int64) * HV + hv) * DK * DV
            tl.store(hs_ptr + slot + state_offs, hd, mask=state_ok)
        k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)  # (C, BK)
        rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
        gam, gam_c, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
        a = load_rows(a_ptr + hv * 64, rows, r_ok, HV * 64, offs_c, c_ok)  # (C, C)
        v = load_rows(v_ptr + hv * stride_vh, rows, r_ok, stride_vt, offs_v, v_ok)  # (C, BV)
        if LEAN:
            kh = tl.dot(k, hd, input_precision=PRECISION)  # (C, BV)
            x = (v.to(tl.float32) - kh * rk[:, None] * tl.exp(gam)[:, None]) * beta[:, None]
            v_new = tl.dot(a, x.to(dt), input_precision=PRECISION)  # (C, BV) U − W h
            w_new = v_new * rk[:, None]  # 1/‖k‖ on V_new's rows: P's columns and the state's
        else:
            v_new = chunk_v_new(k, hd, v, a, beta, rk, gam, PRECISION)  # (C, BV) U − W h
        if STORE_VNEW:
            store_rows(vn_ptr + hv * DV, v_new, rows, r_ok, HV * DV, offs_v, v_ok)
        if OUTPUT:
            q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)
            rq = load_norms(rq_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM) * scale
            if LEAN:  # r_q once, on the sum: O = r_q⊙(e^γ⊙(q h) + (q Kᵀ ⊙ Γ) W_new)
                p = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay_lower(gam, 64,
                                                                                  False)
                o = tl.dot(q, hd, input_precision=PRECISION) * tl.exp(gam)[:, None]
                o = tl.dot(p.to(dt), w_new.to(dt), o, input_precision=PRECISION) * rq[:, None]
            else:
                p = intra_chunk_p(q, k, rq, rk, gam, PRECISION)  # (C, C)
                o = tl.dot(q, hd, input_precision=PRECISION) * (rq * tl.exp(gam))[:, None]
                o += tl.dot(p.to(dt), v_new.to(dt), input_precision=PRECISION)  # (C, BV)
            store_rows(o_ptr + hv * DV, o, rows, r_ok, HV * DV, offs_v, v_ok)
        if LEAN:
            v_end = (w_new * tl.exp(gam_c - gam)[:, None]).to(dt)
        else:
            v_end = (v_new * (rk * tl.exp(gam_c - gam))[:, None]).to(dt)
        h = h * tl.exp(gam_c) + tl.dot(tl.trans(k), v_end, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(ht_ptr + pid_nh.to(tl.int64) * DK * DV + state_offs, h, mask=state_ok)


@triton.jit
def chunk_bwd_dh_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, a_ptr, rq_ptr, rk_ptr, do_ptr, dht_ptr, dhs_ptr, dh0_ptr,
    y_ptr, dv_ptr, dvl_ptr, cu, chunk_off,
    stride_qt, stride_qh, stride_kt, stride_kh, scale, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    STORE_Y: tl.constexpr, DV_LOCAL: tl.constexpr, PRECISION: tl.constexpr,
    PARALLELISM: tl.constexpr,
):
    """One (sequence·value head, value block): ``dh`` after each chunk, and ``dh0``; with
    ``STORE_Y`` also ``Y = Aᵀ dV_new`` (float32) and ``dv = β ⊙ Y``, which it computes anyway;
    with ``DV_LOCAL`` the within-chunk part ``Pᵀ dO`` of ``dV_new`` is read (float32, from
    :mod:`.chunk_dv`) instead of computed on the sequential path. ``PARALLELISM`` only keys
    the autotuner."""
    pid_nh = tl.program_id(0)  # sequences × heads on the axis without the 65535 limit
    pid_v = tl.program_id(1)
    n = pid_nh // HV
    hv = pid_nh % HV
    hk = hv // GROUP
    dt = k_ptr.dtype.element_ty
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    slot0 = tl.load(chunk_off + n)
    nt = tl.cdiv(eos - bos, 64)
    offs_c = tl.arange(0, 64)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    c_ok = offs_c < 64
    state_offs = offs_k[:, None] * DV + offs_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    dh = tl.zeros([BK, BV], tl.float32)
    if HAS_DHT:
        dh += tl.load(dht_ptr + pid_nh.to(tl.int64) * DK * DV + state_offs, mask=state_ok,
                      other=0.0).to(tl.float32)
    for i in range(nt):
        i_t = nt - 1 - i
        rows = bos + i_t * 64 + offs_c
        r_ok = rows < eos
        dhd = dh.to(dt)
        slot = ((slot0 + i_t).to(tl.int64) * HV + hv) * DK * DV
        tl.store(dhs_ptr + slot + state_offs, dhd, mask=state_ok)
        k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)  # (C, BK)
        q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)
        rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
        rq = load_norms(rq_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM) * scale
        gam, gam_c, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
        a = load_rows(a_ptr + hv * 64, rows, r_ok, HV * 64, offs_c, c_ok)  # (C, C)
        do = load_rows(do_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # (C, BV)
        eg = tl.exp(gam)
        if DV_LOCAL:
            dv_new = load_rows(dvl_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # Pᵀ dO
        else:
            pt = intra_chunk_pt(k, q, rk, rq, gam, PRECISION).to(dt)  # (C, C) Pᵀ
            dv_new = tl.dot(pt, do, input_precision=PRECISION)
        kdh = tl.dot(k, dhd, input_precision=PRECISION)  # (C, BV)
        dv_new += kdh * (rk * tl.exp(gam_c - gam))[:, None]  # (C, BV)
        y = tl.dot(tl.trans(a), dv_new.to(dt), input_precision=PRECISION)  # (C, BV) Aᵀ dV_new
        if STORE_Y:
            store_rows(y_ptr + hv * DV, y, rows, r_ok, HV * DV, offs_v, v_ok)
            store_rows(dv_ptr + hv * DV, y * beta[:, None], rows, r_ok, HV * DV, offs_v, v_ok)
        do_in = (do.to(tl.float32) * (rq * eg)[:, None]).to(dt)
        y_w = (y * (rk * beta * eg)[:, None]).to(dt)
        dh = dh * tl.exp(gam_c) + tl.dot(tl.trans(q), do_in, input_precision=PRECISION)
        dh -= tl.dot(tl.trans(k), y_w, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0_ptr + pid_nh.to(tl.int64) * DK * DV + state_offs, dh, mask=state_ok)


def chunk_fwd_h(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, a: Tensor,
                rq: Tensor | None, rk: Tensor | None, h0: Tensor | None, seqs: Sequences,
                scale: float, use_qk_l2norm: bool, precision: str, *, output: bool,
                store_states: bool, final_state: bool, lean: bool = False,
                v_new: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(o[tokens, HV, V] | None, states[NC, HV, K, V] | None, final[N, HV, K, V] | None)``.

    q, k ``[tokens, H, K]``, v ``[tokens, HV, V]`` token-major with unit last strides; g, beta
    float32 ``[tokens, HV]`` and a ``[tokens, HV, 64]`` contiguous; h0 ``[N, HV, K, V]``.
    ``lean``: the kernel's ``LEAN`` ordering (same values, less shared memory). ``v_new``
    (``[tokens, HV, V]`` in v's dtype): also store every chunk's ``U − W h`` there, for the
    backward's passes to read instead of computing it (``STORE_VNEW``).
    """
    tokens, H, K = k.shape
    HV, V = v.shape[1:]
    o = v.new_empty((tokens, HV, V)) if output else None
    states = k.new_empty((seqs.num_chunks, HV, K, V)) if store_states else None
    final = k.new_empty((seqs.num_seqs, HV, K, V), dtype=torch.float32) if final_state else None
    launch(f"chunk_fwd_h{'_o' if output else ''}{'_h' if store_states else ''}"
           f"{'_vn' if v_new is not None else ''}",
           chunk_fwd_h_kernel, CONFIGS, INTERPRETER_CONFIG, _KEY,
           lambda meta: (seqs.num_seqs * HV, triton.cdiv(V, meta["BV"])),
           q, k, v, g, beta, a, rq, rk, h0, o, states, final, v_new, seqs.cu, seqs.chunk_off,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           scale, HV, HV // H, DK=K, DV=V, BK=block(K), USE_L2NORM=use_qk_l2norm,
           HAS_H0=h0 is not None, OUTPUT=output, STORE_H=store_states,
           STORE_FINAL=final_state, PRECISION=precision,
           PARALLELISM=parallelism(seqs.num_seqs * HV), LEAN=lean,
           STORE_VNEW=v_new is not None)
    return o, states, final


def chunk_bwd_dh(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, a: Tensor, rq: Tensor | None,
                 rk: Tensor | None, do: Tensor,
                 dht: Tensor | None, seqs: Sequences, scale: float, use_qk_l2norm: bool,
                 precision: str, *, initial_grad: bool, store_y: bool = False,
                 dv_dtype: torch.dtype | None = None, dv_local: Tensor | None = None,
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(dstates[NC, HV, K, V]`` (gradient of the state after each chunk, k's dtype),
    ``dh0[N, HV, K, V]`` float32 or None, ``y`` and ``dv````)``; ``do[tokens, HV, V]``
    contiguous. With ``store_y``, ``y = Aᵀ dV_new`` (float32) and ``dv = β ⊙ y`` (in
    ``dv_dtype``), both ``[tokens, HV, V]``; else both None. ``dv_local``: ``Pᵀ dO`` from
    :func:`~attnplug_triton.ops.gated_delta_rule.chunk_dv.chunk_bwd_dv_local`, or None to
    compute it here."""
    tokens, H, K = k.shape
    HV, V = do.shape[1:]
    dstates = k.new_empty((seqs.num_chunks, HV, K, V))
    dh0 = k.new_empty((seqs.num_seqs, HV, K, V), dtype=torch.float32) if initial_grad else None
    y = do.new_empty((tokens, HV, V), dtype=torch.float32) if store_y else None
    dv = do.new_empty((tokens, HV, V), dtype=dv_dtype or do.dtype) if store_y else None
    name = f"chunk_bwd_dh{'_y' if store_y else ''}{'_l' if dv_local is not None else ''}"
    launch(name, chunk_bwd_dh_kernel, CONFIGS, INTERPRETER_CONFIG, _KEY,
           lambda meta: (seqs.num_seqs * HV, triton.cdiv(V, meta["BV"])),
           q, k, g, beta, a, rq, rk, do, dht, dstates, dh0, y, dv, dv_local, seqs.cu,
           seqs.chunk_off, q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, HV,
           HV // H, DK=K, DV=V, BK=block(K), USE_L2NORM=use_qk_l2norm, HAS_DHT=dht is not None,
           STORE_DH0=initial_grad, STORE_Y=store_y, DV_LOCAL=dv_local is not None,
           PRECISION=precision, PARALLELISM=parallelism(seqs.num_seqs * HV))
    return dstates, dh0, y, dv

