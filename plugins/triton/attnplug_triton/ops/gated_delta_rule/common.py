"""What the gated delta rule kernels share: argument checks, the chunk tables, launching, and the
small ``@triton.jit`` helpers (row tiles, L2 norm, gates, decay matrices).

Every kernel sees the ``B·T`` tokens as one packed sequence of ``N`` sequences (``N = B``
without ``cu_seqlens``): ``cu[N + 1]`` holds each sequence's first token, the sequences are cut
into chunks of :data:`CHUNK` tokens (the last one of each sequence may be short), and
``chunk_off[N + 1]`` / ``chunk_seq[NC]`` map sequences to chunks and back. A tensor of the
caller's ``[B, T, heads, dim]`` is read through its token stride and head stride (its last dim
must be contiguous); the kernels' own buffers are contiguous ``[tokens, heads, ...]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnplug_triton.ops.utils import (
    check_runnable,
    interpreting,
    next_power_of_2,
    unit_last_stride,
)

__all__ = ["CHUNK", "MAX_DIM", "Sequences", "check_args", "sequences", "launch", "force_config",
           "chosen_configs", "precision", "block", "token_major", "load_rows", "store_rows",
           "load_norms", "chunk_gates", "chunk_bounds", "decay_lower", "decay_upper",
           "intra_chunk_p", "intra_chunk_pt", "chunk_v_new"]

CHUNK = 64  # tokens per chunk (the WY block); fixed, every kernel assumes it
MAX_DIM = 256  # largest key and value head dims (K, V)


# -- host side --------------------------------------------------------------------------------
class Sequences(NamedTuple):
    """The packed sequences and their chunks, as int32 tensors on the inputs' device."""

    cu: Tensor  # (N + 1,) first token of each sequence in the flattened B·T tokens
    chunk_off: Tensor  # (N + 1,) first chunk of each sequence
    chunk_seq: Tensor  # (NC,) sequence of each chunk
    num_seqs: int  # N
    num_chunks: int  # NC
    longest: int  # tokens in the longest sequence


def _fail(owner: str, message: str) -> ValueError:
    return ValueError(f"{owner}: {message}")


