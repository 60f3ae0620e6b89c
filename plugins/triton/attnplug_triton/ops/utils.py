"""Helpers shared by the kernel modules: interpreter detection, block sizes, input checks."""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "interpreting", "next_power_of_2",
           "check_runnable", "sm_count"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the flash attention kernels' largest head dim (D and Dv)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


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
