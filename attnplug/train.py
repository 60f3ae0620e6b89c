"""``attnplug train CONFIG.toml``: build the model of ``[model]`` and train it as ``[train]`` says.

The loop is deliberately plain: AdamW (weight decay on matrices only), linear warmup then cosine
decay, gradient clipping, loss = cross-entropy (``ignore_index=-100``) + ``model.auxiliary_loss()``
(MoE load balancing, the DSA indexer's loss). Batches come from :mod:`attnplug.data` as a pure
function of ``(seed, step)``, and a checkpoint holds everything else that moves (model, optimizer,
scheduler, RNG states, losses), so ``--resume`` continues a run bit-for-bit on the CPU.

Under ``torchrun`` with more than one process the run is split over the processes as the
``[parallel]`` table and the pipeline fields of ``[model]`` say (:mod:`attnplug.distributed`).
In one process, ``[parallel] microbatches`` (when above 1) accumulates gradients over that many
micro-batches: the objective of a multi-process run with the same setting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from attnplug._errors import ConfigError
from attnplug.config import TomlTable, TransformerConfig, _choice, _float, _int
from attnplug.data import IGNORE_INDEX, TASKS, check_lm, check_mqar, make_task
from attnplug.report import (
    Reporter,
    save_plot,
    summarize_run,
    summary_table,
)

__all__ = [
    "TrainConfig",
    "add_train_arguments",
    "run_train",
    "load_configs",
    "resolve_device",
    "build_model",
    "make_optimizer",
    "make_scheduler",
    "lr_factor",
    "cross_entropy",
    "evaluate",
    "save_plot",
]

DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "attnplug-train-checkpoint"
CHECKPOINT_VERSION = 1
# [train] fields that may differ between a checkpoint and the run that resumes it
RESUMABLE_FIELDS = ("steps", "lr_decay_steps", "device", "log_every", "eval_every",
                    "eval_batches")
# [model] fields that may differ too: the backend, and how the layers are split over pipeline
# ranks (a checkpoint holds the whole model, keyed by layer, whatever the split)
RESUMABLE_MODEL_FIELDS = ("backend", "pipeline_model_parallel_size",
                          "virtual_pipeline_model_parallel_size",
                          "num_layers_in_first_pipeline_stage",
                          "num_layers_in_last_pipeline_stage",
                          "account_for_embedding_in_pipeline_split",
                          "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout")
PLOT_INSTALL = 'pip install "attnplug[plot]"'


@attrs.frozen(kw_only=True)
class TrainConfig(TomlTable):
    """The ``[train]`` table: what to train on and how.

    The defaults are a CPU run of about a minute that a small GDN/softmax hybrid learns: MQAR
    with 4 key/value pairs among 32 tokens (16 keys, 16 values).

    ``steps`` is the total number of optimizer steps of the run (a resumed run goes on up to it).
    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine from
    ``lr`` down to ``lr * min_lr_ratio`` at ``lr_decay_steps`` (``None``: ``steps``); set
    ``lr_decay_steps`` when a run will be stopped and extended, so the schedule stays one.
    ``grad_clip = 0`` turns clipping off; ``eval_every = 0`` evaluates only at the end.
    ``vocab_size`` is the task's vocabulary and sizes the model's embedding. ``num_kv_pairs``
    is for ``task = "mqar"``, ``lm_corpus_tokens`` and ``lm_corpus_seed`` for ``task = "lm"``.
    """

    TABLE: ClassVar[str] = "train"

    task: str = "mqar"
    steps: int = 500
    batch_size: int = 32
    seq_len: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    vocab_size: int = 33
    num_kv_pairs: int = 4
    lm_corpus_tokens: int = 200_000
    lm_corpus_seed: int = 0

    def __attrs_post_init__(self) -> None:
        f = "[train] {}".format
        _choice(f("task"), self.task, TASKS)
        for name in ("steps", "batch_size", "log_every", "eval_batches", "vocab_size",
                     "num_kv_pairs", "lm_corpus_tokens"):
            _int(f(name), getattr(self, name))
        _int(f("seq_len"), self.seq_len, minimum=2)
        for name in ("warmup_steps", "eval_every", "seed", "lm_corpus_seed"):
            _int(f(name), getattr(self, name), minimum=0)
        _int(f("lr_decay_steps"), self.lr_decay_steps, optional=True)
        _float(f("lr"), self.lr, strict=True)
        _float(f("min_lr_ratio"), self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise ConfigError(f"[train] min_lr_ratio={self.min_lr_ratio!r} is not accepted: "
                              "expected a fraction of lr in [0, 1]")
        _float(f("weight_decay"), self.weight_decay)
        _float(f("grad_clip"), self.grad_clip)
        _choice(f("device"), self.device, DEVICES)
        if self.lr_decay_steps is not None and self.warmup_steps > self.lr_decay_steps:
            raise ConfigError(f"[train] warmup_steps={self.warmup_steps} is not accepted: "
                              f"expected at most lr_decay_steps={self.lr_decay_steps}")
        if self.task == "mqar":
            check_mqar(self.vocab_size, self.seq_len, self.num_kv_pairs)
        else:
            check_lm(self.vocab_size, self.seq_len, self.lm_corpus_tokens)

    @property
    def decay_steps(self) -> int:
        """The step at which the cosine reaches its floor: ``lr_decay_steps`` or ``steps``."""
        return self.lr_decay_steps or self.steps



# -- command line -----------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``CONFIG`` and the options of ``attnplug train`` to ``parser``."""
    parser.add_argument("config", metavar="CONFIG.toml",
                        help="TOML file with a [model] table and an optional [train] table")
    parser.add_argument("--steps", type=int, metavar="N", help="override [train] steps")
    parser.add_argument("--seed", type=int, metavar="S", help="override [train] seed")
    parser.add_argument("--device", choices=DEVICES, help="override [train] device")
    parser.add_argument("--backend", metavar="NAME", help="override [model] backend")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the results on stdout, and nothing else")
    parser.add_argument("--save", metavar="PATH", help="write a checkpoint here at the end")
    parser.add_argument("--save-every", type=int, metavar="N",
                        help="also write the --save checkpoint every N steps")
    parser.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint")
    parser.add_argument("--plot", metavar="PATH.png",
                        help=f"save the loss curve as a PNG (needs matplotlib: {PLOT_INSTALL})")


