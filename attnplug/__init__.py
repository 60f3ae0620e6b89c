"""attnplug: hybrid transformer stacks from declarative specs, with pluggable backends.

The public facade. Heavy parts (torch modules, backends) load on first use.
"""

from __future__ import annotations

from typing import Any

from attnplug._errors import BackendError, ConfigError
from attnplug.config import TransformerConfig
from attnplug.spec import ModuleSpec, build_module, import_module

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "ConfigError",
    "GPTModel",
    "ModuleSpec",
    "TransformerConfig",
    "build_module",
    "hookimpl",
    "import_module",
    "__version__",
]

_LAZY = {
    "Backend": ("attnplug.backends.registry", "Backend"),
    "hookimpl": ("attnplug.hookspecs", "hookimpl"),
    "GPTModel": ("attnplug.layers.model", "GPTModel"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnplug' has no attribute {name!r}")
