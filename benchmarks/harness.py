"""One harness for every kernel question: medians, the anchor in the same run, a table, files.

A benchmark script makes a :class:`Bench`, calls :meth:`Bench.measure` once per case with the
implementations to compare (the anchor first, always measured in the same run), and ends with
:meth:`Bench.report`, which prints a table (median ms, 20th–80th percentile, ratio to the anchor,
TFLOP/s when the script gives a FLOP count) headed by the card's name, and writes
``<name>.csv``, ``<name>.json`` and ``<name>.png`` (when matplotlib imports) into ``--out DIR``.

Timing is ``triton.testing.do_bench`` (CUDA events, warm-up first, the L2 cache flushed before
each repetition). Each case is measured in ``--rounds`` rounds (default 4), every
implementation once a round, in the given order and then in reverse (A B C, C B A, A B C, ...);
an implementation's time is the mean over the rounds of its median in each round. An H200's
speed drifts by several percent within a run (session 9 saw one kernel at 1.32 and 1.54 ms in
rows measured a minute apart); in one pass that drift is charged to whichever rows ran during
a slow spell, while the back-and-forth order gives every row the same mean position, which
cancels a steady drift exactly (and a median per round keeps one stray repetition out).
``--rep`` is shared by the rounds, so a run takes about as long as with one. The 20th–80th
percentile column is over the repetitions of every round.

An implementation that cannot run here is given as a string saying why, and shows in the table
as skipped; one that raises is recorded with its error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Bench", "Result", "add_common_args", "device_name", "finish_checks"]

Impl = Callable[[], object]
# (fn, warmup ms, rep ms, tensors whose .grad to reset) -> the repetitions' times in ms
Timer = Callable[[Impl, float, float, "Sequence[Any] | None"], Sequence[float]]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--out DIR``, ``--warmup MS``, ``--rep MS`` and ``--rounds N`` to ``parser``;
    returns it."""
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the CSV, JSON and PNG (default: print only)")
    parser.add_argument("--warmup", type=float, default=25.0,
                        help="do_bench warm-up per measurement, in ms (default 25)")
    parser.add_argument("--rep", type=float, default=100.0,
                        help="do_bench repetition time per measurement, in ms, shared by the "
                             "rounds (default 100)")
    parser.add_argument("--rounds", type=_positive_int, default=4,
                        help="rounds per case, every implementation once a round, the order "
                             "reversed every other round (default 4)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def do_bench_times(fn: Impl, warmup: float, rep: float,
                   grad_to_none: Sequence[Any] | None) -> list[float]:
    """Every repetition's time in ms from ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    return list(do_bench(fn, warmup=warmup, rep=rep,
                         grad_to_none=list(grad_to_none) if grad_to_none else None,
                         return_mode="all"))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation (as ``torch.quantile``)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def device_name() -> str:
    """The CUDA card's name (``torch.cuda.get_device_name``), or ``"cpu"`` without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def finish_checks(name: str, rows: list[dict[str, Any]], started: float, out: Path | None,
                  **extra: Any) -> int:
    """Close a GPU check script (``gpu_check_*.py``): print how many of ``rows`` passed and name
    each failed one (its part, dtype when it has one, and case); with ``out``, write
    ``<out>/<name>.json`` (card, versions, ``extra``, rows). A row marked ``pruned`` (a
    configuration the autotuner never picks there, forced by a probe) that failed is named as
    known and does not fail the run. Returns the exit status: 1 when another row failed,
    else 0."""
    import torch
    import triton

    def label(r: dict[str, Any]) -> str:
        return " ".join(str(r[k]) for k in ("part", "dtype", "case") if k in r)

    failed = [r for r in rows if not r["ok"] and not r.get("pruned")]
    known = [r for r in rows if not r["ok"] and r.get("pruned")]
    print(f"{len(rows) - len(failed) - len(known)} of {len(rows)} checks passed in "
          f"{time.time() - started:.0f} s"
          + (f"; {len(known)} failed on configurations the autotuner prunes (never served)"
             if known else "")
          + "".join("\nFAILED: " + label(r) for r in failed)
          + "".join("\nknown, pruned: " + label(r) for r in known))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__, **extra, "rows": rows}, indent=2))
    return 1 if failed else 0


