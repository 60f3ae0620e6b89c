"""Depthwise causal conv1d over time with the SiLU fused, forward and backward, on ``[B, T, C]``.

GatedDeltaNet convolves its ``q, k, v`` projections (``C = 2·Hk·Dk + Hv·Dv`` channels, kernel
``K`` = 4) before the delta rule. ``local`` pads the sequence with a concatenation, transposes to
``[B, C, T]`` for torch's depthwise ``conv1d`` and applies SiLU after it: each a pass over the
activations. Here one program reads a ``(BT, BC)`` block of outputs' inputs straight from the
projection's output (its rows may be strided: ``x`` is a slice of a wider tensor), the ``K``
shifted tiles overlapping in cache, and writes ``y`` once.

Backward, per block of rows ``t``: ``dpre = dy ⊙ SiLU'(pre)`` with ``pre`` recomputed, and
``dx[t] = Σ_j w[:, j] · dpre[t + K − 1 − j]`` needs ``dpre`` at the next ``K − 1`` rows too,
so the program recomputes ``pre`` at ``K`` row offsets (``K²`` tile loads, all but the first
few from cache). ``dw[c, j] = Σ_{b,t} u[t − K + 1 + j] · dpre[t]`` is summed per program into
a float32 ``[B · row blocks, C, K]`` buffer and reduced by torch (deterministic, no atomics).
The gradient of ``initial_state`` (decoding with autograd only) comes from the reference on the
first ``K − 1`` rows, which are all it reaches.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug.ops.causal_conv1d import causal_conv1d as reference_causal_conv1d
from attnplug.ops.causal_conv1d import check_causal_conv1d_args
from attnplug_triton.ops.utils import check_runnable, interpreting

__all__ = ["causal_conv1d", "causal_conv1d_fwd_kernel", "causal_conv1d_bwd_kernel"]


@triton.jit
def _shifted(x_ptr, s_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt, stride_sb, stride_st,
             shift, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """``u[b, rows − shift, cols]`` as float32, ``u`` being x preceded by the K − 1 state rows
    (zeros without a state); rows past ``T`` read as zeros."""
    src = rows - shift
    x_ok = (src >= 0) & (src < T)
    u = tl.load(x_ptr + b * stride_xb + src.to(tl.int64)[:, None] * stride_xt + cols[None, :],
                mask=x_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        s_row = src + K - 1  # state row of a negative source position
        s_ok = (src < 0) & (s_row >= 0) & (rows < T)
        u += tl.load(s_ptr + b * stride_sb + s_row.to(tl.int64)[:, None] * stride_st
                     + cols[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0
                     ).to(tl.float32)
    return u


@triton.jit
def _pre(x_ptr, s_ptr, w_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt, stride_sb,
         stride_st, K: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr,
         BC: tl.constexpr):
    """The convolution before the activation at ``rows``: ``Σ_j w[:, j] u[rows − K + 1 + j]``."""
    acc = tl.zeros([BT, BC], tl.float32)
    for j in tl.static_range(K):
        w_j = tl.load(w_ptr + cols * K + j, mask=c_ok, other=0.0).to(tl.float32)
        acc += _shifted(x_ptr, s_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt, stride_sb,
                        stride_st, K - 1 - j, K, HAS_STATE) * w_j[None, :]
    return acc


@triton.jit
def causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, T, C,
    stride_xb, stride_xt, stride_sb, stride_st, stride_yb, stride_yt,
    K: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """``y`` of one ``(BT rows, BC channels)`` block of one sequence."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    pre = _pre(x_ptr, s_ptr, w_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt, stride_sb,
               stride_st, K, HAS_STATE, BT, BC)
    y = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(y_ptr + b * stride_yb + rows.to(tl.int64)[:, None] * stride_yt + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=(rows < T)[:, None] & c_ok[None, :])


@triton.jit
def causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, s_ptr, dy_ptr, dx_ptr, dw_ptr, T, C,
    stride_xb, stride_xt, stride_sb, stride_st, stride_dyb, stride_dyt, stride_dxb, stride_dxt,
    K: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """``dx`` of one ``(BT rows, BC channels)`` block and its share of ``dw``."""
    pid_t = tl.program_id(0)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    dx = tl.zeros([BT, BC], tl.float32)
    for m in tl.static_range(K):  # dpre at rows + m meets the tap j = K − 1 − m
        r = rows + m
        r_ok = r < T
        dpre = tl.load(dy_ptr + b * stride_dyb + r.to(tl.int64)[:, None] * stride_dyt
                       + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0
                       ).to(tl.float32)
        if SILU:
            pre = _pre(x_ptr, s_ptr, w_ptr, b, r, cols, c_ok, T, stride_xb, stride_xt,
                       stride_sb, stride_st, K, HAS_STATE, BT, BC)
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        w_j = tl.load(w_ptr + cols * K + (K - 1 - m), mask=c_ok, other=0.0).to(tl.float32)
        dx += dpre * w_j[None, :]
        if m == 0:  # this block's dpre: its share of dw, tap by tap
            part = dw_ptr + ((b * tl.num_programs(0) + pid_t) * C + cols) * K
            for j in tl.static_range(K):
                u = _shifted(x_ptr, s_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt,
                             stride_sb, stride_st, K - 1 - j, K, HAS_STATE)
                tl.store(part + j, tl.sum(u * dpre, 0), mask=c_ok)
    tl.store(dx_ptr + b * stride_dxb + rows.to(tl.int64)[:, None] * stride_dxt + cols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=(rows < T)[:, None] & c_ok[None, :])