def check_args(owner: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
               initial_state: Tensor | None, cu_seqlens: Tensor | None,
               scale: float | None) -> Sequences:
    """Raise ``ValueError`` (naming the argument) unless the arguments fit DESIGN §8.

    Returns the :class:`Sequences` of the call. Synchronises with the device only to read
    ``cu_seqlens``.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise _fail(owner, f"{name} must be a floating-point tensor; got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if q.dim() != 4 or k.shape != q.shape:
        raise _fail(owner, f"q and k must be [B, T, H, K] of one shape; got {tuple(q.shape)} "
                    f"and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise _fail(owner, f"v must be [B={B}, T={T}, HV, V]; got {tuple(v.shape)}")
    HV, V = v.shape[2:]
    if H == 0 or HV % H:
        raise _fail(owner, f"the value heads HV={HV} (v, g, beta) must be a multiple of the key "
                    f"heads H={H} (q, k)")
    if not (0 < K <= MAX_DIM and 0 < V <= MAX_DIM):
        raise _fail(owner, f"head dims must be in 1..{MAX_DIM}; got K={K}, V={V}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise _fail(owner, f"{name} must be [B, T, HV] = {(B, T, HV)}; got {tuple(x.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise _fail(owner, f"scale must be a float or None; got {type(scale).__name__}")
    tensors = {"q": q, "k": k, "v": v}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    check_runnable(owner, tensors)
    for name, x in (*tensors.items(), ("g", g), ("beta", beta)):
        if x.device != q.device:
            raise _fail(owner, f"{name} is on {x.device} but q is on {q.device}")
    seqs = sequences(owner, B, T, cu_seqlens, q.device)
    expected = (seqs.num_seqs, HV, K, V)
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise _fail(owner, f"initial_state must be [N, HV, K, V] = {expected} (N = number of "
                    f"sequences); got {tuple(initial_state.shape)}")
    return seqs


def sequences(owner: str, B: int, T: int, cu_seqlens: Tensor | None,
              device: torch.device) -> Sequences:
    """The :class:`Sequences` of ``B`` sequences of ``T`` tokens, or of ``cu_seqlens`` (B = 1)."""
    if cu_seqlens is None:
        nt = triton.cdiv(T, CHUNK)
        arange = torch.arange(B + 1, dtype=torch.int32, device=device)
        chunk_seq = torch.arange(B * nt, dtype=torch.int32, device=device) // max(nt, 1)
        return Sequences(arange * T, arange * nt, chunk_seq, B, B * nt, T)
    if (not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1
            or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool):
        raise _fail(owner, "cu_seqlens must be a 1-D integer tensor [N + 1] of sequence offsets")
    if B != 1:
        raise _fail(owner, f"cu_seqlens requires batch size B == 1 (packed sequences); got B={B}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or min(lengths) < 0:
        raise _fail(owner, f"cu_seqlens must start at 0, never decrease and end at T={T}, with "
                    f"at least 2 entries; got {cu}")
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in lengths], dtype=torch.int32)
    chunk_off = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    chunk_seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), counts)
    return Sequences(torch.tensor(cu, dtype=torch.int32, device=device), chunk_off.to(device),
                     chunk_seq.to(device), len(lengths), int(chunk_off[-1]), max(lengths))


def token_major(x: Tensor) -> Tensor:
    """``x[B, T, ...]`` as ``[B·T, ...]`` with a unit last stride (a view when possible)."""
    x = unit_last_stride(x)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the dots whose operands are float32: three TF32 products
    (float32-level accuracy) for float32 inputs, one TF32 product for 16-bit inputs."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def block(dim: int) -> int:
    """The power-of-two block covering a head dim (at least 16, the smallest dot)."""
    return max(16, next_power_of_2(dim))


_TUNERS: dict[str, Any] = {}
_FORCED: dict[str, triton.Config] = {}


@contextlib.contextmanager
def force_config(name: str, config: triton.Config) -> Iterator[None]:
    """Launch kernel ``name`` with ``config`` instead of autotuning, inside the block (checks)."""
    _FORCED[name] = config
    try:
        yield
    finally:
        del _FORCED[name]


def launch(name: str, kernel: Any, configs: list[triton.Config], interpreter: triton.Config,
           key: list[str], grid: Callable[[dict[str, Any]], tuple[int, ...]], *args: Any,
           prune: Callable[..., list[triton.Config]] | None = None,
           restore: tuple[str, ...] = (), **meta: Any) -> None:
    """Run ``kernel``: autotuned over ``configs`` on a GPU (keyed on ``key``; ``prune``, when
    given, is Triton's ``early_config_prune``: it drops configurations per call before they
    are timed), with the ``interpreter`` config under ``TRITON_INTERPRET=1``, or with a config
    forced by :func:`force_config` (never pruned: the GPU checks force each one).
    ``grid(meta)`` gives the launch grid for a config's meta-parameters. ``restore`` names the
    arguments the kernel reads and then overwrites: the autotuner runs it once per
    configuration it times, so it restores them after each (Triton's ``restore_value``)."""
    config = _FORCED.get(name) or (interpreter if interpreting() else None)
    if config is not None:
        kernel[grid({**meta, **config.kwargs})](*args, **meta, **config.kwargs,
                                                num_warps=config.num_warps,
                                                num_stages=config.num_stages)
        return
    if name not in _TUNERS:
        by = {"early_config_prune": prune} if prune is not None else None
        _TUNERS[name] = triton.autotune(configs=configs, key=key, prune_configs_by=by,
                                        restore_value=list(restore) or None)(kernel)
    _TUNERS[name][grid](*args, **meta)


def chosen_configs() -> list[str]:
    """What the autotuners chose so far, one line per kernel and tuning key."""
    return [f"{name} key={key}: {config}" for name, tuner in _TUNERS.items()
            for key, config in getattr(tuner, "cache", {}).items()]


# -- device side ------------------------------------------------------------------------------
@triton.jit
def load_rows(ptr, rows, row_ok, stride_t, cols, col_ok):
    """The ``(rows, cols)`` tile of a token-major tensor (``ptr`` at the head), zeros outside."""
    offs = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_rows(ptr, tile, rows, row_ok, stride_t, cols, col_ok):
    """Store ``tile`` at the ``(rows, cols)`` of a token-major tensor, in its dtype."""
    offs = rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def load_norms(r_ptr, rows, row_ok, H, hk, USE_L2NORM: tl.constexpr):
    """The inverse L2 norms ``1 / sqrt(Σx² + 1e-6)`` of the rows' q or k (float32
    ``[tokens, H]``, written by the first kernel), or ones without the flag."""
    if USE_L2NORM:
        return tl.load(r_ptr + rows.to(tl.int64) * H + hk, mask=row_ok, other=1.0)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def chunk_gates(g_ptr, beta_ptr, rows, row_ok, hv, HV):
    """Within-chunk cumulative log decay ``γ``, its total ``γ_C`` and ``β`` (float32, zero
    outside the sequence, so ``γ`` stays flat there) from float32 ``[tokens, HV]`` tensors."""
    idx = rows.to(tl.int64) * HV + hv
    g = tl.load(g_ptr + idx, mask=row_ok, other=0.0)
    beta = tl.load(beta_ptr + idx, mask=row_ok, other=0.0)
    return tl.cumsum(g, 0), tl.sum(g, 0), beta


@triton.jit
def chunk_bounds(chunk_seq, cu, chunk_off, c, BT: tl.constexpr):
    """Sequence, first token and end of the sequence for chunk ``c``."""
    n = tl.load(chunk_seq + c)
    start = tl.load(cu + n) + (c - tl.load(chunk_off + n)) * BT
    return n, start, tl.load(cu + n + 1)


@triton.jit
def decay_lower(gam, BT: tl.constexpr, STRICT: tl.constexpr):
    """``Γ_ij = exp(γ_i − γ_j)`` for ``j < i`` (``j <= i`` unless ``STRICT``), else 0.

    The exponent is masked before ``exp``: above the diagonal it is positive and may overflow.
    """
    i = tl.arange(0, BT)
    if STRICT:
        keep = i[:, None] > i[None, :]
    else:
        keep = i[:, None] >= i[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, gam[:, None] - gam[None, :], 0.0)), 0.0)


