"""RMSNorm and LayerNorm over the last dimension, with an optional fused SiLU gate, in Triton.

``fused_norm(x, weight, bias, gate, eps=, rms=)`` computes ``norm(x)·weight (+ bias)`` and, with
``gate``, multiplies by ``SiLU(gate)`` (Qwen3-Next's gated RMSNorm) — the same function as
``attnplug.layers.norms`` (``gated_norm`` for the gate), statistics and arithmetic in float32,
one rounding to ``x``'s dtype at the end.

Forward: one program normalises a block of rows held whole in registers (widths up to
:data:`MAX_WIDTH`), saving the float32 ``rstd`` (and ``mean`` for LayerNorm) per row. Backward:
a fixed number of programs each walk a contiguous range of rows, write ``dx`` (and ``dgate``) and
sum their rows' weight/bias gradients in float32 into one partial row each; the partials are
summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.utils import check_runnable, next_power_of_2, sm_count, unit_last_stride

__all__ = ["MAX_WIDTH", "fused_norm"]

MAX_WIDTH = 65536


@triton.jit
def norm_fwd_kernel(
    X, W, BIAS, GATE, Y, MEAN, RSTD,
    stride_x, stride_g, stride_y, N, WIDTH, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    """``y = norm(x)·w (+ b) (· SiLU(gate))`` for ``ROWS`` rows; saves mean and rstd."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < N
    col_ok = cols < WIDTH
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # (ROWS, BLOCK)
    if IS_RMS:
        centred = x
    else:
        mean = tl.sum(x, 1) / WIDTH  # (ROWS,)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / WIDTH + eps)  # (ROWS,)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        g = tl.load(GATE + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        y = y * g * tl.sigmoid(g)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(
    X, W, BIAS, GATE, DY, MEAN, RSTD, DX, DGATE, DW_PART, DB_PART,
    stride_x, stride_g, stride_dy, stride_dx, stride_dg, N, WIDTH, rows_per_program,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    """dx (and dgate) for a range of rows, and that range's partial weight/bias gradients."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < WIDTH
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    for start in range(row_start, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # (ROWS, BLOCK)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # (ROWS,)
        if IS_RMS:
            x_hat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_GATE:
            g = tl.load(GATE + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32)
            sig = tl.sigmoid(g)
            normed = x_hat * w[None, :]
            if HAS_BIAS:
                normed += bias[None, :]
            dg = dy * normed * sig * (1.0 + g * (1.0 - sig))  # d SiLU(g) / dg = σ(1 + g(1 − σ))
            tl.store(DGATE + rows64[:, None] * stride_dg + cols[None, :],
                     dg.to(DGATE.dtype.element_ty), mask=mask)
            dy = dy * g * sig  # the gradient reaching norm(x)
        wdy = w[None, :] * dy
        c1 = tl.sum(x_hat * wdy, 1) / WIDTH  # (ROWS,)
        if IS_RMS:
            dx = (wdy - x_hat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, 1) / WIDTH
            dx = (wdy - x_hat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * WIDTH + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * WIDTH + cols, tl.sum(db, 0), mask=col_ok)


def _launch_shape(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): about 4K elements per program for narrow rows."""
    block = max(16, next_power_of_2(width))
    rows = max(1, min(16, 4096 // block))
    warps = min(16, max(1, block * rows // 256))
    return block, rows, warps


def _rows_view(t: Tensor, width: int) -> Tensor:
    """``t`` as ``[N, width]`` rows with a unit inner stride (copied only when needed)."""
    return unit_last_stride(t.reshape(-1, width))


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor | None, eps: float,
             rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    width = x.shape[-1]
    x2 = _rows_view(x, width)  # (N, W)
    g2 = _rows_view(gate, width) if gate is not None else None
    n = x2.shape[0]
    y = torch.empty((n, width), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    mean = rstd if rms else torch.empty(n, dtype=torch.float32, device=x.device)
    block, rows, warps = _launch_shape(width)
    norm_fwd_kernel[(triton.cdiv(n, rows),)](
        x2, weight, bias if bias is not None else weight, g2 if g2 is not None else x2, y, mean,
        rstd, x2.stride(0), g2.stride(0) if g2 is not None else 0, y.stride(0), n, width, eps,
        BLOCK=block, ROWS=rows, IS_RMS=rms, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, num_warps=warps,
    )
    return y.view(x.shape), x2, mean, rstd, g2


def _backward(dy: Tensor, x2: Tensor, weight: Tensor, bias: Tensor | None, g2: Tensor | None,
              mean: Tensor, rstd: Tensor, rms: bool
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    n, width = x2.shape
    dy2 = _rows_view(dy, width)
    dx = torch.empty((n, width), dtype=x2.dtype, device=x2.device)
    dg = torch.empty_like(dx, dtype=g2.dtype) if g2 is not None else None
    block, rows, warps = _launch_shape(width)
    device_index = x2.device.index if x2.is_cuda else 0
    programs = max(1, min(triton.cdiv(n, rows), 4 * sm_count(device_index)))
    rows_per_program = rows * triton.cdiv(triton.cdiv(n, rows), programs)
    programs = triton.cdiv(n, rows_per_program)
    dw_part = torch.empty((programs, width), dtype=torch.float32, device=x2.device)
    db_part = torch.empty_like(dw_part) if bias is not None else dw_part
    norm_bwd_kernel[(programs,)](
        x2, weight, bias if bias is not None else weight, g2 if g2 is not None else x2, dy2,
        mean, rstd, dx, dg if dg is not None else dx, dw_part, db_part,
        x2.stride(0), g2.stride(0) if g2 is not None else 0, dy2.stride(0), dx.stride(0),
        dg.stride(0) if dg is not None else 0, n, width, rows_per_program,
        BLOCK=block, ROWS=rows, IS_RMS=rms, HAS_BIAS=bias is not None,
        HAS_GATE=g2 is not None, num_warps=warps,
    )
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dg


class FusedNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, the parameters, the gate and the per-row statistics."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor | None,
                eps: float, rms: bool) -> Tensor:
        y, x2, mean, rstd, g2 = _forward(x, weight, bias, gate, eps, rms)
        ctx.save_for_backward(x2, weight, bias, g2, mean, rstd)
        ctx.rms = rms
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, bias, g2, mean, rstd = ctx.saved_tensors
        dx, dw, db, dg = _backward(dy, x2, weight, bias, g2, mean, rstd, ctx.rms)
        dg = dg.view(ctx.shape) if dg is not None else None
        return dx.view(ctx.shape), dw, db, dg, None, None


def fused_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, gate: Tensor | None = None,
               *, eps: float, rms: bool) -> Tensor:
    """RMSNorm (``rms=True``) or LayerNorm of the last dim, optionally times ``SiLU(gate)``.

    Args:
        x: input ``[..., W]`` (float16, bfloat16 or float32), ``W <= MAX_WIDTH``.
        weight: ``[W]``; bias: ``[W]`` or ``None`` (LayerNorm's shift; ``None`` for RMSNorm).
        gate: ``None`` or a tensor shaped like ``x``: the output is multiplied by ``SiLU(gate)``.
        eps: added to the variance (mean square for RMSNorm).

    Returns:
        ``y`` shaped and typed like ``x``; differentiable in x, weight, bias and gate.

    Raises:
        ValueError: shapes, dtypes or devices the kernels do not take (named in the message).
    """
    width = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"fused_norm: x must be [..., W] with 1 <= W <= {MAX_WIDTH}; got shape "
                         f"{tuple(x.shape)}")
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    for name, p in params.items():
        if p.shape != (width,):
            raise ValueError(f"fused_norm: {name} must be [{width}] to match x {tuple(x.shape)}; "
                             f"got {tuple(p.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"fused_norm: gate must have x's shape {tuple(x.shape)}; got "
                         f"{tuple(gate.shape)}")
    tensors = {"x": x, **params} | ({"gate": gate} if gate is not None else {})
    check_runnable("fused_norm", tensors)
    if x.numel() == 0:
        return x.new_empty(x.shape) + 0 * weight.sum()
    return FusedNormFunction.apply(x, weight, bias, gate, float(eps), bool(rms))
