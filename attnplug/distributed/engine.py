"""What each process of a multi-process run holds and does in one step.

The processes form a ``(pp, dp)`` device mesh (global rank ``pp_rank · dp + dp_rank``). Each
builds its pipeline chunks (:func:`~attnplug.distributed.stage.build_stage_modules`), wraps them
in FSDP2 over the ``dp`` dimension when there is data parallelism (every decoder layer, then the
chunk), and, with pipeline parallelism, a ``torch.distributed.pipelining`` stage per chunk and
the schedule over them. A step: the same batch on every process (it is a pure function of the
step), each data-parallel rank keeps its rows, the schedule (or, without a pipeline, plain
gradient accumulation) runs its micro-batches; gradients are summed — over micro-batches, across
stages by the schedule's backward, across data-parallel ranks by FSDP's reduce-scatter with a
divide factor of 1 — and clipped by their global norm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from attnplug._errors import ConfigError
from attnplug.data import IGNORE_INDEX
from attnplug.distributed.config import INTERLEAVED, Layout
from attnplug.distributed.microbatch import (
    TokenSumLoss,
    accumulate_gradients,
    count_targets,
    split_rows,
)
from attnplug.distributed.stage import PipelineStageModule, build_stage_modules

__all__ = [
    "Engine",
    "LocalModel",
    "build_engine",
    "clip_grad_norm",
    "evaluate",
    "process_group",
    "resolve_process_device",
    "train_step",
]


def resolve_process_device(name: str) -> torch.device:
    """This process's device for ``[train] device``: ``cuda:LOCAL_RANK`` (made current) when
    CUDA is asked for or ``"auto"`` finds it, else the CPU.

    Raises:
        ConfigError: ``"cuda"`` without a CUDA device, or fewer CUDA devices than local ranks.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("[train] device='cuda' is not accepted here: torch sees no CUDA device;"
                          " expected 'cpu' or 'auto'")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU: this machine has "
                          f"{torch.cuda.device_count()}; start at most that many processes per "
                          "node (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The default process group for the duration, from torchrun's environment: gloo on the CPU,
    NCCL for CUDA tensors (with gloo beside it for CPU ones). One that is already up is used and
    left up."""
    if dist.is_initialized():
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)
    try:
        yield
        dist.barrier()  # nobody tears the group down while another process still uses it
    finally:
        dist.destroy_process_group()


class LocalModel(nn.Module):
    """This process's chunks as one module: for the optimizer, ``train()``/``eval()`` and
    counting. :meth:`model_state` is its part of the whole model's state dict."""

    def __init__(self, chunks: list[PipelineStageModule]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.backend_name: str = chunks[0].backend_name

    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name in the whole model, parameter)`` for every local parameter."""
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def model_state(self) -> dict[str, Any]:
        """The local part of the whole model's state dict (FSDP: sharded DTensors)."""
        state: dict[str, Any] = {}
        for chunk in self.chunks:
            state.update(chunk.state_dict())
        return state


@attrs.define
class Engine:
    """This process's share of a run: its mesh coordinates, chunks and schedule."""

    layout: Layout
    device: torch.device
    mesh: Any  # DeviceMesh ("pp", "dp")
    pp_rank: int
    dp_rank: int
    model: LocalModel
    schedule: Any  # a torch.distributed.pipelining schedule, None without pipeline parallelism
    loss_fn: TokenSumLoss
    replicated: list[nn.Parameter] = attrs.field(factory=list)  # whole on every dp rank

    @property
    def chunks(self) -> list[PipelineStageModule]:
        """The local chunks, in pipeline order."""
        return list(self.model.chunks)

    @property
    def holds_first(self) -> bool:
        """Whether this process runs the embedding (pipeline stage 0)."""
        return any(chunk.is_first for chunk in self.model.chunks)

    @property
    def holds_last(self) -> bool:
        """Whether this process runs the output layer (the last pipeline stage)."""
        return any(chunk.is_last for chunk in self.model.chunks)


