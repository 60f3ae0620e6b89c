"""Depthwise causal conv1d over time with the SiLU fused, forward and backward, on ``[B, T, C]``.

GatedDeltaNet convolves its ``q, k, v`` projections (``C = 2·Hk·Dk + Hv·Dv`` channels, kernel
``K`` = 4) before the delta rule. ``local`` pads the sequence with a concatenation, transposes to
``[B, C, T]`` for torch's depthwise ``conv1d`` and applies SiLU after it: each a pass over the
activations. Here one program reads a ``(BT, BC)`` block of outputs' inputs straight from the
projection's output (its rows may be strided: ``x`` is a slice of a wider tensor), the ``K``
shifted tiles overlapping in cache, and writes ``y`` once.

Backward (:func:`causal_conv1d`, served since session 6) in two passes: ``dpre = dy ⊙
SiLU'(pre)`` written in x's dtype (as autograd through SiLU would round it), then ``dx[t] =
Σ_j w[:, j] · dpre[t + K − 1 − j]`` from ``K`` shifted tiles of ``dpre`` (the one-pass kernel
without the activation) — both passes in the forward's block sizes, autotuned. On the H200
(B=2, T=4096, C=8192) forward and backward take 0.66 ms.

Backward in one pass (:func:`causal_conv1d_one_pass`, served before): ``dx`` needs ``dpre`` at
the next ``K − 1`` rows too, so the program recomputes ``pre`` at ``K`` row offsets (``K²``
tile loads); its registers hold it to 16 × 64 blocks, and forward and backward take 1.29 ms
(the backward 1.1 ms where its bytes take 0.1 ms).

Either way ``dw[c, j] = Σ_{b,t} u[t − K + 1 + j] · dpre[t]`` is summed per program into a
float32 ``[B · row blocks, C, K]`` buffer and reduced by torch (deterministic, no atomics).
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
from attnplug_triton.ops.utils import check_runnable, interpreting, unit_last_stride

__all__ = ["causal_conv1d", "causal_conv1d_one_pass", "causal_conv1d_fwd_kernel",
           "causal_conv1d_dpre_kernel", "causal_conv1d_bwd_kernel"]


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
def causal_conv1d_dpre_kernel(
    x_ptr, w_ptr, s_ptr, dy_ptr, dpre_ptr, T, C,
    stride_xb, stride_xt, stride_sb, stride_st, stride_dyb, stride_dyt,
    K: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """``dpre = dy ⊙ SiLU'(pre)`` of one ``(BT rows, BC channels)`` block, ``pre`` recomputed
    (written densely: ``dpre[b, t, c]``)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    c_ok = cols < C
    mask = (rows < T)[:, None] & c_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(dy_ptr + b * stride_dyb + rows64 * stride_dyt + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    pre = _pre(x_ptr, s_ptr, w_ptr, b, rows, cols, c_ok, T, stride_xb, stride_xt, stride_sb,
               stride_st, K, HAS_STATE, BT, BC)
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))  # d SiLU(p) / dp = σ(1 + p(1 − σ))
    tl.store(dpre_ptr + (b * T + rows64) * C + cols[None, :],
             dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def causal_conv1d_bwd_kernel(
    x_ptr, w_ptr, s_ptr, dy_ptr, dx_ptr, dw_ptr, T, C,
    stride_xb, stride_xt, stride_sb, stride_st, stride_dyb, stride_dyt, stride_dxb, stride_dxt,
    K: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """``dx`` of one ``(BT rows, BC channels)`` block and its share of ``dw``. With ``SILU``
    from ``dy``, ``pre`` recomputed at ``K`` row offsets (the one-pass backward); without,
    ``dy`` is the gradient before the activation (the served two-pass backward's second pass
    reads ``dpre`` here)."""
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


# Rows per program on a GPU: fixed, so that the dw partial sums' layout ([B · row blocks, C, K])
# is the same whichever configuration the autotuner runs.
ROWS = 64
# (channels per program, warps) the GPU autotuner chooses from (by C and the dtypes). ptxas
# (sm_90, Triton 3.6; ``benchmarks/ptxas_report.py --only conv``), registers a thread for the
# forward / dpre / backward kernels: 128 × 8 warps 207 / 254 / 254 (one program an SM), 64 × 8
# warps 100 / 128 / 118, 32 × 4 warps 100 / 128 / 114; none spills (64 × 4 warps would: 156 B).
CONFIGS = ((128, 8), (64, 8), (32, 4))
# under the interpreter (no autotuning there): small blocks, for speed
INTERPRETER_BLOCKS = (16, 32, 1)
# (BT, BC, warps) of the served kernels on a GPU, checked there: the forward's, and the one-pass
# backward's — the largest that does not spill on sm_90 (its K recomputed tiles all live)
FORWARD_BLOCKS = (64, 128, 8)
ONE_PASS_BACKWARD_BLOCKS = (16, 64, 4)

_TUNERS: dict[str, Any] = {}


def _blocks(tuned: bool, fixed: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """``(BT, BC, warps)`` of a launch: :data:`INTERPRETER_BLOCKS` under the interpreter,
    ``fixed`` on a GPU, or None when the autotuner chooses (``BT`` = :data:`ROWS` then)."""
    if interpreting():
        return INTERPRETER_BLOCKS
    return None if tuned else fixed


def _launch(kernel: Any, B: int, T: int, C: int, args: tuple, meta: dict[str, Any], *,
            tuned: bool, fixed: tuple[int, int, int]) -> None:
    """Run ``kernel`` over ``[B, T, C]`` with :func:`_blocks`' choice, autotuned over
    :data:`CONFIGS` when it has none."""
    blocks = _blocks(tuned, fixed)
    if blocks is not None:
        bt, bc, warps = blocks
        kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc), B)](*args, **meta, BT=bt, BC=bc,
                                                          num_warps=warps)
        return
    if kernel.__name__ not in _TUNERS:
        configs = [triton.Config({"BT": ROWS, "BC": bc}, num_warps=w) for bc, w in CONFIGS]
        _TUNERS[kernel.__name__] = triton.autotune(configs=configs, key=["C"])(kernel)
    _TUNERS[kernel.__name__][
        lambda m: (triton.cdiv(T, m["BT"]), triton.cdiv(C, m["BC"]), B)](*args, **meta)


