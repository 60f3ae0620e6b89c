"""Stage 5, the backward's parallel part: every gradient of one chunk, in three passes (dk, dg
and dβ from :mod:`.chunk_bwd_wy` instead with ``dm_from_y``, served up to K, V = 128).

One program per (chunk, value head) has the chunk's starting state ``h`` and the gradient ``dh``
of the state after it (from :mod:`.chunk_h`) and rebuilds in registers what the forward had:
``X = β⊙V − (β⊙e^γ⊙K̂) h`` and ``V_new = A X`` (= ``U − W h``), ``dV_new = Pᵀ dO +
(K̂⊙e^{γ_C−γ}) dh`` with ``Pᵀ`` built as ``K Qᵀ`` scaled. The same kernel runs three times
(``PASS``), so that each pass holds at most one ``(64, K)`` float32 accumulator (register
pressure, checked by compiling for sm_90):

* the dq pass (0) accumulates ``dO hᵀ`` and ``dPᵀ = V_new dOᵀ`` over the value blocks and writes
  ``dq = e^γ ⊙ dO hᵀ + (dP ⊙ Γ) K̂`` (then the L2 norm's backward);
* the dv pass (1) writes ``Y = Aᵀ dV_new`` (float32 scratch) and ``dv = β ⊙ Y`` per value block
  — a product the single dk pass used to make itself, split out after that pass faulted on an
  H200 (see the kernel);
* the dk pass (2) accumulates the gradient of ``K̂`` through the state update
  (``e^{γ_C−γ} ⊙ V_new dhᵀ``) and through ``W`` (``−β e^γ ⊙ Y hᵀ``), ``dA = dV_new Xᵀ`` and
  ``dPᵀ``; then closes with the WY inverse, ``dM = −Aᵀ dA Aᵀ`` (strictly lower),
  ``dK̂ += (S + Sᵀ) K̂`` with ``S = dM ⊙ β ⊙ Γ``, and ``dK̂ += (dPᵀ ⊙ Γᵀ) q``. Every ``γ`` term is
  collected per row (the row sums of the ``(64, K)`` gradients with q or K̂ are taken as
  ``(64, V)`` products: ``dO ⊙ (q h)``, ``V_new ⊙ (K dh)``, ``Y ⊙ (K h)``) and turned into ``dg``
  by a reverse cumulative sum inside the chunk, plus the chunk total ``γ_C``'s gradient on every
  row; ``dβ`` likewise.

The dk pass holds the most tiles at once (the ``(64, K)`` accumulator, ``dPᵀ``, ``dA``, q, k,
``A``, ``Pᵀ``) and spills on sm_90 (1–2 KB a thread at every configuration, Triton 3.6); with
``split_dk`` it runs as two passes instead: the stats pass (3) makes ``dPᵀ``, ``dA``, dg, dβ and
dk's closing terms (into a float32 scratch), the sum pass (4) only dk's two loop products plus
that scratch — V_new recomputed once more, fewer live tiles in each.

With one value head per key head (``FINALIZE``) the L2 norm's backward runs here and dq, dk are
written once in the inputs' dtype; with grouped heads the passes write float32 gradients of the
normalised q̂, k̂ per value head, summed over the group afterwards.

Hopper miscompilation (shared/gpu/README.md: a dot result cast to 16 bits and transposed into
another dot, 64-wide): exactly three tiles here are dot results that a later dot needs
transposed — ``X`` (for ``dA``), ``dP`` (from the accumulated ``dPᵀ``) and ``S`` (from ``dM``).
All three stay **float32** and enter their dots as float32 (TF32, TF32×3 for float32 inputs);
nothing cast to 16 bits is ever transposed. Every other transposed operand (``h``, ``dh``,
``A``, ``K``, ``q``, ``dO``) is a tile loaded from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.chunk_bwd_wy import chunk_bwd_wy_kernel
from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    block,
    chunk_bounds,
    chunk_gates,
    decay_lower,
    decay_upper,
    intra_chunk_pt,
    launch,
    load_norms,
    load_rows,
    store_rows,
)

__all__ = ["chunk_bwd", "chunk_bwd_kernel", "CONFIGS", "PASS_ARGS", "launch_names", "prune",
           "safe_configs"]

CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=s)
           for bv in (32, 64) for w in (4, 8) for s in (1, 2)]
INTERPRETER_CONFIG = triton.Config({"BV": 16}, num_warps=1, num_stages=1)


# (key block, BV, warps) combinations that computed wrong gradients or faulted on an H200 with
# Triton 3.6 in bf16 (``benchmarks/gpu_check_gdn.py --parts probe --probe-dims 16 32 64``,
# 2026-11-28): at K = 32 the dq pass with BV = 32 and 4 warps wrote dq with relative error
# 0.24 or faulted (illegal memory access); at K = 16 every 8-warp configuration wrote NaN in
# dk and dg. All eight were right at K = V = 64 and 128.
_MISCOMPILED = {(32, 32, 4)} | {(16, bv, 8) for bv in (32, 64)}
# The same for the two passes of the split dk (PASS 3 and 4, ``split_dk``), same machine and
# Triton (``--probe-variants split_dk --probe-dims 32``, session 8): at K = V = 32 with BV = 32
# they wrote dk with relative error 0.82 (8 warps) or faulted (4 warps); right under the
# interpreter with the same blocks, and on the H200 with BV = 64 at K = 32 and with every
# configuration at K = V = 128.
_MISCOMPILED_SPLIT_DK = {(32, 32, w) for w in (4, 8)}
# The same for ``dm_from_y``'s passes (the dq pass with ``CLOSE_DP`` and
# :mod:`.chunk_bwd_wy`'s), same machine and Triton (``gpu_experimental.sh gdn-wy-probe``,
# session 13, the whole family forced to one configuration): at K = V = 32, BV = 32 with 8
# warps wrote dk, dg, dβ with relative errors 0.85, 0.77, 0.20, and BV = 64 with 4 warps NaN in
# dk and dg (two passes and one); right under the interpreter, and on the H200 with BV = 64
# and 8 warps at K = 32 and every configuration at K = 16 (bar ``_MISCOMPILED``'s), 64, 128.
_MISCOMPILED_WY = {(32, 32, 8), (32, 64, 4)}
# launch name → the constexprs by which :func:`prune` tells that launch's pass apart
PASS_ARGS = {"chunk_bwd_dq": {"PASS": 0, "CLOSE_DP": False},
             "chunk_bwd_dv": {"PASS": 1, "CLOSE_DP": False},
             "chunk_bwd_dk": {"PASS": 2, "CLOSE_DP": False},
             "chunk_bwd_dk_stats": {"PASS": 3, "CLOSE_DP": False},
             "chunk_bwd_dk_sum": {"PASS": 4, "CLOSE_DP": False},
             "chunk_bwd_dq_dp": {"PASS": 0, "CLOSE_DP": True},
             "chunk_bwd_wy_stats": {"STATS": True, "SUM": False},
             "chunk_bwd_wy_sum": {"STATS": False, "SUM": True},
             "chunk_bwd_wy": {"STATS": True, "SUM": True}}
# the passes that read V_new from the backward's state walk (``v_new``)
PASS_ARGS |= {name + "_vn": PASS_ARGS[name] for name in (
    "chunk_bwd_dq_dp", "chunk_bwd_wy_stats", "chunk_bwd_wy_sum", "chunk_bwd_wy")}


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configurations that are safe for this call's key dim and pass (Triton's
    ``early_config_prune``): none of ``_MISCOMPILED`` (nor, for the split dk's passes, of
    ``_MISCOMPILED_SPLIT_DK``; nor, for ``dm_from_y``'s, of ``_MISCOMPILED_WY``)."""
    dk = kwargs.get("DK", named_args.get("DK"))
    if dk is None:
        return configs
    bad = _MISCOMPILED
    if kwargs.get("PASS", named_args.get("PASS")) in (3, 4):
        bad = bad | _MISCOMPILED_SPLIT_DK
    if kwargs.get("CLOSE_DP") or "STATS" in kwargs:  # dm_from_y's dq pass, the WY kernel
        bad = bad | _MISCOMPILED_WY
    return [c for c in configs if (block(dk), c.kwargs["BV"], c.num_warps) not in bad]


