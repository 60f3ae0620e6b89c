"""What the indexer kernels share: packed index queries, order keys, argument checks.

A program scores ``BLOCK_M`` consecutive queries at once. Their ``HI`` index heads are packed
as rows: row ``i`` of the query tile is query ``t0 + i // HP``, head ``i % HP`` (``HP``: ``HI``
padded to a power of two, padded heads have zero weight), so one key tile ``[BLOCK_N, DI]``
serves every head of every query in a single ``tl.dot`` of ``M = BLOCK_M·HP`` rows, and

    score[t, s] = Σ_h w[t, h] · relu(q[t, h] · k[s])

is a reshape of the ``[BLOCK_M·HP, BLOCK_N]`` product to ``[BLOCK_M, HP, BLOCK_N]`` and a sum
over the heads, in float32 whatever the input dtype. The kernels write that tile computation
out in their loops rather than call a helper: Triton's CPU interpreter pays for every call of a
``@triton.jit`` function (and reductions are such calls), which is what makes the tests slow.
For the same reason index arithmetic runs in int64 (the interpreter checks every int32
operation for overflow; on a GPU addresses are 64-bit anyway).

Order keys map float32 to int32 monotonically (``a < b`` iff ``key(a) < key(b)``; −0.0 sorts
just below +0.0): the top-k kernel sorts keys built from them, never floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.utils import check_runnable

__all__ = ["order_key", "load_index_queries", "check_indexer_inputs", "dot_precision"]


@triton.jit
def order_key(x):
    """The int32 order key of float32 ``x``: flips the magnitude bits of negative numbers."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def load_index_queries(Q, W, b, t0, T, HI, DI, stride_qb, stride_qt, stride_qh,
                       stride_wb, stride_wt, stride_wh,
                       BLOCK_M: tl.constexpr, HP: tl.constexpr, BLOCK_D: tl.constexpr):
    """The packed query rows ``[BLOCK_M·HP, BLOCK_D]`` and their weights (float32, 0 on pads)."""
    rows = tl.arange(0, BLOCK_M * HP).to(tl.int64)
    t = t0 + rows // HP
    h = rows % HP
    ok = (t < T) & (h < HI)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=ok[:, None] & (d[None, :] < DI), other=0.0)
    w = tl.load(W + b * stride_wb + t * stride_wt + h * stride_wh, mask=ok, other=0.0)
    return q, w.to(tl.float32)


def check_indexer_inputs(owner: str, q: Tensor, k: Tensor, weights: Tensor, causal: bool) -> None:
    """Raise ``ValueError`` unless q[B,T,HI,DI], k[B,S,DI], weights[B,T,HI] fit the kernels."""
    for name, x, dims in (("q", q, 4), ("k", k, 3), ("weights", weights, 3)):
        if not isinstance(x, Tensor) or x.dim() != dims:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{owner}: {name} must be a {dims}-D tensor; got {shape}")
    B, T, HI, DI = q.shape
    if k.shape[0] != B or k.shape[2] != DI:
        raise ValueError(f"{owner}: k must be [B={B}, S, DI={DI}] (one key per token); got "
                         f"{tuple(k.shape)}")
    if weights.shape != (B, T, HI):
        raise ValueError(f"{owner}: weights must be [B, T, HI] = {(B, T, HI)}; got "
                         f"{tuple(weights.shape)}")
    if causal and k.shape[1] < T:
        raise ValueError(f"{owner}: with causal=True, k needs at least as many positions as q: "
                         f"S={k.shape[1]} < T={T}")
    if q.dtype != k.dtype:
        raise ValueError(f"{owner}: q and k must share one dtype; got {q.dtype}, {k.dtype}")
    check_runnable(owner, {"q": q, "k": k, "weights": weights})


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: three TF32 products for float32, native otherwise."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
