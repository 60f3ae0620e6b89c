"""The core's own plugin: registers the ``local`` backend (plain PyTorch, CPU and GPU).

Named by the core's entry point ``local = "attnplug.backends.local_plugin"``, and registered
directly when attnplug runs from a source tree that was never installed.
"""

from __future__ import annotations

from attnplug.backends.registry import Backend
from attnplug.hookspecs import hookimpl


@hookimpl
def attnplug_backends() -> list[Backend]:
    """The ``local`` backend; it can always run, so it has no ``check``."""
    return [
        Backend(
            "local",
            provider="attnplug.backends.local:LocalSpecProvider",
            priority=0,
            description="plain PyTorch reference layers and kernels (CPU and GPU)",
        )
    ]
