"""``torchrun --nproc-per-node N -m attnplug train CONFIG.toml``: the multi-process run.

The same job as :func:`attnplug.train.run_train` — same ``[train]`` table, batches, optimizer,
schedule of the learning rate, progress, ``--json`` keys (plus ``"parallel"``), ``--save`` /
``--resume`` — with the model split over the processes as ``[model]`` and ``[parallel]`` say
(:mod:`attnplug.distributed.engine`). Every number it reports is over all processes; rank 0
reports. ``--save PATH`` writes a DCP checkpoint directory
(:mod:`attnplug.distributed.checkpoint`); ``--resume`` takes such a directory, from any number of
processes, or a single-process checkpoint file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from rich.console import Console
from torch.optim.lr_scheduler import LambdaLR

from attnplug._errors import ConfigError
from attnplug.config import TransformerConfig
from attnplug.data import make_task
from attnplug.distributed.checkpoint import (
    ensure_optimizer_state,
    load_checkpoint_dir,
    load_single_file,
    optimizer_state_by_name,
    read_meta,
    save_checkpoint_dir,
)
from attnplug.distributed.config import Layout, ParallelConfig, resolve_layout
from attnplug.distributed.engine import (
    Engine,
    build_engine,
    evaluate,
    process_group,
    resolve_process_device,
    train_step,
)

# the single-process trainer's pieces, shared so that both runs are one job
from attnplug.report import Reporter, save_plot, summarize_run, summary_table
from attnplug.train import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    TrainConfig,
    _arg,
    _check_resumable,
    _deterministic,
    _loop,
    _read_checkpoint,
    _restore_progress,
    _rng_states,
    make_optimizer,
    make_scheduler,
)

__all__ = ["run_distributed_train", "single_process_parameter_order"]


@attrs.define
class _Run:
    """What moves during a multi-process run (the single-process ``_Run``'s fields, plus the
    engine and the layout)."""

    model_cfg: TransformerConfig
    train_cfg: TrainConfig
    parallel_cfg: ParallelConfig
    layout: Layout
    engine: Engine
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    task: Any
    step: int = 0
    losses: list[float] = attrs.field(factory=list)
    evals: list[dict[str, float]] = attrs.field(factory=list)
    aux_loss: float = 0.0
    train_seconds: float = 0.0
    tokens: int = 0
    step_times: list[tuple[int, float]] = attrs.field(factory=list)  # this session's steps

    @property
    def model(self) -> Any:
        """This process's chunks (``backend_name``, ``parameters()``)."""
        return self.engine.model


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def _rank0_note(text: str) -> None:
    """A note on stderr from rank 0 (like the single-process run's, even with ``--json``)."""
    if _is_rank0():
        Console(stderr=True).print(text, highlight=False)


def _start(model_cfg: TransformerConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
           layout: Layout, device: torch.device, *, resuming: bool) -> _Run:
    task = make_task(train_cfg)
    engine = build_engine(model_cfg, layout, device, vocab_size=task.vocab_size,
                          batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
                          seed=None if resuming else train_cfg.seed)
    optimizer = make_optimizer(engine.model, train_cfg)
    return _Run(model_cfg=model_cfg, train_cfg=train_cfg, parallel_cfg=parallel_cfg,
                layout=layout, engine=engine, optimizer=optimizer,
                scheduler=make_scheduler(optimizer, train_cfg), task=task)


def _train_step(run: _Run) -> float:
    """One optimizer step on the batch of ``run.step``; returns its cross-entropy.

    Raises:
        ConfigError: the loss is not finite (the run diverged; every process raises).
    """
    batch = run.task.train_batch(run.step)
    ce, aux = train_step(run.engine, run.optimizer, batch, run.train_cfg.grad_clip)
    if not math.isfinite(ce + aux):
        cfg = run.train_cfg
        raise ConfigError(f"training diverged at step {run.step + 1} (loss={ce + aux}): "
                          f"lower [train] lr (now {cfg.lr}) or set [train] grad_clip")
    run.scheduler.step()
    run.step += 1
    run.aux_loss = aux
    run.tokens += batch[0].numel()
    return ce


def _eval(run: _Run, reporter: Reporter) -> None:
    loss, accuracy = evaluate(run.engine, run.task, run.train_cfg.eval_batches)
    run.evals.append({"step": run.step, "loss": loss, "accuracy": accuracy})
    reporter.message(f"step {run.step}: eval loss {loss:.4f}, accuracy {accuracy:.1%}")


# -- checkpoints --------------------------------------------------------------------------------


