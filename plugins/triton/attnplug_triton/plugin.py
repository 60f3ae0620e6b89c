"""Registers the ``triton`` backend: attnplug's own Triton kernels behind the local layers.

Loading this module imports neither Triton nor torch: :func:`check` looks Triton up with
``importlib.util.find_spec`` and imports torch only when it is called, and the provider is a lazy
``"module:Class"`` reference that attnplug imports when the backend is used.
"""

from __future__ import annotations

import importlib.util
import os

from attnplug import hookimpl
from attnplug.backends import Backend

__all__ = ["attnplug_backends", "check"]


def check() -> list[str]:
    """The reasons the ``triton`` backend cannot run here; empty when it can.

    It can when Triton is installed and either a CUDA device is visible or Triton's CPU
    interpreter is on (``TRITON_INTERPRET=1``, for tests).
    """
    if importlib.util.find_spec("triton") is None:
        return ['Triton is not installed: pip install "attnplug[triton]" (or pip install triton)']
    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels in "
                "Triton's CPU interpreter, slowly)"]
    return []


@hookimpl
def attnplug_backends() -> list[Backend]:
    """The ``triton`` backend (priority 10, above ``local``)."""
    return [
        Backend(
            "triton",
            provider="attnplug_triton.provider:TritonSpecProvider",
            priority=10,
            description="Triton kernels: causal flash attention, fused RMSNorm/LayerNorm (with "
            "an optional SiLU gate), the chunked gated delta rule; every other slot from local",
            check=check,
        )
    ]
