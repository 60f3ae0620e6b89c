"""The gated delta rule (Gated DeltaNet's token mixer), chunked and per-token (DESIGN §8).

Conventions (flash-linear-attention's): the state ``S`` of each value head is ``K × V``; ``g`` is a
natural-log decay (``≤ 0``); for every token

    S' = exp(g_t) · S_{t-1}
    S_t = S' + k_t ⊗ β_t (v_t − S'ᵀ k_t)
    o_t = scale · S_tᵀ q_t                      (scale defaults to K ** -0.5)

Key head ``h`` serves value heads ``h·G … h·G + G − 1`` with ``G = HV / H``. With ``cu_seqlens``
(batch 1), the packed sequences are independent and each has its own state.

Precision: inputs in float16/bfloat16/float32 are computed in float32; if any input is float64
everything is computed in float64. The output takes v's dtype; the final state is float32 (float64).

The chunked form (chunk ``C``, ``γ`` the within-chunk cumulative log decay,
``Γ_ij = exp(γ_i − γ_j)``) uses the WY representation: ``U = A(β⊙V)``, ``W = A(β⊙e^γ⊙K)`` with
``A = (I + StrictTril(diag(β) K Kᵀ ⊙ Γ))⁻¹``; then, serially over chunks,
``V_new = U − W h``, ``O = scale·[(Q⊙e^γ) h + (Q Kᵀ ⊙ Γ ⊙ causal) V_new]``,
``h ← e^{γ_C} h + (K ⊙ e^{γ_C − γ})ᵀ V_new``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "chunk_gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "gated_delta_rule_step",
]

_L2NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Validation


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor; got {kind}")


def _check_qkv_g_beta(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    """Raise ``ValueError`` unless q, k [B,T,H,K], v [B,T,HV,V], g, beta [B,T,HV] fit together."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K]; got shape {_shape(q)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {_shape(q)}; got {_shape(k)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B={B}, T={T}, HV, V]; got shape {_shape(v)}")
    HV = v.shape[2]
    if K == 0 or v.shape[3] == 0:
        raise ValueError(
            f"the key dim K (q, k) and value dim V (v) must be > 0; got K={K}, V={v.shape[3]}"
        )
    if H == 0 or HV % H != 0:
        raise ValueError(
            f"the value heads HV={HV} (v, g, beta) must be a multiple of the key heads H={H} (q, k)"
        )
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}; got {_shape(x)}")


def _sequence_bounds(cu_seqlens: Tensor | None, B: int, T: int) -> list[tuple[int, int]] | None:
    """Check ``cu_seqlens`` and return the ``(start, end)`` of each packed sequence (or None)."""
    if cu_seqlens is None:
        return None
    if (
        not isinstance(cu_seqlens, Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.is_floating_point()
        or cu_seqlens.dtype == torch.bool
    ):
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence offsets")
    if B != 1:
        raise ValueError(f"cu_seqlens requires batch size B == 1 (packed sequences); got B={B}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if (
        len(cu) < 2
        or cu[0] != 0
        or cu[-1] != T
        or any(a > b for a, b in zip(cu[:-1], cu[1:], strict=True))
    ):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T={T}, with at least 2 "
            f"entries; got {cu}"
        )
    return list(zip(cu[:-1], cu[1:], strict=True))


def _check_state(name: str, state: Tensor | None, N: int, HV: int, K: int, V: int) -> None:
    if state is None:
        return
    _check_float(name, state)
    if state.shape != (N, HV, K, V):
        raise ValueError(
            f"{name} must be [N, HV, K, V] = {(N, HV, K, V)} (N = number of sequences); "
            f"got {_shape(state)}"
        )


def _check_scale(scale: float | None) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None; got {type(scale).__name__}")


# --------------------------------------------------------------------------------------------
# Shared preparation


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    if any(x is not None and x.dtype == torch.float64 for x in tensors):
        return torch.float64
    return torch.float32


def _l2norm(x: Tensor) -> Tensor:
    """``x / sqrt(Σ x² + 1e-6)`` over the last dim."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + _L2NORM_EPS)


def _prepare_qk(
    q: Tensor, k: Tensor, HV: int, scale: float | None, use_qk_l2norm: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cast, optionally L2-normalise, scale q and repeat q, k to the HV value heads."""
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    group = HV // q.shape[2]
    if group > 1:
        q = q.repeat_interleave(group, dim=2)  # (B, T, HV, K)
        k = k.repeat_interleave(group, dim=2)  # (B, T, HV, K)
    return q, k


