"""The pre-norm transformer layer and the block of layers (one pipeline chunk)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnplug._errors import ConfigError
from attnplug.layers._checks import check_config, check_layer_args
from attnplug.layers.identity import IdentityOp
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import TransformerBlockSubmodules, TransformerLayerSubmodules

__all__ = ["TransformerLayer", "TransformerBlock"]


class TransformerLayer(nn.Module):
    """``x + attn(input_layernorm(x))``, then ``x + mlp(pre_mlp_layernorm(x))``.

    Builds the norms ``(config=, hidden_size=config.hidden_size)`` (``IdentityOp`` when fused
    into the next linear) and ``self_attention`` / ``mlp`` ``(config=, layer_number=)``.
    ``forward(hidden[B,T,h], **attention_kwargs) -> [B,T,h]``; the keyword arguments go to the
    token mixer (``position_offset`` for softmax attention, ``cache`` for Gated DeltaNet).

    A half whose ``self_attention`` or ``mlp`` is ``IdentityOp`` is skipped, residual and all
    (not added as ``x + x``): a hybrid pattern's mixer-only and MLP-only sublayers.
    ``has_self_attention`` / ``has_mlp`` say which halves run. Raises ``ConfigError`` when a
    skipped half keeps a real norm (its parameters would never be used) or both are skipped.
    """

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.layer_number = check_layer_args(owner, config, layer_number)
        self.config = config
        hidden = config.hidden_size
        self.input_layernorm = build_module(submodules.input_layernorm, config=config,
                                            hidden_size=hidden)
        self.self_attention = build_module(submodules.self_attention, config=config,
                                           layer_number=layer_number)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config,
                                              hidden_size=hidden)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number)
        self.has_self_attention = self._half_runs("input_layernorm", "self_attention")
        self.has_mlp = self._half_runs("pre_mlp_layernorm", "mlp")
        if not (self.has_self_attention or self.has_mlp):
            raise ConfigError(f"{owner}: self_attention and mlp are both IdentityOp: the layer "
                              "would do nothing; expected a mixer, an MLP or both")

    def _half_runs(self, norm: str, main: str) -> bool:
        """Whether the half ``main`` (with its norm ``norm``) runs; ``IdentityOp`` skips it."""
        if not isinstance(getattr(self, main), IdentityOp):
            return True
        if not isinstance(getattr(self, norm), IdentityOp):
            raise ConfigError(
                f"{type(self).__name__}: {norm}={type(getattr(self, norm)).__name__} is not "
                f"accepted with {main}=IdentityOp: a skipped half has no norm; expected IdentityOp"
            )
        return False

    def forward(self, hidden_states: torch.Tensor, **attention_kwargs: Any) -> torch.Tensor:
        x = hidden_states  # (B, T, h)
        if self.has_self_attention:
            x = x + self.self_attention(self.input_layernorm(x), **attention_kwargs)
        if self.has_mlp:
            x = x + self.mlp(self.pre_mlp_layernorm(x))
        return x


class TransformerBlock(nn.Module):
    """A stack of layers (``layer_number = layer_offset + i + 1``) and the final norm, if any.

    ``forward(hidden[B,T,h]) -> [B,T,h]``.
    """

    def __init__(self, config: TransformerConfig, submodules: TransformerBlockSubmodules,
                 layer_offset: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        if isinstance(layer_offset, bool) or not isinstance(layer_offset, int) or layer_offset < 0:
            raise ValueError(f"{owner}: layer_offset={layer_offset!r} is not accepted: expected "
                             "an integer >= 0")
        self.config = config
        self.layer_offset = layer_offset
        self.layers = nn.ModuleList(
            build_module(spec, config=config, layer_number=layer_offset + i + 1)
            for i, spec in enumerate(submodules.layer_specs)
        )
        norm = submodules.layer_norm
        self.final_layernorm = (
            None if norm is None
            else build_module(norm, config=config, hidden_size=config.hidden_size)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states  # (B, T, h)
        for layer in self.layers:
            x = layer(x)
        return x if self.final_layernorm is None else self.final_layernorm(x)
