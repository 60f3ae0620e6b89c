"""The ``[parallel]`` table and how a run's processes are laid out.

``world size = pipeline_model_parallel_size × data-parallel size``: the pipeline size comes from
``[model]``, the data-parallel size is whatever is left of the processes ``torchrun`` started.

``microbatches`` counts the micro-batches of one optimizer step over *all* data-parallel ranks
together: a step's batch (``[train] batch_size`` rows) is cut into ``microbatches`` equal,
consecutive pieces; data-parallel rank ``d`` of ``D`` takes pieces ``d·M/D .. (d+1)·M/D - 1``
(consecutive rows) and runs them one by one, through the pipeline schedule when there is one.
The objective of a step is the same whatever the layout::

    loss = Σ_pieces [ CE_sum(piece) / targets_in_batch + aux_losses(piece) / microbatches ]

so a single process with the same ``microbatches`` (which accumulates gradients over the
pieces) trains exactly the same model as 2 pipeline ranks or 2 data-parallel ranks. The
cross-entropy part does not depend on ``microbatches`` at all; the auxiliary losses (MoE load
balancing, the DSA indexer's loss) are statistics of the rows they see, so for a model with
them ``microbatches`` is part of the objective.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import attrs

from attnplug._errors import ConfigError
from attnplug.config import TomlTable, _bool, _choice, _int

__all__ = ["SCHEDULES", "Layout", "ParallelConfig", "resolve_layout", "world_size_from_env"]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
INTERLEAVED = "interleaved_1f1b"


@attrs.frozen(kw_only=True)
class ParallelConfig(TomlTable):
    """The ``[parallel]`` table: how a multi-process run splits the work.

    ``fsdp``: shard parameters, gradients and optimizer states over the data-parallel ranks
    (FSDP2 ``fully_shard``); without it there is no data parallelism, and every process must be
    a pipeline rank. ``schedule``: the pipeline schedule, ``"gpipe"``, ``"1f1b"`` or
    ``"interleaved_1f1b"`` (the last exactly when ``[model]
    virtual_pipeline_model_parallel_size`` is set); ``None`` picks ``"interleaved_1f1b"`` with
    virtual stages and ``"1f1b"`` without. ``microbatches``: micro-batches per optimizer step over
    all data-parallel ranks together (see the module docstring); ``None`` means
    ``data-parallel size × pipeline_model_parallel_size`` (1 in a single process).

    Raises ``ConfigError`` naming ``[parallel] <field>`` for a bad value.
    """

    TABLE: ClassVar[str] = "parallel"

    fsdp: bool = False
    schedule: str | None = None
    microbatches: int | None = None

    def __attrs_post_init__(self) -> None:
        f = "[parallel] {}".format
        _bool(f("fsdp"), self.fsdp)
        if self.schedule is not None:
            _choice(f("schedule"), self.schedule, SCHEDULES)
        _int(f("microbatches"), self.microbatches, optional=True)



@attrs.frozen(kw_only=True)
class Layout:
    """How a run's ``world_size`` processes split the work (see :func:`resolve_layout`).

    ``microbatches`` is the step's total; ``local_microbatches`` (``microbatches / dp``) is what
    each data-parallel rank runs, and what the pipeline schedule is built for.
    """

    world_size: int
    pp: int
    vp: int | None
    dp: int
    fsdp: bool
    schedule: str | None
    microbatches: int
    local_microbatches: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (for the ``--json`` result)."""
        return attrs.asdict(self)


def _check_schedule(parallel: ParallelConfig, vp: int | None) -> str:
    """The schedule, ``None`` resolved; ``interleaved_1f1b`` exactly with virtual stages."""
    vp_field = "[model] virtual_pipeline_model_parallel_size"
    schedule = parallel.schedule
    if schedule is None:
        return INTERLEAVED if vp is not None else "1f1b"
    if schedule == INTERLEAVED and vp is None:
        raise ConfigError(f"[parallel] schedule={schedule!r} is not accepted: the interleaved "
                          f"schedule runs several chunks per rank; set {vp_field} (>= 2 chunks)"
                          " or pick 'gpipe' or '1f1b'")
    if schedule != INTERLEAVED and vp is not None:
        raise ConfigError(f"[parallel] schedule={schedule!r} is not accepted with {vp_field}={vp}:"
                          f" virtual pipeline stages need schedule = {INTERLEAVED!r}")
    return schedule


