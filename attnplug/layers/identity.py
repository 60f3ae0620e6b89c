"""``IdentityOp``: the placeholder a spec uses for a part that does nothing (a fused-away norm)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["IdentityOp"]


class IdentityOp(nn.Module):
    """Accepts and ignores any constructor arguments; ``forward`` returns its first input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x