def _arg(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def load_configs(args: argparse.Namespace) -> tuple[TransformerConfig, TrainConfig]:
    """The model and training configs of ``args.config`` with the command-line overrides applied.

    Raises:
        ConfigError: anything wrong in the file or in an override.
    """
    model_cfg = TransformerConfig.from_toml(args.config)
    train_cfg = TrainConfig.from_toml(args.config)
    overrides = {name: _arg(args, name) for name in ("steps", "seed", "device")}
    train_cfg = attrs.evolve(train_cfg, **{k: v for k, v in overrides.items() if v is not None})
    if _arg(args, "backend") is not None:
        model_cfg = attrs.evolve(model_cfg, backend=args.backend)
    return model_cfg, train_cfg


def _check_output_args(args: argparse.Namespace) -> None:
    save_every = _arg(args, "save_every")
    if save_every is not None and (save_every < 1 or _arg(args, "save") is None):
        raise ConfigError(f"--save-every={save_every} is not accepted: expected an integer >= 1 "
                          "together with --save PATH")
    if _arg(args, "plot") is not None and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; ``"cuda"`` without CUDA → ``ConfigError``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[train] device='cuda' is not accepted here: torch sees no CUDA device;"
                          " expected 'cpu' or 'auto'")
    return torch.device(name)


# -- the pieces of the loop -----------------------------------------------------------------


