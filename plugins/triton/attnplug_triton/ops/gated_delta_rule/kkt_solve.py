"""Stage 1 of the chunked gated delta rule: the WY inverse ``A`` of every chunk, in one kernel.

``A = (I + StrictTril(diag(β) K̂ K̂ᵀ ⊙ Γ))⁻¹`` (64 × 64, unit lower triangular) with
``Γ_ij = exp(γ_i − γ_j)`` and ``K̂`` the (optionally L2-normalised) keys of the chunk. One program
per (chunk, value head) computes the ten lower 16 × 16 blocks of ``M = StrictTril(...)`` from
four 16-row key tiles, inverts the four diagonal blocks by forward substitution, row by row
without dots (up to K = 128; above it, or when :data:`DIAGONAL_INVERSE` says ``"series"``, as
the finite series ``(I − M)(I + M²)(I + M⁴)(I + M⁸)``, six float32 dots on 16 × 16 tiles;
:func:`diagonal_inverse_for`), fills the six blocks
below them with ``A_ij = −A_ii Σ_{j≤l<i} M_il A_lj`` (float32 dots, "ieee" unless
:data:`INVERSE_PRECISION` says otherwise), and writes ``A``
once (``[tokens, HV, 64]``, in the inputs' dtype, like fla). With ``use_qk_l2norm`` the key
head's first program also writes the inverse norms of q and k (float32 ``[tokens, H]``), so
that every later kernel feeds q and k to its dots as loaded. The cumulative gate and ``K̂K̂ᵀ``
never touch memory. Nothing here transposes a dot result: the only transposed operand is a
loaded key tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.common import (
    CHUNK,
    Sequences,
    block,
    chunk_bounds,
    launch,
    load_rows,
)

__all__ = ["kkt_solve", "kkt_solve_kernel", "CONFIGS", "INVERSE_PRECISION", "INVERSE_PRECISIONS",
           "DIAGONAL_INVERSE", "DIAGONAL_INVERSES", "SUBSTITUTION_MAX_DIM",
           "diagonal_inverse_for"]

CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4) for s in (1, 2)]
INTERPRETER_CONFIG = triton.Config({}, num_warps=1, num_stages=1)
# The float32 products of the inverse (the series and the blocks below the diagonal):
# "ieee" (served) multiplies on the CUDA cores — at 2 warps on sm_90 about 2,800 FMAs, 900
# shared-memory accesses and 75 barriers a thread (Triton 3.6 PTX), each product's operands
# passing through shared memory; "tf32x3" (three TF32 tensor-core products, float32's
# accuracy to about 2⁻²²) about 640 mma.sync, 1,200 register shuffles, 50 shared-memory
# accesses and 42 barriers. Both right on the H200 (Triton 3.6, bf16, against float64 at
# K = V = 64 and 128 and the project shape), but tf32x3 slower: the forward at B = 8,
# T = 4096, H = 16, K = V = 128 took 1.429 ms with it against 1.010 (session 12,
# benchmarks/results/2026-11-28-h200-session12.md). "ieee" is served.
INVERSE_PRECISION = "ieee"
INVERSE_PRECISIONS = ("ieee", "tf32x3")
# How the four 16 × 16 diagonal blocks are inverted: "substitution" (served), forward
# substitution row by row — row i of the inverse is e_i − Σ_{j<i} M_ij (row j) — fifteen
# dependent steps of a masked (16,) × (16, 16) product on the CUDA cores, the four blocks
# interleaved, no dot: about 4K multiply-adds a block instead of 24.6K, and no operand passing
# through shared memory between products; or "series", the product
# (I − M)(I + M²)(I + M⁴)(I + M⁸), six float32 dots a block (24 of the kernel's 38). Both
# float32 and exact in exact arithmetic, but the series forms partial products in the
# thousands that cancel when the keys of a block nearly coincide: with keys 1 + 0.05·noise,
# β = 0.999 and no decay its A is 5.6e-4 off float64 where the substitution's is 4.9e-7 (the
# interpreter, float32; A is stored in the inputs' dtype, so this shows in float32 inputs,
# below bf16's own rounding). ptxas (sm_90, Triton 3.6, 2 warps): both 255 registers, no
# spills, four programs a SM; the substitution's PTX has 44 instead of 75 barriers and 387
# instead of 899 shared-memory accesses, 1,136 instead of 184 shuffles. On the H200 (session
# 15, benchmarks/results/2026-11-29-h200-session15.md): every configuration right in bf16 at
# K = V = 32/64/128 and float32 at 16/64, every checked shape within tolerance of float64;
# the forward at B = 8, T = 4096, H = 16, K = V = 128 0.675 ms against the series' 0.693 (fla
# 0.977), at B = 1, T = 64K 3.969 against 4.001. Served since session 15 up to
# SUBSTITUTION_MAX_DIM: at K = 256 it has not run on a GPU (its check there did not finish in
# the session's device time) and Triton 3.6 has faulted on other kernels at that head dim, so
# K = 256 keeps the series, which was checked there. None (served) chooses by K
# (:func:`diagonal_inverse_for`); a name forces it.
DIAGONAL_INVERSE: str | None = None
SUBSTITUTION_MAX_DIM = 128
DIAGONAL_INVERSES = ("series", "substitution")


@triton.jit
def _norms(x):
    """``1 / sqrt(Σ x² + 1e-6)`` per row of a tile, float32."""
    x = x.to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, 1) + 1e-6)


@triton.jit
def _sub_keys(k_base, rk_ptr, rows, eos, stride_kt, offs_k, k_ok, H, hk, WRITE_NORMS,
              USE_L2NORM: tl.constexpr):
    """A 16-row key tile, normalised in float32, in the inputs' dtype for the dot; its inverse
    norms are written to ``rk_ptr[t, hk]`` by one program per key head."""
    k = load_rows(k_base, rows, rows < eos, stride_kt, offs_k, k_ok)
    if USE_L2NORM:
        rk = _norms(k)
        if WRITE_NORMS:
            tl.store(rk_ptr + rows.to(tl.int64) * H + hk, rk, mask=rows < eos)
        k = (k.to(tl.float32) * rk[:, None]).to(k.dtype)
    return k


@triton.jit
def _sub_gates(g_ptr, beta_ptr, rows, eos, hv, HV):
    idx = rows.to(tl.int64) * HV + hv
    ok = rows < eos
    return tl.load(g_ptr + idx, mask=ok, other=0.0), tl.load(beta_ptr + idx, mask=ok, other=0.0)


@triton.jit
def _kkt_block(ka, kb, beta_a, gam_a, gam_b, DIAG: tl.constexpr, PRECISION: tl.constexpr):
    """``M_ab = β_a (k_a · k_b) exp(γ_a − γ_b)``; strictly lower on a diagonal block."""
    s = tl.dot(ka, tl.trans(kb), input_precision=PRECISION)  # (16, 16)
    d = gam_a[:, None] - gam_b[None, :]
    if DIAG:
        i = tl.arange(0, 16)
        keep = i[:, None] > i[None, :]
        return tl.where(keep, s * tl.exp(tl.where(keep, d, 0.0)) * beta_a[:, None], 0.0)
    return s * tl.exp(d) * beta_a[:, None]


@triton.jit
def _kkt_diag_t(k, beta, gam, PRECISION: tl.constexpr):
    """``Mᵀ`` of a diagonal block, built transposed rather than transposing a dot result:
    ``Mᵀ_ji = M_ij = β_i (k_i · k_j) exp(γ_i − γ_j)`` for ``i > j``, zero elsewhere."""
    s = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # (16, 16), symmetric
    i = tl.arange(0, 16)
    keep = i[None, :] > i[:, None]  # column i below row j's diagonal
    d = gam[None, :] - gam[:, None]
    return tl.where(keep, s * tl.exp(tl.where(keep, d, 0.0)) * beta[None, :], 0.0)


@triton.jit
def _substitute_row(x, mt, i: tl.constexpr):
    """Row ``i`` of ``(I + M)⁻¹`` into ``x``, whose rows ``j < i`` are final and row ``i`` is
    ``e_i``: ``e_i − Σ_j M_ij x_j`` (``M_ij`` is column ``i`` of ``mt``, zero for ``j ≥ i``)."""
    r = tl.arange(0, 16)
    m_i = tl.sum(tl.where(r[None, :] == i, mt, 0.0), 1)  # (16,) over j: M_ij
    row = tl.sum(m_i[:, None] * x, 0)  # (16,) over columns: Σ_j M_ij x_jc
    return tl.where(r[:, None] == i, x - row[None, :], x)


@triton.jit
def _unit_lower_inverses_by_substitution(mt0, mt1, mt2, mt3):
    """``(I + M)⁻¹`` of four strictly lower 16 × 16 tiles given as ``Mᵀ``, by forward
    substitution, the four chains interleaved (:data:`DIAGONAL_INVERSE`)."""
    r = tl.arange(0, 16)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    x0 = eye
    x1 = eye
    x2 = eye
    x3 = eye
    for i in tl.static_range(1, 16):
        x0 = _substitute_row(x0, mt0, i)
        x1 = _substitute_row(x1, mt1, i)
        x2 = _substitute_row(x2, mt2, i)
        x3 = _substitute_row(x3, mt3, i)
    return x0, x1, x2, x3


@triton.jit
def _unit_lower_inverse(m, INV_PRECISION: tl.constexpr):
    """``(I + m)⁻¹`` of a strictly lower 16 × 16 tile. ``m`` is nilpotent (``m¹⁶ = 0``), so the
    inverse is the finite series ``Σ_{n<16} (−m)ⁿ = (I − m)(I + m²)(I + m⁴)(I + m⁸)``: six
    float32 dots, at most four of them in a chain, instead of the fifteen dependent steps of
    forward substitution."""
    i = tl.arange(0, 16)
    eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    m2 = tl.dot(m, m, input_precision=INV_PRECISION)
    m4 = tl.dot(m2, m2, input_precision=INV_PRECISION)
    m8 = tl.dot(m4, m4, input_precision=INV_PRECISION)
    x = eye - m
    x = tl.dot(x, m2, x, input_precision=INV_PRECISION)  # x (I + m²)
    x = tl.dot(x, m4, x, input_precision=INV_PRECISION)
    return tl.dot(x, m8, x, input_precision=INV_PRECISION)


@triton.jit
def kkt_solve_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, a_ptr, rq_ptr, rk_ptr, chunk_seq, cu, chunk_off,
    stride_qt, stride_qh, stride_kt, stride_kh, HV, GROUP,
    DK: tl.constexpr, BK: tl.constexpr, USE_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
    INV_PRECISION: tl.constexpr = "ieee", SUBSTITUTION: tl.constexpr = False,
):
    """``A`` of one (chunk, value head): ``a_ptr[t, hv, :]`` for the chunk's tokens ``t``; with
    ``USE_L2NORM`` also the inverse norms of q and k (``[t, hk]``, by the key head's first
    value head), so that the later kernels use q and k as loaded."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    hk = hv // GROUP
    H = HV // GROUP
    first = hv % GROUP == 0
    _, start, eos = chunk_bounds(chunk_seq, cu, chunk_off, c, 64)
    k_base = k_ptr + hk * stride_kh
    offs_k = tl.arange(0, BK)
    k_ok = offs_k < DK
    rows = start + tl.arange(0, 64)
    if USE_L2NORM:
        if first:
            q = load_rows(q_ptr + hk * stride_qh, rows, rows < eos, stride_qt, offs_k, k_ok)
            tl.store(rq_ptr + rows.to(tl.int64) * H + hk, _norms(q), mask=rows < eos)
    r0 = start + tl.arange(0, 16)
    r1 = r0 + 16
    r2 = r0 + 32
    r3 = r0 + 48
    k0 = _sub_keys(k_base, rk_ptr, r0, eos, stride_kt, offs_k, k_ok, H, hk, first, USE_L2NORM)
    k1 = _sub_keys(k_base, rk_ptr, r1, eos, stride_kt, offs_k, k_ok, H, hk, first, USE_L2NORM)
    k2 = _sub_keys(k_base, rk_ptr, r2, eos, stride_kt, offs_k, k_ok, H, hk, first, USE_L2NORM)
    k3 = _sub_keys(k_base, rk_ptr, r3, eos, stride_kt, offs_k, k_ok, H, hk, first, USE_L2NORM)
    g0, b0 = _sub_gates(g_ptr, beta_ptr, r0, eos, hv, HV)
    g1, b1 = _sub_gates(g_ptr, beta_ptr, r1, eos, hv, HV)
    g2, b2 = _sub_gates(g_ptr, beta_ptr, r2, eos, hv, HV)
    g3, b3 = _sub_gates(g_ptr, beta_ptr, r3, eos, hv, HV)
    # γ over the whole chunk: each tile's cumsum plus the totals of the tiles before it
    s0 = tl.sum(g0, 0)
    s1 = s0 + tl.sum(g1, 0)
    s2 = s1 + tl.sum(g2, 0)
    c0 = tl.cumsum(g0, 0)
    c1 = tl.cumsum(g1, 0) + s0
    c2 = tl.cumsum(g2, 0) + s1
    c3 = tl.cumsum(g3, 0) + s2

    if SUBSTITUTION:  # the diagonal blocks transposed, for the substitution's row steps
        mt0 = _kkt_diag_t(k0, b0, c0, PRECISION)
        mt1 = _kkt_diag_t(k1, b1, c1, PRECISION)
        mt2 = _kkt_diag_t(k2, b2, c2, PRECISION)
        mt3 = _kkt_diag_t(k3, b3, c3, PRECISION)
    else:
        m00 = _kkt_block(k0, k0, b0, c0, c0, True, PRECISION)
        m11 = _kkt_block(k1, k1, b1, c1, c1, True, PRECISION)
        m22 = _kkt_block(k2, k2, b2, c2, c2, True, PRECISION)
        m33 = _kkt_block(k3, k3, b3, c3, c3, True, PRECISION)
    m10 = _kkt_block(k1, k0, b1, c1, c0, False, PRECISION)
    m20 = _kkt_block(k2, k0, b2, c2, c0, False, PRECISION)
    m21 = _kkt_block(k2, k1, b2, c2, c1, False, PRECISION)
    m30 = _kkt_block(k3, k0, b3, c3, c0, False, PRECISION)
    m31 = _kkt_block(k3, k1, b3, c3, c1, False, PRECISION)
    m32 = _kkt_block(k3, k2, b3, c3, c2, False, PRECISION)

    if SUBSTITUTION:
        a00, a11, a22, a33 = _unit_lower_inverses_by_substitution(mt0, mt1, mt2, mt3)
    else:
        a00 = _unit_lower_inverse(m00, INV_PRECISION)
        a11 = _unit_lower_inverse(m11, INV_PRECISION)
        a22 = _unit_lower_inverse(m22, INV_PRECISION)
        a33 = _unit_lower_inverse(m33, INV_PRECISION)
    ip: tl.constexpr = INV_PRECISION  # the products below: float32 operands
    a10 = -tl.dot(tl.dot(a11, m10, input_precision=ip), a00, input_precision=ip)
    a21 = -tl.dot(tl.dot(a22, m21, input_precision=ip), a11, input_precision=ip)
    a32 = -tl.dot(tl.dot(a33, m32, input_precision=ip), a22, input_precision=ip)
    a20 = tl.dot(m20, a00, input_precision=ip)
    a20 = -tl.dot(a22, tl.dot(m21, a10, a20, input_precision=ip), input_precision=ip)
    a31 = tl.dot(m31, a11, input_precision=ip)
    a31 = -tl.dot(a33, tl.dot(m32, a21, a31, input_precision=ip), input_precision=ip)
    a30 = tl.dot(m31, a10, tl.dot(m30, a00, input_precision=ip), input_precision=ip)
    a30 = -tl.dot(a33, tl.dot(m32, a20, a30, input_precision=ip), input_precision=ip)

    # A's rows in four 16-row strips; the blocks above the diagonal are stored as zeros
    a_base = a_ptr + hv * 64
    cols = tl.arange(0, 16)[None, :]
    p0 = a_base + r0.to(tl.int64)[:, None] * HV * 64 + cols
    p1 = p0 + 16 * HV * 64
    p2 = p0 + 32 * HV * 64
    p3 = p0 + 48 * HV * 64
    ok0 = (r0 < eos)[:, None]
    ok1 = (r1 < eos)[:, None]
    ok2 = (r2 < eos)[:, None]
    ok3 = (r3 < eos)[:, None]
    dt = a_ptr.dtype.element_ty
    zero = tl.zeros([16, 16], dt)
    tl.store(p0, a00.to(dt), mask=ok0)
    tl.store(p0 + 16, zero, mask=ok0)
    tl.store(p0 + 32, zero, mask=ok0)
    tl.store(p0 + 48, zero, mask=ok0)
    tl.store(p1, a10.to(dt), mask=ok1)
    tl.store(p1 + 16, a11.to(dt), mask=ok1)
    tl.store(p1 + 32, zero, mask=ok1)
    tl.store(p1 + 48, zero, mask=ok1)
    tl.store(p2, a20.to(dt), mask=ok2)
    tl.store(p2 + 16, a21.to(dt), mask=ok2)
    tl.store(p2 + 32, a22.to(dt), mask=ok2)
    tl.store(p2 + 48, zero, mask=ok2)
    tl.store(p3, a30.to(dt), mask=ok3)
    tl.store(p3 + 16, a31.to(dt), mask=ok3)
    tl.store(p3 + 32, a32.to(dt), mask=ok3)
    tl.store(p3 + 48, a33.to(dt), mask=ok3)