def _row_blocks(T: int, tuned: bool, fixed: tuple[int, int, int]) -> int:
    """Row blocks of a sequence of ``T`` rows under :func:`_blocks`' choice: the dw partial
    sums' count per sequence."""
    blocks = _blocks(tuned, fixed)
    return triton.cdiv(T, ROWS if blocks is None else blocks[0])


def chosen_configs() -> list[str]:
    """What the autotuners chose so far, one line per kernel and tuning key."""
    return [f"{name} key={key}: {config}" for name, tuner in _TUNERS.items()
            for key, config in getattr(tuner, "cache", {}).items()]


class CausalConv1dFunction(torch.autograd.Function):
    """Autograd over the kernels; ``initial_state`` may be None. ``two_pass``: the two-pass
    backward and autotuned blocks (served); else the single-pass backward with fixed blocks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, initial_state: Tensor | None,
                silu: bool, two_pass: bool) -> Tensor:
        x = unit_last_stride(x)
        w = weight.contiguous()
        s = None if initial_state is None else unit_last_stride(initial_state.to(x.dtype))
        B, T, C = x.shape
        K = w.shape[1]
        y = x.new_empty((B, T, C))
        if T:
            _launch(causal_conv1d_fwd_kernel, B, T, C, (
                x, w, x if s is None else s, y, T, C, x.stride(0), x.stride(1),
                0 if s is None else s.stride(0), 0 if s is None else s.stride(1),
                y.stride(0), y.stride(1)), dict(K=K, HAS_STATE=s is not None, SILU=silu),
                tuned=two_pass, fixed=FORWARD_BLOCKS)
        ctx.save_for_backward(x, w, s)
        ctx.silu = silu
        ctx.two_pass = two_pass
        ctx.weight_dtype = weight.dtype
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, s = ctx.saved_tensors
        dy = unit_last_stride(dy)
        B, T, C = x.shape
        K = w.shape[1]
        state = (x if s is None else s, 0 if s is None else s.stride(0),
                 0 if s is None else s.stride(1))
        meta = dict(K=K, HAS_STATE=s is not None)
        two_pass, fixed = ctx.two_pass, ONE_PASS_BACKWARD_BLOCKS
        # the gradient the dx/dw kernel reads: dy (the activation's backward inside it, one
        # pass), or dpre written by a first pass (two passes)
        grad, silu_inside = dy, ctx.silu and not two_pass
        if two_pass and ctx.silu and T:
            grad = torch.empty((B, T, C), device=x.device, dtype=x.dtype)
            _launch(causal_conv1d_dpre_kernel, B, T, C, (
                x, w, state[0], dy, grad, T, C, x.stride(0), x.stride(1), state[1], state[2],
                dy.stride(0), dy.stride(1)), meta, tuned=True, fixed=fixed)
        dx = torch.empty_like(x)
        parts = torch.empty((B * _row_blocks(T, two_pass, fixed), C, K), device=x.device,
                            dtype=torch.float32)
        if T:
            _launch(causal_conv1d_bwd_kernel, B, T, C, (
                x, w, state[0], grad, dx, parts, T, C, x.stride(0), x.stride(1), state[1],
                state[2], grad.stride(0), grad.stride(1), dx.stride(0), dx.stride(1)),
                {**meta, "SILU": silu_inside}, tuned=two_pass, fixed=fixed)
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
        return dx, dw, ds, None, None


def _causal_conv1d(owner: str, x: Tensor, weight: Tensor, initial_state: Tensor | None,
                   activation: str | None, two_pass: bool) -> Tensor:
    check_causal_conv1d_args(owner, x, weight, initial_state, activation)
    tensors = {"x": x, "weight": weight}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    check_runnable(owner, tensors)
    return CausalConv1dFunction.apply(x, weight, initial_state, activation == "silu", two_pass)


def causal_conv1d(x: Tensor, weight: Tensor, *, initial_state: Tensor | None = None,
                  activation: str | None = "silu") -> Tensor:
    """``y[B, T, C]`` from ``x[B, T, C]``, ``weight[C, K]`` and optionally
    ``initial_state[B, K−1, C]``: the function of ``attnplug.ops.causal_conv1d`` (same
    arguments), differentiable in all three, on CUDA tensors (or on the CPU under
    ``TRITON_INTERPRET=1``). Autotuned blocks; the backward in two passes (``dpre``, then
    ``dx`` and ``dw`` from K shifted tiles of it): on the H200 at B=2, T=4096, C=8192 forward
    and backward take 0.66 ms against the one-pass backward's 1.29."""
    return _causal_conv1d("triton causal_conv1d", x, weight, initial_state, activation, True)


def causal_conv1d_one_pass(x: Tensor, weight: Tensor, *, initial_state: Tensor | None = None,
                           activation: str | None = "silu") -> Tensor:
    """:func:`causal_conv1d` with fixed blocks and the one-pass backward (the pre-activation
    recomputed in each of K shifted tiles): served until session 6, kept for comparison in
    ``benchmarks/bench_conv.py``."""
    return _causal_conv1d("triton causal_conv1d", x, weight, initial_state, activation, False)
