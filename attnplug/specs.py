"""The seed's spec builders: a hybrid block of softmax attention / Gated DeltaNet / DSA layers,
each with a dense MLP or MoE, for any backend.

Names, arguments and meaning follow Megatron-Core's
``experimental_attention_variant_module_specs``; unlike it, every builder works with any
:class:`~attnplug.backends.base.BackendSpecProvider` (``backend=None`` resolves
``config.backend`` through the registry), a backend that does not fuse norms into linears still
gets working GDN and attention layers (a separate input norm and a plain column-parallel
projection), and bad input raises :class:`~attnplug.ConfigError` instead of asserting.

A config in the pattern form (``hybrid_layer_pattern``, Megatron's HybridModel) gets one
``TransformerLayer`` spec per sublayer, mixer-only or MLP-only, the other half ``IdentityOp``
(which the layer skips); a frequency config keeps one spec per layer, mixer and MLP. Frequency
layer ``i`` and sublayers ``2i``, ``2i + 1`` of the equivalent pattern
(:func:`~attnplug.patterns.to_hybrid_pattern_config`) hold the same modules, built in the same
order, so one seed gives the same weights and the same logits.

Every slot a backend fills is wrapped in a :class:`~attnplug.spec.ModuleSpec` whose
``metainfo`` records ``{"slot": <provider slot>, "backend": <backend that served it>}``, so
:func:`describe_layer_spec` (and ``attnplug plan``) can say which backend serves what.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from attnplug._errors import ConfigError
from attnplug.backends.base import SlotNotServed
from attnplug.backends.local import LocalSpecProvider
from attnplug.layers.submodules import (
    IDENTITY,
    DSAIndexerSubmodules,
    DSAttentionSubmodules,
    GatedDeltaNetSubmodules,
    MLPSubmodules,
    MoESubmodules,
    SelfAttentionSubmodules,
    TransformerBlockSubmodules,
    TransformerLayerSubmodules,
)
from attnplug.patterns import (
    NONE_KIND,
    get_attention_kinds,
    get_linear_attention_pattern,
    get_mlp_kinds,
    get_moe_layer_pattern,
    is_linear_attention_variant,
)
from attnplug.pipeline import get_layer_ids
from attnplug.spec import ModuleSpec, spec_name

if TYPE_CHECKING:
    from attnplug.backends.base import BackendSpecProvider
    from attnplug.config import TransformerConfig

__all__ = [
    "get_gated_delta_net_module_spec",
    "get_dsa_module_spec_for_backend",
    "get_experimental_attention_variant_module_spec",
    "get_transformer_layer_with_experimental_attention_variant_spec",
    "get_transformer_block_with_experimental_attention_variant_spec",
    "is_linear_attention_variant",
    "get_moe_layer_pattern",
    "get_linear_attention_pattern",
    "get_attention_kinds",
    "get_mlp_kinds",
    "describe_layer_spec",
    "describe_spec_tree",
    "describe_slot",
]

TRANSFORMER_LAYER = "attnplug.layers.transformer:TransformerLayer"
SELF_ATTENTION = "attnplug.layers.attention:SelfAttention"
GATED_DELTA_NET = "attnplug.layers.gated_delta_net:GatedDeltaNet"
DSA_SELF_ATTENTION = "attnplug.layers.dsa:DSASelfAttention"
DSA_ATTENTION = "attnplug.layers.dsa:DSAttention"
DSA_INDEXER = "attnplug.layers.dsa:DSAIndexer"
MLP = "attnplug.layers.mlp:MLP"
MOE_LAYER = "attnplug.layers.moe:MoELayer"


# -- backends -----------------------------------------------------------------------------------
def _get_backend_spec_provider(config: TransformerConfig) -> BackendSpecProvider:
    """The provider for ``config``: ``config.backend`` resolved through the registry.

    ``"auto"`` takes the highest-priority backend that can run here and supports the config;
    ``use_kitchen`` selects ``kitchen``. Raises ``BackendError`` with the reasons when the
    named backend cannot run.
    """
    from attnplug.backends import resolve_backend

    return resolve_backend(config)


def _provider(config: TransformerConfig, backend: BackendSpecProvider | None):
    return backend if backend is not None else _get_backend_spec_provider(config)


def _slot(backend: BackendSpecProvider, slot: str, *args: Any, **kwargs: Any) -> ModuleSpec | None:
    """Ask ``backend`` for ``slot`` and wrap the answer in a spec recording who served it."""
    value = getattr(backend, slot)(*args, **kwargs)
    if value is None:
        return None
    return ModuleSpec(value, metainfo={"slot": slot, "backend": backend.served_by(slot)})


def _optional_kernel(backend: BackendSpecProvider, slot: str) -> ModuleSpec | None:
    """An optional kernel slot (one added to the contract after third-party backends existed):
    the backend's when it serves it, else the ``local`` backend's — recorded as served by
    ``local``, so ``attnplug plan`` shows it."""
    try:
        return _slot(backend, slot)
    except SlotNotServed:
        return _slot(LocalSpecProvider(), slot)


def _rms(config: TransformerConfig) -> bool:
    return config.normalization == "RMSNorm"


def _fused_column_linear(backend: BackendSpecProvider) -> ModuleSpec | None:
    """The backend's norm-fused column linear, or ``None`` when it does not fuse."""
    if not backend.fuse_layernorm_and_linear():
        return None
    return _slot(backend, "column_parallel_layer_norm_linear")