@triton.jit
def decay_upper(gam, BT: tl.constexpr, STRICT: tl.constexpr):
    """``Γᵀ``: ``exp(γ_j − γ_i)`` for ``j > i`` (``j >= i`` unless ``STRICT``), else 0."""
    i = tl.arange(0, BT)
    if STRICT:
        keep = i[:, None] < i[None, :]
    else:
        keep = i[:, None] <= i[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, gam[None, :] - gam[:, None], 0.0)), 0.0)


@triton.jit
def intra_chunk_p(q, k, rq, rk, gam, PRECISION: tl.constexpr):
    """``P = (q kᵀ) ⊙ r_q r_kᵀ ⊙ Γ`` (on and below the diagonal), float32, from loaded tiles
    (``r_q``, ``r_k``: the row scales — norms, and for q the scale)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (C, C)
    return s * rq[:, None] * rk[None, :] * decay_lower(gam, 64, False)


@triton.jit
def intra_chunk_pt(k, q, rk, rq, gam, PRECISION: tl.constexpr):
    """``Pᵀ`` built as ``(k qᵀ) ⊙ r_k r_qᵀ ⊙ Γᵀ`` from loaded tiles — never a transposed dot
    result (the Hopper miscompilation) — float32."""
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (C, C) KQᵀ
    return st * rk[:, None] * rq[None, :] * decay_upper(gam, 64, False)


@triton.jit
def chunk_v_new(k, h, v, a, beta, rk, gam, PRECISION: tl.constexpr):
    """The forward from a chunk's start state ``h``: ``V_new = A X`` (``U − W h``, float32)
    with ``X = β⊙V − (β e^γ / ‖k‖)⊙(K h)`` entering the product in k's dtype."""
    kh = tl.dot(k, h, input_precision=PRECISION)  # (C, BV)
    x = v.to(tl.float32) * beta[:, None] - kh * (rk * beta * tl.exp(gam))[:, None]
    return tl.dot(a, x.to(k.dtype), input_precision=PRECISION)  # (C, BV)