@dataclass
class Result:
    """One measurement: ``case`` × ``impl``; times in ms; ``ratio`` = median / anchor median."""

    case: str
    impl: str
    median_ms: float | None
    p20_ms: float | None = None
    p80_ms: float | None = None
    ratio: float | None = None
    tflops: float | None = None
    status: str = "ok"  # "ok", "skipped: why", "error: what"
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Collects the measurements of one question and reports them.

    ``name`` names the output files; ``anchor`` is the implementation every ratio divides by
    (measured in each case, first).
    """

    def __init__(self, name: str, anchor: str, *, out: Path | None = None,
                 warmup: float = 25.0, rep: float = 100.0, rounds: int = 4,
                 timer: Timer = do_bench_times) -> None:
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"Bench: rounds={rounds!r} is not accepted: expected an int >= 1")
        self.name = name
        self.anchor = anchor
        self.out = out
        self.warmup = warmup
        self.rep = rep
        self.rounds = rounds
        self.timer = timer
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    @staticmethod
    def summary(rounds: Sequence[Sequence[float]]) -> tuple[float, float, float]:
        """(the mean of each round's median, 20th and 80th percentile of every repetition) of
        one implementation's times, a list per round."""
        pooled = [t for times in rounds for t in times]
        return (sum(quantile(times, 0.5) for times in rounds) / len(rounds),
                quantile(pooled, 0.2), quantile(pooled, 0.8))

    def measure(self, case: str, impls: dict[str, Impl | str], *, flops: float | None = None,
                grad_to_none: Sequence[Any] | None = None,
                extra: dict[str, dict[str, Any]] | None = None) -> list[Result]:
        """Time every implementation of ``case``; the anchor first.

        ``impls`` maps a name to a zero-argument callable, or to a string saying why it cannot
        run here. ``flops`` (per call) adds TFLOP/s; ``grad_to_none`` are tensors whose
        ``.grad`` is reset before each repetition; ``extra[impl]`` adds columns to its row.
        Returns this case's results. Raises ``ValueError`` when the anchor is missing.
        """
        if self.anchor not in impls:
            raise ValueError(f"case {case!r}: the anchor {self.anchor!r} is not among "
                             f"{sorted(impls)}; it must be measured in the same run")
        order = [self.anchor] + [name for name in impls if name != self.anchor]
        rows = {name: Result(case, name, None, extra=dict((extra or {}).get(name, {})))
                for name in order}
        times: dict[str, list[list[float]]] = {name: [] for name in order}
        for name in order:
            if isinstance(impls[name], str):
                rows[name].status = f"skipped: {impls[name]}"
        for round_ in range(self.rounds):
            # the anchor first in the first round, the order reversed every other round
            medians = []
            for name in (order if round_ % 2 == 0 else order[::-1]):
                impl, row = impls[name], rows[name]
                if row.status != "ok":  # skipped, or raised in an earlier round
                    continue
                try:
                    got = list(self.timer(impl, self.warmup, self.rep / self.rounds,
                                          grad_to_none))
                except Exception as exc:  # one failing implementation must not end the run
                    row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    continue
                times[name].append(got)
                medians.append(f"{name} {quantile(got, 0.5):.3f}")
            # progress as it goes, so that a run stopped at its time limit still reports
            print(f"  {case} | round {round_ + 1}/{self.rounds}: " + ", ".join(medians),
                  file=sys.stderr, flush=True)
        for name in order:
            row = rows[name]
            if row.status == "ok" and times[name]:
                row.median_ms, row.p20_ms, row.p80_ms = self.summary(times[name])
            print(f"  {case} | {name}: "
                  + (f"{row.median_ms:.3f} ms" if row.median_ms is not None else row.status),
                  file=sys.stderr, flush=True)
        rows = [rows[name] for name in order]
        anchor_ms = rows[0].median_ms
        for row in rows:
            if row.median_ms is not None and anchor_ms:
                row.ratio = row.median_ms / anchor_ms
            if row.median_ms is not None and flops:
                row.tflops = flops / (row.median_ms * 1e-3) / 1e12
        self.results.extend(rows)
        return rows

    def note(self, text: str) -> None:
        """Add a line printed under the table and stored in the JSON."""
        self.notes.append(text)

    # -- reporting ------------------------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        """The card, library versions and start time recorded with the results."""
        env: dict[str, Any] = {"device": device_name(), "python": platform.python_version(),
                               "started": self.started}
        for module in ("torch", "triton"):
            try:
                env[module] = __import__(module).__version__
            except ImportError:
                env[module] = None
        return env

    def report(self) -> None:
        """Print the table and write ``<name>.csv/.json/.png`` into ``out`` (when set)."""
        env = self.environment()
        title = (f"{self.name} on {env['device']} — torch {env['torch']}, triton {env['triton']}"
                 f"; medians of do_bench over {self.rounds} round(s), ratio = time / "
                 f"{self.anchor}")
        self._print_table(title)
        for line in self.notes:
            print(f"note: {line}")
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_csv(self.out / f"{self.name}.csv")
        (self.out / f"{self.name}.json").write_text(json.dumps(
            {"name": self.name, "anchor": self.anchor, "rounds": self.rounds,
             "environment": env, "notes": self.notes,
             "results": [asdict(r) for r in self.results]}, indent=2))
        png = self._write_png(self.out / f"{self.name}.png", title)
        print(f"wrote {self.out / self.name}.csv and .json" + (" and .png" if png else
              " (no PNG: matplotlib is not installed)"))

    def _columns(self) -> list[str]:
        return sorted({key for r in self.results for key in r.extra})

    def _cells(self, r: Result, extras: list[str]) -> list[str]:
        def fmt(x: float | None, spec: str) -> str:
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

        spread = (f"{r.p20_ms:.3f}–{r.p80_ms:.3f}" if r.p20_ms is not None else "")
        cells = [r.case, r.impl, fmt(r.median_ms, ".3f"), spread, fmt(r.ratio, ".2f") + (
            "×" if r.ratio is not None else ""), fmt(r.tflops, ".0f")]
        cells += [str(r.extra.get(key, "")) for key in extras]
        return cells + ["" if r.status == "ok" else r.status]

    def _print_table(self, title: str) -> None:
        extras = self._columns()
        header = ["case", "impl", "median ms", "p20–p80 ms", "ratio", "TFLOP/s", *extras, "status"]
        rows = [self._cells(r, extras) for r in self.results]
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
                      for i, h in enumerate(header)]
            print(title)
            print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
            for row in rows:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            return
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="left" if h in ("case", "impl", "status") else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)

    def _write_csv(self, path: Path) -> None:
        extras = self._columns()
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "impl", "median_ms", "p20_ms", "p80_ms", "ratio", "tflops",
                             *extras, "status"])
            for r in self.results:
                writer.writerow([r.case, r.impl, r.median_ms, r.p20_ms, r.p80_ms, r.ratio,
                                 r.tflops, *(r.extra.get(k, "") for k in extras), r.status])

    def _write_png(self, path: Path, title: str) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        cases = list(dict.fromkeys(r.case for r in self.results))
        impls = list(dict.fromkeys(r.impl for r in self.results))
        width = 0.8 / max(1, len(impls))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases)), 4.5))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                r = next((r for r in self.results if r.case == case and r.impl == impl), None)
                if r is not None and r.median_ms is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r.median_ms)
                    if r.ratio is not None and impl != self.anchor:
                        ax.annotate(f"{r.ratio:.2f}×", (xs[-1], ys[-1]), ha="center",
                                    va="bottom", fontsize=7)
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log scale)")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


if __name__ == "__main__":  # pragma: no cover - a library module
    sys.exit("benchmarks/harness.py is a library: run one of the bench_*.py scripts")
