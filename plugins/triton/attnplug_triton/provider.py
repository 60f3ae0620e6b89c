"""``TritonSpecProvider``: the ``local`` backend with Triton kernels in the slots they serve.

``core_attention`` is :class:`attnplug_triton.layers.FlashAttention`; ``layer_norm`` is
:class:`attnplug_triton.layers.RMSNorm` or :class:`attnplug_triton.layers.LayerNorm`. Every
other slot is inherited from :class:`attnplug.backends.LocalSpecProvider`, and
:meth:`TritonSpecProvider.served_by` says so. The layers (and Triton) are imported when a slot
is asked for, not when this module is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnplug.backends.local import LocalSpecProvider

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["TritonSpecProvider"]

# The slots this provider serves with its own kernels; the rest come from ``local``.
TRITON_SLOTS = frozenset({"core_attention", "layer_norm"})


class TritonSpecProvider(LocalSpecProvider):
    """Triton flash attention and fused norms; everything else from the local backend."""

    name = "triton"

    def served_by(self, slot: str) -> str:
        """``"triton"`` for ``core_attention`` and ``layer_norm``, ``"local"`` otherwise."""
        return self.name if slot in TRITON_SLOTS else LocalSpecProvider.name

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
