"""``TritonSpecProvider``: the ``local`` backend with Triton kernels in the slots they serve.

``core_attention`` is :class:`attnplug_triton.layers.FlashAttention`; ``layer_norm`` is
:class:`attnplug_triton.layers.RMSNorm` or :class:`attnplug_triton.layers.LayerNorm`. Every
other slot is inherited from :class:`attnplug.backends.LocalSpecProvider`, and
:meth:`TritonSpecProvider.served_by` says so. The layers (and Triton) are imported when a slot
is asked for, not when this module is.

The gated delta rule (``gated_delta_rule``) is served too: on an H200 with Triton 3.6 its
forward and backward match float64 at the project shape and at head dims 16, 32, 64 and 128
(benchmarks/results/2026-11-28-h200-session3.md). Configs whose GDN head dims exceed the largest
verified on a GPU (:data:`GPU_VERIFIED_GDN_DIM`) get ``local``'s there (:meth:`configure`; the
plan says so); GDN at those head dims is served only when asked for —
``TritonSpecProvider(experimental_kernels=True)`` or ``ATTNPLUG_TRITON_EXPERIMENTAL=1``, which
also turns on the chunked kernels' variants not yet checked on a GPU
(``EXPERIMENTAL_CHUNK_OPTIONS``; none since session 12 checked the last two). The DSA
kernels (``dsa_indexer_topk``, ``sparse_attention``, ``dsa_indexer_loss``) are served since
session 7: right against float64 on the H200 at T = 4096, topk = 2048, and a DSA model's
training step took 368 ms with them against 1223 ms with ``local``'s DSA ops
(benchmarks/results/2026-11-28-h200-session7.md).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from attnplug.backends.local import LocalSpecProvider

if TYPE_CHECKING:
    from collections.abc import Callable

    from attnplug.config import TransformerConfig

__all__ = ["TritonSpecProvider"]

logger = logging.getLogger(__name__)

# The slots this provider serves with kernels verified on a GPU; the rest come from ``local``.
TRITON_SLOTS = frozenset({"core_attention", "layer_norm", "gated_delta_rule", "causal_conv1d",
                          "dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss"})
DSA_SLOTS = frozenset({"dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss"})
EXPERIMENTAL_ENV = "ATTNPLUG_TRITON_EXPERIMENTAL"
# The largest GDN key/value head dim whose kernels were checked against float64 on a GPU (an
# H200 with Triton 3.6: the autotuned kernels at 16, 32, 64 and 128, each configuration of each
# kernel at 16-64, of chunk_bwd at 128); larger ones (up to 256, which the kernels take) only as
# experimental kernels.
GPU_VERIFIED_GDN_DIM = 128


class TritonSpecProvider(LocalSpecProvider):
    """Triton flash attention, fused norms, the gated delta rule, GatedDeltaNet's convolution and
    the DSA kernels; everything else from the local backend.

    Args:
        experimental_kernels: serve GDN at any head dim the kernels take, with the chunked
            kernels' variants not yet checked on a GPU; ``None`` reads
            ``ATTNPLUG_TRITON_EXPERIMENTAL`` (``1`` enables).
        gdn_kernel: serve ``gated_delta_rule`` (without experimental kernels, :meth:`configure`
            turns it off for head dims above :data:`GPU_VERIFIED_GDN_DIM`).
        dsa_kernels: serve the DSA slots (:meth:`configure` turns them off for an indexer head
            dim the kernels do not take).
    """

    name = "triton"

    def __init__(self, experimental_kernels: bool | None = None, *,
                 gdn_kernel: bool = True, dsa_kernels: bool = True) -> None:
        if experimental_kernels is None:
            experimental_kernels = os.environ.get(EXPERIMENTAL_ENV, "") == "1"
        self.experimental_kernels = bool(experimental_kernels)
        self.gdn_kernel = bool(gdn_kernel)
        self.dsa_kernels = bool(dsa_kernels)

    def _serves(self, slot: str) -> bool:
        if slot == "gated_delta_rule":
            return self.gdn_kernel or self.experimental_kernels
        if slot in DSA_SLOTS:
            return self.dsa_kernels
        return slot in TRITON_SLOTS

    def served_by(self, slot: str) -> str:
        """``"triton"`` for the slots its kernels serve, ``"local"`` otherwise."""
        return self.name if self._serves(slot) else LocalSpecProvider.name

    def configure(self, config: TransformerConfig) -> TritonSpecProvider:
        """``self``, or a copy that takes ``local``'s gated delta rule when ``config``'s GDN head
        dims exceed :data:`GPU_VERIFIED_GDN_DIM` (without experimental kernels), and ``local``'s
        DSA ops when its indexer head dim exceeds what the DSA kernels take (256)."""
        from attnplug_triton.ops.utils import MAX_HEAD_DIM

        gdn, dsa = self.gdn_kernel, self.dsa_kernels
        dim = max(config.linear_key_head_dim, config.linear_value_head_dim)
        if gdn and not self.experimental_kernels and dim > GPU_VERIFIED_GDN_DIM:
            logger.info("triton: GDN head dims %d/%d exceed %d, the largest verified on a GPU; "
                        "gated_delta_rule comes from 'local' (ATTNPLUG_TRITON_EXPERIMENTAL=1 "
                        "serves the triton kernel)", config.linear_key_head_dim,
                        config.linear_value_head_dim, GPU_VERIFIED_GDN_DIM)
            gdn = False
        index_dim = config.dsa_indexer_head_dim
        if dsa and index_dim is not None and index_dim > MAX_HEAD_DIM:
            logger.info("triton: dsa_indexer_head_dim=%d exceeds %d, the largest the DSA kernels "
                        "take; the DSA ops come from 'local'", index_dim, MAX_HEAD_DIM)
            dsa = False
        if (gdn, dsa) == (self.gdn_kernel, self.dsa_kernels):
            return self
        return TritonSpecProvider(self.experimental_kernels, gdn_kernel=gdn, dsa_kernels=dsa)

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
        autograd; K and V up to 256. With experimental kernels,
        :func:`~attnplug_triton.ops.gated_delta_rule.experimental_gated_delta_rule`: the same
        with the chunked kernels' variants not yet checked on a GPU. Triton is imported on the
        first call."""
        if not self._serves("gated_delta_rule"):
            return super().gated_delta_rule()
        from attnplug_triton.ops.gated_delta_rule import (
            experimental_gated_delta_rule,
            gated_delta_rule,
        )

        return experimental_gated_delta_rule if self.experimental_kernels else gated_delta_rule

    def dsa_indexer_topk(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.topk_blocked.dsa_indexer_topk_threshold`: the
        indexer's float32 scores for a bounded block of queries at a time in Triton, each row's
        ``topk``-th largest score by ``torch.topk``, then a selection kernel (indices in position
        order, −1 in unused slots; equal scores: the earlier key). On the H200 it took 13.1 ms
        at T = 32K with the small indexer where the 64-bit-key selection took 19.9 ms
        (benchmarks/results/2026-11-28-h200-session7.md). Triton is imported when the slot is
        asked for."""
        if not self._serves("dsa_indexer_topk"):
            return super().dsa_indexer_topk()
        from attnplug_triton.ops.dsa.topk_blocked import dsa_indexer_topk_threshold

        return dsa_indexer_topk_threshold

    def sparse_attention(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.sparse.sparse_attention`: attention over each query's
        selected keys, forward and backward, each key gathered once per key/value head group;
        head dims up to 256. Triton is imported when the slot is asked for."""
        if not self._serves("sparse_attention"):
            return super().sparse_attention()
        from attnplug_triton.ops.dsa.sparse import sparse_attention

        return sparse_attention

    def dsa_indexer_loss(self) -> Callable:
        """:func:`attnplug_triton.ops.dsa.kl.indexer_kl_loss`: the indexer's KL loss against the
        head-summed main attention in one kernel, never a ``[B, H, T, S]`` tensor. Triton is
        imported when the slot is asked for."""
        if not self._serves("dsa_indexer_loss"):
            return super().dsa_indexer_loss()
        from attnplug_triton.ops.dsa.kl import indexer_kl_loss

        return indexer_kl_loss

    def causal_conv1d(self) -> Callable:
        """:func:`attnplug_triton.ops.conv.fused.causal_conv1d`: GatedDeltaNet's depthwise
        causal convolution with the SiLU fused, forward and backward (two passes)."""
        if not self._serves("causal_conv1d"):
            return super().causal_conv1d()
        from attnplug_triton.ops.conv.fused import causal_conv1d

        return causal_conv1d
