"""Causal flash attention: launchers, block configurations and the autograd function.

``flash_attention(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv]) -> o[B,T,H,Dv]`` computes the same
function as :func:`attnplug.ops.attention.causal_attention` (DESIGN §8) with the kernels of
:mod:`.kernels`: float16, bfloat16 or float32 inputs (float32 dots as "tf32x3", three TF32
products, which keeps float32-level accuracy), float32 accumulation, head dims up to 256
(padded to a power of two), any ``S >= T``.

The backward is deterministic: a dK/dV kernel (one program per key block, summing over every
query head of its group) and a dQ kernel (one program per row block) recompute the
probabilities from the saved log-sum-exp; no atomics. (Summing dQ inside the dK/dV kernel
instead — five matrix products rather than seven — was measured slower on an H200 at B=8,
T=4096, H=16, D=128, bf16 forward+backward: with float32 atomics 6.26 against 5.05 ms
(session 4), with one TMA reduction a tile 5.61 against 5.21 ms (session 9), so neither is
kept.) Warp specialization (TMA producer warps, consumer warpgroups: how FlashAttention-3 and
cuDNN reach their Hopper speed) is not available from Triton 3.6 on the H200: every kernel its
Hopper pass specialized hung, gave NaN or did not compile
(``benchmarks/probe_warp_specialize.py``, session 10).

On a GPU each kernel is autotuned over a short list of block configurations chosen by head dim
(:data:`FWD_CONFIGS`, :data:`DKDV_CONFIGS`, :data:`DQ_CONFIGS`), keyed on the power-of-two
buckets of the row and key counts; under ``TRITON_INTERPRET=1`` a fixed small configuration runs
instead (the interpreter cannot autotune).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor

from attnplug_triton.ops.attention import kernels
from attnplug_triton.ops.utils import (
    MAX_HEAD_DIM,
    check_qkv,
    check_runnable,
    interpreting,
    next_power_of_2,
    unit_last_stride,
)

__all__ = [
    "BlockConfig",
    "FWD_CONFIGS",
    "DKDV_CONFIGS",
    "DQ_CONFIGS",
    "MAX_HEAD_DIM",
    "flash_attention",
    "attention_forward",
    "attention_backward",
    "chosen_configs",
]

_LOG2_E = 1.4426950408889634
_INT32_MAX = 2**31 - 1


class BlockConfig(NamedTuple):
    """One launch configuration: rows per block, keys per block, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Keyed by the padded head dim's size class (64: up to 64, 128, 256). In the dK/dV kernel
# block_n is the program's key block and block_m the row block of its inner loop.
FWD_CONFIGS: dict[int, tuple[BlockConfig, ...]] = {
    64: (BlockConfig(128, 64, 4, 3), BlockConfig(128, 128, 8, 3), BlockConfig(64, 64, 4, 4),
         BlockConfig(64, 32, 4, 3)),
    128: (BlockConfig(128, 64, 8, 3), BlockConfig(128, 128, 8, 2), BlockConfig(128, 64, 4, 3),
          BlockConfig(64, 64, 4, 3)),
    256: (BlockConfig(64, 64, 4, 2), BlockConfig(128, 64, 8, 2), BlockConfig(64, 32, 4, 2)),
}
DKDV_CONFIGS: dict[int, tuple[BlockConfig, ...]] = {
    64: (BlockConfig(32, 128, 4, 3), BlockConfig(64, 128, 8, 3), BlockConfig(64, 64, 4, 3),
         BlockConfig(32, 64, 4, 4)),
    128: (BlockConfig(32, 128, 4, 3), BlockConfig(32, 128, 4, 5), BlockConfig(64, 128, 8, 3),
          BlockConfig(64, 64, 4, 3)),
    256: (BlockConfig(32, 64, 4, 2), BlockConfig(64, 64, 8, 2), BlockConfig(32, 32, 4, 2)),
}
DQ_CONFIGS: dict[int, tuple[BlockConfig, ...]] = {
    64: (BlockConfig(128, 32, 4, 3), BlockConfig(128, 64, 8, 3), BlockConfig(64, 64, 4, 3),
         BlockConfig(64, 32, 4, 4)),
    128: (BlockConfig(128, 32, 4, 3), BlockConfig(128, 32, 4, 5), BlockConfig(128, 64, 8, 3),
          BlockConfig(64, 64, 4, 3)),
    256: (BlockConfig(64, 32, 4, 2), BlockConfig(64, 64, 8, 2), BlockConfig(32, 32, 4, 2)),
}
# float32 inputs: "tf32x3" dots (three TF32 products, float32-level accuracy) at one small
# configuration, not tuned (float32 attention is for checking, not for speed).
FP32_CONFIG = BlockConfig(32, 32, 4, 2)
# Under the interpreter: small blocks, so the tests' short sequences still span several blocks.
_INTERPRETER_CONFIG = BlockConfig(32, 16, 1, 1)
_TUNING_KEY = ["ROWS_BUCKET", "KEYS_BUCKET", "BLOCK_D", "BLOCK_DV", "GROUP", "PRECISION"]
_KERNELS = {
    "fwd": (kernels.attention_fwd_kernel, FWD_CONFIGS),
    "dkdv": (kernels.attention_bwd_dkdv_kernel, DKDV_CONFIGS),
    "dq": (kernels.attention_bwd_dq_kernel, DQ_CONFIGS),
}


