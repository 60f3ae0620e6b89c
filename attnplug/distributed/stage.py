"""One pipeline chunk of ``GPTModel``, built from the chunk's own spec.

:class:`PipelineStageModule` is what a pipeline rank holds for ``(pp_rank, vp_stage)``: the layers
``get_layer_ids(config, pp_rank, vp_stage)`` assigns it, built from
``get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage, pp_rank)``
with the layer numbers of ``get_transformer_layer_offset``; the embedding when it is the first
chunk; the final norm (part of the last chunk's spec) and the output layer when it is the last.

Parameter names are the whole model's: layer ``i`` of the model is ``decoder.layers.<i>`` in
whichever chunk holds it, so the chunks' state dicts are disjoint pieces of the
``GPTModel`` state dict. That is what lets a checkpoint written by N pipeline ranks load into
one process and back (see :mod:`attnplug.distributed.checkpoint`).

Initialisation. A chunk built on its own draws its weights from the RNG in another order than
the whole model does, so :func:`build_stage_modules` builds the whole ``GPTModel`` under the
run's seed first — exactly as a single process would — and copies each chunk's weights out of
it. That guarantees the same start as one process, at a price: every rank holds the whole model
(on the CPU) while its chunks are built; it is freed before training starts. A resumed run does
not pay it: its weights come from the checkpoint.

Auxiliary losses (MoE load balancing, the DSA indexer's loss) are produced inside a chunk, but
the loss function runs on the last chunk only. Each chunk therefore attaches its auxiliary
losses to its hidden states (before the output layer on the last chunk) with
:func:`attach_aux_loss`: the forward returns them unchanged (a copy: [B, T, hidden]); the
backward passes the output's gradient through and hands the auxiliary loss a gradient of
``weight`` — exactly as if ``weight * aux_loss`` had been added to the objective, whichever
stage computes the objective (Megatron-Core's ``MoEAuxLossAutoScaler`` trick).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnplug._errors import ConfigError
from attnplug.layers._checks import check_config, check_positive_int
from attnplug.layers.aux_loss import clear_aux_losses, collect_aux_losses
from attnplug.layers.linear import init_normal
from attnplug.layers.transformer import TransformerBlock
from attnplug.spec import build_module

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["PipelineStageModule", "attach_aux_loss", "build_stage_modules", "local_chunks"]


class _AttachAuxLoss(torch.autograd.Function):
    """A copy of ``output``; in backward, ``aux_loss`` receives a gradient of ``weight``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor,
                weight: float) -> torch.Tensor:
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        ctx.weight = weight
        return output.clone()  # a fresh tensor, not a view: FSDP hooks and in-place ops stay safe

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_aux = torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype,
                              device=grad_output.device)
        return grad_output, grad_aux, None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor,
                    weight: float = 1.0) -> torch.Tensor:
    """A copy of ``output`` that carries ``weight * aux_loss`` into whatever loss it reaches.

    Backpropagating any loss ``L`` through the returned tensor gives every parameter the
    gradient of ``L + weight * aux_loss``: the output's gradient passes through untouched and
    ``aux_loss`` gets ``d/d aux = weight``. ``aux_loss`` is a 0-dim tensor in the graph.

    Returns:
        A copy of ``output``, in the autograd graph of both.
    """
    return _AttachAuxLoss.apply(output, aux_loss, weight)


class _StageDecoder(nn.Module):
    """The chunk's layers under their global indices (``layers.<i>``) and the final norm."""

    def __init__(self, layer_ids: list[int], block: TransformerBlock) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(
            {str(i): layer for i, layer in zip(layer_ids, block.layers, strict=True)}
        )
        self.final_layernorm = block.final_layernorm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states  # (B, T, h)
        for layer in self.layers.values():
            x = layer(x)
        return x if self.final_layernorm is None else self.final_layernorm(x)


