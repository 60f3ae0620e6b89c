"""``TritonSpecProvider``: the ``local`` backend with Triton kernels in the slots they serve.

``core_attention`` is :class:`attnplug_triton.layers.FlashAttention`; ``layer_norm`` is
:class:`attnplug_triton.layers.RMSNorm` or :class:`attnplug_triton.layers.LayerNorm`. Every
other slot is inherited from :class:`attnplug.backends.LocalSpecProvider`, and
:meth:`TritonSpecProvider.served_by` says so. The layers (and Triton) are imported when a slot
is asked for, not when this module is.

The gated delta rule and DSA kernels (``gated_delta_rule``, ``dsa_indexer_topk``,
``sparse_attention``, ``dsa_indexer_loss``) match the float64 references under the CPU
interpreter; on an H200 the DSA ones are correct but slower than ``local`` and the gated delta
rule's backward faults (plugins/triton/README.md). Until that changes they are served only when
asked for —
``TritonSpecProvider(experimental_kernels=True)`` or ``ATTNPLUG_TRITON_EXPERIMENTAL=1`` — and
those slots otherwise come from ``local`` (``plan`` shows which).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from attnplug.backends.local import LocalSpecProvider

if TYPE_CHECKING:
    from collections.abc import Callable

    from attnplug.config import TransformerConfig

__all__ = ["TritonSpecProvider"]

# The slots this provider serves with kernels verified on a GPU; the rest come from ``local``.
TRITON_SLOTS = frozenset({"core_attention", "layer_norm"})
# Kernels verified on the CPU interpreter only: served when experimental kernels are enabled.
EXPERIMENTAL_SLOTS = frozenset({"gated_delta_rule", "dsa_indexer_topk", "sparse_attention",
                                "dsa_indexer_loss"})
EXPERIMENTAL_ENV = "ATTNPLUG_TRITON_EXPERIMENTAL"


class TritonSpecProvider(LocalSpecProvider):
    """Triton flash attention and fused norms (and, when enabled, the not yet GPU-verified gated
    delta rule and DSA kernels); everything else from the local backend.

    ``experimental_kernels``: ``None`` reads ``ATTNPLUG_TRITON_EXPERIMENTAL`` (``1`` enables).
    """

    name = "triton"

    def __init__(self, experimental_kernels: bool | None = None) -> None:
        if experimental_kernels is None:
            experimental_kernels = os.environ.get(EXPERIMENTAL_ENV, "") == "1"
        self.experimental_kernels = bool(experimental_kernels)

    def served_by(self, slot: str) -> str:
        """``"triton"`` for the slots its kernels serve, ``"local"`` otherwise."""
        experimental = self.experimental_kernels and slot in EXPERIMENTAL_SLOTS
        return self.name if slot in TRITON_SLOTS or experimental else LocalSpecProvider.name

    def supports(self, config: TransformerConfig) -> list[str]:
        """Reasons the kernels cannot serve ``config``: float64 parameters, head dim > 256."""
        from attnplug_triton.ops.utils import MAX_HEAD_DIM

        reasons = []
        if config.params_dtype == "float64":
            reasons.append("params_dtype='float64': the Triton kernels compute float16, "
                           "bfloat16 and float32 (use backend='local')")
        if config.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim={config.head_dim}: the flash attention kernel takes head "
                           f"dims up to {MAX_HEAD_DIM}")
        return reasons

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> type:
        if has_residual:
            raise self._not_served(
                "layer_norm",
                "has_residual=True asks for a norm fused with the residual add, which the triton "
                "backend does not have (its layers add the residual themselves)",
            )
        from attnplug_triton.layers import LayerNorm, RMSNorm

        return RMSNorm if rms_norm else LayerNorm

    def core_attention(self) -> type:
        from attnplug_triton.layers import FlashAttention

        return FlashAttention

    def gated_delta_rule(self) -> Callable:
        """:func:`attnplug_triton.ops.gated_delta_rule.gated_delta_rule`: the chunked kernels
        (forward and backward), or the token-by-token kernel for short sequences without
        autograd; K and V up to 256. Triton is imported on the first call."""
        if not self.experimental_kernels:
            return super().gated_delta_rule()
        from attnplug_triton.ops.gated_delta_rule import gated_delta_rule

        return gated_delta_rule

    def dsa_indexer_topk(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.topk.dsa_indexer_topk`: the indexer's scores and an
        exact per-query top-k in Triton, never a ``[B, T, S]`` score tensor (indices in no
        particular order, −1 in unused slots). Triton is imported when the slot is asked for."""
        if not self.experimental_kernels:
            return super().dsa_indexer_topk()
        from attnplug_triton.ops.dsa.topk import dsa_indexer_topk

        return dsa_indexer_topk

    def sparse_attention(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.sparse.sparse_attention`: attention over each query's
        selected keys, forward and backward, each key gathered once per key/value head group;
        head dims up to 256. Triton is imported when the slot is asked for."""
        if not self.experimental_kernels:
            return super().sparse_attention()
        from attnplug_triton.ops.dsa.sparse import sparse_attention

        return sparse_attention

    def dsa_indexer_loss(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.kl.indexer_kl_loss`: the indexer's KL loss against the
        head-summed main attention in one kernel, never a ``[B, H, T, S]`` tensor. Triton is
        imported when the slot is asked for."""
        if not self.experimental_kernels:
            return super().dsa_indexer_loss()
        from attnplug_triton.ops.dsa.kl import indexer_kl_loss

        return indexer_kl_loss