def _shard(chunk: PipelineStageModule, dp_mesh: Any) -> list[nn.Parameter]:
    """FSDP2 over the data-parallel ranks: each decoder layer, then the chunk; gradients are
    summed (divide factor 1: the objective already divides by the whole batch).

    FSDP2 needs one dtype per group; parameters a layer keeps in another dtype than the model's
    (Gated DeltaNet's float32 ``A_log`` and ``dt_bias`` in a bfloat16 model) stay whole on every
    rank instead, and their gradients are summed by :func:`_sum_replicated_grads`.

    Returns:
        Those replicated parameters (none when every parameter has the model's dtype).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dtype = chunk.config.torch_dtype
    replicated = [p for p in chunk.parameters() if p.dtype != dtype]

    def ignored(module: nn.Module) -> set[nn.Parameter] | None:
        mine = {p for p in module.parameters() if p.dtype != dtype}
        return mine or None

    for layer in chunk.decoder.layers.values():
        fully_shard(layer, mesh=dp_mesh, ignored_params=ignored(layer))
    fully_shard(chunk, mesh=dp_mesh, ignored_params=ignored(chunk))
    for module in chunk.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
    return replicated


def _sum_replicated_grads(engine: Engine) -> None:
    """Sum the gradients of the parameters FSDP left whole over the data-parallel ranks."""
    if engine.layout.dp == 1:
        return
    group = engine.mesh.get_group("dp")
    for p in engine.replicated:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def _pipeline_stage(chunk: PipelineStageModule, device: torch.device, pp_group: Any,
                    seq_len: int, rows: int) -> Any:
    """A ``PipelineStage`` with its shapes given up front (static metadata: no shape-inference
    forward). Activations and their gradients cross stages as ``[rows, seq_len, hidden]``."""
    from torch.distributed.pipelining import PipelineStage

    cfg = chunk.config
    dtype = cfg.torch_dtype

    def activation(width: int) -> torch.Tensor:
        return torch.empty(rows, seq_len, width, dtype=dtype, device=device, requires_grad=True)

    inputs = (torch.empty(rows, seq_len, dtype=torch.long, device=device) if chunk.is_first
              else activation(cfg.hidden_size))
    outputs = activation(chunk.vocab_size if chunk.is_last else cfg.hidden_size)
    return PipelineStage(chunk, chunk.stage_index, chunk.num_stages, device,
                         input_args=inputs, output_args=outputs, group=pp_group)


def _schedule(layout: Layout, stages: list[Any], loss_fn: TokenSumLoss) -> Any:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    kwargs = {"loss_fn": loss_fn, "scale_grads": False}  # the loss divides by the whole batch
    if layout.schedule == INTERLEAVED:
        return ScheduleInterleaved1F1B(stages, layout.local_microbatches, **kwargs)
    cls = ScheduleGPipe if layout.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], layout.local_microbatches, **kwargs)


def build_engine(model_cfg: Any, layout: Layout, device: torch.device, *, vocab_size: int,
                 batch_size: int, seq_len: int, seed: int | None) -> Engine:
    """Set up this process's share of the run (collective: every process calls it).

    ``seed``: initialise the weights as one process would under this seed; ``None`` leaves them
    to a checkpoint that is loaded next.

    Returns:
        The :class:`Engine`: mesh coordinates, chunks (FSDP-wrapped with data parallelism) and
        the pipeline schedule (``None`` without pipeline parallelism).

    Raises:
        ConfigError / BackendError: the model cannot be built.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (layout.pp, layout.dp), mesh_dim_names=("pp", "dp"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    chunks = build_stage_modules(model_cfg, vocab_size, pp_rank, seed=seed,
                                 max_sequence_length=seq_len,
                                 aux_loss_weight=1.0 / layout.microbatches)
    replicated: list[nn.Parameter] = []
    for chunk in chunks:
        chunk.to(device)
        if layout.fsdp:
            replicated += _shard(chunk, mesh["dp"])
    loss_fn = TokenSumLoss()
    schedule = None
    if layout.pp > 1:
        rows = batch_size // layout.microbatches
        stages = [_pipeline_stage(chunk, device, mesh.get_group("pp"), seq_len, rows)
                  for chunk in chunks]
        schedule = _schedule(layout, stages, loss_fn)
    return Engine(layout=layout, device=device, mesh=mesh, pp_rank=pp_rank, dp_rank=dp_rank,
                  model=LocalModel(chunks), schedule=schedule, loss_fn=loss_fn,
                  replicated=replicated)


def _all_reduce_sum(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """Sum each value over every process; returns Python floats."""
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                          for v in values])
    dist.all_reduce(packed)
    return packed.tolist()


