"""attnplug's Triton kernels, one folder per op (flash-linear-attention's vocabulary).

Each op folder holds ``fused.py`` (the Triton kernels and their autograd wrapper) and
``naive.py`` (a plain-PyTorch reference for tests). Nothing is imported here: importing a
kernel module imports Triton, so callers import the module they use, when they use it.
"""
