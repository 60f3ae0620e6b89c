"""The kitchen backend of attnplug (distribution ``attnplug-kitchen``).

``KitchenSpecProvider`` serves recipe-driven linears and experts (and, with
``use_kitchen_attention``, core attention) itself and delegates every other slot to a fallback
backend. Importing this package is cheap; ``KitchenSpecProvider`` loads on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnplug_kitchen.provider import KitchenSpecProvider

__all__ = ["KitchenSpecProvider"]


def __getattr__(name: str) -> Any:
    if name == "KitchenSpecProvider":
        from attnplug_kitchen.provider import KitchenSpecProvider

        return KitchenSpecProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
