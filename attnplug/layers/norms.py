"""Normalisations in plain PyTorch, computed in float32 (or float64) and cast back.

Every class is built as ``cls(*, config, hidden_size, eps=None)`` (the ``layer_norm`` slot's
contract) and normalises the last dimension; ``eps=None`` means ``config.layernorm_epsilon``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.layers._checks import check_config, check_positive_int

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["LayerNorm", "RMSNorm", "GatedRMSNorm", "build_norm", "gated_norm", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and gates compute in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check_eps(owner: str, eps: float | None, config: TransformerConfig) -> float:
    if eps is None:
        return config.layernorm_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps={eps!r} is not accepted: expected a number > 0 or None")
    return float(eps)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) · weight`` over the last dimension."""

    def __init__(self, *, config: TransformerConfig, hidden_size: int,
                 eps: float | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.hidden_size = check_positive_int(owner, "hidden_size", hidden_size)
        self.eps = _check_eps(owner, eps, config)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.torch_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))  # (..., hidden)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """``y = (x − mean) / sqrt(var + eps) · weight + bias`` over the last dimension."""

    def __init__(self, *, config: TransformerConfig, hidden_size: int,
                 eps: float | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.hidden_size = check_positive_int(owner, "hidden_size", hidden_size)
        self.eps = _check_eps(owner, eps, config)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.torch_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.torch_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))  # (..., hidden)
        centred = xf - xf.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype) + self.bias.to(xf.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


def gated_norm(norm: nn.Module, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``norm(x) · SiLU(gate)`` in float32 (float64 for float64 inputs), cast back to ``x``'s dtype.

    This is Qwen3-Next's ``RMSNormGated`` when ``norm`` is an RMSNorm; ``norm`` may be any module
    that normalises the last dimension (a backend's ``layer_norm`` slot).
    """
    dtype = compute_dtype(x.dtype)
    y = norm(x.to(dtype)).to(dtype) * F.silu(gate.to(dtype))
    return y.to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm with an optional SiLU output gate: ``forward(x, gate) = RMSNorm(x)·SiLU(gate)``."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return super().forward(x)
        return gated_norm(super().forward, x, gate)


def build_norm(config: TransformerConfig, hidden_size: int, eps: float | None = None) -> nn.Module:
    """The norm ``config.normalization`` names (``"RMSNorm"`` or ``"LayerNorm"``)."""
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return cls(config=config, hidden_size=hidden_size, eps=eps)
