"""A plugin that registers no backend (as attnplug-te does before its backend exists)."""

from attnplug import hookimpl


@hookimpl
def attnplug_backends() -> list:
    return []