def _size_class(d: int, dv: int) -> int:
    """The config table's key for head dims ``d`` and ``dv``: 64, 128 or 256."""
    return max(64, next_power_of_2(max(d, dv)))


# The kernels that load the tiles of their loop through tensor descriptors (TMA loads on Hopper)
# instead of pointers — K and V in the forward ("fwd") and the dQ kernel ("dq"), q and dO in
# the dK/dV kernel ("dkdv") — where the tensors allow it (:func:`_descriptors`). None by
# default: on the H200 (bench_attention.py, B=8, H=16, D=128, bf16, two runs of session 9)
# no choice was faster beyond the run-to-run spread — forward+backward at T=4096, ms: all
# pointers 5.206 / 5.244, all descriptors 5.065 / 5.652, descriptors in dK/dV and dQ only
# 5.275, in dQ only 5.398, in dK/dV only 5.518. Session 10, four interleaved rounds (the
# harness's drift cancelling): all pointers 5.395 (p20-p80 5.235-5.518), all descriptors 5.440,
# dK/dV only 5.239, dQ only 5.185 — and the forward rows, which all ran the same pointer
# forward, 1.333-1.384: still within the spread. Right on the GPU at real shapes
# (test_triton_attention.py -k descriptor).
TENSOR_DESCRIPTORS: frozenset[str] = frozenset()
_DESC_KERNELS = ("fwd", "dkdv", "dq")

_TUNERS: dict[tuple[str, int, bool], Any] = {}


def _set_kv_blocks(nargs: dict[str, Any]) -> None:
    """Autotuner pre-hook (forward, dQ): the K/V descriptors' blocks follow BLOCK_N."""
    for name, width in (("K", "BLOCK_D"), ("V", "BLOCK_DV")):
        nargs[name].block_shape = [1, nargs["BLOCK_N"], 1, nargs[width]]


def _set_qo_blocks(nargs: dict[str, Any]) -> None:
    """Autotuner pre-hook (dK/dV): the q/dO descriptors' blocks are BLOCK_M packed rows,
    ``BLOCK_M / GROUP`` positions of the group's ``GROUP`` heads."""
    for name, width in (("Q", "BLOCK_D"), ("DO", "BLOCK_DV")):
        nargs[name].block_shape = [1, nargs["BLOCK_M"] // nargs["GROUP"], nargs["GROUP"],
                                   nargs[width]]


_BLOCK_HOOKS = {"fwd": _set_kv_blocks, "dq": _set_kv_blocks, "dkdv": _set_qo_blocks}
_DESC_FLAGS = {"fwd": "KV_DESC", "dq": "KV_DESC", "dkdv": "QO_DESC"}


