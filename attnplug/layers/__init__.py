"""The layers of attnplug (plain PyTorch) and the records of their submodules.

Importing this package does not import torch: ``attnplug.layers.submodules`` is plain data, and
the torch classes below load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GPTModel",
    "TransformerBlock",
    "TransformerLayer",
    "SelfAttention",
    "DotProductAttention",
    "GatedDeltaNet",
    "GDNCache",
    "DSASelfAttention",
    "DSAttention",
    "DSAIndexer",
    "MLP",
    "MoELayer",
    "SequentialExperts",
    "Linear",
    "LayerNormLinear",
    "LayerNorm",
    "RMSNorm",
    "GatedRMSNorm",
    "IdentityOp",
    "AuxLossMixin",
]

_LAZY = {
    "GPTModel": "model",
    "TransformerBlock": "transformer",
    "TransformerLayer": "transformer",
    "SelfAttention": "attention",
    "DotProductAttention": "attention",
    "GatedDeltaNet": "gated_delta_net",
    "GDNCache": "gated_delta_net",
    "DSASelfAttention": "dsa",
    "DSAttention": "dsa",
    "DSAIndexer": "dsa",
    "MLP": "mlp",
    "MoELayer": "moe",
    "SequentialExperts": "moe",
    "Linear": "linear",
    "LayerNormLinear": "linear",
    "LayerNorm": "norms",
    "RMSNorm": "norms",
    "GatedRMSNorm": "norms",
    "IdentityOp": "identity",
    "AuxLossMixin": "aux_loss",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
