"""The te backend of attnplug (distribution ``attnplug-te``): Transformer Engine modules.

``attnplug_te.plugin`` registers the backend (cheap: no TE, no torch); ``attnplug_te.provider``
holds ``TESpecProvider``; ``attnplug_te.modules`` the TE adapters (imports TE);
``attnplug_te.convert`` maps weights between a ``local`` and a ``te`` model.
"""
