"""Stage 5's dk, dg and dβ from the stored ``Y = Aᵀ dV_new``: the WY gradient without ``dA``.

:mod:`.chunk_bwd`'s dk passes accumulate ``dA = dV_new Xᵀ`` over the value blocks — rebuilding
``dV_new = Pᵀ dO + (K̂⊙e^{γ_C−γ}) dh`` in every block — and close with two more products,
``dM = −Aᵀ dA Aᵀ``. But ``Aᵀ dV_new`` is ``Y``, which the dh walk (or the dv pass) has already
stored, and ``X Aᵀ = (A X)ᵀ = V_newᵀ``, so

    dM = −Aᵀ (dV_new Xᵀ) Aᵀ = −Y V_newᵀ,

one ``(64, 64)`` accumulation of ``V_new Yᵀ`` (``−dMᵀ``) from tiles these passes make anyway:
no ``Pᵀ``, ``dO``, ``dh`` or ``dV_new`` in the stats, and no closing WY products. The ``dPᵀ``
terms of dk and dg move to the dq pass, which accumulates ``dPᵀ`` for dq already
(``chunk_bwd_kernel``'s ``CLOSE_DP``: it writes them into the float32 dk scratch and into dg).
The gradient through the state update's ``K̂⊙e^{γ_C−γ}`` per row, ``t_end = Σ_k K̂ ⊙
e^{γ_C−γ} ⊙ V_new dhᵀ``, is read off dk's loop accumulator: ``r_k Σ_k K ⊙ (loop terms) =
t_end + β e^γ t_w`` with ``t_w = −r_k Σ_v Y ⊙ (K h)``, which both passes have elementwise.

Two passes (``STATS`` then ``SUM``) or one (both): the stats pass accumulates ``V_new Yᵀ``,
writes dβ, adds the WY terms to dk's scratch and the gate terms to dg; the sum pass accumulates
dk's loop products (``V_new dhᵀ`` and ``Y hᵀ``), adds the scratch, and finishes dg (the reverse
cumulative sum inside the chunk and the chunk total's term). Each pass reads dg (the stats
pass also dk's scratch) and overwrites it, so their launches name those arguments in
``restore``: the autotuner runs a kernel once per configuration it times (session 13: without
that, dg came out NaN on the H200 and right under the interpreter).

Hopper miscompilation (a 16-bit cast of a dot result transposed into another dot): ``Yᵀ`` is
loaded transposed from memory; ``V_new Yᵀ`` is only transposed in float32 (the symmetric WY term
enters its dot as float32, as in :mod:`.chunk_bwd`); ``V_new`` enters untransposed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnplug_triton.ops.gated_delta_rule.common import (
    chunk_bounds,
    chunk_gates,
    decay_upper,
    load_norms,
    load_rows,
    store_rows,
)

__all__ = ["chunk_bwd_wy_kernel"]


@triton.jit
def chunk_bwd_wy_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, a_ptr, rk_ptr, hs_ptr, dhs_ptr, y_ptr,
    dk_ptr, dg_ptr, dbeta_ptr, dkp_ptr, vn_ptr, chunk_seq, cu, chunk_off,
    stride_kt, stride_kh, stride_vt, stride_vh, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, FINALIZE: tl.constexpr, PRECISION: tl.constexpr,
    STATS: tl.constexpr, SUM: tl.constexpr, VNEW: tl.constexpr = False,
):
    """One (chunk, value head): with ``STATS`` dβ, the WY terms of dk (added to ``dkp``) and
    of dγ (added to ``dg``); with ``SUM`` dk's loop terms plus ``dkp`` (dk, finished) and dg
    finished from ``dg``'s partial ``dγ``. ``dkp`` and ``dg`` hold the dq pass's ``dPᵀ``
    terms on entry."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    hk = hv // GROUP
    dt = k_ptr.dtype.element_ty
    _, start, eos = chunk_bounds(chunk_seq, cu, chunk_off, c, 64)
    offs_c = tl.arange(0, 64)
    offs_k = tl.arange(0, BK)
    rows = start + offs_c
    r_ok = rows < eos
    k_ok = offs_k < DK
    k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)  # (C, BK)
    rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
    gam, gam_c, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
    eg = tl.exp(gam)
    e_end = tl.exp(gam_c - gam)
    c_w = rk * beta * eg  # β⊙e^γ⊙K̂ = c_w ⊙ K
    if not VNEW:
        a = load_rows(a_ptr + hv * 64, rows, r_ok, HV * 64, offs_c, offs_c < 64)  # (C, C)

    dqk = tl.zeros([64, BK], tl.float32)  # dk's loop terms
    vyt = tl.zeros([64, 64], tl.float32)  # V_new Yᵀ = −dMᵀ
    dbeta = tl.zeros([64], tl.float32)
    t_w = tl.zeros([64], tl.float32)  # Σ_v Y ⊙ (K h), per row
    dgc_h = tl.zeros([BV], tl.float32)  # Σ h⊙dh per value column (γ_C through e^{γ_C} h)
    state = (c.to(tl.int64) * HV + hv) * DK * DV
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < DV
        state_offs = state + offs_k[:, None] * DV + offs_v[None, :]
        state_ok = k_ok[:, None] & v_ok[None, :]
        v = load_rows(v_ptr + hv * stride_vh, rows, r_ok, stride_vt, offs_v, v_ok).to(tl.float32)
        h = tl.load(hs_ptr + state_offs, mask=state_ok, other=0.0)  # (BK, BV)
        # forward again: X = β⊙V − (β⊙e^γ⊙K̂) h, V_new = A X
        kh = tl.dot(k, h, input_precision=PRECISION)  # (C, BV)
        if VNEW:  # as the backward's state walk stored it
            v_new = load_rows(vn_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)
        else:
            x = v * beta[:, None] - kh * c_w[:, None]
            v_new = tl.dot(a, x.to(dt), input_precision=PRECISION).to(dt)  # (C, BV)
        y = load_rows(y_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # Aᵀ dV_new, float32
        t_w += tl.sum(y * kh, 1)
        if STATS:
            yt = tl.load(y_ptr + hv * DV + rows.to(tl.int64)[None, :] * (HV * DV)
                         + offs_v[:, None], mask=r_ok[None, :] & v_ok[:, None],
                         other=0.0)  # (BV, C) Yᵀ, loaded transposed
            vyt = tl.dot(v_new, yt.to(dt), vyt, input_precision=PRECISION)
            dbeta += tl.sum(v * y, 1)
        if SUM:
            dh = tl.load(dhs_ptr + state_offs, mask=state_ok, other=0.0)  # (BK, BV)
            # K̂ in the state update, V_new dhᵀ; K̂ in W, −Aᵀ dV_new hᵀ
            dqk = tl.dot((v_new.to(tl.float32) * e_end[:, None]).to(dt), tl.trans(dh), dqk,
                         input_precision=PRECISION)
            dqk = tl.dot((y * (-beta * eg)[:, None]).to(dt), tl.trans(h), dqk,
                         input_precision=PRECISION)
            dgc_h += tl.sum(h.to(tl.float32) * dh.to(tl.float32), 0)
    t_w = -t_w * rk  # Σ_k K̂ ⊙ the gradient of β⊙e^γ⊙K̂, per row

    gate = rows.to(tl.int64) * HV + hv
    dgam = tl.load(dg_ptr + gate, mask=r_ok, other=0.0)  # the passes before: dγ so far
    if SUM:  # t_end from the loop terms, before the closing ones join them
        t_end = tl.sum(k.to(tl.float32) * dqk, 1) * rk - beta * eg * t_w
    if STATS:
        dgam += t_w * beta * eg
        dbeta += t_w * eg
        # dM = −vytᵀ on the strictly lower triangle; M = (K̂ K̂ᵀ) ⊙ Γ_strict. In vyt's
        # orientation: vg = −(dM ⊙ Γ_strict)ᵀ, w = −(dM ⊙ M)ᵀ
        vg = vyt * decay_upper(gam, 64, True)
        kk = tl.dot(k, tl.trans(k), input_precision=PRECISION) * rk[:, None] * rk[None, :]
        w = vg * kk
        dbeta -= tl.sum(w, 0)  # Σ_j dM_ij M_ij
        z = w * beta[None, :]  # −(dM ⊙ M ⊙ β)ᵀ
        dgam += tl.sum(z, 1) - tl.sum(z, 0)
        tl.store(dbeta_ptr + gate, dbeta, mask=r_ok)
        # dK̂ += (S + Sᵀ) K̂ with S = dM ⊙ β ⊙ Γ_strict = −uᵀ, float32 (transposed)
        u = vg * beta[None, :]
        close = tl.dot(-(u + tl.trans(u)) * rk[None, :], k.to(tl.float32),
                       input_precision=PRECISION)  # (C, BK)
        if SUM:
            dqk += close
        else:
            close += load_rows(dkp_ptr + hv * DK, rows, r_ok, HV * DK, offs_k, k_ok)
            store_rows(dkp_ptr + hv * DK, close, rows, r_ok, HV * DK, offs_k, k_ok)
    if SUM:
        # g: γ_i = Σ_{t≤i} g_t inside the chunk, γ_C = Σ_t g_t
        dgam -= t_end
        dgc = tl.sum(t_end, 0) + tl.sum(dgc_h, 0) * tl.exp(gam_c)
        dg = tl.sum(dgam, 0) - tl.cumsum(dgam, 0) + dgam + dgc
        tl.store(dg_ptr + gate, dg, mask=r_ok)
        dqk += load_rows(dkp_ptr + hv * DK, rows, r_ok, HV * DK, offs_k, k_ok)
        if FINALIZE:
            if USE_L2NORM:
                k_hat = k.to(tl.float32) * rk[:, None]
                dqk = (dqk - k_hat * tl.sum(k_hat * dqk, 1)[:, None]) * rk[:, None]
        store_rows(dk_ptr + hv * DK, dqk, rows, r_ok, HV * DK, offs_k, k_ok)
    else:
        tl.store(dg_ptr + gate, dgam, mask=r_ok)  # the sum pass finishes dg