class PipelineStageModule(nn.Module):
    """Chunk ``(pp_rank, vp_stage)`` of ``GPTModel(config, vocab_size)``.

    ``forward(x) -> y``: the first chunk takes ``input_ids[B, T]`` (int64), the others the
    hidden states ``[B, T, hidden]`` of the chunk before; the last chunk returns
    ``logits[B, T, vocab_size]``, the others hidden states. In training mode with grad enabled,
    the chunk's auxiliary losses of this forward ride on ``y`` (:func:`attach_aux_loss`, weight
    ``aux_loss_weight``) and their detached, weighted sum is added to ``aux_loss_total`` (a
    0-dim tensor, ``None`` until a forward has one; reset it with :meth:`reset_aux_loss_total`).

    Attributes: ``pp_rank``, ``vp_stage``, ``stage_index`` (``vp_stage * pp + pp_rank``, the
    position in the pipeline), ``num_stages``, ``is_first``, ``is_last``, ``layer_ids``,
    ``backend_name``; ``embedding`` / ``output_layer`` are ``None`` where the chunk has none.

    Raises ``ConfigError`` for a bad argument or a rank/stage out of range, ``BackendError`` when
    the backend cannot serve the config.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, pp_rank: int,
                 vp_stage: int | None = None, *, max_sequence_length: int | None = None,
                 backend: Any = None, aux_loss_weight: float = 1.0) -> None:
        from attnplug.layers.model import _resolve_provider
        from attnplug.pipeline import get_layer_ids, get_transformer_layer_offset
        from attnplug.specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
            is_last_stage,
        )

        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.config = config
        self.vocab_size = check_positive_int(owner, "vocab_size", vocab_size)
        if max_sequence_length is not None:
            check_positive_int(owner, "max_sequence_length", max_sequence_length)
        self.max_sequence_length = max_sequence_length
        self.layer_ids = get_layer_ids(config, pp_rank, vp_stage)  # checks pp_rank, vp_stage
        self.pp_rank, self.vp_stage = pp_rank, vp_stage
        pp = config.pipeline_model_parallel_size
        self.num_stages = pp * (config.virtual_pipeline_model_parallel_size or 1)
        self.stage_index = (vp_stage or 0) * pp + pp_rank
        self.is_first = self.stage_index == 0
        self.is_last = is_last_stage(config, pp_rank, vp_stage)
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_loss_total: torch.Tensor | None = None

        provider = _resolve_provider(config, backend)
        self.backend_name: str = provider.name
        spec = get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=vp_stage, pp_rank=pp_rank, backend=provider
        )
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        self.embedding: nn.Embedding | None = None
        if self.is_first:
            self.embedding = nn.Embedding(vocab_size, config.hidden_size,
                                          dtype=config.torch_dtype)
            init_normal(config.init_method_std)(self.embedding.weight)
        self.decoder = _StageDecoder(self.layer_ids,
                                     TransformerBlock(config, spec, layer_offset=offset))
        self.output_layer: nn.Module | None = None
        if self.is_last:
            self.output_layer = build_module(provider.column_parallel_linear(),
                                             config.hidden_size, vocab_size, config=config,
                                             bias=False)

    def reset_aux_loss_total(self) -> None:
        """Start counting ``aux_loss_total`` from zero again (``None``: nothing counted)."""
        self.aux_loss_total = None

    def _check_input(self, x: torch.Tensor) -> None:
        """``ValueError`` unless ``x`` is what this stage takes (ids first, hidden states after)."""
        owner = type(self).__name__
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if self.is_first and (not isinstance(x, torch.Tensor) or x.dim() != 2
                              or x.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"{owner}: the first stage takes input_ids [batch, seq] (integers);"
                             f" got {shape}")
        if not self.is_first and (not isinstance(x, torch.Tensor) or x.dim() != 3):
            raise ValueError(f"{owner}: stage {self.stage_index} takes hidden states "
                             f"[batch, seq, hidden]; got {shape}")
        seq = x.shape[1]
        if self.max_sequence_length is not None and seq > self.max_sequence_length:
            raise ValueError(f"{owner}: the input has {seq} tokens, more than "
                             f"max_sequence_length={self.max_sequence_length}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        clear_aux_losses(self)
        h = self.embedding(x) if self.embedding is not None else x  # (B, T, hidden)
        h = self.decoder(h)  # (B, T, hidden)
        h = self._attach_aux_losses(h)
        return self.output_layer(h) if self.output_layer is not None else h  # (B, T, V | hidden)

    def _attach_aux_losses(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` carrying this forward's auxiliary losses (training with grad only), which are
        added to ``aux_loss_total``; the layers' references to them are dropped."""
        losses = list(collect_aux_losses(self).values())
        clear_aux_losses(self)  # the graph lives on through h
        if not losses or not torch.is_grad_enabled():
            return h
        aux = torch.stack([loss.float() for loss in losses]).sum()
        weighted = aux.detach() * self.aux_loss_weight
        total = self.aux_loss_total
        self.aux_loss_total = weighted if total is None else total + weighted
        return attach_aux_loss(h, aux, self.aux_loss_weight)

    def copy_weights_from(self, model: nn.Module) -> None:
        """Copy this chunk's parameters and buffers out of a whole ``GPTModel`` (same config).

        Raises:
            ConfigError: ``model`` lacks one of this chunk's entries or has another shape.
        """
        source = model.state_dict()
        mine = self.state_dict()
        missing = [name for name in mine if name not in source]
        if missing:
            raise ConfigError(f"{type(self).__name__}: the model has no {missing[0]!r}: expected "
                              "a GPTModel built from the same config")
        wrong = [n for n in mine if source[n].shape != mine[n].shape]
        if wrong:
            raise ConfigError(f"{type(self).__name__}: {wrong[0]!r} has shape "
                              f"{tuple(source[wrong[0]].shape)} in the model, "
                              f"{tuple(mine[wrong[0]].shape)} here: not the same config")
        self.load_state_dict({name: source[name] for name in mine})