def _save(run: _Run, path: str | Path) -> None:
    """Write the run's checkpoint directory (collective)."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": run.step,
        "scheduler": run.scheduler.state_dict(),
        "rng": _rng_states(),
        "model_config": run.model_cfg.to_dict(),
        "train_config": run.train_cfg.to_dict(),
        "parallel_config": run.parallel_cfg.to_dict(),
        "layout": run.layout.to_dict(),
        "losses": list(run.losses),
        "evals": list(run.evals),
    }
    ensure_optimizer_state(run.optimizer)
    save_checkpoint_dir(path, run.model.model_state(),
                        optimizer_state_by_name(run.model.named_model_parameters(),
                                                run.optimizer), meta)


def single_process_parameter_order(model_cfg: TransformerConfig, train_cfg: TrainConfig,
                                   vocab_size: int) -> list[str]:
    """The parameter names in the order a single-process run's optimizer numbers them (what its
    checkpoint's ``optimizer`` state is keyed by). Built on the meta device: no memory."""
    from attnplug.train import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, vocab_size, train_cfg.seq_len)
    optimizer = make_optimizer(model, train_cfg)
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _resume(run: _Run, path: str | Path, note: Callable[[str], None]) -> None:
    """Restore ``run`` from a checkpoint directory (any process count) or a single-process file.

    Raises:
        ConfigError: not a checkpoint, or its settings differ from the run's.
    """
    ensure_optimizer_state(run.optimizer)
    model_state = run.model.model_state()
    optimizer_state = optimizer_state_by_name(run.model.named_model_parameters(), run.optimizer)
    if Path(path).is_dir():
        state = read_meta(path, checkpoint_format=CHECKPOINT_FORMAT)
        _check_resumable(state, run, path)
        load_checkpoint_dir(path, model_state, optimizer_state)
        for group, lr in zip(run.optimizer.param_groups, state["scheduler"]["_last_lr"],
                             strict=False):
            group["lr"] = lr
    else:
        state = _read_checkpoint(path)
        _check_resumable(state, run, path)
        names = single_process_parameter_order(run.model_cfg, run.train_cfg,
                                               run.task.vocab_size)
        load_single_file(state, model_state, optimizer_state, names, run.optimizer)
    _restore_progress(run, state, note)


# -- the job ------------------------------------------------------------------------------------


def _parameter_count(run: _Run) -> int:
    """Parameters of the whole model: each pipeline rank counts its own (DTensors count whole),
    summed over the pipeline ranks of one data-parallel replica."""
    local = sum(p.numel() for p in run.model.parameters())
    count = torch.tensor(float(local), dtype=torch.float64, device=run.engine.device)
    dist.all_reduce(count)
    return int(count.item()) // run.layout.dp


def _summarize(run: _Run, wall_seconds: float) -> dict[str, Any]:
    """The results (``attnplug.train``'s ``--json`` keys, and ``"parallel"``: the layout)."""
    result = summarize_run(run, wall_seconds, device=run.engine.device.type,
                           parameters=_parameter_count(run))
    return {**result, "parallel": run.layout.to_dict()}


def run_distributed_train(args: argparse.Namespace, model_cfg: TransformerConfig,
                          train_cfg: TrainConfig, parallel_cfg: ParallelConfig,
                          world_size: int) -> int:
    """Run ``attnplug train`` as one of the ``world_size`` processes torchrun started.

    Rank 0 prints what the single-process run prints (progress on stderr, the summary or the
    ``--json`` object on stdout); the other ranks print nothing but errors.

    Returns:
        0 when the run finished.

    Raises:
        ConfigError: a bad layout for this many processes (see
            :func:`~attnplug.distributed.config.resolve_layout`), checkpoint or option, or a
            diverged run.
        BackendError: the backend cannot build this model here.
    """
    layout = resolve_layout(parallel_cfg, model_cfg, train_cfg.batch_size, world_size)
    device = resolve_process_device(train_cfg.device)
    resume = _arg(args, "resume")
    with process_group(device), _deterministic(device):
        wall = time.perf_counter()
        run = _start(model_cfg, train_cfg, parallel_cfg, layout, device,
                     resuming=bool(resume))
        quiet = bool(_arg(args, "json")) or not _is_rank0()
        with Reporter(run, quiet=quiet) as reporter:
            if resume:
                _resume(run, resume, _rank0_note)
            _loop(run, reporter, _arg(args, "save"), _arg(args, "save_every"),
                  train_step=_train_step, evaluate_run=_eval, save_run=_save)
        if _arg(args, "save"):
            _save(run, args.save)
        result = _summarize(run, time.perf_counter() - wall)
        rank0 = _is_rank0()
        # The model, optimizer and pipeline schedule hold communication state (FSDP2's work
        # handles among it): free them while the process group is up, not at interpreter exit,
        # where a gloo work object freed during finalisation can abort the process.
        del run
        gc.collect()
    if not rank0:
        return 0
    if _arg(args, "plot"):
        save_plot(result, args.plot)
    if _arg(args, "json"):
        print(json.dumps(result))
    else:
        Console().print(summary_table(result))
    return 0