def descriptor_kernels(desc: bool | Iterable[str] | None) -> frozenset[str]:
    """The kernels a ``desc`` argument puts on tensor descriptors: ``None`` as
    :data:`TENSOR_DESCRIPTORS` says, ``True`` all three, ``False`` none, or the names given
    (``"fwd"``, ``"dkdv"``, ``"dq"``)."""
    if desc is None:
        return frozenset(TENSOR_DESCRIPTORS)
    if isinstance(desc, bool):
        return frozenset(_DESC_KERNELS if desc else ())
    if isinstance(desc, str):
        desc = (desc,)
    try:
        names = frozenset(desc)
    except TypeError:
        raise ValueError(f"desc={desc!r} is not accepted: expected None, True, False or kernel "
                         f"names from {list(_DESC_KERNELS)}") from None
    unknown = sorted(str(n) for n in names - set(_DESC_KERNELS))
    if unknown:
        raise ValueError(f"desc names unknown kernels {unknown}: expected names from "
                         f"{list(_DESC_KERNELS)}")
    return names


def _autotuned(name: str, size: int, desc: bool = False) -> Any:
    """The autotuner of kernel ``name`` for head-dim class ``size`` (made once, then kept);
    ``desc``: the kernel with tensor descriptors (their block shapes set per config)."""
    if (name, size, desc) not in _TUNERS:
        kernel, table = _KERNELS[name]
        configs = [
            triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                          num_warps=c.num_warps, num_stages=c.num_stages,
                          pre_hook=_BLOCK_HOOKS[name] if desc else None)
            for c in table[size]
        ]
        _TUNERS[name, size, desc] = triton.autotune(configs=configs, key=_TUNING_KEY)(kernel)
    return _TUNERS[name, size, desc]


def chosen_configs() -> list[str]:
    """What the autotuners chose so far, one line per kernel, head-dim class and tuning key."""
    return [f"{name}{' (descriptors)' if desc else ''} (head dims <= {size}) key={key}: "
            f"{config}"
            for (name, size, desc), tuner in _TUNERS.items()
            for key, config in getattr(tuner, "cache", {}).items()]


