"""The records that say which spec fills each part of a layer (Megatron-Core's names).

Plain data with no torch import: the spec builders in :mod:`attnplug.specs` make them, the
layers in :mod:`attnplug.layers` consume them. Each field is a ``ModuleSpec``, a class, a
function (for kernel slots) or ``None``.
"""

from __future__ import annotations

from typing import Any

import attrs

IDENTITY = "attnplug.layers.identity:IdentityOp"

__all__ = [
    "IDENTITY",
    "TransformerBlockSubmodules",
    "TransformerLayerSubmodules",
    "SelfAttentionSubmodules",
    "GatedDeltaNetSubmodules",
    "DSAttentionSubmodules",
    "DSAIndexerSubmodules",
    "MLPSubmodules",
    "MoESubmodules",
]


@attrs.define
class TransformerBlockSubmodules:
    """The layer specs of one pipeline slice and the final norm (``None``: no final norm)."""

    layer_specs: list = attrs.field(factory=list)
    layer_norm: Any = None


@attrs.define
class TransformerLayerSubmodules:
    input_layernorm: Any = IDENTITY
    self_attention: Any = IDENTITY
    pre_mlp_layernorm: Any = IDENTITY
    mlp: Any = IDENTITY


@attrs.define
class SelfAttentionSubmodules:
    linear_qkv: Any = None
    core_attention: Any = None
    linear_proj: Any = None
    q_layernorm: Any = None
    k_layernorm: Any = None


@attrs.define
class GatedDeltaNetSubmodules:
    in_proj: Any = None
    out_norm: Any = None
    out_proj: Any = None
    gated_delta_rule: Any = None
    causal_conv1d: Any = None  # None: attnplug.ops.causal_conv1d


@attrs.define
class DSAIndexerSubmodules:
    linear_wq_b: Any = None
    linear_wk: Any = None
    k_norm: Any = None
    linear_weights_proj: Any = None
    dsa_indexer_topk: Any = None


@attrs.define
class DSAttentionSubmodules:
    indexer: Any = None
    sparse_attention: Any = None
    dsa_indexer_loss: Any = None  # None: attnplug.ops.dsa_indexer_loss


@attrs.define
class MLPSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None
    activation_func: Any = None


@attrs.define
class MoESubmodules:
    experts: Any = None
    shared_experts: Any = None
