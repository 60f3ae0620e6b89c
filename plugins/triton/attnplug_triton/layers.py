"""The modules the ``triton`` backend's slots return, each a drop-in for its local counterpart.

They subclass the local layers (``attnplug.layers``), so construction, argument checks and
parameter names (``weight``, ``bias``) are the same and a state dict copies across; only
``forward`` runs a Triton kernel.
"""

from __future__ import annotations

import torch

from attnplug.layers.attention import DotProductAttention
from attnplug.layers.norms import LayerNorm as LocalLayerNorm
from attnplug.layers.norms import RMSNorm as LocalRMSNorm
from attnplug_triton.ops.attention.fused import flash_attention
from attnplug_triton.ops.norms.fused import fused_norm

__all__ = ["FlashAttention", "RMSNorm", "LayerNorm"]


class FlashAttention(DotProductAttention):
    """``core_attention``: causal flash attention in Triton (grouped-query, S >= T).

    Built as ``cls(config, layer_number=1, softmax_scale=None)``;
    ``forward(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv]) -> o[B,T,H,Dv]``.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention(q, k, v, softmax_scale=self.softmax_scale)  # (B, T, H, Dv)


class RMSNorm(LocalRMSNorm):
    """RMSNorm in Triton; ``forward(x, gate=None)``: with ``gate``, ``RMSNorm(x)·SiLU(gate)``
    fused in one kernel (the gated RMSNorm of Gated DeltaNet's output)."""

    accepts_gate = True

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return fused_norm(x, self.weight, None, gate, eps=self.eps, rms=True)  # (..., hidden)


class LayerNorm(LocalLayerNorm):
    """LayerNorm in Triton; ``forward(x, gate=None)``: with ``gate``, ``LayerNorm(x)·SiLU(gate)``
    fused in one kernel."""

    accepts_gate = True

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return fused_norm(x, self.weight, self.bias, gate, eps=self.eps, rms=False)
