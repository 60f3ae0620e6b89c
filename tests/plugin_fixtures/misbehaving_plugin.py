"""Plugins whose hook raises, or returns something other than a list of ``Backend``."""

from attnplug import hookimpl


class Raising:
    @hookimpl
    def attnplug_backends(self):
        raise RuntimeError("the plugin's hook exploded")


class Garbage:
    @hookimpl
    def attnplug_backends(self):
        return ["not a backend"]


raising = Raising()
garbage = Garbage()