def _blocks(backward: bool) -> tuple[int, int, int]:
    """``(BT, BC, num_warps)``: small blocks under the interpreter (speed); on a GPU the
    largest that do not spill on sm_90 (``benchmarks/ptxas_report.py --only conv``, Triton
    3.6): 64 × 128 with 8 warps forward (207 registers), 16 × 64 with 4 warps backward (156
    registers; 32 × 128 spilled 2 KB a thread, its K recomputed tiles all live)."""
    if interpreting():
        return 16, 32, 1
    return (16, 64, 4) if backward else (64, 128, 8)


def _rows(t: Tensor) -> Tensor:
    """``t`` with unit channel stride (the kernels index channels densely)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class CausalConv1dFunction(torch.autograd.Function):
    """Autograd over the two kernels; ``initial_state`` may be None."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, initial_state: Tensor | None,
                silu: bool) -> Tensor:
        x = _rows(x)
        w = weight.contiguous()
        s = None if initial_state is None else _rows(initial_state.to(x.dtype))
        B, T, C = x.shape
        K = w.shape[1]
        y = x.new_empty((B, T, C))
        BT, BC, warps = _blocks(False)
        if T:
            causal_conv1d_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](
                x, w, x if s is None else s, y, T, C, x.stride(0), x.stride(1),
                0 if s is None else s.stride(0), 0 if s is None else s.stride(1),
                y.stride(0), y.stride(1), K=K, HAS_STATE=s is not None, SILU=silu, BT=BT,
                BC=BC, num_warps=warps)
        ctx.save_for_backward(x, w, s)
        ctx.silu = silu
        ctx.weight_dtype = weight.dtype
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, s = ctx.saved_tensors
        dy = _rows(dy)
        B, T, C = x.shape
        K = w.shape[1]
        BT, BC, warps = _blocks(True)
        blocks = triton.cdiv(T, BT)
        dx = torch.empty_like(x)
        parts = torch.empty((B * blocks, C, K), device=x.device, dtype=torch.float32)
        if T:
            causal_conv1d_bwd_kernel[(blocks, triton.cdiv(C, BC), B)](
                x, w, x if s is None else s, dy, dx, parts, T, C, x.stride(0), x.stride(1),
                0 if s is None else s.stride(0), 0 if s is None else s.stride(1),
                dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), K=K,
                HAS_STATE=s is not None, SILU=ctx.silu, BT=BT, BC=BC, num_warps=warps)
        dw = parts.sum(0).to(ctx.weight_dtype)
        ds = None
        if s is not None and ctx.needs_input_grad[2] and T:
            # only the first K − 1 outputs see the state: the reference over those rows
            head = min(T, K - 1)
            with torch.enable_grad():
                state = s.detach().requires_grad_()
                y_head = reference_causal_conv1d(x[:, :head].detach(), w.detach(),
                                                 initial_state=state,
                                                 activation="silu" if ctx.silu else None)
                (ds,) = torch.autograd.grad(y_head, state, dy[:, :head])
            ds = ds.to(ctx.state_dtype)
        elif s is not None and ctx.needs_input_grad[2]:
            ds = torch.zeros_like(s, dtype=ctx.state_dtype)
        return dx, dw, ds, None


def causal_conv1d(x: Tensor, weight: Tensor, *, initial_state: Tensor | None = None,
                  activation: str | None = "silu") -> Tensor:
    """``y[B, T, C]`` from ``x[B, T, C]``, ``weight[C, K]`` and optionally
    ``initial_state[B, K−1, C]``: the function of ``attnplug.ops.causal_conv1d`` (same
    arguments), differentiable in all three, on CUDA tensors (or on the CPU under
    ``TRITON_INTERPRET=1``)."""
    check_causal_conv1d_args("triton causal_conv1d", x, weight, initial_state, activation)
    tensors = {"x": x, "weight": weight}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    check_runnable("triton causal_conv1d", tensors)
    return CausalConv1dFunction.apply(x, weight, initial_state, activation == "silu")
