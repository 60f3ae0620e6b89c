"""A third-party backend, as someone outside attnplug would write it."""