def diagonal_inverse_for(K: int, diagonal_inverse: str | None = None) -> str:
    """How kkt_solve inverts the diagonal blocks at key dim ``K``: ``diagonal_inverse`` when
    given, else :data:`DIAGONAL_INVERSE` when set, else ``"substitution"`` up to
    :data:`SUBSTITUTION_MAX_DIM` and ``"series"`` above it."""
    method = DIAGONAL_INVERSE if diagonal_inverse is None else diagonal_inverse
    if method is None:
        return "substitution" if K <= SUBSTITUTION_MAX_DIM else "series"
    if method not in DIAGONAL_INVERSES:
        which = ("kkt_solve.DIAGONAL_INVERSE" if diagonal_inverse is None
                 else "diagonal_inverse")
        raise ValueError(f"{which}={method!r} is not accepted: expected None or one of "
                         f"{list(DIAGONAL_INVERSES)}")
    return method


def kkt_solve(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, seqs: Sequences,
              use_qk_l2norm: bool, precision: str, inverse_precision: str | None = None,
              diagonal_inverse: str | None = None,
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(A[tokens, HV, 64]`` in k's dtype, and with ``use_qk_l2norm`` the inverse norms
    ``rq, rk[tokens, H]`` float32 (else None)``)`` for token-major ``q, k[tokens, H, K]`` and
    float32 ``g, beta[tokens, HV]`` (contiguous). The inverse's products take
    ``inverse_precision`` (None: :data:`INVERSE_PRECISION`); its diagonal blocks are inverted
    by ``diagonal_inverse`` (None: :func:`diagonal_inverse_for`)."""
    inverse = INVERSE_PRECISION if inverse_precision is None else inverse_precision
    if inverse not in INVERSE_PRECISIONS:
        which = ("kkt_solve.INVERSE_PRECISION" if inverse_precision is None
                 else "inverse_precision")
        raise ValueError(f"{which}={inverse!r} is not accepted: expected one of "
                         f"{list(INVERSE_PRECISIONS)}")
    tokens, H, K = k.shape
    method = diagonal_inverse_for(K, diagonal_inverse)
    HV = g.shape[1]
    a = k.new_empty((tokens, HV, CHUNK))
    rq = rk = None
    if use_qk_l2norm:
        rq, rk = (k.new_empty((tokens, H), dtype=torch.float32) for _ in range(2))
    launch("kkt_solve", kkt_solve_kernel, CONFIGS, INTERPRETER_CONFIG,
           ["DK", "USE_L2NORM", "INV_PRECISION", "SUBSTITUTION"],
           lambda meta: (seqs.num_chunks, HV),
           q, k, g, beta, a, rq, rk, seqs.chunk_seq, seqs.cu, seqs.chunk_off, q.stride(0),
           q.stride(1), k.stride(0), k.stride(1), HV, HV // H, DK=K, BK=block(K),
           USE_L2NORM=use_qk_l2norm, PRECISION=precision, INV_PRECISION=inverse,
           SUBSTITUTION=method == "substitution")
    return a, rq, rk
