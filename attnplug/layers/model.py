"""``GPTModel``: embedding, the hybrid block from the spec builders, final norm, output layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnplug.layers._checks import check_config, check_positive_int
from attnplug.layers.aux_loss import clear_aux_losses, collect_aux_losses
from attnplug.layers.linear import init_normal
from attnplug.layers.submodules import TransformerBlockSubmodules
from attnplug.layers.transformer import TransformerBlock
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.backends.base import BackendSpecProvider
    from attnplug.config import TransformerConfig

__all__ = ["GPTModel"]


def _resolve_provider(config: TransformerConfig, backend: Any) -> BackendSpecProvider:
    """``backend``: None (``config.backend`` through the registry), a name, or a provider."""
    from attnplug.backends import BackendError, BackendSpecProvider, get_provider, resolve_backend

    if backend is None:
        return resolve_backend(config)
    if isinstance(backend, str):
        backend = get_provider(backend)
    if not isinstance(backend, BackendSpecProvider):
        raise ValueError(
            f"GPTModel: backend={backend!r} is not accepted: expected None, a backend name or a "
            "BackendSpecProvider"
        )
    provider = backend.configure(config)
    reasons = provider.supports(config)
    if reasons:
        raise BackendError(f"backend {provider.name!r} cannot build this model: "
                           + "; ".join(reasons))
    return provider


def _whole_model_block(config: TransformerConfig,
                       provider: BackendSpecProvider) -> TransformerBlockSubmodules:
    """Every layer of the model, in order, and the final norm: the pipeline chunks joined."""
    from attnplug.specs import get_transformer_block_with_experimental_attention_variant_spec

    vp = config.virtual_pipeline_model_parallel_size
    stages: list[int | None] = [None] if vp is None else list(range(vp))
    layer_specs: list = []
    final_norm = None
    for stage in stages:
        for rank in range(config.pipeline_model_parallel_size):
            chunk = get_transformer_block_with_experimental_attention_variant_spec(
                config, vp_stage=stage, pp_rank=rank, backend=provider
            )
            layer_specs.extend(chunk.layer_specs)
            final_norm = chunk.layer_norm if chunk.layer_norm is not None else final_norm
    if all("layer_id" in getattr(s, "metainfo", {}) for s in layer_specs):
        layer_specs.sort(key=lambda s: s.metainfo["layer_id"])
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


def _describe_layers(specs: list) -> list[dict[str, dict[str, str]]]:
    from attnplug.specs import describe_layer_spec

    return [describe_layer_spec(spec) for spec in specs]


class GPTModel(nn.Module):
    """A decoder-only language model over the hybrid block of ``config``.

    ``forward(input_ids[B, T]) -> logits[B, T, vocab_size]``. The whole model is built on this
    process (pipeline chunks are joined in layer order). ``backend`` is ``None`` (resolve
    ``config.backend``), a backend name, or a ``BackendSpecProvider``.

    Attributes: ``backend_name``; ``slots``, one ``{slot_path: {"class", "backend"}}`` per
    layer; ``output_slots`` for ``final_layernorm`` and ``output_layer``.
    Auxiliary losses of the latest forward: :meth:`auxiliary_losses`, :meth:`auxiliary_loss`.

    Raises ``ConfigError`` / ``ValueError`` naming a bad argument, ``BackendError`` when the
    backend cannot serve the config.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int,
                 max_sequence_length: int | None = None, *, backend: Any = None) -> None:
        super().__init__()
        check_config("GPTModel", config)
        self.config = config
        self.vocab_size = check_positive_int("GPTModel", "vocab_size", vocab_size)
        if max_sequence_length is not None:
            check_positive_int("GPTModel", "max_sequence_length", max_sequence_length)
        self.max_sequence_length = max_sequence_length
        provider = _resolve_provider(config, backend)
        self.backend_name: str = provider.name
        block = _whole_model_block(config, provider)
        self.slots = _describe_layers(block.layer_specs)
        self.embedding = nn.Embedding(vocab_size, config.hidden_size, dtype=config.torch_dtype)
        init_normal(config.init_method_std)(self.embedding.weight)
        self.decoder = TransformerBlock(config, block)
        output_cls = provider.column_parallel_linear()
        self.output_layer = build_module(output_cls, config.hidden_size, vocab_size,
                                         config=config, bias=False)
        self.output_slots = self._describe_outputs(block, provider, output_cls)

    @staticmethod
    def _describe_outputs(block: TransformerBlockSubmodules, provider: BackendSpecProvider,
                          output_cls: Any) -> dict[str, dict[str, str]]:
        from attnplug.spec import spec_name
        from attnplug.specs import describe_slot

        out = {"output_layer": {"class": spec_name(output_cls),
                                "backend": provider.served_by("column_parallel_linear")}}
        if block.layer_norm is not None:
            out["final_layernorm"] = describe_slot(block.layer_norm)
        return out

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or input_ids.dtype not in (torch.int64, torch.int32)):
            desc = (f"{tuple(input_ids.shape)} {input_ids.dtype}"
                    if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise ValueError(f"GPTModel: input_ids must be an integer tensor [batch, seq]; "
                             f"got {desc}")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("GPTModel: input_ids has no tokens (seq = 0)")
        if self.max_sequence_length is not None and T > self.max_sequence_length:
            raise ValueError(f"GPTModel: input_ids has {T} tokens, more than "
                             f"max_sequence_length={self.max_sequence_length}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_input_ids(input_ids)
        clear_aux_losses(self)
        h = self.embedding(input_ids)  # (B, T, hidden)
        h = self.decoder(h)  # (B, T, hidden)
        return self.output_layer(h)  # (B, T, vocab)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The auxiliary losses of the latest forward, summed over layers by name (coefficients
        applied): e.g. ``"moe_load_balancing"``, ``"dsa_indexer"``. Empty when none."""
        return collect_aux_losses(self)

    def auxiliary_loss(self) -> torch.Tensor:
        """The sum of :meth:`auxiliary_losses` (a 0-dim tensor; 0 when there are none)."""
        losses = list(self.auxiliary_losses().values())
        if not losses:
            return torch.zeros((), device=self.embedding.weight.device)
        return torch.stack([loss.float() for loss in losses]).sum()
