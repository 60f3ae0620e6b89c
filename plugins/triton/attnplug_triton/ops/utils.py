"""Helpers shared by the kernel modules: interpreter detection, block sizes, input checks."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["MAX_HEAD_DIM", "check_qkv", "SUPPORTED_DTYPES", "interpreting", "next_power_of_2",
           "check_runnable", "sm_count", "unit_last_stride"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the flash attention kernels' largest head dim (D and Dv)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride in its last dim, as the kernels index it densely (a copy only
    when it has none; a last dim of size 1 needs none)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def check_qkv(owner: str, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    """Check ``q[B,T,H,D]``, ``k[B,S,Hkv,D]``, ``v[B,S,Hkv,Dv]`` of an attention kernel: 4-D,
    matching sizes, ``H`` a multiple of ``Hkv``, one dtype, head dims up to ``MAX_HEAD_DIM``.

    Returns ``(B, T, H, D, S, Hkv, Dv)``; raises ``ValueError`` naming ``owner`` and the argument.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{owner}: {name} must be a 4-D tensor (batch, seq, heads, dim); "
                             f"got {shape}")
    B, T, H, D = q.shape
    _, S, Hkv, Dv = v.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{owner}: k must be [B={B}, S, Hkv, D={D}] to match q "
                         f"{tuple(q.shape)}; got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{owner}: v must be [B, S, Hkv, Dv] with B, S, Hkv as in k "
                         f"{tuple(k.shape)}; got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{owner}: the query heads H={H} must be a multiple of the key/value "
                         f"heads Hkv={Hkv}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{owner}: q, k and v must share one dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"{owner}: head dims up to {MAX_HEAD_DIM} are supported; got D={D}, "
                         f"Dv={Dv}")
    return B, T, H, D, S, Hkv, Dv


def check_runnable(owner: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every tensor can go through a Triton kernel here.

    A tensor must be float16, bfloat16 or float32 and live on a CUDA device; under the
    interpreter (``TRITON_INTERPRET=1``) it lives on the CPU and must not be bfloat16, which the
    interpreter mis-reads.
    """
    interpret = interpreting()
    for name, x in tensors.items():
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{owner}: {name} is {x.dtype}; the triton backend's kernels take float16, "
                "bfloat16 or float32 (the 'local' backend computes float64)"
            )
        if interpret and x.dtype == torch.bfloat16:
            raise ValueError(
                f"{owner}: {name} is bfloat16, which Triton's interpreter (TRITON_INTERPRET=1) "
                "mis-reads; use float16 or float32 on the CPU"
            )
        if not interpret and not x.is_cuda:
            raise ValueError(
                f"{owner}: {name} is on {x.device}; the triton backend's kernels run on CUDA "
                "tensors (or on the CPU under TRITON_INTERPRET=1, slowly)"
            )


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (4 under the interpreter)."""
    if interpreting():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count
