"""What a training run shows and returns: progress on stderr, the ``--json`` result, the
summary table and the loss plot; shared by the single- and the multi-process trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["Reporter", "steady_tokens_per_second", "summarize_run", "summary_table",
           "save_plot"]


class Reporter:
    """Progress on stderr: a rich bar on a terminal, a line every ``log_every`` steps elsewhere,
    nothing at all with ``--json``."""

    def __init__(self, run: Any, *, quiet: bool) -> None:
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.log_every = run.train_cfg.log_every
        self.progress: Progress | None = None
        if not quiet and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console,
            )
            self.bar = self.progress.add_task(
                f"{run.task.name} · {run.model.backend_name}", total=run.train_cfg.steps,
                completed=run.step, loss="-",
            )

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self, run: Any) -> None:
        """Show the loss after ``run.step`` (averaged over the last ``log_every`` steps)."""
        recent = run.losses[-self.log_every:]
        loss = sum(recent) / len(recent)
        if self.progress is not None:
            self.progress.update(self.bar, completed=run.step, loss=f"{loss:.4f}")
        elif not self.quiet and (run.step % self.log_every == 0 or run.step == run.train_cfg.steps):
            lr = run.scheduler.get_last_lr()[0]
            self.console.print(f"step {run.step}/{run.train_cfg.steps}  loss {loss:.4f}  "
                               f"lr {lr:.2e}", highlight=False)

    def message(self, text: str) -> None:
        """Print ``text`` on stderr above the bar (nothing with ``--json``)."""
        if not self.quiet:
            self.console.print(text, highlight=False)


def steady_tokens_per_second(step_times: list[tuple[int, float]]) -> float:
    """Tokens per second over the second half of a session's ``(tokens, seconds)`` steps: the
    rate once compilation, autotuning and allocator warm-up are behind (all of them when there
    are fewer than two)."""
    later = step_times[len(step_times) // 2:]
    seconds = sum(s for _, s in later)
    return sum(t for t, _ in later) / seconds if seconds else 0.0


def summarize_run(run: Any, wall_seconds: float, *, device: str,
                  parameters: int) -> dict[str, Any]:
    """The ``--json`` keys of a finished run, single- or multi-process: ``run`` has the
    ``model``, ``step``, ``losses``, ``evals``, ``tokens``, ``train_seconds``, ``task``,
    ``train_cfg`` and ``aux_loss`` of a training run; ``device`` and ``parameters`` are given
    because a pipeline rank holds only part of the model."""
    final = run.evals[-1]
    return {
        "backend": run.model.backend_name,
        "steps": run.step,
        "initial_loss": run.losses[0],
        "final_loss": run.losses[-1],
        "tokens_per_second": run.tokens / run.train_seconds if run.train_seconds else 0.0,
        "tokens_per_second_steady": steady_tokens_per_second(run.step_times),
        "task": run.task.name,
        "seed": run.train_cfg.seed,
        "accuracy": final["accuracy"],
        "chance_accuracy": run.task.chance_accuracy,
        "eval_loss": final["loss"],
        "aux_loss": run.aux_loss,
        "device": device,
        "parameters": parameters,
        "vocab_size": run.task.vocab_size,
        "wall_time_s": wall_seconds,
        "losses": run.losses,
        "evals": run.evals,
    }


def summary_table(result: dict[str, Any]) -> Table:
    """The summary a run prints when it ends (without ``--json``)."""
    chance = result["chance_accuracy"]
    accuracy = f"{result['accuracy']:.1%}" + (f" (chance {chance:.1%})" if chance else "")
    rows = [
        ("task", result["task"]), ("backend", result["backend"]),
        ("device", result["device"]), ("parameters", f"{result['parameters']:,}"),
        ("steps", str(result["steps"])), ("initial loss", f"{result['initial_loss']:.4f}"),
        ("final loss", f"{result['final_loss']:.4f}"), ("eval loss", f"{result['eval_loss']:.4f}"),
        ("accuracy", accuracy), ("tokens/s", f"{result['tokens_per_second']:,.0f}"),
        ("tokens/s, 2nd half", f"{result['tokens_per_second_steady']:,.0f}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
    ]
    table = Table(title="attnplug train", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def save_plot(result: dict[str, Any], path: str | Path) -> None:
    """Draw the training loss (and the eval accuracy, on a second axis) into a PNG at ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(1, len(result["losses"]) + 1), result["losses"], lw=1, label="train loss")
    ax.plot([e["step"] for e in result["evals"]], [e["loss"] for e in result["evals"]], "o-",
            label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy",
           title=f"{result['task']} · {result['backend']} · seed {result['seed']}")
    ax.legend(loc="upper left")
    acc = ax.twinx()
    acc.plot([e["step"] for e in result["evals"]], [e["accuracy"] for e in result["evals"]],
             "s--", color="tab:green", label="eval accuracy")
    if result["chance_accuracy"]:
        acc.axhline(result["chance_accuracy"], color="tab:green", ls=":", lw=1, label="chance")
    acc.set(ylabel="accuracy", ylim=(0, 1))
    acc.legend(loc="upper right")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
