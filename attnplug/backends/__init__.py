"""Backends: the slots a backend fills, and the registry that finds and selects backends.

``LocalSpecProvider`` (the built-in ``local`` backend, public so a third party can subclass it
and replace only the slots it accelerates) is imported on first access, so importing this
package imports neither the layers nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnplug._errors import BackendError
from attnplug.backends.base import (
    KERNEL_SLOTS,
    MODULE_SLOTS,
    SLOTS,
    BackendSpecProvider,
    SlotNotServed,
)
from attnplug.backends.registry import (
    Backend,
    BackendInfo,
    get_provider,
    list_backends,
    reload_backends,
    resolve_backend,
)

if TYPE_CHECKING:
    from attnplug.backends.local import LocalSpecProvider

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendSpecProvider",
    "KERNEL_SLOTS",
    "LocalSpecProvider",
    "MODULE_SLOTS",
    "SLOTS",
    "SlotNotServed",
    "get_provider",
    "list_backends",
    "reload_backends",
    "resolve_backend",
]


def __getattr__(name: str) -> Any:
    if name == "LocalSpecProvider":
        from attnplug.backends.local import LocalSpecProvider

        return LocalSpecProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
