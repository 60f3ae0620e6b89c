"""The DSA indexer's KL loss in Triton, without a dense ``[B, H, T, S]`` tensor.

``indexer_kl_loss(q, k, index_q, index_k, index_weights)`` is the loss ``DSAttention`` records
(``attnplug.layers.dsa``, DeepSeek-V3.2's dense alignment loss), without its coefficient::

    p[t]  = (1/H) · Σ_h softmax_s(scale · q[t,h]·k[s, h // (H/Hkv)])     (q, k detached)
    I[t]  = Σ_j w[t,j] · relu(q_I[t,j]·k_I[s])
    loss  = mean_t KL(p[t] ‖ softmax_s(I[t])),   s over the keys query t sees

— ``attnplug.ops.dsa.dsa_indexer_kl_loss(indexer_scores(...), causal_attention_probs(q, k))``
(summing the head probabilities and L1-normalising is the mean over heads, each row summing to
1). Only ``index_q``, ``index_k`` and ``index_weights`` receive gradients:
``∂loss/∂I[t,s] = (softmax(I[t])[s] − p[t,s]) / (B·T)``.

One kernel, one program per block of ``BLOCK_M`` queries, three sweeps over the keys they see:

1. the main attention's log-sum-exp of every (query, head), one key/value head at a time, with
   the group's query heads packed as rows (as in the flash kernel), into a ``[B, T, H]`` scratch;
2. the log-sum-exp of the index scores (:mod:`.scores` packs the index heads as rows);
3. per key tile: ``p`` (head-summed, from the saved log-sum-exps), the scores ``I``, the KL terms
   ``p·log p − p·I`` (plus ``logsumexp(I)`` per row at the end) and — when a gradient is wanted —
   ``dI = softmax(I) − p``, from which ``dq_I += (dI·w·[q_I·k_I > 0])·k_I`` and ``dw`` accumulate in
   registers and ``dk_Iᵀ += q_Iᵀ·(…)`` goes to a float32 buffer with atomics (only loaded tiles
   are transposed: see the Hopper note in ``gpu/README.md``).

The gradient is computed in the forward (the loss is a scalar and its target is detached) and
scaled by the incoming gradient in the backward. Cost: two dense ``q·kᵀ`` sweeps of the main
attention (like two causal attention forwards without ``p·v``) plus three of the indexer.
Memory: float32 ``[B, T, H]`` and ``[B, T]`` scratch and the float32 gradients of the index
inputs — ``O(B·T·(H + HI·DI) + B·S·DI)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.dsa.scores import (
    check_indexer_inputs,
    dot_precision,
    load_index_queries,
)
from attnplug_triton.ops.utils import (
    MAX_HEAD_DIM,
    check_runnable,
    interpreting,
    next_power_of_2,
    unit_last_stride,
)

__all__ = ["KLConfig", "default_kl_config", "indexer_kl_loss"]

_LOG2_E = 1.4426950408889634
_LN_2 = tl.constexpr(0.6931471805599453)


class KLConfig(NamedTuple):
    """Blocks of the KL kernel: queries per program, keys per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_kl_config(group_padded: int, heads_padded: int, dtype: torch.dtype) -> KLConfig:
    """The blocks used when none are given: about 128 packed rows per product on a GPU (64, with
    smaller tiles, for float32 inputs); a few queries per program under the interpreter."""
    if interpreting():
        return KLConfig(4, 32, 1, 1)
    if dtype == torch.float32:
        return KLConfig(max(1, 64 // max(group_padded, heads_padded)), 32, 4, 1)
    return KLConfig(max(1, 128 // max(group_padded, heads_padded)), 64, 8, 2)


@triton.jit
def kl_kernel(
    Q, K, IQ, IK, IW, LSE, KL, DIQ, DIW, DIK,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_iqb, stride_iqt, stride_iqh, stride_ikb, stride_iks,
    stride_iwb, stride_iwt, stride_iwh,
    T, S, H, HKV, HI, D, DI, qk_scale, inv_heads,
    CAUSAL: tl.constexpr, RELU: tl.constexpr, GRAD: tl.constexpr,
    G: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, IPRECISION: tl.constexpr,
):
    """KL terms (and gradients) of ``BLOCK_M`` queries of batch element ``b``."""
    b = tl.program_id(1).to(tl.int64)
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest rows start first
    t = t0 + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,) queries (int64: see scores.py)
    offset = S - T
    if CAUSAL:
        n_vis = tl.minimum(tl.maximum(t + offset + 1, 0), S)
    else:
        n_vis = tl.zeros([BLOCK_M], dtype=tl.int64) + S
    n_vis = tl.where(t < T, n_vis, 0)
    kv_end = tl.max(n_vis, 0)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    # Main attention rows: query t0 + r // GP, head g·G + r % GP of the group being swept.
    r = tl.arange(0, BLOCK_M * GP).to(tl.int64)
    t_r = t0 + r // GP
    i_r = r % GP
    r_ok = (t_r < T) & (i_r < G)
    if CAUSAL:
        last_r = t_r + offset  # the last key row r sees
    else:
        last_r = t_r * 0 + S - 1
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = offs_d < D
    q_base = Q + b * stride_qb + t_r[:, None] * stride_qt + offs_d[None, :]
    lse_base = LSE + (b * T + t_r) * H

    # 1. log-sum-exp (base 2) of every (query, head) of the main attention.
    for g in range(HKV):
        q = tl.load(q_base + (g * G + i_r)[:, None] * stride_qh,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # (BM·GP, BD)
        k_ptrs = K + b * stride_kb + g * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
        m_i = tl.full([BLOCK_M * GP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M * GP], dtype=tl.float32)
        for start in range(0, kv_end, BLOCK_N):
            s = start + offs_n
            k = tl.load(k_ptrs + start * stride_ks, mask=(s[:, None] < S) & d_ok[None, :],
                        other=0.0)  # (BN, BD)
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM·GP, BN)
            x = tl.where((s[None, :] <= last_r[:, None]) & (s[None, :] < S), x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(x - m_use[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(lse_base + g * G + i_r, lse, mask=r_ok)

    # 2. log-sum-exp (base 2) of the index scores.
    iq, iw = load_index_queries(IQ, IW, b, t0, T, HI, DI, stride_iqb, stride_iqt, stride_iqh,
                                stride_iwb, stride_iwt, stride_iwh, BLOCK_M, HP, BLOCK_DI)
    offs_di = tl.arange(0, BLOCK_DI).to(tl.int64)
    di_ok = offs_di < DI
    ik_ptrs = IK + b * stride_ikb + offs_n[:, None] * stride_iks + offs_di[None, :]
    if CAUSAL:
        last_t = t + offset
    else:
        last_t = t * 0 + S - 1
    m_x = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        s = start + offs_n
        ik = tl.load(ik_ptrs + start * stride_iks, mask=(s[:, None] < S) & di_ok[None, :],
                     other=0.0)  # (BN, BDI)
        x = tl.dot(iq, tl.trans(ik), input_precision=IPRECISION)  # (BM·HP, BN)
        if RELU:
            x = tl.maximum(x, 0.0)
        z = tl.sum(tl.reshape(x * iw[:, None], (BLOCK_M, HP, BLOCK_N)), 1) * 1.4426950408889634
        z = tl.where((s[None, :] <= last_t[:, None]) & (s[None, :] < S), z, float("-inf"))
        m_new = tl.maximum(m_x, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_x = l_x * tl.math.exp2(m_x - m_use) + tl.sum(tl.math.exp2(z - m_use[:, None]), 1)
        m_x = m_new
    lse_x = tl.where(l_x > 0, m_x + tl.math.log2(tl.where(l_x > 0, l_x, 1.0)), float("inf"))
    tl.debug_barrier()  # step 1's log-sum-exps are read back by other threads below

    # 3. KL terms and gradients, one key tile at a time.
    kl = tl.zeros([BLOCK_M], dtype=tl.float32)
    if GRAD:
        dq = tl.zeros([BLOCK_M * HP, BLOCK_DI], dtype=tl.float32)
        dw = tl.zeros([BLOCK_M * HP], dtype=tl.float32)
        dk_ptrs = DIK + b * S * DI + offs_n[None, :] * DI + offs_di[:, None]  # (BDI, BN), dkᵀ
    for start in range(0, kv_end, BLOCK_N):
        s = start + offs_n
        seen = (s[None, :] <= last_t[:, None]) & (s[None, :] < S)  # (BM, BN)
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(HKV):
            q = tl.load(q_base + (g * G + i_r)[:, None] * stride_qh,
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + g * G + i_r, mask=r_ok, other=float("inf"))  # (BM·GP,)
            k = tl.load(K + b * stride_kb + g * stride_kh + s[:, None] * stride_ks
                        + offs_d[None, :], mask=(s[:, None] < S) & d_ok[None, :], other=0.0)
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM·GP, BN)
            x = tl.math.exp2(x - lse[:, None])
            p += tl.sum(tl.reshape(x, (BLOCK_M, GP, BLOCK_N)), 1)
        p = tl.where(seen, p * inv_heads, 0.0)  # the head-mean target
        ik = tl.load(ik_ptrs + start * stride_iks, mask=(s[:, None] < S) & di_ok[None, :],
                     other=0.0)
        x = tl.dot(iq, tl.trans(ik), input_precision=IPRECISION)  # (BM·HP, BN)
        act = x
        if RELU:
            act = tl.maximum(x, 0.0)
        score = tl.sum(tl.reshape(act * iw[:, None], (BLOCK_M, HP, BLOCK_N)), 1)  # (BM, BN)
        plogp = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
        kl += tl.sum(plogp - tl.where(seen, p * score, 0.0), 1)
        if GRAD:
            soft = tl.where(seen, tl.math.exp2(score * 1.4426950408889634 - lse_x[:, None]), 0.0)
            d_score = soft - p  # (BM, BN)
            d_rows = tl.reshape(tl.broadcast_to(d_score[:, None, :], (BLOCK_M, HP, BLOCK_N)),
                                (BLOCK_M * HP, BLOCK_N))  # one row per (query, index head)
            dw += tl.sum(d_rows * act, 1)
            d_x = d_rows * iw[:, None]
            if RELU:
                d_x = tl.where(x > 0, d_x, 0.0)
            d_x = d_x.to(iq.dtype)
            dq += tl.dot(d_x, ik, input_precision=IPRECISION)  # (BM·HP, BDI)
            dk_t = tl.dot(tl.trans(iq), d_x, input_precision=IPRECISION)  # (BDI, BN)
            tl.atomic_add(dk_ptrs + start * DI, dk_t, mask=di_ok[:, None] & (s[None, :] < S),
                          sem="relaxed")
    t_ok = t < T
    kl = tl.where(n_vis > 0, kl + lse_x * _LN_2, 0.0)
    tl.store(KL + b * T + t, kl, mask=t_ok)
    if GRAD:
        rows = tl.arange(0, BLOCK_M * HP).to(tl.int64)
        t_h = t0 + rows // HP
        h = rows % HP
        h_ok = (t_h < T) & (h < HI)
        tl.store(DIQ + ((b * T + t_h) * HI + h)[:, None] * DI + offs_di[None, :], dq,
                 mask=h_ok[:, None] & di_ok[None, :])
        tl.store(DIW + (b * T + t_h) * HI + h, dw, mask=h_ok)


def _check_args(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor,
                index_weights: Tensor, causal: bool) -> None:
    owner = "indexer_kl_loss"
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{owner}: {name} must be a 4-D tensor (batch, seq, heads, dim); "
                             f"got {shape}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{owner}: k must be [B={B}, S, Hkv, D={D}] to match q "
                         f"{tuple(q.shape)}; got {tuple(k.shape)}")
    if k.shape[2] == 0 or H % k.shape[2]:
        raise ValueError(f"{owner}: the query heads H={H} must be a multiple of the key heads "
                         f"Hkv={k.shape[2]}")
    if q.dtype != k.dtype:
        raise ValueError(f"{owner}: q and k must share one dtype; got {q.dtype}, {k.dtype}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{owner}: head dims up to {MAX_HEAD_DIM} are supported; got D={D}")
    check_indexer_inputs(owner, index_q, index_k, index_weights, causal)
    if index_q.shape[:2] != (B, T) or index_k.shape[1] != k.shape[1]:
        raise ValueError(f"{owner}: the indexer inputs must cover the same queries and keys as q "
                         f"and k: index_q {tuple(index_q.shape)}, index_k "
                         f"{tuple(index_k.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if index_q.shape[2] == 0 or not 0 < index_q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"{owner}: index_q needs at least one head, of dim 1 to "
                         f"{MAX_HEAD_DIM}; got {tuple(index_q.shape)}")
    check_runnable(owner, {"q": q, "k": k})


def kl_forward(q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor, index_weights: Tensor,
               scale: float, causal: bool, relu: bool, grad: bool,
               config: KLConfig | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The kernel: per-query KL ``[B, T]`` (float32) and, with ``grad``, the float32 gradients
    of the summed KL with respect to ``index_q``, ``index_k``, ``index_weights``."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    HI, DI = index_q.shape[2:]
    group = H // Hkv
    gp, hp = next_power_of_2(group), next_power_of_2(HI)
    cfg = config or default_kl_config(gp, hp, q.dtype)
    # Every product needs >= 16 rows: pad the packed heads when the block has few queries.
    gp, hp = max(gp, next_power_of_2(-(-16 // cfg.block_m))), max(hp, next_power_of_2(
        -(-16 // cfg.block_m)))
    device = q.device
    lse = torch.empty((B, T, H), dtype=torch.float32, device=device)
    kl = torch.empty((B, T), dtype=torch.float32, device=device)
    if grad:
        grads = (torch.empty((B, T, HI, DI), dtype=torch.float32, device=device),
                 torch.zeros((B, S, DI), dtype=torch.float32, device=device),
                 torch.empty((B, T, HI), dtype=torch.float32, device=device))
    else:
        grads = (kl, kl, kl)  # never written
    kl_kernel[(triton.cdiv(T, cfg.block_m), B)](
        q, k, index_q, index_k, index_weights, lse, kl, grads[0], grads[2], grads[1],
        *q.stride()[:3], *k.stride()[:3], *index_q.stride()[:3], *index_k.stride()[:2],
        *index_weights.stride(), T, S, H, Hkv, HI, D, DI, scale * _LOG2_E, 1.0 / H,
        CAUSAL=bool(causal), RELU=bool(relu), GRAD=grad, G=group, GP=gp, HP=hp,
        BLOCK_D=max(16, next_power_of_2(D)), BLOCK_DI=max(16, next_power_of_2(DI)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=dot_precision(q.dtype),
        IPRECISION=dot_precision(index_q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return kl, grads if grad else None


class IndexerKLLossFunction(torch.autograd.Function):
    """Autograd wrapper: the gradients come out of the forward kernel; backward scales them."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, index_q: Tensor, index_k: Tensor,
                index_weights: Tensor, scale: float, causal: bool, relu: bool) -> Tensor:
        grad = any(ctx.needs_input_grad[2:5])
        kl, grads = kl_forward(q, k, index_q, index_k, index_weights, scale, causal, relu, grad)
        ctx.rows = kl.numel()
        ctx.dtypes = (index_q.dtype, index_k.dtype, index_weights.dtype)
        if grads is not None:
            ctx.save_for_backward(*grads)
        return kl.sum() / ctx.rows

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        factor = grad_loss / ctx.rows
        grads = [(g * factor).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes,
                                                            strict=True)]
        return None, None, *grads, None, None, None


def indexer_kl_loss(
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
    """The DSA indexer's KL loss against the head-summed main attention, through one kernel.

    ``mean_t KL(p[t] ‖ softmax(I[t]))`` over the keys query ``t`` sees, ``p`` the main attention
    probabilities averaged over heads, ``I`` the index scores (module docstring): the same
    value as ``attnplug.ops.dsa.dsa_indexer_kl_loss(indexer_scores(index_q, index_k,
    index_weights, causal=False, relu=relu), causal_attention_probs(q, k, softmax_scale=...))``,
    which ``DSAttention`` multiplies by ``dsa_indexer_loss_coeff``.

    Args:
        q: main-attention queries ``[B, T, H, D]``; k: keys ``[B, S, Hkv, D]`` (``H % Hkv == 0``,
            ``D <= 256``). Treated as detached: they receive no gradient.
        index_q: ``[B, T, HI, DI]``; index_k: ``[B, S, DI]``; index_weights: ``[B, T, HI]``.
        softmax_scale: the main attention's scale; default ``D ** -0.5``.
        causal: query ``t`` sees keys ``s <= t + S − T`` (needs ``S >= T``), else all keys.
        relu: the indexer's ReLU on ``q_I·k_I``.

    Returns:
        A float32 scalar, differentiable in ``index_q``, ``index_k`` and ``index_weights``
        (gradients in their dtypes; ``index_k``'s summed with float32 atomics). Memory is
        ``O(B·T·H)`` float32 besides the gradients: no ``[B, H, T, S]`` tensor.

    Raises:
        ValueError: shapes, dtypes, devices or a scale the kernel does not take.
    """
    _check_args(q, k, index_q, index_k, index_weights, causal)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    elif not (isinstance(softmax_scale, (int, float)) and 0 < softmax_scale < float("inf")):
        raise ValueError(f"indexer_kl_loss: softmax_scale={softmax_scale!r} is not accepted: "
                         "expected a finite number > 0 or None")
    if q.shape[0] * q.shape[1] == 0:  # the mean of no rows, as torch has it
        return (index_q.sum() + index_k.sum() + index_weights.sum()).float() * float("nan")
    q, k, index_q, index_k = (unit_last_stride(x.detach() if i < 2 else x)
                              for i, x in enumerate((q, k, index_q, index_k)))
    return IndexerKLLossFunction.apply(q, k, index_q, index_k, index_weights,
                                       float(softmax_scale), bool(causal), bool(relu))
