"""Exceptions shared by every part of attnplug."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that attnplug cannot accept.

    The message names the field (or argument), the value given and what would be accepted.
    """


class BackendError(RuntimeError):
    """A backend that cannot be loaded, selected or asked for a slot it does not serve."""
