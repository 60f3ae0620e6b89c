"""The forward's output from stored chunk states, every chunk in parallel (the split forward).

``chunk_fwd_h_kernel`` can write the output while it walks the chunks (``OUTPUT``), which puts
the output's products — ``q kᵀ``, ``q h`` and ``P V_new`` — on the sequential path of a kernel
with one program per (value block, sequence, value head). The split forward instead lets that
kernel only carry the state (``STORE_H``: each chunk's starting state, in the inputs' dtype) and
runs this kernel over every (chunk, value block, value head) at once: from the chunk's starting
state ``h`` it rebuilds ``V_new = A(β⊙V − c⊙(K h))`` with ``c = β e^γ / ‖k‖`` and writes
``O = r⊙(q h) + P V_new``, ``r`` = scale · q's inverse norm · ``e^γ``, ``P = (q K̂ᵀ) ⊙ Γ``. The
values are those of the fused path bit for bit in the products' inputs (the fused kernel too
rounds ``h`` to the inputs' dtype before its dots); the cost is the states' write and read.

Hopper miscompilation (shared/gpu/README.md): the only transposed operand is ``K``, a tile
loaded from memory.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    block,
    chunk_bounds,
    chunk_gates,
    chunk_v_new,
    intra_chunk_p,
    launch,
    load_norms,
    load_rows,
    store_rows,
)

__all__ = ["chunk_fwd_o", "chunk_fwd_o_kernel", "CONFIGS", "prune"]

# BV = 32 with 4 warps is left out: on an H200 with Triton 3.6 (bf16) it wrote o with relative
# error 1.2 at K = V = 32 and faulted (illegal memory access) at K = V = 128
# (``benchmarks/gpu_check_gdn.py --parts probe --probe-variants --probe-families chunk_o``,
# 2026-11-28); the other six configurations were right at both.
CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=s)
           for bv in (32, 64) for w in (4, 8) for s in (1, 2) if (bv, w) != (32, 4)]
INTERPRETER_CONFIG = triton.Config({"BV": 16}, num_warps=1, num_stages=1)


def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configurations safe at this call's key dim (Triton's ``early_config_prune``): none
    with 8 warps when the key block is 16. On the H200 with Triton 3.6 every 8-warp
    configuration faulted (illegal memory access) in float32 at K = 16, V = 32 (session 14,
    benchmarks/results/2026-11-28-h200-session14.md), in bf16 they ran; chunk_bwd drops 8 warps
    at that block for wrong gradients in bf16 (``chunk_bwd._MISCOMPILED``)."""
    dk = kwargs.get("DK", named_args.get("DK"))
    if dk is None or block(dk) != 16:
        return configs
    return [c for c in configs if c.num_warps != 8]


@triton.jit
def chunk_fwd_o_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, a_ptr, rq_ptr, rk_ptr, hs_ptr, o_ptr,
    chunk_seq, cu, chunk_off,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, scale, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (chunk, value block, value head): ``O`` of the chunk's rows from its start state."""
    c = tl.program_id(0)  # chunks on the axis without the 65535 limit
    pid_v = tl.program_id(1)
    hv = tl.program_id(2)
    hk = hv // GROUP
    dt = k_ptr.dtype.element_ty
    _, start, eos = chunk_bounds(chunk_seq, cu, chunk_off, c, 64)
    offs_c = tl.arange(0, 64)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    rows = start + offs_c
    r_ok = rows < eos
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    state = (c.to(tl.int64) * HV + hv) * DK * DV
    h = tl.load(hs_ptr + state + offs_k[:, None] * DV + offs_v[None, :],
                mask=k_ok[:, None] & v_ok[None, :], other=0.0)  # (BK, BV), inputs' dtype
    k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)  # (C, BK)
    q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)
    rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
    rq = load_norms(rq_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM) * scale
    gam, _, beta = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
    a = load_rows(a_ptr + hv * 64, rows, r_ok, HV * 64, offs_c, offs_c < 64)  # (C, C)
    v = load_rows(v_ptr + hv * stride_vh, rows, r_ok, stride_vt, offs_v, v_ok)  # (C, BV)
    eg = tl.exp(gam)
    v_new = chunk_v_new(k, h, v, a, beta, rk, gam, PRECISION)  # (C, BV) U − W h
    p = intra_chunk_p(q, k, rq, rk, gam, PRECISION)  # (C, C)
    o = tl.dot(q, h, input_precision=PRECISION) * (rq * eg)[:, None]
    o += tl.dot(p.to(dt), v_new.to(dt), input_precision=PRECISION)  # (C, BV)
    store_rows(o_ptr + hv * DV, o, rows, r_ok, HV * DV, offs_v, v_ok)


def chunk_fwd_o(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, a: Tensor,
                rq: Tensor | None, rk: Tensor | None, states: Tensor, seqs: Sequences,
                scale: float, use_qk_l2norm: bool, precision: str) -> Tensor:
    """``o[tokens, HV, V]`` in v's dtype from ``states[NC, HV, K, V]`` (each chunk's starting
    state, as ``chunk_fwd_h(..., store_states=True)`` writes them); the other arguments as
    :func:`~attnplug_triton.ops.gated_delta_rule.chunk_h.chunk_fwd_h` takes them."""
    tokens, H, K = k.shape
    HV, V = v.shape[1:]
    o = v.new_empty((tokens, HV, V))
    launch("chunk_fwd_o", chunk_fwd_o_kernel, CONFIGS, INTERPRETER_CONFIG,
           ["DK", "DV", "USE_L2NORM"],
           lambda meta: (seqs.num_chunks, triton.cdiv(V, meta["BV"]), HV),
           q, k, v, g, beta, a, rq, rk, states, o, seqs.chunk_seq, seqs.cu, seqs.chunk_off,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           scale, HV, HV // H, DK=K, DV=V, BK=block(K), USE_L2NORM=use_qk_l2norm,
           PRECISION=precision, prune=prune)
    return o
