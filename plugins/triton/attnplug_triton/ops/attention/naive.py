"""Causal attention written out densely in plain PyTorch: the reference the kernels are tested
against (pass float64 inputs for an exact reference)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_attention"]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *,
                    softmax_scale: float | None = None) -> Tensor:
    """Causal softmax attention with grouped-query heads, in the inputs' dtype.

    Args:
        q: queries ``[B, T, H, D]``; k: keys ``[B, S, Hkv, D]``; v: values ``[B, S, Hkv, Dv]``,
            with ``S >= T`` and ``H % Hkv == 0``.
        softmax_scale: multiplies ``q·k``; default ``D ** -0.5``.

    Returns:
        ``o[B, T, H, Dv]``: query ``t`` sees key ``s`` when ``s <= t + S − T``; query head ``h``
        uses key/value head ``h // (H // Hkv)``. Memory ``O(B·H·T·S)``; differentiable.
    """
    T, H, D = q.shape[1:]
    S, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    kh = k.repeat_interleave(H // Hkv, dim=2)  # (B, S, H, D)
    vh = v.repeat_interleave(H // Hkv, dim=2)  # (B, S, H, Dv)
    scores = torch.einsum("bthd,bshd->bhts", q, kh) * scale  # (B, H, T, S)
    t = torch.arange(T, device=q.device)[:, None]  # (T, 1)
    s = torch.arange(S, device=q.device)[None, :]  # (1, S)
    scores = scores.masked_fill(s > t + (S - T), float("-inf"))
    p = scores.softmax(dim=-1)  # (B, H, T, S)
    return torch.einsum("bhts,bshe->bthe", p, vh)  # (B, T, H, Dv)
