"""Gated DeltaNet (GDN): linear attention with a gated delta-rule state, Megatron-Core's layout.

Per token: ``in_proj`` (hidden → ``[q | k | v | z | β | α]`` of sizes ``Hk·Dk, Hk·Dk, Hv·Dv,
Hv·Dv, Hv, Hv``), a depthwise causal conv1d (kernel ``linear_conv_kernel_dim``, no bias) and
SiLU on ``q, k, v``, the gates ``g = −exp(A_log)·softplus(α + dt_bias)`` (log decay) and
``β = sigmoid(β)`` in float32, the ``gated_delta_rule`` kernel (q and k L2-normalised inside
it, each key head serving ``Hv/Hk`` consecutive value heads), a per-head ``out_norm`` times
``SiLU(z)``, and ``out_proj``.

Decoding: pass a :class:`GDNCache` to ``forward``; it carries the last ``K−1`` conv inputs and
the recurrent state, so feeding a sequence in pieces gives the full forward's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.layers._checks import check_layer_args
from attnplug.layers.attention import check_hidden
from attnplug.layers.linear import output_layer_init_method
from attnplug.layers.norms import compute_dtype, gated_norm
from attnplug.ops.causal_conv1d import causal_conv1d, padded_input
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import GatedDeltaNetSubmodules

__all__ = ["GatedDeltaNet", "GDNCache"]


@dataclass
class GDNCache:
    """The decoding state of one GatedDeltaNet layer (empty until its first forward).

    ``conv_state``: the last ``K − 1`` conv inputs ``[B, K−1, conv_dim]`` (zeros before the
    first token); ``recurrent_state``: ``[B, Hv, Dk, Dv]`` in float32 (float64); ``seen``: tokens
    consumed so far. The tensors keep their autograd history: decode under ``torch.no_grad()``.
    """

    conv_state: torch.Tensor | None = None
    recurrent_state: torch.Tensor | None = None
    seen: int = 0


class GatedDeltaNet(nn.Module):
    """A Gated DeltaNet token mixer; ``forward(hidden[B,T,h], *, cache=None) -> [B,T,h]``.

    Slots: ``in_proj`` (``(hidden, 2·Hk·Dk + 2·Hv·Dv + 2·Hv, config=, bias=False)``; may be a
    norm-fused linear), ``out_norm`` (``(config=, hidden_size=Dv)``, applied per head),
    ``out_proj`` (``(Hv·Dv, hidden, config=, bias=False, init_method=)``), ``gated_delta_rule``
    (a kernel, DESIGN §8) and ``causal_conv1d`` (a kernel; ``attnplug.ops.causal_conv1d`` when
    unset). ``A_log`` and ``dt_bias`` (``[Hv]``) are kept in float32 (float64 for
    float64 params): ``A_log = log U(1, 16)``, ``dt_bias = 1``.
    """

    def __init__(self, config: TransformerConfig, submodules: GatedDeltaNetSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(
            owner, config, layer_number, submodules,
            ("in_proj", "out_norm", "out_proj", "gated_delta_rule"),
        )
        self.config = config
        self.num_key_heads = config.linear_num_key_heads  # Hk
        self.num_value_heads = config.linear_num_value_heads  # Hv
        self.key_head_dim = config.linear_key_head_dim  # Dk
        self.value_head_dim = config.linear_value_head_dim  # Dv
        self.kernel_size = config.linear_conv_kernel_dim  # K
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(
                f"{owner}: linear_num_value_heads={self.num_value_heads} must be a multiple of "
                f"linear_num_key_heads={self.num_key_heads}"
            )
        self.qk_dim = self.num_key_heads * self.key_head_dim
        self.v_dim = self.num_value_heads * self.value_head_dim
        self.conv_dim = 2 * self.qk_dim + self.v_dim
        hidden, dtype = config.hidden_size, config.torch_dtype
        in_size = 2 * self.qk_dim + 2 * self.v_dim + 2 * self.num_value_heads
        self.in_proj = build_module(submodules.in_proj, hidden, in_size, config=config, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size,
                                groups=self.conv_dim, bias=False, dtype=dtype)
        gate_dtype = compute_dtype(dtype)
        self.A_log = nn.Parameter(
            torch.empty(self.num_value_heads, dtype=gate_dtype).uniform_(1.0, 16.0).log()
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads, dtype=gate_dtype))
        self.gated_delta_rule = build_module(submodules.gated_delta_rule)
        self.causal_conv1d = (causal_conv1d if submodules.causal_conv1d is None
                              else build_module(submodules.causal_conv1d))
        self.out_norm = build_module(submodules.out_norm, config=config,
                                     hidden_size=self.value_head_dim)
        self.out_proj = build_module(submodules.out_proj, self.v_dim, hidden, config=config,
                                     bias=False, init_method=output_layer_init_method(config))

    # -- pieces of the forward ----------------------------------------------------------------
    def _causal_conv(self, x: torch.Tensor, cache: GDNCache | None) -> torch.Tensor:
        """Depthwise causal conv + SiLU over time: x (B, T, C) -> (B, T, C); updates the cache."""
        history = None
        if cache is not None and cache.conv_state is not None:
            history = cache.conv_state.to(x.dtype)  # (B, K-1, C)
        y = self.causal_conv1d(x, self.conv1d.weight[:, 0], initial_state=history,
                               activation="silu")
        if cache is not None:
            pad = self.kernel_size - 1
            # the last K−1 inputs, from the history too when x is shorter than that
            tail = padded_input(x[:, max(x.shape[1] - pad, 0):], history, self.kernel_size)
            cache.conv_state = tail[:, tail.shape[1] - pad:]  # (B, K-1, C)
        return y

    def _gates(self, beta_raw: torch.Tensor,
               alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g and write strength β, both (B, T, Hv) in float32 (float64)."""
        dtype = compute_dtype(self.A_log.dtype)
        g = -self.A_log.to(dtype).exp() * F.softplus(alpha.to(dtype) + self.dt_bias.to(dtype))
        return g, torch.sigmoid(beta_raw.to(dtype))

    def forward(self, hidden_states: torch.Tensor, *,
                cache: GDNCache | None = None) -> torch.Tensor:
        """``hidden_states[B, T, hidden] -> [B, T, hidden]``; with ``cache``, continue from it."""
        check_hidden(type(self).__name__, hidden_states, self.config.hidden_size)
        B, T, _ = hidden_states.shape
        Hk, Hv = self.num_key_heads, self.num_value_heads
        Dk, Dv = self.key_head_dim, self.value_head_dim
        projected = self.in_proj(hidden_states)  # (B, T, 2·qk + 2·v + 2·Hv)
        qkv, z, beta_raw, alpha = torch.split(
            projected, [self.conv_dim, self.v_dim, Hv, Hv], dim=-1
        )
        qkv = self._causal_conv(qkv, cache)  # (B, T, 2·qk + v)
        q, k, v = torch.split(qkv, [self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        q = q.reshape(B, T, Hk, Dk)  # (B, T, Hk, Dk)
        k = k.reshape(B, T, Hk, Dk)  # (B, T, Hk, Dk)
        v = v.reshape(B, T, Hv, Dv)  # (B, T, Hv, Dv)
        g, beta = self._gates(beta_raw, alpha)  # (B, T, Hv) each
        initial = cache.recurrent_state if cache is not None else None
        o, final = self.gated_delta_rule(
            q, k, v, g, beta, initial_state=initial, output_final_state=cache is not None,
            use_qk_l2norm=True,
        )  # (B, T, Hv, Dv), (B, Hv, Dk, Dv) or None
        if cache is not None:
            cache.recurrent_state = final
            cache.seen += T
        z = z.reshape(B, T, Hv, Dv)
        if getattr(self.out_norm, "accepts_gate", False):  # the backend fuses norm(o)·SiLU(z)
            y = self.out_norm(o, gate=z)  # (B, T, Hv, Dv)
        else:
            y = gated_norm(self.out_norm, o, z)  # (B, T, Hv, Dv)
        return self.out_proj(y.reshape(B, T, self.v_dim))
