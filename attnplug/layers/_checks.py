"""Argument checks shared by the layers: a bad constructor argument names itself."""

from __future__ import annotations

from typing import Any

from attnplug._errors import ConfigError

__all__ = ["check_positive_int", "check_config", "check_layer_args"]


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` when it is an int >= 1, else raise ``ConfigError`` naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name}={value!r} is not accepted: expected an integer >= 1")
    return value


def check_config(owner: str, config: Any) -> None:
    """Raise ``ConfigError`` unless ``config`` is a ``TransformerConfig``."""
    from attnplug.config import TransformerConfig

    if not isinstance(config, TransformerConfig):
        raise ConfigError(
            f"{owner}: config={type(config).__name__} is not accepted: expected an "
            "attnplug.TransformerConfig"
        )


def check_layer_args(owner: str, config: Any, layer_number: Any, submodules: Any = None,
                     required: tuple[str, ...] = ()) -> int:
    """Check what every layer's constructor takes: ``config`` is a ``TransformerConfig``, each
    ``submodules.<field>`` in ``required`` is set, and ``layer_number`` is an int >= 1.

    Returns ``layer_number``; raises ``ConfigError`` naming ``owner`` and the argument.
    """
    check_config(owner, config)
    for field in required:
        if getattr(submodules, field, None) is None:
            raise ConfigError(f"{owner}: submodules.{field} is None; a spec is required")
    return check_positive_int(owner, "layer_number", layer_number)
