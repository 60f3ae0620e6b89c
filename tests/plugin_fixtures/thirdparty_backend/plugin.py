"""The entry-point module: cheap to import (the provider and its dependency load later)."""

from attnplug import Backend, hookimpl


@hookimpl
def attnplug_backends() -> list[Backend]:
    return [
        Backend(
            "thirdparty",
            provider="thirdparty_backend.provider:ThirdPartyProvider",
            priority=10,
            description="local, with a faster activation",
        )
    ]
