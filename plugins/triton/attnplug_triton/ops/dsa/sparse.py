"""Sparse attention over each query's selected keys, forward and backward, in Triton.

``sparse_attention(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv], indices[B,T,topk])`` computes the
same function as :func:`attnplug.ops.dsa.sparse_attention` (DESIGN §8): for query ``t`` and head
``h``, a softmax over the keys listed in ``indices[b, t]`` (−1 slots ignored) of key/value head
``h // (H / Hkv)``.

One program serves one query and one key/value head: the ``G = H / Hkv`` query heads of the
group are the rows of every product (padded to ``GP >= 16``), so each selected key and value row
is gathered **once per head group**, not once per query head. The program walks the query's
index row ``BLOCK_N`` slots at a time:

* forward: ``s = q·kᵀ`` on the gathered rows, online softmax in base 2, ``o += p·v``; saves the
  log-sum-exp (float32, base 2, ``+inf`` for a query with no valid index, whose output is 0);
* backward: recomputes ``sᵀ = k·qᵀ`` and ``dpᵀ = v·doᵀ`` (``[BLOCK_N, GP]``, so no computed tile
  is ever transposed — the Hopper miscompilation of ``gpu/README.md`` transposes a dot result
  cast to 16 bits), accumulates ``dqᵀ += kᵀ·dsᵀ`` in registers and adds ``dk += dsᵀ·q``,
  ``dv += pᵀ·do`` into float32 buffers with atomics (a key chosen by many queries receives many
  additions; their order, hence the last bits of dk and dv, varies from run to run). Those
  atomics bound the backward: on the H200 at T = 32K, topk 2048, one key/value head of
  D = 128, they alone take 17.1 of its 21.6 ms (``benchmarks/probe_sparse_atomics.py``).

Memory: the saved log-sum-exp ``[B, T, H]`` float32, and in the backward two float32 buffers the
size of k and v. Entries of ``indices`` outside ``[0, S)`` count as −1 (not checked on the host,
so no device synchronisation).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.dsa.scores import dot_precision
from attnplug_triton.ops.utils import (
    check_qkv,
    check_runnable,
    interpreting,
    next_power_of_2,
    unit_last_stride,
)

__all__ = ["SparseConfig", "default_sparse_config", "sparse_attention", "sparse_forward",
           "sparse_backward"]

_LOG2_E = 1.4426950408889634


class SparseConfig(NamedTuple):
    """Blocks of the sparse-attention kernels: index slots per step, warps, pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


def default_sparse_config(head_dim: int, backward: bool, dtype: torch.dtype) -> SparseConfig:
    """The blocks used when none are given, by the larger head dim and the dtype (chosen from
    register and shared-memory use; ``bench_dsa.py --sweep`` times the alternatives)."""
    if interpreting():
        return SparseConfig(64, 1, 1)
    if dtype == torch.float32:  # three TF32 products per dot: small tiles
        return SparseConfig(16, 4, 2) if backward else SparseConfig(32, 4, 2)
    if backward:
        return SparseConfig(32, 8, 2) if head_dim > 128 else SparseConfig(32, 4, 3)
    return SparseConfig(64, 4, 2 if head_dim > 128 else 3)


@triton.jit
def sparse_fwd_kernel(
    Q, K, V, IDX, O, LSE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ib, stride_it, stride_ob, stride_ot, stride_oh,
    T, S, H, HKV, TOPK, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """o and lse of query ``t`` for the ``G`` query heads of key/value head ``g``."""
    t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // HKV).to(tl.int64)
    g = tl.program_id(1) % HKV
    i = tl.arange(0, GP).to(tl.int64)  # (int64 index math: cheaper under the interpreter)
    head_ok = i < G
    h = g * G + i  # (GP,) query heads
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + b * stride_qb + t * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # (GP, BD)
    k_base = K + b * stride_kb + g * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + g * stride_vh + offs_dv[None, :]
    idx_base = IDX + b * stride_ib + t * stride_it
    slots = tl.arange(0, BLOCK_N).to(tl.int64)
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, BLOCK_DV], dtype=tl.float32)
    for start in range(0, TOPK, BLOCK_N):
        slot = start + slots
        idx = tl.load(idx_base + slot, mask=slot < TOPK, other=-1).to(tl.int64)  # (BN,)
        valid = (idx >= 0) & (idx < S)
        row = tl.where(valid, idx, 0)
        k = tl.load(k_base + row[:, None] * stride_ks, mask=valid[:, None] & d_ok[None, :],
                    other=0.0)  # (BN, BD), gathered
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (GP, BN)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no rescale
        p = tl.math.exp2(s - m_use[:, None])  # (GP, BN)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + row[:, None] * stride_vs, mask=valid[:, None] & dv_ok[None, :],
                    other=0.0)  # (BN, BDV), gathered
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has_key = l_i > 0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # zeros for a query with no valid index
    tl.store(O + b * stride_ob + t * stride_ot + h[:, None] * stride_oh + offs_dv[None, :],
             o.to(O.dtype.element_ty), mask=head_ok[:, None] & dv_ok[None, :])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * T + t) * H + h, lse, mask=head_ok)


