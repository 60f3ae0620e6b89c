"""One plugin, several backends: one that cannot run here, one picky about the config, one whose
provider cannot be imported."""

from attnplug import Backend, hookimpl
from attnplug.backends import LocalSpecProvider


class GdnOnlyProvider(LocalSpecProvider):
    def supports(self, config) -> list[str]:
        if config.experimental_attention_variant != "gdn":
            return ["it serves only experimental_attention_variant='gdn'"]
        return []


def _needs_gpu() -> list[str]:
    return ["no CUDA device is visible", "it needs compute capability 9.0"]


@hookimpl
def attnplug_backends() -> list[Backend]:
    return [
        Backend("gpuonly", provider=LocalSpecProvider, priority=100, check=_needs_gpu),
        Backend("gdnonly", provider=GdnOnlyProvider, priority=50),
        Backend("ghost", provider="attnplug_no_such_module:Provider", priority=30),
    ]
