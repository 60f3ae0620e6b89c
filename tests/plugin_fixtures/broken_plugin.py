"""A plugin whose import fails, as one with a missing dependency does."""

import attnplug_missing_dependency  # noqa: F401
