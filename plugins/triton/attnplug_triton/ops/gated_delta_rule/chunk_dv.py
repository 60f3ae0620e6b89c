"""The within-chunk part of the backward's ``dV_new``, every chunk in parallel (``local_dv``).

``dV_new = Pᵀ dO + (K̂ ⊙ e^{γ_C−γ}) dh``: only the second term depends on the state gradient
``dh`` that ``chunk_bwd_dh_kernel`` carries from chunk to chunk. By default that kernel computes
both on its sequential path; with ``local_dv`` this kernel writes ``Pᵀ dO`` (float32
``[tokens, HV, V]``) for all chunks at once — ``Pᵀ = (K qᵀ) ⊙ r_k r_q Γᵀ``, built from loaded
tiles as the dh kernel builds it — and the dh kernel reads it, keeping two of its six products
(``K qᵀ`` and ``Pᵀ dO``) off the sequential path, at the cost of writing and reading that tensor.

Hopper miscompilation (shared/gpu/README.md): the only transposed operand is ``q``, a tile
loaded from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.gated_delta_rule.common import (
    Sequences,
    block,
    chunk_bounds,
    chunk_gates,
    intra_chunk_pt,
    launch,
    load_norms,
    load_rows,
    store_rows,
)

__all__ = ["chunk_bwd_dv_local", "chunk_bwd_dv_local_kernel", "CONFIGS"]

CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=s)
           for bv in (32, 64) for w in (4, 8) for s in (1, 2)]
INTERPRETER_CONFIG = triton.Config({"BV": 16}, num_warps=1, num_stages=1)


@triton.jit
def chunk_bwd_dv_local_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, rq_ptr, rk_ptr, do_ptr, dvl_ptr, chunk_seq, cu, chunk_off,
    stride_qt, stride_qh, stride_kt, stride_kh, scale, HV, GROUP,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (chunk, value block, value head): ``Pᵀ dO`` of the chunk's rows, float32."""
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
    k = load_rows(k_ptr + hk * stride_kh, rows, r_ok, stride_kt, offs_k, k_ok)  # (C, BK)
    q = load_rows(q_ptr + hk * stride_qh, rows, r_ok, stride_qt, offs_k, k_ok)
    rk = load_norms(rk_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM)
    rq = load_norms(rq_ptr, rows, r_ok, HV // GROUP, hk, USE_L2NORM) * scale
    gam, _, _ = chunk_gates(g_ptr, beta_ptr, rows, r_ok, hv, HV)
    do = load_rows(do_ptr + hv * DV, rows, r_ok, HV * DV, offs_v, v_ok)  # (C, BV)
    pt = intra_chunk_pt(k, q, rk, rq, gam, PRECISION).to(dt)  # (C, C) Pᵀ
    dvl = tl.dot(pt, do, input_precision=PRECISION)  # (C, BV)
    store_rows(dvl_ptr + hv * DV, dvl, rows, r_ok, HV * DV, offs_v, v_ok)


def chunk_bwd_dv_local(q: Tensor, k: Tensor, g: Tensor, beta: Tensor, rq: Tensor | None,
                       rk: Tensor | None, do: Tensor, seqs: Sequences, scale: float,
                       use_qk_l2norm: bool, precision: str) -> Tensor:
    """``Pᵀ dO`` ``[tokens, HV, V]`` float32; arguments as ``chunk_bwd_dh`` takes them."""
    tokens, H, K = k.shape
    HV, V = do.shape[1:]
    dvl = do.new_empty((tokens, HV, V), dtype=torch.float32)
    launch("chunk_bwd_dv_local", chunk_bwd_dv_local_kernel, CONFIGS, INTERPRETER_CONFIG,
           ["DK", "DV", "USE_L2NORM"],
           lambda meta: (seqs.num_chunks, triton.cdiv(V, meta["BV"]), HV),
           q, k, g, beta, rq, rk, do, dvl, seqs.chunk_seq, seqs.cu, seqs.chunk_off,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale, HV, HV // H,
           DK=K, DV=V, BK=block(K), USE_L2NORM=use_qk_l2norm, PRECISION=precision)
    return dvl
