"""The built-in ``local`` backend: every slot in plain PyTorch (CPU and GPU).

Public so that a third party can subclass it and replace only the slots it accelerates: each
slot is one small method that imports what it returns when asked (importing this module
imports neither torch nor the layers).
"""

from __future__ import annotations

from collections.abc import Callable

from attnplug.backends.base import BackendSpecProvider

__all__ = ["LocalSpecProvider"]


class LocalSpecProvider(BackendSpecProvider):
    """Plain-PyTorch layers (``attnplug.layers``) and reference kernels (``attnplug.ops``)."""

    name = "local"

    # -- module slots ---------------------------------------------------------------------------
    def linear(self) -> type:
        from attnplug.layers.linear import Linear

        return Linear

    def column_parallel_linear(self) -> type:
        from attnplug.layers.linear import Linear

        return Linear

    def row_parallel_linear(self) -> type:
        from attnplug.layers.linear import Linear

        return Linear

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self) -> type | None:
        return None

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> type:
        if has_residual:
            raise self._not_served(
                "layer_norm",
                "has_residual=True asks for a norm fused with the residual add, which the local "
                "backend does not have (its layers add the residual themselves)",
            )
        from attnplug.layers.norms import LayerNorm, RMSNorm

        return RMSNorm if rms_norm else LayerNorm

    def core_attention(self) -> type:
        from attnplug.layers.attention import DotProductAttention

        return DotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> type:
        """``SequentialExperts`` (one expert after another), or with ``moe_use_grouped_gemm``
        ``BatchedExperts`` (all experts in grouped GEMMs, or batched matmuls over a padded
        buffer where grouped GEMMs do not apply)."""
        from attnplug.layers.moe import BatchedExperts, SequentialExperts

        return BatchedExperts if moe_use_grouped_gemm else SequentialExperts

    def activation_func(self) -> Callable | None:
        return None

    # -- kernel slots ---------------------------------------------------------------------------
    def gated_delta_rule(self) -> Callable:
        from attnplug.ops import chunk_gated_delta_rule

        return chunk_gated_delta_rule

    def dsa_indexer_topk(self) -> Callable:
        from attnplug.ops import dsa_indexer_topk

        return dsa_indexer_topk

    def sparse_attention(self) -> Callable:
        from attnplug.ops import sparse_attention

        return sparse_attention

    def dsa_indexer_loss(self) -> Callable:
        from attnplug.ops import dsa_indexer_loss

        return dsa_indexer_loss

    def causal_conv1d(self) -> Callable:
        from attnplug.ops import causal_conv1d

        return causal_conv1d
