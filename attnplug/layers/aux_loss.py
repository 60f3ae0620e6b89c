"""Auxiliary losses: how layers report them and how a model collects them.

A module that produces an auxiliary loss (MoE load balancing, the DSA indexer's KL loss)
subclasses :class:`AuxLossMixin`. It calls :meth:`~AuxLossMixin.reset_aux_losses` at the start of
its ``forward`` and :meth:`~AuxLossMixin.record_aux_loss` when it has a loss, so
``module.aux_losses`` always holds the losses of its latest forward — already multiplied by their
coefficients — and nothing from before. :func:`collect_aux_losses` walks a module tree and sums
the losses by name; ``GPTModel.auxiliary_losses()`` is that walk over the model. No global state:
two models, or two micro-batches on one model, never see each other's losses.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AuxLossMixin", "collect_aux_losses", "clear_aux_losses"]


class AuxLossMixin:
    """Mixin for ``nn.Module`` s that produce auxiliary losses (see the module docstring)."""

    aux_losses: dict[str, torch.Tensor]

    def reset_aux_losses(self) -> None:
        """Forget the losses of the previous forward."""
        self.aux_losses = {}

    def record_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Record a 0-dim loss ``value`` (coefficient included) under ``name`` for this forward."""
        self.aux_losses[name] = value


def collect_aux_losses(module: nn.Module) -> dict[str, torch.Tensor]:
    """The auxiliary losses of every :class:`AuxLossMixin` under ``module``, summed by name."""
    totals: dict[str, torch.Tensor] = {}
    for sub in module.modules():
        if isinstance(sub, AuxLossMixin):
            for name, value in getattr(sub, "aux_losses", {}).items():
                totals[name] = value if name not in totals else totals[name] + value
    return totals


def clear_aux_losses(module: nn.Module) -> None:
    """Reset every :class:`AuxLossMixin` under ``module`` (drops the tensors and their graphs)."""
    for sub in module.modules():
        if isinstance(sub, AuxLossMixin):
            sub.reset_aux_losses()