def local_chunks(config: TransformerConfig) -> list[int | None]:
    """The virtual stages each pipeline rank holds, in order: ``[None]`` without virtual
    stages, else ``[0, .., vp - 1]`` (chunk ``v`` of rank ``r`` is pipeline stage
    ``v * pp + r``)."""
    vp = config.virtual_pipeline_model_parallel_size
    return [None] if vp is None else list(range(vp))


def build_stage_modules(config: TransformerConfig, vocab_size: int, pp_rank: int, *,
                        seed: int | None, max_sequence_length: int | None = None,
                        backend: Any = None,
                        aux_loss_weight: float = 1.0) -> list[PipelineStageModule]:
    """The chunks of rank ``pp_rank``, in pipeline order, initialised as one process would be.

    With ``seed`` set, the whole ``GPTModel`` is built under ``torch.manual_seed(seed)`` (as the
    single-process trainer does) and each chunk's weights are copied out of it; it is dropped
    before returning (peak memory: the whole model plus this rank's chunks). With
    ``seed=None`` the chunks keep the weights they were built with: for a run whose weights
    come from a checkpoint.

    Returns:
        One :class:`PipelineStageModule` per local chunk (``vp`` of them with virtual stages).

    Raises:
        ConfigError / BackendError: as ``GPTModel`` and :class:`PipelineStageModule` do.
    """
    full = None
    if seed is not None:
        from attnplug.layers.model import GPTModel

        torch.manual_seed(seed)
        full = GPTModel(config, vocab_size, max_sequence_length=max_sequence_length,
                        backend=backend)
    chunks = [
        PipelineStageModule(config, vocab_size, pp_rank, vp_stage,
                            max_sequence_length=max_sequence_length, backend=backend,
                            aux_loss_weight=aux_loss_weight)
        for vp_stage in local_chunks(config)
    ]
    if full is not None:
        for chunk in chunks:
            chunk.copy_weights_from(full)
    return chunks
