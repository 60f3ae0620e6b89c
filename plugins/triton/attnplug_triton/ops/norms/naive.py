"""RMSNorm / LayerNorm with an optional SiLU gate in plain PyTorch: the kernels' test reference
(pass float64 inputs for an exact reference)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["naive_norm"]


def naive_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               gate: Tensor | None = None, *, eps: float, rms: bool) -> Tensor:
    """``norm(x)·weight (+ bias) (· SiLU(gate))`` over the last dim, in ``x``'s dtype.

    ``rms=True``: ``x / sqrt(mean(x²) + eps)``; else ``(x − mean) / sqrt(var + eps)``.
    Returns a tensor shaped like ``x``; differentiable.
    """
    centred = x if rms else x - x.mean(-1, keepdim=True)
    y = centred * (centred.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * weight
    if bias is not None:
        y = y + bias
    return y if gate is None else y * F.silu(gate)
