"""The entry-point module of attnplug-kitchen: registers the ``kitchen`` backend.

Cheap to import: the provider (and torch) load only when the backend is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnplug import Backend, hookimpl

if TYPE_CHECKING:
    from attnplug_kitchen.provider import KitchenSpecProvider

# Below ``local`` (0): backend="auto" never picks a recipe wrapper by itself; kitchen is chosen
# by backend = "kitchen" or use_kitchen = true.
KITCHEN_PRIORITY = -100


def make_provider() -> KitchenSpecProvider:
    """The registry's zero-argument factory: an unconfigured ``KitchenSpecProvider`` (its
    ``configure(config)`` reads the fallback, attention and recipe from the config)."""
    from attnplug_kitchen.provider import KitchenSpecProvider

    return KitchenSpecProvider.unconfigured()


def check() -> list[str]:
    """Kitchen is pure PyTorch: it can always run (its fallback is judged by ``supports``)."""
    return []


@hookimpl
def attnplug_backends() -> list[Backend]:
    """The ``kitchen`` backend."""
    return [
        Backend(
            "kitchen",
            provider=make_provider,
            priority=KITCHEN_PRIORITY,
            description=(
                "recipe-driven linears and experts (bf16, fp8 current scaling) and optional "
                "attention of its own; every other slot from kitchen_fallback_backend"
            ),
            check=check,
        )
    ]