def launch_names(dm_from_y: bool, split_dk: bool, dv_pass: bool,
                 read_v_new: bool) -> list[str]:
    """The launches :func:`chunk_bwd` makes, in order (keys of :data:`PASS_ARGS`): the dq pass
    (with the ``dPᵀ`` terms under ``dm_from_y``), the dv pass when ``dv_pass``, then dk, dg
    and dβ in one pass or two (``split_dk``) — the WY passes under ``dm_from_y``, named
    ``_vn`` with the dq pass when they read V_new (``read_v_new``)."""
    vn = "_vn" if dm_from_y and read_v_new else ""
    names = ["chunk_bwd_dq_dp" + vn if dm_from_y else "chunk_bwd_dq"]
    if dv_pass:
        names.append("chunk_bwd_dv")
    if dm_from_y:
        names += ([f"chunk_bwd_wy_stats{vn}", f"chunk_bwd_wy_sum{vn}"] if split_dk
                  else [f"chunk_bwd_wy{vn}"])
    else:
        names += ["chunk_bwd_dk_stats", "chunk_bwd_dk_sum"] if split_dk else ["chunk_bwd_dk"]
    return names


def safe_configs(name: str, dk: int) -> list[triton.Config]:
    """The configurations the autotuner may pick for launch ``name`` (a key of
    :data:`PASS_ARGS`) at key dim ``dk``."""
    return prune(CONFIGS, {}, DK=dk, **PASS_ARGS[name])


