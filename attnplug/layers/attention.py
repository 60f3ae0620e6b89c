"""Softmax self-attention with grouped-query heads, RoPE, optional q/k norms and output gate.

Layout of the fused QKV projection (``linear_qkv``), per query group ``g`` of ``G``, with
``R = num_attention_heads / G`` query heads per group and head dim ``D``::

    [ q: R·D | gate: R·D (only with attention_output_gate) | k: D | v: D ]

so the projection's output is ``G·(R·(1 + gated) + 2)·D`` wide (Megatron-Core's grouped layout;
the gate is Qwen3-Next's per-(head, dim) output gate: ``o = attention · sigmoid(gate)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from attnplug.layers._checks import check_config, check_layer_args, check_positive_int
from attnplug.layers.linear import output_layer_init_method
from attnplug.layers.rope import apply_rope
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import SelfAttentionSubmodules

__all__ = ["DotProductAttention", "SelfAttention", "check_hidden"]


def check_hidden(owner: str, hidden: torch.Tensor, hidden_size: int) -> None:
    """Raise ``ValueError`` unless ``hidden`` is ``[B, T, hidden_size]`` with ``T >= 1``."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"{owner}: hidden_states must be [batch, seq, hidden_size={hidden_size}]; got {shape}"
        )
    if hidden.shape[1] == 0:
        raise ValueError(f"{owner}: hidden_states has no tokens (seq = 0)")


class DotProductAttention(nn.Module):
    """The local ``core_attention``: causal softmax attention (``attnplug.ops.causal_attention``).

    ``forward(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv]) -> o[B,T,H,Dv]``; ``softmax_scale``
    defaults to ``D ** -0.5``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        check_config(type(self).__name__, config)
        self.layer_number = check_positive_int(type(self).__name__, "layer_number", layer_number)
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                              and softmax_scale > 0):
            raise ValueError(
                f"DotProductAttention: softmax_scale={softmax_scale!r} is not accepted: "
                "expected a number > 0 or None"
            )
        self.softmax_scale = softmax_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from attnplug.ops import causal_attention

        return causal_attention(q, k, v, softmax_scale=self.softmax_scale)  # (B, T, H, Dv)


class SelfAttention(nn.Module):
    """Grouped-query softmax self-attention; ``forward(hidden[B,T,h]) -> [B,T,h]``.

    Slots: ``linear_qkv`` (built ``(hidden, qkv_size, config=, bias=config.add_bias_linear)``;
    may be a norm-fused linear), ``core_attention`` (built
    ``(config, layer_number=, softmax_scale=None)``), ``linear_proj`` (row-parallel, init
    std / sqrt(2·num_layers)), ``q_layernorm`` /
    ``k_layernorm`` (built with ``hidden_size=head_dim``, applied per head; ``None``: none).
    RoPE rotates the first ``rotary_percent`` of each head's channels after the q/k norms.
    """

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(owner, config, layer_number, submodules,
                                             ("linear_qkv", "core_attention", "linear_proj"))
        self.config = config
        self.num_heads = config.num_attention_heads  # H
        self.num_groups = config.query_groups  # G
        self.head_dim = config.head_dim  # D
        self.gated = config.attention_output_gate
        self.rot_dim = (
            int(self.head_dim * config.rotary_percent)
            if config.position_embedding_type == "rope" else 0
        )
        heads_per_group = self.num_heads // self.num_groups
        qkv_size = self.num_groups * (heads_per_group * (1 + self.gated) + 2) * self.head_dim
        hidden = config.hidden_size
        self.linear_qkv = build_module(submodules.linear_qkv, hidden, qkv_size, config=config,
                                       bias=config.add_bias_linear)
        self.q_layernorm = self._build_qk_norm(submodules.q_layernorm)
        self.k_layernorm = self._build_qk_norm(submodules.k_layernorm)
        self.core_attention = build_module(submodules.core_attention, config,
                                           layer_number=layer_number, softmax_scale=None)
        self.linear_proj = build_module(
            submodules.linear_proj, self.num_heads * self.head_dim, hidden, config=config,
            bias=config.add_bias_linear, init_method=output_layer_init_method(config),
        )

    def _build_qk_norm(self, spec: object) -> nn.Module | None:
        if spec is None:
            return None
        return build_module(spec, config=self.config, hidden_size=self.head_dim)

    def project_qkv(
        self, hidden: torch.Tensor, position_offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q (B,T,H,D), k and v (B,T,G,D) with norms and RoPE applied, and the gate or None."""
        B, T, _ = hidden.shape
        G, D = self.num_groups, self.head_dim
        R = self.num_heads // G
        mixed = self.linear_qkv(hidden).view(B, T, G, -1)  # (B, T, G, (R·(1+gated)+2)·D)
        sizes = [R * D] + [R * D] * self.gated + [D, D]
        parts = torch.split(mixed, sizes, dim=-1)
        q = parts[0].reshape(B, T, G * R, D)  # (B, T, H, D)
        gate = parts[1].reshape(B, T, G * R, D) if self.gated else None  # (B, T, H, D)
        k, v = parts[-2], parts[-1]  # (B, T, G, D) each
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
        if self.k_layernorm is not None:
            k = self.k_layernorm(k)
        base = self.config.rotary_base
        q = apply_rope(q, self.rot_dim, base=base, position_offset=position_offset)
        k = apply_rope(k, self.rot_dim, base=base, position_offset=position_offset)
        return q, k, v, gate

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               hidden: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        """The core attention: (B,T,H,D) from q (B,T,H,D), k, v (B,T,G,D)."""
        return self.core_attention(q, k, v)

    def forward(self, hidden_states: torch.Tensor, *, position_offset: int = 0) -> torch.Tensor:
        """``hidden_states[B, T, hidden]`` (positions ``position_offset + t``) -> ``[B, T, h]``."""
        check_hidden(type(self).__name__, hidden_states, self.config.hidden_size)
        B, T, _ = hidden_states.shape
        q, k, v, gate = self.project_qkv(hidden_states, position_offset)
        o = self.attend(q, k, v, hidden_states, position_offset)  # (B, T, H, D)
        if gate is not None:
            dtype = torch.promote_types(o.dtype, torch.float32)
            o = (o.to(dtype) * torch.sigmoid(gate.to(dtype))).to(o.dtype)
        return self.linear_proj(o.reshape(B, T, self.num_heads * self.head_dim))