def build_model(model_cfg: TransformerConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """``GPTModel(model_cfg, vocab_size, max_sequence_length=seq_len)`` from the layers package."""
    from attnplug.layers.model import GPTModel

    return GPTModel(model_cfg, vocab_size, max_sequence_length=seq_len)


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The multiple of ``lr`` used by optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps``, then a cosine from 1 to ``min_ratio`` that ends
    at ``decay_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of two or more dims only (not norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Warmup + cosine (:func:`lr_factor`) as a ``LambdaLR`` stepped once per optimizer step."""
    def factor(step: int) -> float:
        return lr_factor(step, cfg.warmup_steps, cfg.decay_steps, cfg.min_lr_ratio)

    return LambdaLR(optimizer, factor)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``-100`` (in float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: nn.Module, task: Any, num_batches: int,
             device: torch.device) -> tuple[float, float]:
    """Loss and accuracy on the task's first ``num_batches`` held-out batches.

    Returns:
        ``(mean cross-entropy, accuracy)`` over every position with a target (for MQAR, the
        queried positions only).
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for index in range(num_batches):
        inputs, targets = (t.to(device) for t in task.eval_batch(index))
        logits = model(inputs)  # (B, T, V)
        mask = targets != IGNORE_INDEX
        n = int(mask.sum())
        total_loss += cross_entropy(logits, targets).item() * n
        correct += int((logits.argmax(dim=-1) == targets)[mask].sum())
        count += n
    model.train(was_training)
    return total_loss / count, correct / count


@attrs.define
class _Run:
    """What moves during a run (and goes into a checkpoint besides the modules)."""

    model_cfg: TransformerConfig
    train_cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    task: Any
    device: torch.device
    step: int = 0
    losses: list[float] = attrs.field(factory=list)
    evals: list[dict[str, float]] = attrs.field(factory=list)
    aux_loss: float = 0.0
    train_seconds: float = 0.0
    tokens: int = 0
    microbatches: int = 1
    step_times: list[tuple[int, float]] = attrs.field(factory=list)  # this session's steps


def _check_finite(run: _Run, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        cfg = run.train_cfg
        raise ConfigError(f"training diverged at step {run.step + 1} (loss={loss.item()}): "
                          f"lower [train] lr (now {cfg.lr}) or set [train] grad_clip")


def _train_step(run: _Run) -> float:
    """One optimizer step on the batch of ``run.step``; returns its cross-entropy.

    With ``run.microbatches > 1`` the gradients are accumulated over that many micro-batches
    (:func:`attnplug.distributed.microbatch.accumulate_gradients`).

    Raises:
        ConfigError: the loss is not finite (the run diverged).
    """
    inputs, targets = (t.to(run.device) for t in run.task.train_batch(run.step))
    if run.microbatches > 1:
        from attnplug.distributed.microbatch import accumulate_gradients

        run.optimizer.zero_grad(set_to_none=True)
        ce, aux = accumulate_gradients(run.model, inputs, targets,
                                       microbatches=run.microbatches,
                                       aux_loss=run.model.auxiliary_loss)
        _check_finite(run, ce + aux)
    else:
        logits = run.model(inputs)  # (B, T, V)
        ce = cross_entropy(logits, targets)
        aux = run.model.auxiliary_loss()
        loss = ce + aux
        _check_finite(run, loss)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if run.train_cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train_cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    run.aux_loss = float(aux.detach())
    run.tokens += inputs.numel()
    return ce.item()


# -- checkpoints --------------------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _save_checkpoint(run: _Run, path: str | Path) -> None:
    """Write everything needed to continue ``run`` to ``path`` (atomically, via a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": run.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": _rng_states(),
        "model_config": run.model_cfg.to_dict(),
        "train_config": run.train_cfg.to_dict(),
        "losses": list(run.losses),
        "evals": list(run.evals),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume {str(path)!r}: the file does not exist") from None
    except Exception as exc:  # a truncated file, not a torch file, unsafe contents
        raise ConfigError(f"--resume {str(path)!r}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume {str(path)!r}: not an attnplug train checkpoint")
    return state


def _check_resumable(state: dict[str, Any], run: _Run, path: str | Path) -> None:
    """Refuse a checkpoint whose settings would change the trajectory of the run."""
    saved_model = {k: v for k, v in state["model_config"].items()
                   if k not in RESUMABLE_MODEL_FIELDS}
    now_model = {k: v for k, v in run.model_cfg.to_dict().items()
                 if k not in RESUMABLE_MODEL_FIELDS}
    saved_train = {k: v for k, v in state["train_config"].items() if k not in RESUMABLE_FIELDS}
    now_train = {k: v for k, v in run.train_cfg.to_dict().items() if k not in RESUMABLE_FIELDS}
    for table, saved, now in (("model", saved_model, now_model),
                              ("train", saved_train, now_train)):
        for key in sorted(saved.keys() | now.keys()):
            if saved.get(key) != now.get(key):
                raise ConfigError(
                    f"--resume {str(path)!r}: the checkpoint was trained with [{table}] {key}="
                    f"{saved.get(key)!r} but the config has {now.get(key)!r}; a resumed run must "
                    f"keep every setting except [model] backend and the pipeline split, and "
                    f"[train] "
                    + ", ".join(RESUMABLE_FIELDS)
                )
    if state["step"] >= run.train_cfg.steps:
        raise ConfigError(f"--resume {str(path)!r}: the checkpoint is at step {state['step']} and"
                          f" [train] steps={run.train_cfg.steps}: expected more steps (--steps N)")


def _load_checkpoint(run: _Run, path: str | Path, note: Callable[[str], None]) -> None:
    """Restore ``run`` from the checkpoint at ``path``.

    A directory is a multi-process run's checkpoint
    (:func:`attnplug.distributed.checkpoint.read_checkpoint_dir`).

    Raises:
        ConfigError: the file is missing or not a checkpoint, or its settings differ from the run's.
    """
    if Path(path).is_dir():
        from attnplug.distributed.checkpoint import read_checkpoint_dir, read_meta

        _check_resumable(read_meta(path, checkpoint_format=CHECKPOINT_FORMAT), run, path)
        state = read_checkpoint_dir(path, run.model, run.optimizer,
                                    checkpoint_format=CHECKPOINT_FORMAT)
    else:
        state = _read_checkpoint(path)
    _check_resumable(state, run, path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    _restore_progress(run, state, note)
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _restore_progress(run: Any, state: dict[str, Any], note: Callable[[str], None]) -> None:
    """From a checkpoint's ``state`` (model and optimizer already loaded): the scheduler, torch's
    CPU generator, the step, losses and evaluations; a note when the run's learning rate now
    decays over another number of steps. Shared by both trainers' resume."""
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    run.step = state["step"]
    run.losses = list(state["losses"])
    run.evals = list(state["evals"])
    saved = TrainConfig(**state["train_config"])
    if saved.decay_steps != run.train_cfg.decay_steps:
        note(f"note: the learning rate now decays over {run.train_cfg.decay_steps} steps "
             f"(the checkpoint's run: {saved.decay_steps}); set [train] lr_decay_steps to keep "
             "one schedule across resumed runs")


# -- reporting --------------------------------------------------------------------------------


def _eval(run: _Run, reporter: Reporter) -> None:
    loss, accuracy = evaluate(run.model, run.task, run.train_cfg.eval_batches, run.device)
    run.evals.append({"step": run.step, "loss": loss, "accuracy": accuracy})
    reporter.message(f"step {run.step}: eval loss {loss:.4f}, accuracy {accuracy:.1%}")


def _loop(run: Any, reporter: Reporter, save: str | None, save_every: int | None, *,
          train_step: Callable[[Any], float], evaluate_run: Callable[[Any, Reporter], None],
          save_run: Callable[[Any, str | Path], None]) -> None:
    """Train to ``run.train_cfg.steps``: evaluate every ``eval_every`` steps and at the end,
    save every ``save_every``, with the step, evaluation and save of the trainer calling it
    (single- or multi-process)."""
    cfg = run.train_cfg
    while run.step < cfg.steps:
        tokens, start = run.tokens, time.perf_counter()
        run.losses.append(train_step(run))
        seconds = time.perf_counter() - start
        run.train_seconds += seconds
        run.step_times.append((run.tokens - tokens, seconds))
        reporter.step(run)
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
            evaluate_run(run, reporter)
        if save_every and run.step % save_every == 0 and run.step < cfg.steps:
            save_run(run, save)
    if not run.evals or run.evals[-1]["step"] != run.step:
        evaluate_run(run, reporter)


def _summarize(run: _Run, wall_seconds: float) -> dict[str, Any]:
    """The results of a finished run: the keys of ``--json`` (DESIGN §10 names the first five)."""
    parameters = sum(p.numel() for p in run.model.parameters())
    return summarize_run(run, wall_seconds, device=run.device.type, parameters=parameters)


# -- the job ------------------------------------------------------------------------------------


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on the CPU for the duration; the previous settings come back.

    Filling fresh memory with NaN (a debugging aid that comes with deterministic mode) is turned
    off: it makes CPU training several times slower and changes no result.
    """
    if device.type != "cpu":
        yield
        return
    fill = torch.utils.deterministic
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                fill.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        fill.fill_uninitialized_memory = previous[2]


def _start(model_cfg: TransformerConfig, train_cfg: TrainConfig, device: torch.device,
           microbatches: int = 1) -> _Run:
    task = make_task(train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, task.vocab_size, train_cfg.seq_len).to(device)
    optimizer = make_optimizer(model, train_cfg)
    return _Run(model_cfg=model_cfg, train_cfg=train_cfg, model=model, optimizer=optimizer,
                scheduler=make_scheduler(optimizer, train_cfg), task=task, device=device,
                microbatches=microbatches)


def run_train(args: argparse.Namespace) -> int:
    """Run ``attnplug train`` for parsed ``args`` (see :func:`add_train_arguments`).

    Prints progress on stderr and a summary table on stdout, or with ``args.json`` one JSON
    object (:func:`_summarize`) and nothing else on stdout. Started by ``torchrun`` with
    ``WORLD_SIZE`` > 1, runs as one of the processes of
    :func:`attnplug.distributed.train.run_distributed_train`.

    Returns:
        0 when the run finished.

    Raises:
        ConfigError: a bad config file, override, checkpoint or option, or a diverged run.
        BackendError: the backend cannot build this model here.
    """
    from attnplug.distributed.config import ParallelConfig, resolve_layout, world_size_from_env

    model_cfg, train_cfg = load_configs(args)
    parallel_cfg = ParallelConfig.from_toml(args.config)
    _check_output_args(args)
    world_size = world_size_from_env()
    if world_size > 1:
        from attnplug.distributed.train import run_distributed_train

        return run_distributed_train(args, model_cfg, train_cfg, parallel_cfg, world_size)
    layout = resolve_layout(parallel_cfg, model_cfg, train_cfg.batch_size, world_size)
    device = resolve_device(train_cfg.device)
    quiet = bool(_arg(args, "json"))
    with _deterministic(device):
        wall = time.perf_counter()
        run = _start(model_cfg, train_cfg, device, layout.microbatches)
        with Reporter(run, quiet=quiet) as reporter:
            if _arg(args, "resume"):
                _load_checkpoint(run, args.resume, Console(stderr=True).print)
            _loop(run, reporter, _arg(args, "save"), _arg(args, "save_every"),
                  train_step=_train_step, evaluate_run=_eval, save_run=_save_checkpoint)
        if _arg(args, "save"):
            _save_checkpoint(run, args.save)
        result = _summarize(run, time.perf_counter() - wall)
    if _arg(args, "plot"):
        save_plot(result, args.plot)
    if quiet:
        print(json.dumps(result))
    else:
        Console().print(summary_table(result))
    return 0
