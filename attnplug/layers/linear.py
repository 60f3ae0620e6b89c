"""Linear layers in plain PyTorch (the local backend's ``linear`` slots).

Built as ``cls(input_size, output_size, *, config, bias=False, init_method=None)``: parameters in
``config.torch_dtype``; the weight is ``normal(0, config.init_method_std)`` unless ``init_method``
(a function filling a tensor in place) is given; the bias starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.layers._checks import check_config, check_positive_int
from attnplug.layers.norms import build_norm

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["Linear", "LayerNormLinear", "init_normal", "output_layer_init_method"]

InitMethod = Callable[[torch.Tensor], object]


def init_normal(std: float) -> InitMethod:
    """An init method that fills a tensor with ``normal(0, std)``."""

    def init(tensor: torch.Tensor) -> None:
        with torch.no_grad():
            nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def output_layer_init_method(config: TransformerConfig) -> InitMethod:
    """Megatron's init for projections that feed the residual: std / sqrt(residual branches),
    that is std / sqrt(2·num_layers), or std / sqrt(num_layers) for a hybrid layer pattern,
    whose layers are sublayers (see ``TransformerConfig.residual_branches``)."""
    return init_normal(config.init_method_std / math.sqrt(config.residual_branches))


class Linear(nn.Module):
    """``y = x Wᵀ (+ b)``; weight ``[output_size, input_size]``."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method: InitMethod | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.input_size = check_positive_int(owner, "input_size", input_size)
        self.output_size = check_positive_int(owner, "output_size", output_size)
        if not isinstance(bias, bool):
            raise ValueError(f"{owner}: bias={bias!r} is not accepted: expected true or false")
        if init_method is not None and not callable(init_method):
            raise ValueError(
                f"{owner}: init_method={init_method!r} is not accepted: expected None or a "
                "function that fills a tensor in place"
            )
        dtype = config.torch_dtype
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
        (init_method or init_normal(config.init_method_std))(self.weight)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., output_size)

    def extra_repr(self) -> str:
        return f"{self.input_size} -> {self.output_size}, bias={self.bias is not None}"


class LayerNormLinear(Linear):
    """A norm (``config.normalization``, ``config.layernorm_epsilon``) then a linear.

    The local backend does not fuse norms into linears; this is for third parties and tests
    that want the fused slot's behaviour in plain PyTorch.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method: InitMethod | None = None) -> None:
        super().__init__(input_size, output_size, config=config, bias=bias,
                         init_method=init_method)
        self.layer_norm = build_norm(config, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.layer_norm(x))
