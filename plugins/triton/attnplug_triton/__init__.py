"""The ``triton`` backend of attnplug (distribution ``attnplug-triton``).

Importing this package imports nothing heavy: :mod:`attnplug_triton.plugin` registers the
backend, :mod:`attnplug_triton.provider` serves its slots, :mod:`attnplug_triton.layers` holds
the modules and :mod:`attnplug_triton.ops` the kernels (each imported when first used).
"""
