"""What ``attnplug plan`` reports: per layer (per sublayer, for a hybrid layer pattern), its
stage, kinds and the class and backend behind every slot, computed from specs alone (nothing is
built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnplug._errors import ConfigError
from attnplug.patterns import normalize_hybrid_pattern
from attnplug.specs import (
    _get_backend_spec_provider,
    _slot,
    describe_layer_spec,
    describe_slot,
    get_transformer_block_with_experimental_attention_variant_spec,
    is_last_stage,
)

if TYPE_CHECKING:
    from attnplug.backends.base import BackendSpecProvider
    from attnplug.config import TransformerConfig

__all__ = ["describe_plan", "pipeline_chunks"]


def pipeline_chunks(
    config: TransformerConfig, pp_rank: int | None = None, vp_stage: int | None = None
) -> list[tuple[int, int | None]]:
    """The ``(pp_rank, vp_stage)`` chunks to describe, in layer order (virtual-stage major).

    ``None`` for either means all of them. Raises ``ConfigError`` for values out of range.
    """
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size
    if pp_rank is not None and not 0 <= pp_rank < pp:
        raise ConfigError(
            f"pp_rank={pp_rank} is out of range: expected 0..{pp - 1} "
            f"(pipeline_model_parallel_size={pp})"
        )
    if vp_stage is not None and (vp is None or not 0 <= vp_stage < vp):
        accepted = "no vp_stage (virtual pipelining is off)" if vp is None else f"0..{vp - 1}"
        raise ConfigError(f"vp_stage={vp_stage} is out of range: expected {accepted}")
    ranks = [pp_rank] if pp_rank is not None else list(range(pp))
    stages: list[int | None] = [None] if vp is None else list(range(vp))
    if vp_stage is not None:
        stages = [vp_stage]
    return [(rank, stage) for stage in stages for rank in ranks]


def describe_plan(
    config: TransformerConfig,
    pp_rank: int | None = None,
    vp_stage: int | None = None,
    backend: BackendSpecProvider | None = None,
) -> dict[str, Any]:
    """The ``plan --json`` object: ``{"backend", "hybrid_layer_pattern", "layers": [{"index",
    "attention", "mlp", "pp_rank", "vp_stage", "slots": {slot: {"class", "backend"}}}],
    "final_layernorm"}``.

    ``hybrid_layer_pattern`` is the config's pattern, normalised, or ``None`` for a frequency
    config. A pattern config has one row per sublayer: a mixer-only row has ``mlp`` ``"-"`` and
    an MLP-only row ``attention`` ``"-"``, and the skipped half's slots are left out. Raises
    ``ConfigError`` / ``BackendError`` as the spec builders do.
    """
    backend = backend if backend is not None else _get_backend_spec_provider(config)
    layers = []
    for rank, stage in pipeline_chunks(config, pp_rank, vp_stage):
        block = get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=stage, pp_rank=rank, backend=backend
        )
        for spec in block.layer_specs:
            layers.append(
                {
                    "index": spec.metainfo["layer_id"],
                    "attention": spec.metainfo["attention"],
                    "mlp": spec.metainfo["mlp"],
                    "pp_rank": rank,
                    "vp_stage": stage,
                    "slots": describe_layer_spec(spec),
                }
            )
    pattern = config.hybrid_layer_pattern
    plan: dict[str, Any] = {
        "backend": backend.name,
        "hybrid_layer_pattern": None if pattern is None else normalize_hybrid_pattern(pattern),
        "layers": layers,
    }
    final = None
    if any(is_last_stage(config, r, s) for r, s in pipeline_chunks(config, pp_rank, vp_stage)):
        norm = _slot(backend, "layer_norm", rms_norm=config.normalization == "RMSNorm")
        final = describe_slot(norm) if norm is not None else None
    plan["final_layernorm"] = final
    return plan