# --------------------------------------------------------------------------------------------
# Chunked form


def _pad_batch(x: Tensor, Tp: int) -> Tensor:
    """Zero-pad dim 1 of ``x[B, T, ...]`` to ``Tp``."""
    pad = [0, 0] * (x.dim() - 2) + [0, Tp - x.shape[1]]
    return F.pad(x, pad)


def _pack_index(bounds: list[tuple[int, int]], Tp: int, T: int, device: torch.device) -> Tensor:
    """``[N, Tp]`` positions into the packed sequence; ``T`` (a zero row) where padded."""
    idx = torch.full((len(bounds), Tp), T, dtype=torch.long)
    for i, (start, end) in enumerate(bounds):
        idx[i, : end - start] = torch.arange(start, end)
    return idx.to(device)


def _to_padded_sequences(x: Tensor, idx: Tensor) -> Tensor:
    """Packed ``x[1, T, ...]`` to padded ``[N, Tp, ...]``; ``idx`` from :func:`_pack_index`."""
    rows = torch.cat([x[0], x.new_zeros((1, *x.shape[2:]))])  # (T + 1, ...)
    return rows[idx]  # (N, Tp, ...)


def _from_padded_sequences(x: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """Zero-padded ``x[N, Tp, ...]`` back to packed ``[1, T, ...]``."""
    # unbind, not x[i]: one gradient stack instead of a zero-filled [N, Tp, ...] per sequence
    rows = x.unbind(0)
    return torch.cat([r[: end - start] for r, (start, end) in zip(rows, bounds, strict=True)])[None]


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """``[N, NT·C, HV, *D]`` to contiguous ``[N·HV, NT, C, *D]``."""
    N, Tp, HV = x.shape[:3]
    x = x.reshape(N, Tp // C, C, HV, *x.shape[3:])  # (N, NT, C, HV, *D)
    return x.movedim(3, 1).reshape(N * HV, Tp // C, C, *x.shape[4:])  # (N·HV, NT, C, *D)


def _unit_lower_inverse(m: Tensor) -> Tensor:
    """``(I + StrictTril(m))⁻¹`` for square ``m (..., C, C)``, by recursive halving.

    Only the strictly lower triangle of ``m`` is read (the diagonal counts as ones).
    ``[[M11, 0], [M21, M22]]⁻¹ = [[A, 0], [−B M21 A, B]]`` with ``A = M11⁻¹``, ``B = M22⁻¹``; blocks
    of at most 16 rows go to ``solve_triangular``, which is slow on CPU for large batches of 64×64.
    """
    C = m.shape[-1]
    if C <= 16:
        eye = torch.eye(C, dtype=m.dtype, device=m.device).expand_as(m)  # (..., C, C)
        return torch.linalg.solve_triangular(m, eye, upper=False, unitriangular=True)
    h = C // 2
    if C % 2 == 0:
        a, b = _unit_lower_inverse(torch.stack([m[..., :h, :h], m[..., h:, h:]])).unbind(0)
    else:
        a, b = _unit_lower_inverse(m[..., :h, :h]), _unit_lower_inverse(m[..., h:, h:])
    c = -(b @ m[..., h:, :h] @ a)  # (..., C − h, h)
    top = torch.cat([a, m.new_zeros((*m.shape[:-2], h, C - h))], dim=-1)  # (..., h, C)
    return torch.cat([top, torch.cat([c, b], dim=-1)], dim=-2)  # (..., C, C)


def _wy_factors(k: Tensor, v: Tensor, gam: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per chunk: ``U = A(β⊙V)``, ``W = A(β⊙e^γ⊙K)`` and the decay matrix ``Γ ⊙ causal``.

    k: (NH, NT, C, K); v: (NH, NT, C, V); gam, beta: (NH, NT, C).
    """
    C = k.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()  # (C, C) incl. diagonal
    diff = gam[..., :, None] - gam[..., None, :]  # (NH, NT, C, C)
    decay = torch.where(causal, diff, float("-inf")).exp()  # (NH, NT, C, C), 0 above diagonal
    lower = (k @ k.transpose(-1, -2)) * decay * beta[..., None]  # (NH, NT, C, C)
    a = _unit_lower_inverse(lower)  # (NH, NT, C, C) (I + StrictTril(βKKᵀ⊙Γ))⁻¹
    u = a @ (beta[..., None] * v)  # (NH, NT, C, V)
    w = a @ ((beta * gam.exp())[..., None] * k)  # (NH, NT, C, K)
    return u, w, decay


def _chunk_forward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor, C: int
) -> tuple[Tensor, Tensor]:
    """The chunked gated delta rule on padded sequences (``Tp`` a multiple of ``C``).

    q (scaled), k: (N, Tp, HV, K); v: (N, Tp, HV, V); g, beta: (N, Tp, HV); h0: (N, HV, K, V).
    Returns o (N, Tp, HV, V) and the final state (N, HV, K, V).
    """
    N, Tp, HV, K = q.shape
    V = v.shape[-1]
    NT = Tp // C
    q, k, v = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C)  # (NH, NT, C, ·)
    g, beta = _to_chunks(g, C), _to_chunks(beta, C)  # (NH, NT, C)
    gam = g.cumsum(-1)  # (NH, NT, C) within-chunk cumulative log decay
    u, w, decay = _wy_factors(k, v, gam, beta)
    k_to_end = (k * (gam[..., -1:] - gam).exp()[..., None]).transpose(-1, -2)  # (NH, NT, K, C)
    chunk_decay = gam[..., -1].exp()[..., None, None]  # (NH, NT, 1, 1)

    q_in = q * gam.exp()[..., None]  # (NH, NT, C, K) reads the state at the chunk start
    q_intra = (q @ k.transpose(-1, -2)) * decay  # (NH, NT, C, C) reads this chunk's new values

    # The chunks taken with unbind, not indexing: one gradient stack rather than a zero-filled
    # full-size gradient per indexed step (quadratic in the length; 2x the forward+backward
    # time at T = 4096 on a CPU). Outputs are made in the loop, so no state is kept beyond
    # what autograd saves.
    u, w, k_to_end, chunk_decay, q_intra, q_in = (
        x.unbind(1) for x in (u, w, k_to_end, chunk_decay, q_intra, q_in)
    )  # NT × (NH, ·, ·)
    h = h0.reshape(N * HV, K, V)  # (NH, K, V)
    outs = []
    for n in range(NT):
        v_new = torch.baddbmm(u[n], w[n], h, alpha=-1)  # (NH, C, V) U − W h
        outs.append(torch.baddbmm(q_intra[n] @ v_new, q_in[n], h))  # (NH, C, V)
        h = torch.baddbmm(chunk_decay[n] * h, k_to_end[n], v_new)  # (NH, K, V)
    h_final = h.reshape(N, HV, K, V)
    if NT == 0:
        return q.new_zeros(N, Tp, HV, V), h_final
    o = torch.stack(outs, dim=1)  # (NH, NT, C, V)
    return o.reshape(N, HV, Tp, V).transpose(1, 2), h_final  # (N, Tp, HV, V)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule, chunked (WY form inside a chunk, the state carried between chunks).

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]`` with ``HV % H == 0``.
        g: log decays ``[B, T, HV]`` (``≤ 0``).
        beta: write strengths ``[B, T, HV]``.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` or None (zeros); ``N = B``, or the number of packed
            sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: ``[N + 1]`` integer offsets of packed sequences; requires ``B == 1``.
        use_qk_l2norm: L2-normalise q and k per head (``x / sqrt(Σx² + 1e-6)``) first.
        chunk_size: tokens per chunk (any positive int; 64 by default). Inputs shorter than a
            chunk are processed as one chunk of their length.

    Returns:
        ``(o[B, T, HV, V]`` in v's dtype, ``final_state[N, HV, K, V]`` float32 (float64 if any
        input is float64) or None).

    Raises:
        ValueError: on shapes, dtypes, ``cu_seqlens`` or ``chunk_size`` that do not fit (the
        message names the argument).
    """
    _check_qkv_g_beta(q, k, v, g, beta)
    _check_scale(scale)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    bounds = _sequence_bounds(cu_seqlens, B, T)
    N = B if bounds is None else len(bounds)
    _check_state("initial_state", initial_state, N, HV, K, V)

    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    qc, kc = _prepare_qk(q, k, HV, scale, use_qk_l2norm, dtype)  # (B, T, HV, K)
    vc, gc, bc = v.to(dtype), g.to(dtype), beta.to(dtype)
    longest = T if bounds is None else max(end - start for start, end in bounds)
    C = max(1, min(chunk_size, longest))  # short inputs (decoding) need no padding
    Tp = -(-longest // C) * C
    if bounds is None:
        padded = [_pad_batch(x, Tp) for x in (qc, kc, vc, gc, bc)]  # (B, Tp, ...)
    else:
        idx = _pack_index(bounds, Tp, T, q.device)  # (N, Tp)
        padded = [_to_padded_sequences(x, idx) for x in (qc, kc, vc, gc, bc)]  # (N, Tp, ...)
    h0 = (
        q.new_zeros((N, HV, K, V), dtype=dtype)
        if initial_state is None
        else initial_state.to(dtype)
    )
    o, h = _chunk_forward(*padded, h0, C)  # (N, Tp, HV, V), (N, HV, K, V)
    o = o[:, :T] if bounds is None else _from_padded_sequences(o, bounds)  # (B, T, HV, V)
    return o.to(v.dtype), (h if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Per-token form


def _recurrent_update(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of the rule. q (scaled), k: (N, HV, K); v: (N, HV, V); g, beta: (N, HV);
    h: (N, HV, K, V). Returns o (N, HV, V) and the new state (N, HV, K, V)."""
    h = g.exp()[..., None, None] * h  # S' = exp(g)·S
    pred = (k[..., None, :] @ h).squeeze(-2)  # (N, HV, V) S'ᵀk
    delta = beta[..., None] * (v - pred)  # (N, HV, V)
    h = h + k[..., :, None] * delta[..., None, :]  # (N, HV, K, V)
    o = (q[..., None, :] @ h).squeeze(-2)  # (N, HV, V)
    return o, h


def _recurrent_sequence(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """Token by token over dim 1. q, k: (N, T, HV, K); v: (N, T, HV, V); g, beta: (N, T, HV)."""
    outs = []
    for t in range(q.shape[1]):
        o_t, h = _recurrent_update(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], h)
        outs.append(o_t)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # (N, T, HV, V)
    return o, h


def naive_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`chunk_gated_delta_rule` token by token: the reference (exact in float64).

    Same arguments (without ``chunk_size``), returns and errors as :func:`chunk_gated_delta_rule`.
    """
    _check_qkv_g_beta(q, k, v, g, beta)
    _check_scale(scale)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    bounds = _sequence_bounds(cu_seqlens, B, T)
    N = B if bounds is None else len(bounds)
    _check_state("initial_state", initial_state, N, HV, K, V)

    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    qc, kc = _prepare_qk(q, k, HV, scale, use_qk_l2norm, dtype)  # (B, T, HV, K)
    vc, gc, bc = v.to(dtype), g.to(dtype), beta.to(dtype)
    h0 = (
        q.new_zeros((N, HV, K, V), dtype=dtype)
        if initial_state is None
        else initial_state.to(dtype)
    )
    if bounds is None:
        o, h = _recurrent_sequence(qc, kc, vc, gc, bc, h0)  # (B, T, HV, V), (B, HV, K, V)
    else:
        outs, states = [], []
        for i, (s, e) in enumerate(bounds):
            o_i, h_i = _recurrent_sequence(
                qc[:, s:e], kc[:, s:e], vc[:, s:e], gc[:, s:e], bc[:, s:e], h0[i : i + 1]
            )
            outs.append(o_i)
            states.append(h_i)
        o, h = torch.cat(outs, dim=1), torch.cat(states)  # (1, T, HV, V), (N, HV, K, V)
    return o.to(v.dtype), (h if output_final_state else None)


def gated_delta_rule_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor | None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """One decoding step: q, k ``[B, 1, H, K]``, v ``[B, 1, HV, V]``, g, beta ``[B, 1, HV]``.

    ``state`` is ``[B, HV, K, V]`` (None: zeros), e.g. the ``final_state`` of a prefill.

    Returns:
        ``(o[B, 1, HV, V]`` in v's dtype, ``new_state[B, HV, K, V]`` float32 or float64).

    Raises:
        ValueError: shapes that do not fit, or more than one token.
    """
    _check_qkv_g_beta(q, k, v, g, beta)
    _check_scale(scale)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if T != 1:
        raise ValueError(f"q must hold exactly one token per sequence [B, 1, H, K]; got T={T}")
    _check_state("state", state, B, HV, K, V)
    dtype = _compute_dtype(q, k, v, g, beta, state)
    qc, kc = _prepare_qk(q, k, HV, scale, use_qk_l2norm, dtype)  # (B, 1, HV, K)
    h = q.new_zeros((B, HV, K, V), dtype=dtype) if state is None else state.to(dtype)
    o, h = _recurrent_update(
        qc[:, 0], kc[:, 0], v[:, 0].to(dtype), g[:, 0].to(dtype), beta[:, 0].to(dtype), h
    )
    return o[:, None].to(v.dtype), h  # (B, 1, HV, V), (B, HV, K, V)