@triton.jit
def chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, a_ptr, rq_ptr, rk_ptr, do_ptr, hs_ptr, dhs_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, y_ptr, dkp_ptr, vn_ptr, chunk_seq, cu,
    chunk_off, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, scale, HV,
    GROUP, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, FINALIZE: tl.constexpr, PRECISION: tl.constexpr,
    PASS: tl.constexpr, CLOSE_DP: tl.constexpr, VNEW: tl.constexpr = False,
):
    """One (chunk, value head): dq (``PASS`` 0); ``Y = Aᵀ dV_new`` and dv (``PASS`` 1); dk, dg
    and dβ from that Y (``PASS`` 2) — or the same in two passes: dg, dβ and the closing terms
    of dk into the float32 scratch ``dkp`` (``PASS`` 3), then dk's loop terms plus ``dkp``
    (``PASS`` 4). With ``CLOSE_DP`` the dq pass also writes the ``dPᵀ`` terms of dk (into
    ``dkp``) and of dg (into ``dg``, the within-chunk ``dγ`` so far) for
    :mod:`.chunk_bwd_wy`'s passes, which finish them."""
    DQ_PASS: tl.constexpr = PASS == 0
    DV_PASS: tl.constexpr = PASS == 1
    DK_STATS: tl.constexpr = PASS == 3  # no dk accumulation in the loop
    DK_SUM: tl.constexpr = PASS == 4  # only dk's accumulation in the loop
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
    # q and k enter the dots as loaded; norms, scale and gates scale rows and columns
    q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)  # (C, BK)
    k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)
    rq = load_norms(rq_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
    rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
    rqs = rq * scale  # q_used = rqs ⊙ q
    gam, gam_c, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
    eg = tl.exp(gam)
    e_end = tl.exp(gam_c - gam)
    c_w = rk * beta * eg  # β⊙e^γ⊙K̂ = c_w ⊙ K
    c_end = rk * e_end  # K̂⊙e^{γ_C−γ} = c_end ⊙ K
    a = load_rows(a_ptr + hv * 64, rows, r_ok, HV * 64, offs_c, offs_c < 64)  # (C, C)
    if not DQ_PASS and not DK_SUM:
        pt = intra_chunk_pt(k, q, rk, rqs, gam, PRECISION).to(dt)  # (C, C) Pᵀ

    dqk = tl.zeros([64, BK], tl.float32)  # dq pass: Σ dO hᵀ; dk pass: the gradient of k̂
    dpt = tl.zeros([64, 64], tl.float32)  # dPᵀ
    da = tl.zeros([64, 64], tl.float32)  # dA
    dbeta = tl.zeros([64], tl.float32)
    t_q = tl.zeros([64], tl.float32)  # Σ_k q ⊙ (dO hᵀ), per row
    t_end = tl.zeros([64], tl.float32)  # Σ_k K̂⊙e^{γ_C−γ} ⊙ its gradient, per row
    t_w = tl.zeros([64], tl.float32)  # Σ_k K̂ ⊙ the gradient of β⊙e^γ⊙K̂, per row
    dgc_h = tl.zeros([BV], tl.float32)  # Σ h⊙dh per value column (γ_C through e^{γ_C} h)
    state = (c.to(tl.int64) * HV + hv) * DK * DV
    if DV_PASS:
        # Y = Aᵀ dV_new in a kernel of its own. On an H200 with Triton 3.6 the single dk pass
        # faulted (illegal memory access); compute-sanitizer's first report was the wgmma of
        # Aᵀ dV_new there (SASS offset matched by compiling for sm_90; possibly the sanitizer's
        # known wgmma false positive). chunk_bwd_dh, which computes the same product in a
        # kernel as small as this one, ran clean. This pass of its own removed the fault: on
        # the H200 (session 3, benchmarks/gpu_check_gdn.py --parts probe) every
        # configuration ran right.
        at = tl.load(a_ptr + hv * 64 + rows.to(tl.int64)[None, :] * (HV * 64)
                     + offs_c[:, None], mask=r_ok[None, :] & (offs_c < 64)[:, None],
                     other=0.0)  # (C, C) Aᵀ
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            v_ok = offs_v < DV
            state_offs = state + offs_k[:, None] * DV + offs_v[None, :]
            state_ok = k_ok[:, None] & v_ok[None, :]
            do = load_rows(do_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # (C, BV)
            dh = tl.load(dhs_ptr + state_offs, mask=state_ok, other=0.0)  # (BK, BV)
            kdh = tl.dot(k, dh, input_precision=PRECISION)  # (C, BV)
            dv_new = tl.dot(pt, do, input_precision=PRECISION) + kdh * c_end[:, None]
            y = tl.dot(at, dv_new.to(dt), input_precision=PRECISION)  # (C, BV) Aᵀ dV_new
            store_rows(y_ptr + hv * DV, y, rows, r_ok, HV * DV, offs_v, v_ok)
            store_rows(dv_ptr + hv * DV, y * beta[:, None], rows, r_ok, HV * DV, offs_v, v_ok)
        return
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < DV
        state_offs = state + offs_k[:, None] * DV + offs_v[None, :]
        state_ok = k_ok[:, None] & v_ok[None, :]
        if not VNEW:
            v = load_rows(v_ptr + hv * stride_vh, rows, r_ok, stride_vt, offs_v,
                          v_ok).to(tl.float32)
        if not DK_SUM:
            do = load_rows(do_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # (C, BV)
        h = tl.load(hs_ptr + state_offs, mask=state_ok, other=0.0)  # (BK, BV)
        if VNEW:  # the dq pass only: V_new as the backward's state walk stored it
            v_new = load_rows(vn_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)
        else:
            # forward again: X = β⊙V − (β⊙e^γ⊙K̂) h, V_new = A X
            kh = tl.dot(k, h, input_precision=PRECISION)  # (C, BV)
            x = v * beta[:, None] - kh * c_w[:, None]
            v_new = tl.dot(a, x.to(dt), input_precision=PRECISION).to(dt)  # (C, BV)
        if not DK_SUM:
            dpt = tl.dot(v_new, tl.trans(do), dpt, input_precision=PRECISION)
        if DQ_PASS:
            dqk = tl.dot(do, tl.trans(h), dqk, input_precision=PRECISION)
        else:
            # ordered so that each (C, BV) tile dies soon after it is made
            dh = tl.load(dhs_ptr + state_offs, mask=state_ok, other=0.0)  # (BK, BV)
            if not DK_SUM:
                kdh = tl.dot(k, dh, input_precision=PRECISION)  # (C, BV)
                dv_new = tl.dot(pt, do, input_precision=PRECISION) + kdh * c_end[:, None]
                # row sums with q or K̂ of the (C, K) gradients, taken as (C, V) products:
                # K̂ ⊙ V_new dhᵀ is V_new ⊙ (K̂ dh), q ⊙ dO hᵀ is dO ⊙ (q h), K̂ ⊙ Y hᵀ is
                # Y ⊙ (K̂ h)
                t_end += tl.sum(v_new.to(tl.float32) * kdh, 1) * c_end
                # dA = dU (β⊙V)ᵀ + dW (β⊙e^γ⊙K̂)ᵀ = dV_new Xᵀ: X is a dot result, kept float32
                da = tl.dot(dv_new, tl.trans(x), da, input_precision=PRECISION)
            if not DK_STATS:
                # K̂ in the state update, V_new dhᵀ
                dqk = tl.dot((v_new.to(tl.float32) * e_end[:, None]).to(dt), tl.trans(dh), dqk,
                             input_precision=PRECISION)
            if not DK_SUM:
                dgc_h += tl.sum(h.to(tl.float32) * dh.to(tl.float32), 0)
            y = load_rows(y_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # Aᵀ dV_new
            if not DK_SUM:
                dbeta += tl.sum(v * y, 1)
                t_w -= tl.sum(y * kh, 1) * rk
            if not DK_STATS:
                # K̂ in W, −Aᵀ dV_new hᵀ
                dqk = tl.dot((y * (-beta * eg)[:, None]).to(dt), tl.trans(h), dqk,
                             input_precision=PRECISION)
            if not DK_SUM:
                t_q += tl.sum(do.to(tl.float32) * tl.dot(q, h, input_precision=PRECISION), 1)

    # q, k and the gates again (from cache) rather than kept in registers through the loop
    gam, gam_c, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
    eg = tl.exp(gam)
    q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)
    k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)
    # the intra-chunk product P V_new, P = (q_used K̂ᵀ) ⊙ Γ; dP = (dPᵀ)ᵀ stays float32
    gl = decay_lower(gam, 64, False)  # Γ on and below the diagonal
    if DQ_PASS:
        # O ∋ (q_used ⊙ e^γ) h and P V_new; then the L2 norm's backward
        dqs = dqk * eg[:, None] + tl.dot(tl.trans(dpt) * gl * rk[None, :], k.to(tl.float32),
                                         input_precision=PRECISION)
        dqh = dqs * scale  # gradient of q̂
        if CLOSE_DP or (FINALIZE and USE_L2NORM):
            q_hat = q.to(tl.float32) * rq[:, None]
            qdq = tl.sum(q_hat * dqh, 1)
        if FINALIZE:
            if USE_L2NORM:
                dqh = (dqh - q_hat * qdq[:, None]) * rq[:, None]
        store_rows(dq_ptr + hv * DK, dqh, rows, r_ok, HV * DK, offs_k, k_ok)
        if CLOSE_DP:
            # the dPᵀ terms of dk, (dPᵀ ⊙ Γᵀ) q_used, and of dγ, Σ_j dP ⊙ P by rows minus by
            # columns — read off the gradients: Σ_k q̂ ⊙ dq̂ is the rows' sum plus the
            # q ⊙ dO hᵀ term, Σ_k K̂ ⊙ (dPᵀ ⊙ Γᵀ) q_used the columns' (no P needed)
            dst = (dpt * decay_upper(gam, 64, False) * rqs[None, :]).to(dt)
            dkdp = tl.dot(dst, q, input_precision=PRECISION)  # (C, BK)
            store_rows(dkp_ptr + hv * DK, dkdp, rows, r_ok, HV * DK, offs_k, k_ok)
            dgam = qdq - tl.sum(k.to(tl.float32) * dkdp, 1) * rk
            tl.store(dg_ptr + rows.to(tl.int64) * HV + hv, dgam, mask=r_ok)
    elif DK_SUM:  # the loop's terms and the closing ones of the stats pass
        dqk += load_rows(dkp_ptr + hv * DK, rows, r_ok, HV * DK, offs_k, k_ok)
    else:
        dgam = t_q * rqs * eg - t_end + t_w * beta * eg
        dbeta += t_w * eg
        p = tl.dot(q, tl.trans(k), input_precision=PRECISION) * rqs[:, None] * rk[None, :] * gl
        yp = tl.trans(dpt) * p
        dgam += tl.sum(yp, 1) - tl.sum(yp, 0)
        dst = (dpt * decay_upper(gam, 64, False) * rqs[None, :]).to(dt)
        dqk += tl.dot(dst, q, input_precision=PRECISION)
        # the WY inverse: dM = −Aᵀ dA Aᵀ, kept on the strictly lower triangle by Γ_strict
        dm = tl.dot(da.to(dt), tl.trans(a), input_precision=PRECISION).to(dt)
        dm = -tl.dot(tl.trans(a), dm, input_precision=PRECISION)  # (C, C)
        gs = decay_lower(gam, 64, True)
        mkk = tl.dot(k, tl.trans(k), input_precision=PRECISION) * rk[:, None] * rk[None, :] * gs
        dbeta += tl.sum(dm * mkk, 1)
        xm = dm * mkk * beta[:, None]  # dM ⊙ M
        dgam += tl.sum(xm, 1) - tl.sum(xm, 0)
        xs = dm * gs * beta[:, None]  # S of the docstring, float32: transposed into a dot
        dqk += tl.dot((xs + tl.trans(xs)) * rk[None, :], k.to(tl.float32),
                      input_precision=PRECISION)
        # g: γ_i = Σ_{t≤i} g_t inside the chunk, γ_C = Σ_t g_t
        dgc = tl.sum(t_end, 0) + tl.sum(dgc_h, 0) * tl.exp(gam_c)
        dg = tl.sum(dgam, 0) - tl.cumsum(dgam, 0) + dgam + dgc
        gate = rows.to(tl.int64) * HV + hv
        tl.store(dg_ptr + gate, dg, mask=r_ok)
        tl.store(dbeta_ptr + gate, dbeta, mask=r_ok)
        if DK_STATS:  # dk's closing terms, for the sum pass
            store_rows(dkp_ptr + hv * DK, dqk, rows, r_ok, HV * DK, offs_k, k_ok)
    if not DQ_PASS and not DK_STATS:  # dk complete (single pass or sum pass)
        if FINALIZE:
            if USE_L2NORM:
                k_hat = k.to(tl.float32) * rk[:, None]
                dqk = (dqk - k_hat * tl.sum(k_hat * dqk, 1)[:, None]) * rk[:, None]
        store_rows(dk_ptr + hv * DK, dqk, rows, r_ok, HV * DK, offs_k, k_ok)


def _l2norm_backward(x: Tensor, dy: Tensor) -> Tensor:
    """Gradient of ``x / sqrt(Σx² + 1e-6)`` (last dim) given ``dy``, in float32."""
    x = x.float()
    r = torch.rsqrt(x.square().sum(-1, keepdim=True) + 1e-6)
    y = x * r
    return (dy - y * (y * dy).sum(-1, keepdim=True)) * r


def chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, a: Tensor,
              rq: Tensor | None, rk: Tensor | None, do: Tensor,
              states: Tensor, dstates: Tensor, seqs: Sequences, scale: float,
              use_qk_l2norm: bool, precision: str, y: Tensor | None = None,
              dv: Tensor | None = None, fused_group_grads: bool = False,
              split_dk: bool = False, dm_from_y: bool = False,
              v_new: Tensor | None = None) -> tuple[Tensor, ...]:
    """``(dq, dk, dv, dg, dbeta)``: dq, dk ``[tokens, H, K]`` and dv ``[tokens, HV, V]`` in the
    inputs' dtype, dg and dbeta ``[tokens, HV]`` float32. Given ``y`` (``Aᵀ dV_new``, float32)
    and ``dv`` — as ``chunk_bwd_dh(..., store_y=True)`` writes them — the dv pass is skipped.
    With grouped value heads, ``fused_group_grads`` sums dq, dk over each group and applies the
    L2 norm's backward in one kernel (:mod:`.group_grads`) instead of in torch. ``split_dk``
    runs the dk pass as two (``PASS`` 3 then 4, a float32 ``[tokens, HV, K]`` scratch between
    them), each with fewer live tiles than the single one. ``dm_from_y`` makes dk, dg and dβ
    in :mod:`.chunk_bwd_wy`'s passes instead (the WY gradient from ``Y``; two passes with
    ``split_dk``, else one), the dq pass adding the ``dPᵀ`` terms; given ``v_new``
    (``U − W h`` ``[tokens, HV, V]`` in the inputs' dtype, as ``chunk_fwd_h(..., v_new=)``
    writes it) those passes read it instead of computing it."""
    tokens, H, K = k.shape
    HV, V = v.shape[1:]
    group = HV // H
    finalize = group == 1
    partial = k.dtype if finalize else torch.float32
    dq = k.new_empty((tokens, HV, K), dtype=partial)
    dk = k.new_empty((tokens, HV, K), dtype=partial)
    dg = g.new_empty((tokens, HV))
    dbeta = g.new_empty((tokens, HV))
    dk_part = None
    if split_dk or dm_from_y:
        dk_part = g.new_empty((tokens, HV, K))  # dk's closing terms, float32
    dv_pass = y is None
    if dv_pass:
        dv = v.new_empty((tokens, HV, V))
        y = g.new_empty((tokens, HV, V))  # Aᵀ dV_new, float32, from the dv pass to the dk pass
    key = ["DK", "DV", "USE_L2NORM", "FINALIZE"]
    vn = v_new if dm_from_y else None  # V_new read, not recomputed (dq and WY passes)
    for name in launch_names(dm_from_y, split_dk, dv_pass, vn is not None):
        args = PASS_ARGS[name]
        reads_vn = name.endswith("_vn")
        if "PASS" in args:
            launch(name, chunk_bwd_kernel, CONFIGS, INTERPRETER_CONFIG, key,
                   lambda meta: (seqs.num_chunks, HV),
                   q, k, v, g, beta, a, rq, rk, do, states, dstates, dq, dk, dv, dg, dbeta, y,
                   y if dk_part is None else dk_part, vn if reads_vn else None,
                   seqs.chunk_seq, seqs.cu, seqs.chunk_off,
                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                   v.stride(1), scale, HV, group, DK=K, DV=V,
                   BK=block(K), USE_L2NORM=use_qk_l2norm, FINALIZE=finalize,
                   PRECISION=precision, PASS=args["PASS"], CLOSE_DP=dm_from_y,
                   VNEW=reads_vn, prune=prune)
        else:
            # each WY pass reads the dγ (the stats pass alone also dk's scratch) that it then
            # overwrites
            overwritten = ("dg_ptr", "dkp_ptr") if not args["SUM"] else ("dg_ptr",)
            launch(name, chunk_bwd_wy_kernel, CONFIGS, INTERPRETER_CONFIG, key,
                   lambda meta: (seqs.num_chunks, HV),
                   k, v, g, beta, a, rk, states, dstates, y, dk, dg, dbeta, dk_part, vn,
                   seqs.chunk_seq, seqs.cu, seqs.chunk_off,
                   k.stride(0), k.stride(1), v.stride(0), v.stride(1), HV, group, DK=K, DV=V,
                   BK=block(K), USE_L2NORM=use_qk_l2norm, FINALIZE=finalize,
                   PRECISION=precision, **args, VNEW=reads_vn, prune=prune,
                   restore=overwritten)
    if not finalize and fused_group_grads:
        from attnplug_triton.ops.gated_delta_rule.group_grads import finish_group_grads

        return (finish_group_grads(dq, q, group, use_qk_l2norm),
                finish_group_grads(dk, k, group, use_qk_l2norm), dv, dg, dbeta)
    if not finalize:
        dq = dq.view(tokens, H, group, K).sum(2)  # (tokens, H, K) gradient of q̂
        dk = dk.view(tokens, H, group, K).sum(2)
        if use_qk_l2norm:
            dq, dk = _l2norm_backward(q, dq), _l2norm_backward(k, dk)
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    return dq, dk, dv, dg, dbeta
