"""Registers the ``te`` backend (Transformer Engine modules on NVIDIA GPUs).

Named by the entry point ``te = "attnplug_te.plugin"`` of the distribution ``attnplug-te``.
Loading this module imports neither Transformer Engine nor torch: the provider
(``attnplug_te.provider:TESpecProvider``) is imported only when the backend is used, and
:func:`check` looks for TE without importing it.
"""

from __future__ import annotations

import importlib.util

from attnplug import Backend, hookimpl

__all__ = ["attnplug_backends", "check", "INSTALL_HINT"]

INSTALL_HINT = 'pip install "attnplug[te]"'
PRIORITY = 20


def _te_is_installed() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):  # a broken or half-imported package: report it missing
        return False


def _cuda_reasons() -> list[str]:
    import torch

    if torch.version.cuda is None:
        return [f"torch {torch.__version__} is a CPU-only build: Transformer Engine needs a CUDA "
                "build of torch and an NVIDIA GPU"]
    if not torch.cuda.is_available():
        return ["no CUDA device is visible (torch.cuda.is_available() is False): Transformer "
                "Engine runs only on NVIDIA GPUs"]
    return []


def check() -> list[str]:
    """The reasons the ``te`` backend cannot run here; an empty list when it can.

    Returns ``['transformer_engine is not installed: pip install "attnplug[te]"']`` when TE is
    missing (found with ``importlib.util.find_spec``: nothing is imported). Only once TE is found
    is torch imported to ask for a CUDA device, so listing backends on a machine without TE stays
    cheap. Whether TE's compiled PyTorch extension loads is known only on import: creating the
    provider does that and fails with the import error. Raises nothing.
    """
    if not _te_is_installed():
        return [f"transformer_engine is not installed: {INSTALL_HINT}"]
    return _cuda_reasons()


@hookimpl
def attnplug_backends() -> list[Backend]:
    """The ``te`` backend: priority 20, available when TE is installed and a GPU is visible."""
    return [
        Backend(
            "te",
            provider="attnplug_te.provider:TESpecProvider",
            priority=PRIORITY,
            description=(
                "Transformer Engine linears, fused norm+linear, norms, DotProductAttention and "
                "GroupedLinear experts; GDN/DSA kernels from the triton backend, else local"
            ),
            check=check,
        )
    ]
