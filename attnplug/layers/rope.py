"""Rotary position embedding (RoPE), non-interleaved ("rotate half", NeoX/Megatron style).

The first ``rot_dim`` channels of each head are rotated: channel ``i`` pairs with channel
``i + rot_dim/2`` at frequency ``base^(−2i/rot_dim)``; the remaining channels pass through.
"""

from __future__ import annotations

import torch

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, base: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``(T, rot_dim // 2)`` for integer ``positions`` ``(T,)``."""
    half = rot_dim // 2
    exponent = torch.arange(half, dtype=dtype, device=positions.device) * (2.0 / rot_dim)
    inv_freq = base ** (-exponent)  # (rot_dim/2,)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]  # (T, rot_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rot_dim: int, *, base: float,
               position_offset: int = 0) -> torch.Tensor:
    """Rotate the first ``rot_dim`` channels of ``x`` (B, T, H, D) by positions ``offset + t``.

    Computed in float32 (float64 for float64 inputs) and cast back. ``rot_dim == 0`` returns
    ``x`` unchanged.
    """
    if rot_dim == 0:
        return x
    if rot_dim % 2 or rot_dim > x.shape[-1]:
        raise ValueError(f"apply_rope: rot_dim={rot_dim} must be even and at most {x.shape[-1]}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    T = x.shape[1]
    positions = torch.arange(position_offset, position_offset + T, device=x.device)
    cos, sin = rope_cos_sin(positions, rot_dim, base, dtype)  # (T, rot_dim/2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, rot_dim/2)
    rot, rest = x[..., :rot_dim].to(dtype), x[..., rot_dim:]
    x1, x2 = rot.chunk(2, dim=-1)  # (B, T, H, rot_dim/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    # every channel rotated (the usual case): no second concatenation, i.e. no extra copy
    return rotated if rest.shape[-1] == 0 else torch.cat((rotated, rest), dim=-1)
