"""GatedDeltaNet's short convolution (depthwise, causal, then SiLU): :mod:`.fused` holds the
kernels; the reference is ``attnplug.ops.causal_conv1d``."""
