"""Training on several processes with ``torch.distributed``: FSDP2 data parallelism and pipeline
stages built from the pipeline slices (``torchrun --nproc-per-node N -m attnplug train``).

* :mod:`~attnplug.distributed.config` — the ``[parallel]`` table and the process layout;
* :mod:`~attnplug.distributed.stage` — one pipeline chunk of ``GPTModel`` built from its spec,
  and the auxiliary-loss carrier;
* :mod:`~attnplug.distributed.microbatch` — the step's objective cut into micro-batches;
* :mod:`~attnplug.distributed.engine` — a process's chunks, FSDP2, the pipeline schedule, a step;
* :mod:`~attnplug.distributed.checkpoint` — DCP checkpoints across process counts;
* :mod:`~attnplug.distributed.train` — the multi-process ``attnplug train``.

Heavy parts load on first use.
"""

from __future__ import annotations

from typing import Any

from attnplug.distributed.config import Layout, ParallelConfig, resolve_layout, world_size_from_env

__all__ = [
    "Layout",
    "ParallelConfig",
    "PipelineStageModule",
    "attach_aux_loss",
    "build_stage_modules",
    "resolve_layout",
    "world_size_from_env",
]

_LAZY = {
    "PipelineStageModule": "attnplug.distributed.stage",
    "attach_aux_loss": "attnplug.distributed.stage",
    "build_stage_modules": "attnplug.distributed.stage",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnplug.distributed' has no attribute {name!r}")