def _qk_norm(config: TransformerConfig, backend: BackendSpecProvider) -> ModuleSpec | None:
    if not config.qk_layernorm:
        return None
    return _slot(backend, "layer_norm", rms_norm=_rms(config), for_qk=True)


# -- attention variants -------------------------------------------------------------------------
def get_gated_delta_net_module_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of a Gated DeltaNet layer.

    With a backend that fuses norms into linears, ``in_proj`` is its layer-norm-linear and
    ``metainfo["fuse_input_layernorm"]`` is true (the layer's input norm becomes identity);
    otherwise ``in_proj`` is a plain column-parallel linear and the layer keeps its own norm.
    """
    backend = _provider(config, backend)
    fused = _fused_column_linear(backend)
    return ModuleSpec(
        GATED_DELTA_NET,
        submodules=GatedDeltaNetSubmodules(
            in_proj=fused if fused is not None else _slot(backend, "column_parallel_linear"),
            out_norm=_slot(backend, "layer_norm", rms_norm=_rms(config), for_qk=False),
            out_proj=_slot(backend, "row_parallel_linear"),
            gated_delta_rule=_slot(backend, "gated_delta_rule"),
            causal_conv1d=_optional_kernel(backend, "causal_conv1d"),
        ),
        metainfo={"fuse_input_layernorm": fused is not None},
    )


def _require_dsa_fields(config: TransformerConfig) -> None:
    missing = [
        name
        for name in ("dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk")
        if getattr(config, name) is None
    ]
    if missing:
        raise ConfigError(
            f"{', '.join(f'{m}=None' for m in missing)}: a DSA layer needs "
            "dsa_indexer_n_heads, dsa_indexer_head_dim and dsa_indexer_topk (integers >= 1)"
        )


def get_dsa_module_spec_for_backend(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of a DeepSeek Sparse Attention layer on a multi-head / grouped-query host.

    The lightning indexer (``linear_wq_b``, ``linear_wk``, LayerNorm ``k_norm``,
    ``linear_weights_proj``, the ``dsa_indexer_topk`` kernel) picks each query's keys; the
    ``sparse_attention`` kernel attends over them; the ``dsa_indexer_loss`` kernel trains the
    indexer (its KL loss against the main attention). The input norm stays separate
    (``fuse_input_layernorm`` false): the indexer reads the normalised hidden states.
    Raises ``ConfigError`` when the DSA fields are unset.
    """
    _require_dsa_fields(config)
    backend = _provider(config, backend)
    qk_norm = _qk_norm(config, backend)
    indexer = ModuleSpec(
        DSA_INDEXER,
        submodules=DSAIndexerSubmodules(
            linear_wq_b=_slot(backend, "linear"),
            linear_wk=_slot(backend, "linear"),
            k_norm=_slot(backend, "layer_norm", rms_norm=False, for_qk=True),
            linear_weights_proj=_slot(backend, "linear"),
            dsa_indexer_topk=_slot(backend, "dsa_indexer_topk"),
        ),
    )
    core = ModuleSpec(
        DSA_ATTENTION,
        submodules=DSAttentionSubmodules(
            indexer=indexer,
            sparse_attention=_slot(backend, "sparse_attention"),
            dsa_indexer_loss=_optional_kernel(backend, "dsa_indexer_loss"),
        ),
    )
    return ModuleSpec(
        DSA_SELF_ATTENTION,
        submodules=SelfAttentionSubmodules(
            linear_qkv=_slot(backend, "column_parallel_linear"),
            core_attention=core,
            linear_proj=_slot(backend, "row_parallel_linear"),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
        metainfo={"fuse_input_layernorm": False},
    )


def get_experimental_attention_variant_module_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of ``config.experimental_attention_variant`` (``"gdn"`` or ``"dsa"``).

    Raises ``ConfigError`` for any other value, ``None`` included.
    """
    variant = config.experimental_attention_variant
    if is_linear_attention_variant(variant):
        return get_gated_delta_net_module_spec(config, backend)
    if variant == "dsa":
        return get_dsa_module_spec_for_backend(config, backend)
    raise ConfigError(
        f"experimental_attention_variant={variant!r} has no experimental spec: "
        "expected 'gdn' or 'dsa'"
    )


def _get_self_attention_module_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of standard (softmax, grouped-query) self-attention for hybrid stacks.

    ``metainfo["fuse_input_layernorm"]`` is true when the backend fuses the input norm into
    ``linear_qkv``.
    """
    backend = _provider(config, backend)
    fused = _fused_column_linear(backend)
    qk_norm = _qk_norm(config, backend)
    return ModuleSpec(
        SELF_ATTENTION,
        submodules=SelfAttentionSubmodules(
            linear_qkv=fused if fused is not None else _slot(backend, "column_parallel_linear"),
            core_attention=_slot(backend, "core_attention"),
            linear_proj=_slot(backend, "row_parallel_linear"),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
        metainfo={"fuse_input_layernorm": fused is not None},
    )


# -- MLPs ---------------------------------------------------------------------------------------
def _mlp_submodules(backend: BackendSpecProvider, fc1: ModuleSpec | None = None) -> MLPSubmodules:
    return MLPSubmodules(
        linear_fc1=fc1 if fc1 is not None else _slot(backend, "column_parallel_linear"),
        linear_fc2=_slot(backend, "row_parallel_linear"),
        activation_func=_slot(backend, "activation_func"),
    )


def _get_dense_mlp_module_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of a dense MLP; ``metainfo["fuse_pre_mlp_layernorm"]`` says whether ``fc1``
    absorbs the pre-MLP norm (a backend that fuses norms into linears)."""
    backend = _provider(config, backend)
    fused = _fused_column_linear(backend)
    return ModuleSpec(
        MLP,
        submodules=_mlp_submodules(backend, fused),
        metainfo={"fuse_pre_mlp_layernorm": fused is not None},
    )


def _get_moe_module_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> ModuleSpec:
    """The spec of a Mixture-of-Experts layer: router, experts from the backend's
    ``grouped_mlp_modules``, an optional shared expert. MoE keeps its own pre-MLP norm."""
    backend = _provider(config, backend)
    shared = None
    if config.moe_shared_expert_intermediate_size is not None:
        shared = ModuleSpec(
            MLP,
            params={"ffn_hidden_size": config.moe_shared_expert_intermediate_size},
            submodules=_mlp_submodules(backend),
        )
    return ModuleSpec(
        MOE_LAYER,
        submodules=MoESubmodules(
            experts=_slot(backend, "grouped_mlp_modules", config.moe_grouped_gemm),
            shared_experts=shared,
        ),
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


# -- layers and blocks --------------------------------------------------------------------------
def _norm_or_identity(config: TransformerConfig, backend, fused: bool) -> Any:
    if fused:
        return IDENTITY
    return _slot(backend, "layer_norm", rms_norm=_rms(config), for_qk=False)


def _mixer_spec(kind: str, config: TransformerConfig, backend: BackendSpecProvider) -> ModuleSpec:
    """The spec of one mixer kind: ``"sdpa"``, ``"gdn"`` or ``"dsa"``."""
    if kind == "sdpa":
        return _get_self_attention_module_spec(config, backend)
    if kind == "gdn":
        return get_gated_delta_net_module_spec(config, backend)
    return get_dsa_module_spec_for_backend(config, backend)


def _mlp_spec(kind: str, config: TransformerConfig, backend: BackendSpecProvider) -> ModuleSpec:
    """The spec of one MLP kind: ``"dense"`` or ``"moe"``."""
    if kind == "moe":
        return _get_moe_module_spec(config, backend)
    return _get_dense_mlp_module_spec(config, backend)


def _layer_submodules(config: TransformerConfig, backend: BackendSpecProvider,
                      attention: ModuleSpec | None, mlp: ModuleSpec | None
                      ) -> TransformerLayerSubmodules:
    """A layer's submodules; a missing half (``None``) is ``IdentityOp``, its norm too, and the
    layer skips it (a mixer-only or MLP-only sublayer of a hybrid pattern)."""
    submodules = TransformerLayerSubmodules()
    if attention is not None:
        submodules.input_layernorm = _norm_or_identity(
            config, backend, attention.metainfo["fuse_input_layernorm"]
        )
        submodules.self_attention = attention
    if mlp is not None:
        submodules.pre_mlp_layernorm = _norm_or_identity(
            config, backend, mlp.metainfo["fuse_pre_mlp_layernorm"]
        )
        submodules.mlp = mlp
    return submodules


def get_transformer_layer_with_experimental_attention_variant_spec(
    config: TransformerConfig, backend: BackendSpecProvider | None = None
) -> list[ModuleSpec]:
    """One ``TransformerLayer`` spec for every layer of the model (no pipeline slicing).

    Each spec's ``metainfo`` has ``layer_id`` (0-based), ``attention`` and ``mlp`` (the kinds,
    see :func:`get_attention_kinds` / :func:`get_mlp_kinds`). With a ``hybrid_layer_pattern``
    there is one spec per sublayer: a mixer-only layer (``mlp`` kind ``"-"``; its
    ``pre_mlp_layernorm`` and ``mlp`` are ``IdentityOp``) or an MLP-only one (``attention``
    kind ``"-"``; ``input_layernorm`` and ``self_attention`` are ``IdentityOp``). Raises
    ``ConfigError`` / ``BackendError`` as the builders of each part do.
    """
    backend = _provider(config, backend)
    attention_kinds = get_attention_kinds(config)
    mlp_kinds = get_mlp_kinds(config)
    attention_specs = {kind: _mixer_spec(kind, config, backend)
                       for kind in sorted(set(attention_kinds) - {NONE_KIND})}
    mlp_specs = {kind: _mlp_spec(kind, config, backend)
                 for kind in sorted(set(mlp_kinds) - {NONE_KIND})}
    layers = []
    for layer_id, (attention, mlp) in enumerate(zip(attention_kinds, mlp_kinds, strict=True)):
        submodules = _layer_submodules(config, backend, attention_specs.get(attention),
                                       mlp_specs.get(mlp))
        layers.append(
            ModuleSpec(
                TRANSFORMER_LAYER,
                submodules=submodules,
                metainfo={"layer_id": layer_id, "attention": attention, "mlp": mlp},
            )
        )
    return layers


def is_last_stage(config: TransformerConfig, pp_rank: int | None, vp_stage: int | None) -> bool:
    """Whether ``(pp_rank, vp_stage)`` is the model's last pipeline chunk (it holds the final
    norm and the output layer)."""
    last_rank = (pp_rank or 0) == config.pipeline_model_parallel_size - 1
    vp = config.virtual_pipeline_model_parallel_size
    return last_rank and (vp is None or vp_stage == vp - 1)


def get_transformer_block_with_experimental_attention_variant_spec(
    config: TransformerConfig,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    backend: BackendSpecProvider | None = None,
) -> TransformerBlockSubmodules:
    """The block of one pipeline chunk: the specs of the layers ``get_layer_ids(config,
    pp_rank, vp_stage)`` assigns it, and the final norm on the last chunk (``None`` elsewhere).
    With a ``hybrid_layer_pattern`` the layers are its sublayers, split by its ``|`` markers
    when it has them.

    ``pp_rank=None`` means rank 0. Raises ``ConfigError`` for a rank or stage out of range,
    ``BackendError`` when the backend cannot serve the config.
    """
    backend = _provider(config, backend)
    layer_ids = get_layer_ids(config, pp_rank, vp_stage)
    all_layers = get_transformer_layer_with_experimental_attention_variant_spec(config, backend)
    final_norm = None
    if is_last_stage(config, pp_rank, vp_stage):
        final_norm = _slot(backend, "layer_norm", rms_norm=_rms(config), for_qk=False)
    return TransformerBlockSubmodules(
        layer_specs=[all_layers[i] for i in layer_ids], layer_norm=final_norm
    )


# -- descriptions (for `attnplug plan` and built models) ----------------------------------------
def describe_slot(value: Any) -> dict[str, str]:
    """``{"class", "backend"}`` of one slot's spec (a fused norm is ``IdentityOp``/``fused``)."""
    if isinstance(value, ModuleSpec) and "slot" in value.metainfo:
        return {"class": spec_name(value), "backend": value.metainfo["backend"]}
    if value == IDENTITY:
        return {"class": "IdentityOp", "backend": "fused"}
    return {"class": spec_name(value), "backend": "attnplug"}


def describe_spec_tree(value: Any, prefix: str = "") -> dict[str, dict[str, str]]:
    """Every backend slot under ``value``: ``{"path.to.slot": {"class", "backend"}}``.

    Layer-level specs (``SelfAttention``, ``GatedDeltaNet``, ...) are walked into; a slot a
    backend filled is a leaf; a norm fused into the next linear shows as ``IdentityOp``
    served by ``"fused"``.
    """
    out: dict[str, dict[str, str]] = {}
    submodules = value.submodules if isinstance(value, ModuleSpec) else None
    if submodules is None or not attrs.has(type(submodules)):
        if prefix:
            out[prefix] = describe_slot(value)
        return out
    if prefix:
        out[prefix] = describe_slot(value)
    for field in attrs.fields(type(submodules)):
        child = getattr(submodules, field.name)
        if child is None:
            continue
        out.update(describe_spec_tree(child, f"{prefix}.{field.name}" if prefix else field.name))
    return out


_HALVES = (("input_layernorm", "self_attention"), ("pre_mlp_layernorm", "mlp"))


def describe_layer_spec(spec: ModuleSpec) -> dict[str, dict[str, str]]:
    """The slots of one ``TransformerLayer`` spec: ``{slot_path: {"class", "backend"}}``.

    A half the layer skips (its ``self_attention`` or ``mlp`` is ``IdentityOp``: a sublayer of
    a hybrid pattern) is left out, with its norm.
    """
    slots = describe_spec_tree(spec)
    submodules = spec.submodules
    for norm, main in _HALVES:
        if getattr(submodules, main, None) != IDENTITY:
            continue
        for path in list(slots):
            if path.split(".", 1)[0] in (norm, main):
                del slots[path]
    return slots
