"""The last step of dq and dk with grouped value heads, in one pass.

With ``HV = group · H`` value heads, :mod:`.chunk_bwd` writes float32 gradients of the
normalised ``q̂``, ``k̂`` per value head, ``[tokens, HV, K]``; each key head's gradient is the sum
over its ``group`` value heads, then (with ``use_qk_l2norm``) the L2 norm's backward
``(dŷ − ŷ (ŷ·dŷ)) / ‖x‖`` with ``ŷ = x / sqrt(Σx² + 1e-6)``, then the cast to the input's dtype.
In torch that is a dozen passes over ``[tokens, H, K]`` float32 tensors for each of q and k;
here one program reads its rows' ``group`` partial gradients and ``x`` once and writes the
result once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.utils import next_power_of_2

__all__ = ["finish_group_grads", "group_grads_kernel"]

ROWS = 16  # (token, key head) rows per program


@triton.jit
def group_grads_kernel(part_ptr, x_ptr, out_ptr, n_rows, H, stride_xt, stride_xh,
                       GROUP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                       USE_L2NORM: tl.constexpr, BR: tl.constexpr):
    """Rows ``r = token · H + head``: ``out[r] = l2norm_bwd(x[r], Σ_g part[r · GROUP + g])``."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BR, BK], tl.float32)
    for g in tl.static_range(GROUP):
        acc += tl.load(part_ptr + (rows64 * GROUP + g)[:, None] * K + cols[None, :], mask=mask,
                       other=0.0)
    if USE_L2NORM:
        token, head = rows64 // H, rows64 % H
        x = tl.load(x_ptr + (token * stride_xt + head * stride_xh)[:, None] + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, 1) + 1e-6)  # (BR,)
        y = x * inv[:, None]
        acc = (acc - y * tl.sum(y * acc, 1)[:, None]) * inv[:, None]
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def finish_group_grads(part: Tensor, x: Tensor, group: int, use_l2norm: bool) -> Tensor:
    """``[tokens, H, K]`` in x's dtype from the float32 per-value-head gradients ``part``
    ``[tokens, H · group, K]`` (contiguous) of the (normalised, with ``use_l2norm``) ``x``
    ``[tokens, H, K]`` (unit last stride)."""
    tokens, H, K = x.shape
    if part.shape != (tokens, H * group, K) or not part.is_contiguous():
        raise ValueError(f"finish_group_grads: part must be contiguous [{tokens}, {H * group}, "
                         f"{K}]; got {tuple(part.shape)}")
    out = torch.empty((tokens, H, K), dtype=x.dtype, device=x.device)
    n_rows = tokens * H
    if n_rows:
        group_grads_kernel[(triton.cdiv(n_rows, ROWS),)](
            part, x, out, n_rows, H, x.stride(0), x.stride(1), GROUP=group, K=K,
            BK=max(16, next_power_of_2(K)), USE_L2NORM=use_l2norm, BR=ROWS, num_warps=4)
    return out
