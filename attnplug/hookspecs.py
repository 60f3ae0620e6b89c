"""The pluggy hooks a plugin implements (project name ``"attnplug"``).

A plugin is a module named by an entry point in the group ``attnplug``::

    [project.entry-points.attnplug]
    mybackend = "mypackage.plugin"

and that module implements :func:`attnplug_backends` with the marker :data:`hookimpl`::

    from attnplug.hookspecs import hookimpl
    from attnplug.backends import Backend

    @hookimpl
    def attnplug_backends():
        return [Backend("mybackend", provider="mypackage.provider:MyProvider", priority=10)]

Loading the module must be cheap: the heavy imports (TE, Triton) belong to the provider, which
attnplug imports only when the backend is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from attnplug.backends.registry import Backend

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec", "attnplug_backends"]

PROJECT_NAME = "attnplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def attnplug_backends() -> list[Backend]:
    """Return the backends this plugin provides, as a list of :class:`attnplug.backends.Backend`.

    An empty list is allowed (a plugin that registers nothing on this machine). Raising, or
    returning anything but a list of ``Backend``, gets the plugin reported and skipped.
    """
