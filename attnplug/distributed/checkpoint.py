"""Checkpoints that move between process counts: torch.distributed.checkpoint (DCP).

A multi-process run's ``--save PATH`` writes a directory::

    PATH/.metadata, PATH/*.distcp   DCP: {"model": {name: tensor}, "optimizer": {name: {...}}}
    PATH/train_state.pt             the rest (step, scheduler, RNG, configs, losses), rank 0

Tensors are keyed by the whole model's parameter names (``decoder.layers.3.mlp...``) whatever
the layout: a pipeline rank writes its own layers, FSDP ranks write their shards of each
tensor, and DCP reassembles or re-shards them for whoever loads — 1 process, 2 pipeline ranks,
2 FSDP ranks. The optimizer entries are AdamW's per-parameter ``step``, ``exp_avg`` and
``exp_avg_sq``; the learning rate is the scheduler's, restored from ``train_state.pt``.

Both directions across process counts work:

* a single process resumes a directory (``attnplug.train`` calls :func:`read_checkpoint_dir`
  when ``--resume`` names a directory);
* a multi-process run resumes a single-process file (:func:`load_single_file`) or a directory
  (:func:`load_checkpoint_dir`).

The directory must be on a file system every process sees (one machine, or a shared mount).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from attnplug._errors import ConfigError

__all__ = [
    "META_FILE",
    "ensure_optimizer_state",
    "load_checkpoint_dir",
    "load_single_file",
    "optimizer_state_by_name",
    "read_checkpoint_dir",
    "read_meta",
    "save_checkpoint_dir",
]

META_FILE = "train_state.pt"
_DCP_METADATA = ".metadata"


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (zeros) without moving any parameter.

    AdamW creates its state lazily at the first step; a checkpoint is loaded *into* that state,
    so it must exist first. Runs one step with zero gradients and ``lr = 0`` (which leaves the
    parameters as they are), like ``torch.distributed.checkpoint.state_dict`` does.
    """
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def optimizer_state_by_name(named_parameters: Iterable[tuple[str, nn.Parameter]],
                            optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """``{parameter name: its optimizer state}`` (the state's own tensors, not copies)."""
    return {name: optimizer.state[p] for name, p in named_parameters if p in optimizer.state}


def _set_learning_rates(optimizer: torch.optim.Optimizer, scheduler_state: dict[str, Any]) -> None:
    """The learning rate each group had when the checkpoint was written (the scheduler's)."""
    for group, lr in zip(optimizer.param_groups, scheduler_state["_last_lr"], strict=False):
        group["lr"] = lr


# -- writing ------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint_dir(path: str | Path, model_state: dict[str, Any],
                        optimizer_state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a checkpoint directory at ``path`` from every process (collective).

    ``model_state`` / ``optimizer_state`` are this process's part, keyed by parameter name
    (DTensor shards allowed); ``meta`` (plain values and CPU tensors) is written by rank 0. The
    directory is written next to ``path`` and renamed into place at the end, so an interrupted
    save leaves the previous checkpoint whole.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    if _rank() == 0:
        torch.save(meta, tmp / META_FILE)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp.rename(path)
    _barrier()


# -- reading -----------------------------------------------------------------------------------


def read_meta(path: str | Path, *, checkpoint_format: str) -> dict[str, Any]:
    """The ``train_state.pt`` of the checkpoint directory ``path``.

    Returns:
        Everything of the checkpoint but the tensors: ``format``, ``step``, ``scheduler``,
        ``rng``, ``model_config``, ``train_config``, ``losses``, ``evals``, ...

    Raises:
        ConfigError: ``path`` is not a checkpoint directory of ``checkpoint_format``.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file() or not (path / _DCP_METADATA).is_file():
        raise ConfigError(f"--resume {str(path)!r}: a directory, but not an attnplug "
                          f"checkpoint (no {META_FILE} and {_DCP_METADATA} in it)")
    try:
        meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, not a torch file, unsafe contents
        raise ConfigError(f"--resume {str(path)!r}: {META_FILE} is not readable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != checkpoint_format:
        raise ConfigError(f"--resume {str(path)!r}: not an attnplug train checkpoint")
    return meta


def load_checkpoint_dir(path: str | Path, model_state: dict[str, Any],
                        optimizer_state: dict[str, Any]) -> None:
    """Fill ``model_state`` / ``optimizer_state`` (this process's tensors, keyed by name) in
    place from the checkpoint directory ``path``, whatever process count wrote it.

    Collective when a process group is up; a single process reads on its own.
    """
    import torch.distributed.checkpoint as dcp

    state = {"model": model_state, "optimizer": optimizer_state}
    if dist.is_initialized():
        dcp.load(state, checkpoint_id=str(path))
        return
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def read_checkpoint_dir(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        checkpoint_format: str) -> dict[str, Any]:
    """Load the checkpoint directory ``path`` into a single-process ``model`` and ``optimizer``
    and return it as the single-process trainer's checkpoint dict (``step``, ``model``,
    ``optimizer``, ``scheduler``, ``rng``, configs, ``losses``, ``evals``).

    Raises:
        ConfigError: ``path`` is not a checkpoint directory.
    """
    meta = read_meta(path, checkpoint_format=checkpoint_format)
    ensure_optimizer_state(optimizer)
    model_state = model.state_dict()  # views of the parameters: loaded in place
    load_checkpoint_dir(path, model_state,
                        optimizer_state_by_name(model.named_parameters(), optimizer))
    _set_learning_rates(optimizer, meta["scheduler"])
    return {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _full_to_local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor ``full`` that the (possibly sharded) ``like`` holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements,
                                 src_data_rank=None).to_local()
    return full


def _copy_from_full(target: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    local = target.to_local() if isinstance(target, DTensor) else target
    with torch.no_grad():
        local.copy_(_full_to_local(full, target))


def load_single_file(state: dict[str, Any], model_state: dict[str, torch.Tensor],
                     optimizer_state: dict[str, dict[str, Any]],
                     optimizer_names: list[str], optimizer: torch.optim.Optimizer) -> None:
    """Fill this process's tensors from a single-process checkpoint ``state`` (the dict
    ``torch.load`` gives for a ``--save`` file of one process).

    ``optimizer_names`` are the parameter names in the order of that process's optimizer
    (``state["optimizer"]`` numbers parameters in that order). Every process holds the whole
    file and keeps its own layers, and of each tensor its own shard.
    """
    for name, tensor in model_state.items():
        _copy_from_full(tensor, state["model"][name])
    saved = state["optimizer"]["state"]
    index = {name: i for i, name in enumerate(optimizer_names)}
    for name, entries in optimizer_state.items():
        for key, value in entries.items():
            full = saved[index[name]][key]
            if value.dim() == 0:
                value.copy_(full)
            else:
                _copy_from_full(value, full)
    _set_learning_rates(optimizer, state["scheduler"])