def _local_batch(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of this data-parallel rank, and the whole batch's target count."""
    inputs, targets = (t.to(engine.device) for t in batch)
    dp, rank = engine.layout.dp, engine.dp_rank
    return split_rows(inputs, dp, rank), split_rows(targets, dp, rank), count_targets(targets)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, device: torch.device, *,
                   replicated: list[nn.Parameter] = (), count_replicated: bool = True) -> float:
    """Scale the gradients so that their norm over *every* process is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_``'s rule: ``coef = min(1, max_norm / (norm + 1e-6))``).

    Pipeline ranks hold different parameters and FSDP ranks different shards, so the squares
    of the local gradients add up over all processes to the square of the whole norm. The
    ``replicated`` ones (whole on every data-parallel rank) count only where
    ``count_replicated`` (data-parallel rank 0).

    Returns:
        The norm before clipping.
    """
    from torch.distributed.tensor import DTensor

    skipped = set() if count_replicated else set(replicated)
    square = torch.zeros((), dtype=torch.float32, device=device)
    local = []
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        local.append(g)
        if p not in skipped:
            square += g.float().pow(2).sum()
    dist.all_reduce(square)
    norm = square.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))
    return float(norm)


def _pipeline_backward(engine: Engine, inputs: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
    """Run the schedule's forwards and backwards; returns this rank's cross-entropy part."""
    losses: list[torch.Tensor] = []
    args = (inputs,) if engine.holds_first else ()
    engine.schedule.step(*args, target=targets if engine.holds_last else None, losses=losses,
                         return_outputs=False)
    if not losses:
        return torch.zeros((), device=engine.device)
    return torch.stack([loss.detach().float() for loss in losses]).sum()


def _fsdp_backward(engine: Engine, inputs: torch.Tensor, targets: torch.Tensor,
                   count: torch.Tensor) -> torch.Tensor:
    """Accumulate over the local micro-batches; FSDP reduces the gradients after the last."""
    (chunk,) = engine.chunks
    local = engine.layout.local_microbatches

    def before_backward(k: int) -> None:
        if engine.layout.fsdp:
            chunk.set_requires_gradient_sync(k == local - 1)

    ce, _ = accumulate_gradients(chunk, inputs, targets, microbatches=local,
                                 total_microbatches=engine.layout.microbatches,
                                 num_targets=count, before_backward=before_backward)
    return ce


def train_step(engine: Engine, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor], grad_clip: float) -> tuple[float, float]:
    """Forward, backward, clip and step on ``batch`` (the whole step's batch; collective).

    Returns:
        ``(cross-entropy, auxiliary loss)`` of the step, over every process; the optimizer has
        not stepped when either is not finite (the caller reports the divergence).
    """
    inputs, targets, count = _local_batch(engine, batch)
    engine.loss_fn.num_targets = count
    for chunk in engine.chunks:
        chunk.reset_aux_loss_total()
    optimizer.zero_grad(set_to_none=True)
    if engine.schedule is not None:
        ce = _pipeline_backward(engine, inputs, targets)
    else:
        ce = _fsdp_backward(engine, inputs, targets, count)
    aux = [c.aux_loss_total for c in engine.chunks if c.aux_loss_total is not None]
    aux_local = torch.stack(aux).sum() if aux else 0.0
    ce_all, aux_all = _all_reduce_sum([ce, aux_local], engine.device)
    if not (torch.isfinite(torch.tensor(ce_all)) and torch.isfinite(torch.tensor(aux_all))):
        return ce_all, aux_all
    _sum_replicated_grads(engine)
    params = [p for p in engine.model.parameters() if p.requires_grad]
    if grad_clip > 0:
        clip_grad_norm(params, grad_clip, engine.device, replicated=engine.replicated,
                       count_replicated=engine.dp_rank == 0)
    optimizer.step()
    return ce_all, aux_all


def _eval_logits(engine: Engine, inputs: torch.Tensor, targets: torch.Tensor
                 ) -> torch.Tensor | None:
    """This rank's logits for its rows (``None`` on pipeline ranks without the last stage)."""
    if engine.schedule is None:
        (chunk,) = engine.chunks
        return chunk(inputs)
    args = (inputs,) if engine.holds_first else ()
    return engine.schedule.eval(*args, target=targets if engine.holds_last else None,
                                losses=[])


@torch.no_grad()
def evaluate(engine: Engine, task: Any, num_batches: int) -> tuple[float, float]:
    """Loss and accuracy on the task's first ``num_batches`` held-out batches (collective).

    Returns:
        ``(mean cross-entropy, accuracy)`` over every position with a target, all ranks'
        rows together; the same on every process.
    """
    engine.model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss·n, correct, n
    for index in range(num_batches):
        inputs, targets, count = _local_batch(engine, task.eval_batch(index))
        engine.loss_fn.num_targets = count
        logits = _eval_logits(engine, inputs, targets)
        if logits is None:
            continue
        mask = targets != IGNORE_INDEX
        n = mask.sum()
        totals[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double()
        totals[1] += (logits.argmax(dim=-1) == targets)[mask].sum()
        totals[2] += n
    engine.model.train()
    dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count
