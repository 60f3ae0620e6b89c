"""The gated delta rule token by token in one kernel: decoding (one new token per sequence) and
short prompts, forward only.

One program per (value block, sequence, value head) keeps its state block ``h[K, BV]`` in float32
registers and walks the sequence's tokens: ``h ← e^{g_t} h``, ``h ← h + k̂_t ⊗ β_t(v_t − hᵀk̂_t)``,
``o_t = hᵀ(scale·q̂_t)`` (q and k L2-normalised in registers with ``use_qk_l2norm``). It reads each
input once and writes o and, if asked, the final state: for one token it moves the state twice
(read, write), which is all decoding must move.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    block,
    check_args,
    launch,
    token_major,
)

__all__ = ["fused_recurrent_gated_delta_rule", "run_fused_recurrent", "fused_recurrent_kernel"]

CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=1)
           for bv in (16, 32, 64) for w in (1, 2, 4)]
INTERPRETER_CONFIG = triton.Config({"BV": 16}, num_warps=1, num_stages=1)


@triton.jit
def _token_row(ptr, t, stride_t, offs, ok):
    return tl.load(ptr + t * stride_t + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def fused_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, h0_ptr, o_ptr, ht_ptr, cu,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, scale, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    """One (sequence·value head, value block): every token's output, then the final state."""
    pid_nh = tl.program_id(0)  # sequences × heads on the axis without the 65535 limit
    pid_v = tl.program_id(1)
    n = pid_nh // HV
    hv = pid_nh % HV
    hk = hv // GROUP
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    state_offs = pid_nh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    h = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + state_offs, mask=state_ok, other=0.0).to(tl.float32)
    bos = tl.load(cu + n).to(tl.int64)
    for i in range(tl.load(cu + n + 1) - bos):
        t = bos + i
        q = _token_row(q_ptr + hk * stride_qh, t, stride_qt, offs_k, k_ok)  # (BK,)
        k = _token_row(k_ptr + hk * stride_kh, t, stride_kt, offs_k, k_ok)
        if USE_L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
        v = _token_row(v_ptr + hv * stride_vh, t, stride_vt, offs_v, v_ok)  # (BV,)
        gate = t * HV + hv
        h = h * tl.exp(tl.load(g_ptr + gate))
        delta = tl.load(beta_ptr + gate) * (v - tl.sum(h * k[:, None], 0))  # (BV,)
        h = h + k[:, None] * delta[None, :]
        o = tl.sum(h * (q * scale)[:, None], 0)  # (BV,)
        tl.store(o_ptr + gate * DV + offs_v, o.to(o_ptr.dtype.element_ty), mask=v_ok)
    if STORE_FINAL:
        tl.store(ht_ptr + state_offs, h, mask=state_ok)


def run_fused_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                        seqs: Sequences, *, scale: float | None, initial_state: Tensor | None,
                        output_final_state: bool,
                        use_qk_l2norm: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`fused_recurrent_gated_delta_rule` on arguments already checked."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K**-0.5 if scale is None else float(scale)
    N = seqs.num_seqs
    o = v.new_empty((B, T, HV, V))
    final = q.new_empty((N, HV, K, V), dtype=torch.float32) if output_final_state else None
    if N * HV == 0:
        return o, final
    qt, kt, vt = (token_major(x) for x in (q, k, v))  # (B·T, heads, dim)
    gt, bt = (token_major(x.float()).contiguous() for x in (g, beta))  # (B·T, HV)
    h0 = None if initial_state is None else initial_state.contiguous()
    launch("fused_recurrent", fused_recurrent_kernel, CONFIGS, INTERPRETER_CONFIG,
           ["DK", "DV", "USE_L2NORM"], lambda meta: (N * HV, triton.cdiv(V, meta["BV"])),
           qt, kt, vt, gt, bt, h0, o, final, seqs.cu, qt.stride(0), qt.stride(1),
           kt.stride(0), kt.stride(1), vt.stride(0), vt.stride(1), scale, HV, HV // H,
           DK=K, DV=V, BK=block(K), USE_L2NORM=use_qk_l2norm, HAS_H0=h0 is not None,
           STORE_FINAL=output_final_state)
    return o, final


def fused_recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule token by token (decoding); same arguments and results as
    :func:`~attnplug_triton.ops.gated_delta_rule.chunk.chunk_gated_delta_rule`, forward only.

    Raises:
        ValueError: arguments the kernels do not take (named), or inputs that require a gradient
        while autograd is on (this kernel has no backward: use the chunked function).
    """
    owner = "fused_recurrent_gated_delta_rule"
    seqs = check_args(owner, q, k, v, g, beta, initial_state, cu_seqlens, scale)
    tensors = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise ValueError(f"{owner}: forward only, and an input requires a gradient; use "
                         "chunk_gated_delta_rule to train, or run under torch.no_grad()")
    return run_fused_recurrent(q, k, v, g, beta, seqs, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state,
                               use_qk_l2norm=use_qk_l2norm)