@triton.jit
def sparse_bwd_kernel(
    Q, K, V, IDX, O, DO, LSE, DQ, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ib, stride_it, stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    T, S, H, HKV, TOPK, qk_scale, softmax_scale,
    D: tl.constexpr, DV_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of query ``t`` (heads of group ``g``); its share of dk, dv added with atomics."""
    t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // HKV).to(tl.int64)
    g = tl.program_id(1) % HKV
    i = tl.arange(0, GP).to(tl.int64)  # (int64 index math: cheaper under the interpreter)
    head_ok = i < G
    h = g * G + i
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV_DIM
    q = tl.load(Q + b * stride_qb + t * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # (GP, BD)
    do = tl.load(DO + b * stride_dob + t * stride_dot + h[:, None] * stride_doh
                 + offs_dv[None, :], mask=head_ok[:, None] & dv_ok[None, :], other=0.0)
    o = tl.load(O + b * stride_ob + t * stride_ot + h[:, None] * stride_oh + offs_dv[None, :],
                mask=head_ok[:, None] & dv_ok[None, :], other=0.0)  # (GP, BDV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (GP,)
    lse = tl.load(LSE + (b * T + t) * H + h, mask=head_ok, other=float("inf"))  # (GP,)
    k_base = K + b * stride_kb + g * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + g * stride_vh + offs_dv[None, :]
    dk_base = DK + b * stride_dkb + g * stride_dkh + offs_d[None, :]
    dv_base = DV + b * stride_dvb + g * stride_dvh + offs_dv[None, :]
    idx_base = IDX + b * stride_ib + t * stride_it
    slots = tl.arange(0, BLOCK_N).to(tl.int64)
    dq_t = tl.zeros([BLOCK_D, GP], dtype=tl.float32)  # dqᵀ
    for start in range(0, TOPK, BLOCK_N):
        slot = start + slots
        idx = tl.load(idx_base + slot, mask=slot < TOPK, other=-1).to(tl.int64)
        valid = (idx >= 0) & (idx < S)
        row = tl.where(valid, idx, 0)
        k = tl.load(k_base + row[:, None] * stride_ks, mask=valid[:, None] & d_ok[None, :],
                    other=0.0)  # (BN, BD)
        v = tl.load(v_base + row[:, None] * stride_vs, mask=valid[:, None] & dv_ok[None, :],
                    other=0.0)  # (BN, BDV)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BN, GP)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        p_t = tl.where(valid[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, GP)
        ds_t = p_t * (dp_t - delta[None, :])  # (BN, GP)
        dv_part = tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BN, BDV)
        dk_part = tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # (BN, BD)
        dq_t += tl.dot(tl.trans(k), ds_t.to(k.dtype), input_precision=PRECISION)  # (BD, GP)
        tl.atomic_add(dk_base + row[:, None] * stride_dks, dk_part * softmax_scale,
                      mask=valid[:, None] & d_ok[None, :], sem="relaxed")
        tl.atomic_add(dv_base + row[:, None] * stride_dvs, dv_part,
                      mask=valid[:, None] & dv_ok[None, :], sem="relaxed")
    tl.store(DQ + b * stride_dqb + t * stride_dqt + h[None, :] * stride_dqh + offs_d[:, None],
             (dq_t * softmax_scale).to(DQ.dtype.element_ty),
             mask=d_ok[:, None] & head_ok[None, :])


def _check_args(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> None:
    owner = "sparse_attention"
    B, T, H, D, S, Hkv, Dv = check_qkv(owner, q, k, v)
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{owner}: indices must be an int32 or int64 tensor [B, T, topk]")
    if indices.dim() != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"{owner}: indices must be [B={B}, T={T}, topk]; got "
                         f"{tuple(indices.shape)}")
    if indices.device != q.device:
        raise ValueError(f"{owner}: indices are on {indices.device}, q on {q.device}")
    check_runnable(owner, {"q": q, "k": k, "v": v})


def _meta(q: Tensor, v: Tensor, config: SparseConfig) -> dict[str, Any]:
    H, D = q.shape[2:]
    Hkv, Dv = v.shape[2:]
    group = H // Hkv
    return {"BLOCK_D": max(16, next_power_of_2(D)), "BLOCK_DV": max(16, next_power_of_2(Dv)),
            "G": group, "GP": max(16, next_power_of_2(group)), "BLOCK_N": config.block_n,
            "PRECISION": dot_precision(q.dtype), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def sparse_forward(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float,
                   config: SparseConfig | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel: ``o[B,T,H,Dv]`` and ``lse[B,T,H]`` (float32, base 2, +inf if empty).

    Inputs must be checked and have a unit last stride; ``config`` forces the blocks.
    """
    B, T, H, D = q.shape
    S, Hkv, Dv = v.shape[1:]
    cfg = config or default_sparse_config(max(D, Dv), False, q.dtype)
    o = torch.empty((B, T, H, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    sparse_fwd_kernel[(T, B * Hkv)](
        q, k, v, indices, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *indices.stride()[:2], *o.stride()[:3], T, S, H, Hkv, indices.shape[2],
        scale * _LOG2_E, D=D, DV=Dv, **_meta(q, v, cfg),
    )
    return o, lse


def sparse_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, o: Tensor,
                    lse: Tensor, scale: float,
                    config: SparseConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernel: ``dq``, ``dk``, ``dv`` shaped and typed like ``q``, ``k``, ``v``."""
    B, T, H, D = q.shape
    S, Hkv, Dv = v.shape[1:]
    cfg = config or default_sparse_config(max(D, Dv), True, q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros((B, S, Hkv, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros((B, S, Hkv, Dv), dtype=torch.float32, device=q.device)
    sparse_bwd_kernel[(T, B * Hkv)](
        q, k, v, indices, o, do, lse, dq, dk, dv, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *indices.stride()[:2], *o.stride()[:3], *do.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], T, S, H, Hkv, indices.shape[2],
        scale * _LOG2_E, scale, D=D, DV_DIM=Dv, **_meta(q, v, cfg),
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the indices, o and the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float
                ) -> Tensor:
        o, lse = sparse_forward(q, k, v, indices, scale)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_backward(unit_last_stride(do), q, k, v, indices, o, lse, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *,
                     scale: float | None = None) -> Tensor:
    """Softmax attention of each query over its selected keys only, through Triton kernels.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``H % Hkv == 0``,
            head dims up to 256; float16, bfloat16 or float32).
        indices: ``[B, T, topk]`` int32/int64 key positions shared by all heads of a query;
            −1 (or anything outside ``[0, S)``) marks an unused slot. Positions in a row should
            be distinct (a repeated key counts twice). No causal rule is applied here.
        scale: multiplies ``q·k``; default ``D ** -0.5``.

    Returns:
        ``o[B, T, H, Dv]`` in q's dtype (float32 accumulation); zeros for a query whose row has
        no valid index. Differentiable in q, k and v (dk, dv summed with float32 atomics).

    Raises:
        ValueError: shapes, dtypes, devices or a scale the kernels do not take.
    """
    _check_args(q, k, v, indices)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"sparse_attention: scale={scale!r} is not accepted: expected a finite "
                         "number > 0 or None")
    q, k, v, indices = (unit_last_stride(x) for x in (q, k, v, indices))
    if q.numel() == 0 or v.numel() == 0 or indices.shape[2] == 0:
        B, T, H, _ = q.shape
        return q.new_zeros((B, T, H, v.shape[-1])) + 0 * (q.sum() + k.sum() + v.sum())
    return SparseAttentionFunction.apply(q, k, v, indices, float(scale))
