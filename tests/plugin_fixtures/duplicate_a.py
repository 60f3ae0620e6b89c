"""One of two plugins that register a backend with the same name."""

from attnplug import Backend, hookimpl


@hookimpl
def attnplug_backends() -> list[Backend]:
    return [Backend("twin", provider="attnplug.backends.local:LocalSpecProvider")]
