"""The dense MLP: ``fc2(act(fc1(x)))``, or ``fc2(act(gate) · up)`` with a gated linear unit.

With ``config.gated_linear_unit`` the first projection is ``2·ffn`` wide and split in halves
``[gate | up]`` (SwiGLU when the activation is SiLU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.layers._checks import check_config, check_positive_int
from attnplug.layers.linear import output_layer_init_method
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig
    from attnplug.layers.submodules import MLPSubmodules

__all__ = ["MLP", "activation_function", "glu"]


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)²`` (Primer)."""
    return F.relu(x).pow(2)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": squared_relu,
}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise function ``config.activation_func`` names; ``ValueError`` if unknown."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation_func={name!r} is not accepted: expected one of {sorted(_ACTIVATIONS)}"
        ) from None


def glu(x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``act(gate) · up`` for ``x = [gate | up]`` along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return act(gate) * up


class MLP(nn.Module):
    """``forward(x[..., hidden]) -> [..., hidden]``.

    Slots: ``linear_fc1`` (``(hidden, ffn or 2·ffn, config=, bias=config.add_bias_linear)``; may
    be norm-fused), ``linear_fc2`` (``(ffn, hidden, config=, bias=, init_method=)``, init std /
    sqrt(2·num_layers)), ``activation_func`` (a function, or ``None`` for the config's).
    ``ffn_hidden_size`` defaults to ``config.ffn_size``.
    """

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules,
                 layer_number: int = 1, ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.layer_number = check_positive_int(owner, "layer_number", layer_number)
        ffn = config.ffn_size if ffn_hidden_size is None else ffn_hidden_size
        self.ffn_hidden_size = check_positive_int(owner, "ffn_hidden_size", ffn)
        for field in ("linear_fc1", "linear_fc2"):
            if getattr(submodules, field, None) is None:
                raise ValueError(f"{owner}: submodules.{field} is None; a spec is required")
        self.gated = config.gated_linear_unit
        bias = config.add_bias_linear
        fc1_size = 2 * ffn if self.gated else ffn
        self.linear_fc1 = build_module(submodules.linear_fc1, config.hidden_size, fc1_size,
                                       config=config, bias=bias)
        self.linear_fc2 = build_module(submodules.linear_fc2, ffn, config.hidden_size,
                                       config=config, bias=bias,
                                       init_method=output_layer_init_method(config))
        act = getattr(submodules, "activation_func", None)
        self.activation_func = (
            build_module(act) if act is not None else activation_function(config.activation_func)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)  # (..., ffn or 2·ffn)
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)  # (..., ffn)
        return self.linear_fc2(h)  # (..., hidden)
