"""The objective of one step cut into micro-batches, and gradient accumulation over them.

A step's loss is ``Σ_pieces CE_sum(piece) / targets_in_batch + aux(piece) / microbatches`` (see
:mod:`attnplug.distributed.config`): every piece adds its share of the batch's mean
cross-entropy and of the auxiliary losses, so gradients summed over the pieces — by accumulation
in one process, by the pipeline schedule across stages, by FSDP's reduce-scatter across
data-parallel ranks — are the gradient of one and the same objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.data import IGNORE_INDEX

__all__ = ["TokenSumLoss", "accumulate_gradients", "count_targets", "split_rows"]


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many positions of ``targets`` have a target (are not ``-100``), at least 1.

    Returns:
        A 0-dim int64 tensor on ``targets.device``.
    """
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


class TokenSumLoss:
    """``loss(logits, targets) = CE_sum / num_targets`` in float32: one micro-batch's share of the
    batch's mean cross-entropy. Set ``num_targets`` (the whole batch's, all ranks together)
    before each step; it is the loss function handed to the pipeline schedule."""

    def __init__(self) -> None:
        self.num_targets: torch.Tensor | int = 1

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total / self.num_targets


def split_rows(tensor: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Rows ``index·B/parts .. (index+1)·B/parts - 1`` of ``tensor`` (``B`` divisible by
    ``parts``): data-parallel rank ``index``'s share of a batch."""
    rows = tensor.shape[0] // parts
    return tensor[index * rows:(index + 1) * rows]


def accumulate_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    microbatches: int,
    total_microbatches: int | None = None,
    num_targets: torch.Tensor | None = None,
    aux_loss: Callable[[], torch.Tensor] | None = None,
    before_backward: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward ``inputs``/``targets`` in ``microbatches`` consecutive pieces,
    adding to the parameters' ``.grad`` the gradient of
    ``Σ_k CE_sum_k / num_targets + aux_k / total_microbatches``.

    ``model(input_ids) -> logits``. ``aux_loss()`` returns the auxiliary loss of the latest
    forward, unweighted (e.g. ``GPTModel.auxiliary_loss``); ``None`` when the model attaches its
    own (a :class:`~attnplug.distributed.stage.PipelineStageModule`). ``num_targets`` defaults
    to the targets in ``targets``, ``total_microbatches`` to ``microbatches`` (set both when
    ``inputs`` is one data-parallel rank's share). ``before_backward(k)`` runs before piece
    ``k``'s backward (FSDP: turn gradient reduction on for the last piece only).

    Returns:
        ``(cross-entropy, auxiliary loss)``: this call's parts of the objective, detached.
    """
    total = total_microbatches or microbatches
    count = num_targets if num_targets is not None else count_targets(targets)
    loss_fn = TokenSumLoss()
    loss_fn.num_targets = count
    ce_sum = torch.zeros((), device=inputs.device)
    aux_sum = torch.zeros((), device=inputs.device)
    for k, (ids, tgt) in enumerate(zip(inputs.chunk(microbatches), targets.chunk(microbatches),
                                       strict=True)):
        ce = loss_fn(model(ids), tgt)
        loss = ce
        if aux_loss is not None:
            aux = aux_loss() / total
            loss = loss + aux
            aux_sum += aux.detach()
        if before_backward is not None:
            before_backward(k)
        loss.backward()
        ce_sum += ce.detach()
    return ce_sum, aux_sum
