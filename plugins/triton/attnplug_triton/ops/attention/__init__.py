"""Causal flash attention: ``fused.flash_attention`` (Triton) and ``naive.naive_attention``."""
