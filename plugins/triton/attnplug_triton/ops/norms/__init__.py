"""RMSNorm / LayerNorm with an optional SiLU gate: ``fused.fused_norm`` and ``naive.naive_norm``."""