def _launch(name: str, grid: Callable[[int, int], tuple[int, int]], args: tuple,
            meta: dict[str, Any], config: BlockConfig | None) -> None:
    """Run kernel ``name``: with ``config`` if given, fixed under the interpreter, else tuned.

    ``grid(block_m, block_n)`` gives the launch grid for the chosen blocks.
    """
    if config is None and interpreting():
        config = _INTERPRETER_CONFIG
    elif config is None and meta["PRECISION"] == "tf32x3":
        config = FP32_CONFIG
    desc = bool(meta.get(_DESC_FLAGS[name]))
    if config is not None:
        kernel = _KERNELS[name][0]
        if desc:
            _BLOCK_HOOKS[name]({**dict(zip(kernel.arg_names, args, strict=False)), **meta,
                                "BLOCK_M": config.block_m, "BLOCK_N": config.block_n})
        kernel[grid(config.block_m, config.block_n)](
            *args, **meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return
    tuned = _autotuned(name, _size_class(meta["D"], meta["DV"]), desc)
    tuned[lambda m: grid(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)


def _check_args(q: Tensor, k: Tensor, v: Tensor) -> None:
    owner = "flash_attention"
    B, T, H, D, S, Hkv, Dv = check_qkv(owner, q, k, v)
    if S < T:
        raise ValueError(f"{owner}: causal attention needs S >= T (the queries are the last T "
                         f"positions); got S={S}, T={T}")
    check_runnable(owner, {"q": q, "k": k, "v": v})


def _check_offsets(*tensors: Tensor) -> None:
    # The kernels index within one batch element in int32.
    for x in tensors:
        if sum((n - 1) * s for n, s in zip(x.shape[1:], x.stride()[1:], strict=True)) > _INT32_MAX:
            raise ValueError(f"flash_attention: a batch element of shape {tuple(x.shape)} spans "
                             "more than 2**31 elements, which the kernels cannot index")


def _meta(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    H, D = q.shape[2:]
    Hkv, Dv = v.shape[2:]
    group = H // Hkv
    return {
        "D": D, "DV": Dv, "BLOCK_D": max(16, next_power_of_2(D)),
        "BLOCK_DV": max(16, next_power_of_2(Dv)), "GROUP": group,
        "PRECISION": "tf32x3" if q.dtype == torch.float32 else "tf32",
    }


def _buckets(T: int, S: int, group: int) -> tuple[int, int]:
    return next_power_of_2(T * group), next_power_of_2(S)


def _descriptors(x: Tensor, y: Tensor, meta: dict[str, Any]) -> tuple[Any, Any] | None:
    """Tensor descriptors over two ``[B, L, heads, dim]`` tensors (K and V, or q and dO; block
    shapes set at launch), or None where TMA cannot take them: float32 (the tf32x3 path), a GPU
    before Hopper, a base not 16-byte aligned or a stride that is not a multiple of 16
    bytes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if meta["PRECISION"] == "tf32x3":
        return None
    if not interpreting() and torch.cuda.get_device_capability(x.device) < (9, 0):
        return None
    for t in (x, y):
        if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()),
                                  [1, 1, 1, max(16, next_power_of_2(t.shape[-1]))])
                 for t in (x, y))  # placeholder blocks, set at launch


def _qo_descriptors(q: Tensor, do: Tensor, meta: dict[str, Any],
                    config: BlockConfig | None) -> tuple[Any, Any] | None:
    """:func:`_descriptors` over q and dO (the dK/dV kernel's loop tiles), or None also where a
    row block of any configuration it may run would not hold whole position groups (``GROUP``
    not a power of two, or above the smallest ``BLOCK_M``)."""
    group = meta["GROUP"]
    if config is not None:
        smallest = config.block_m
    elif interpreting():
        smallest = _INTERPRETER_CONFIG.block_m
    else:
        smallest = min(c.block_m for c in DKDV_CONFIGS[_size_class(meta["D"], meta["DV"])])
    if group & (group - 1) or smallest % group:
        return None
    return _descriptors(q, do, meta)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float,
                      config: BlockConfig | None = None,
                      desc: bool | Iterable[str] | None = None) -> tuple[Tensor, Tensor]:
    """The forward kernel: ``o[B,T,H,Dv]`` and ``lse[B·Hkv, T·H/Hkv]`` (float32, base 2).

    ``q``, ``k``, ``v`` must already be checked and have a unit last stride; ``config`` forces
    one block configuration (for tests) instead of autotuning; the kernel loads K and V
    through tensor descriptors where :func:`_descriptors` allows when ``"fwd"`` is among
    :func:`descriptor_kernels` of ``desc``.
    """
    B, T, H, _ = q.shape
    S, Hkv, Dv = v.shape[1], v.shape[2], v.shape[3]
    meta = _meta(q, k, v)
    rows = T * meta["GROUP"]
    o = torch.empty((B, T, H, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * Hkv, rows), dtype=torch.float32, device=q.device)
    descriptors = _descriptors(k, v, meta) if "fwd" in descriptor_kernels(desc) else None
    if descriptors is not None:
        meta["KV_DESC"] = True
    kv = descriptors or (k, v)
    args = (q, *kv, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            T, S, Hkv, softmax_scale * _LOG2_E, *_buckets(T, S, meta["GROUP"]))
    _launch("fwd", lambda bm, bn: (triton.cdiv(rows, bm), B * Hkv), args, meta, config)
    return o, lse


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       softmax_scale: float, dkdv_config: BlockConfig | None = None,
                       dq_config: BlockConfig | None = None,
                       desc: bool | Iterable[str] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The backward kernels: ``dq``, ``dk``, ``dv`` shaped and typed like ``q``, ``k``, ``v``.

    ``do`` must have a unit last stride; the configs force block configurations (for tests);
    the kernels among :func:`descriptor_kernels` of ``desc`` (``"dkdv"``, ``"dq"``) load their
    loop tiles through tensor descriptors where TMA takes them.
    """
    B, T, H, _ = q.shape
    S, Hkv = v.shape[1], v.shape[2]
    meta = _meta(q, k, v)
    group = meta["GROUP"]
    rows = T * group
    delta = torch.empty_like(lse)  # (B·Hkv, rows)
    block = 64 if not interpreting() else 32
    kernels.attention_bwd_delta_kernel[(triton.cdiv(rows, block), B * Hkv)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], T, Hkv,
        DV=meta["DV"], BLOCK_DV=meta["BLOCK_DV"], GROUP=group, BLOCK_M=block,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    qk_scale = softmax_scale * _LOG2_E
    buckets = _buckets(T, S, group)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    use_desc = descriptor_kernels(desc)
    qo = _qo_descriptors(q, do, meta, dkdv_config) if "dkdv" in use_desc else None
    kv = _descriptors(k, v, meta) if "dq" in use_desc else None
    _launch("dkdv", lambda bm, bn: (triton.cdiv(S, bn), B * Hkv),
            (qo[0] if qo else q, k, v, qo[1] if qo else do, lse, delta, dk, dv, *common,
             *dk.stride()[:3], *dv.stride()[:3], T, S, Hkv, qk_scale, softmax_scale, *buckets),
            {**meta, "QO_DESC": True} if qo else meta, dkdv_config)
    _launch("dq", lambda bm, bn: (triton.cdiv(rows, bm), B * Hkv),
            (q, *(kv or (k, v)), do, lse, delta, dq, *common, *dq.stride()[:3],
             T, S, Hkv, qk_scale, softmax_scale, *buckets),
            {**meta, "KV_DESC": True} if kv else meta, dq_config)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the log-sum-exp for the backward kernels.
    ``desc`` goes to both launchers (``None``: :data:`TENSOR_DESCRIPTORS`), so a caller can
    pick the kernels on descriptors for one call, backward included."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, softmax_scale: float,
                desc: bool | Iterable[str] | None = None) -> Tensor:
        o, lse = attention_forward(q, k, v, softmax_scale, desc=desc)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.softmax_scale, ctx.desc = softmax_scale, desc
        return o

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(unit_last_stride(do), q, k, v, o, lse, ctx.softmax_scale,
                                        desc=ctx.desc)
        return dq, dk, dv, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *,
                    softmax_scale: float | None = None) -> Tensor:
    """Causal softmax attention with grouped-query heads, through Triton kernels.

    Args:
        q: queries ``[B, T, H, D]``.
        k: keys ``[B, S, Hkv, D]`` with ``S >= T`` and ``H % Hkv == 0``.
        v: values ``[B, S, Hkv, Dv]``; ``D, Dv <= 256``.
        softmax_scale: multiplies ``q·k``; default ``D ** -0.5``.

    Returns:
        ``o[B, T, H, Dv]`` in q's dtype. Query ``t`` sees key ``s`` when ``s <= t + S − T``;
        query head ``h`` uses key/value head ``h // (H // Hkv)``. Differentiable in q, k, v.

    Raises:
        ValueError: shapes, dtypes or devices the kernels do not take (named in the message).
    """
    _check_args(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    elif not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
              and softmax_scale > 0):
        raise ValueError(f"flash_attention: softmax_scale={softmax_scale!r} is not accepted: "
                         "expected a finite number > 0 or None")
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    _check_offsets(q, k, v)
    if q.numel() == 0 or v.numel() == 0:
        B, T, H, _ = q.shape
        return q.new_zeros((B, T, H, v.shape[-1])) + 0 * (q.sum() + k.sum() + v.sum())
    return FlashAttentionFunction.apply(q, k, v, float(softmax_scale), None)
