"""The provider: subclasses ``LocalSpecProvider`` and replaces one slot."""

import thirdparty_heavy_dependency

from attnplug.backends import LocalSpecProvider


class ThirdPartyProvider(LocalSpecProvider):
    def activation_func(self):
        return thirdparty_heavy_dependency.fast_silu