def _check_world(parallel: ParallelConfig, pp: int, world_size: int) -> int:
    """The data-parallel size ``world_size / pp``; ``ConfigError`` when it does not work."""
    if world_size % pp:
        raise ConfigError(
            f"{world_size} processes is not accepted with [model] pipeline_model_parallel_size="
            f"{pp}: the number of processes must be pipeline_model_parallel_size × the "
            f"data-parallel size, a multiple of {pp} (torchrun --nproc-per-node {pp}, "
            f"{2 * pp}, ...)"
        )
    dp = world_size // pp
    if dp > 1 and not parallel.fsdp:
        raise ConfigError(
            f"[parallel] fsdp=False is not accepted with {world_size} processes and [model] "
            f"pipeline_model_parallel_size={pp}: that is a data-parallel size of {dp}, and "
            "data parallelism runs sharded; set [parallel] fsdp = true, or start "
            f"{pp} process{'es' if pp > 1 else ''}"
        )
    return dp


def _check_microbatches(parallel: ParallelConfig, batch_size: int, pp: int, dp: int,
                        schedule: str | None) -> tuple[int, int]:
    """``(microbatches, local_microbatches)``, checked against the batch and the schedule."""
    field = "[parallel] microbatches"
    total = parallel.microbatches if parallel.microbatches is not None else dp * pp
    if total % dp:
        raise ConfigError(f"{field}={total} is not accepted with {dp} data-parallel ranks: "
                          f"expected a multiple of {dp} (each rank runs microbatches / {dp})")
    if batch_size % total:
        raise ConfigError(f"{field}={total} is not accepted with [train] batch_size="
                          f"{batch_size}: the batch must split into equal micro-batches; "
                          f"expected a divisor of {batch_size}")
    local = total // dp
    if schedule in ("1f1b", INTERLEAVED) and pp > 1 and local < pp:
        raise ConfigError(f"{field}={total} is not accepted: schedule {schedule!r} needs at "
                          f"least pipeline_model_parallel_size={pp} micro-batches per "
                          f"data-parallel rank, here {total} / {dp} = {local}; expected "
                          f"microbatches >= {pp * dp}")
    if schedule == INTERLEAVED and local % max(1, local // pp):
        rounds = local // pp
        raise ConfigError(f"{field}={total} is not accepted: schedule {schedule!r} runs "
                          f"{local} micro-batches per data-parallel rank in {rounds} rounds of "
                          f"pipeline_model_parallel_size={pp}; expected a multiple of {rounds}"
                          f" per rank")
    return total, local


def resolve_layout(parallel: ParallelConfig, model_cfg: Any, batch_size: int,
                   world_size: int) -> Layout:
    """How ``world_size`` processes run ``model_cfg`` under ``parallel``.

    One process (``world_size == 1``) builds the whole model whatever the pipeline fields say
    (``pp = dp = 1``, no schedule) and only ``microbatches`` applies (gradient accumulation).

    Returns:
        The checked :class:`Layout`.

    Raises:
        ConfigError: ``world_size`` is not a multiple of ``pipeline_model_parallel_size``; data
            parallelism without ``fsdp``; the schedule does not match the virtual stages;
            ``microbatches`` does not divide the batch, is not a multiple of the data-parallel
            size, or is too few for the schedule.
    """
    _int("world size", world_size)
    vp = model_cfg.virtual_pipeline_model_parallel_size
    schedule = _check_schedule(parallel, vp)
    if world_size == 1:
        pp, dp, vp, schedule = 1, 1, None, None
    else:
        pp = model_cfg.pipeline_model_parallel_size
        dp = _check_world(parallel, pp, world_size)
        if pp == 1:
            schedule = None
    total, local = _check_microbatches(parallel, batch_size, pp, dp, schedule)
    return Layout(world_size=world_size, pp=pp, vp=vp, dp=dp, fsdp=parallel.fsdp and dp > 1,
                  schedule=schedule, microbatches=total, local_microbatches=local)


def world_size_from_env() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without torchrun).

    Raises:
        ConfigError: ``WORLD_SIZE`` is set to something other than a whole number >= 1.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} is not accepted: expected a whole number >= 1 "
                          "(torchrun sets it)")
    return int(text)
