"""The ``attnplug`` command: ``backends``, ``plan``, ``train`` and ``check``.

A user error (a bad config, a backend that cannot run) prints one line,
``attnplug: error: <message>``, and exits with status 2; no traceback. ``check`` exits with
status 1 when a slot computes a wrong value or raises.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attnplug._errors import BackendError, ConfigError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main", "build_parser"]

PROG = "attnplug"
USAGE_ERROR = 2
PIPE_WIDTH = 240


class _UserError(Exception):
    """An error to report as one line, with exit status 2."""


# -- the parser -------------------------------------------------------------------------------
def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from attnplug.train import add_train_arguments
    except ImportError as exc:
        raise _UserError(f"the train command is not available: {exc}") from exc
    add_train_arguments(parser)  # CONFIG.toml and the options, all of them train's own


def build_parser(*, with_train_arguments: bool = False) -> argparse.ArgumentParser:
    """The command-line parser.

    The ``train`` arguments come from :mod:`attnplug.train`, imported only when
    ``with_train_arguments`` is true (that is, when the command is ``train``). Raises
    ``_UserError`` when it is asked for and that module cannot be imported.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hybrid transformer stacks from specs, with pluggable backends.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log which backend was chosen and why")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backends = commands.add_parser("backends", help="list the installed backends")
    backends.add_argument("--json", action="store_true", help="print JSON instead of a table")

    plan = commands.add_parser("plan", help="show which class and backend fill every layer slot")
    plan.add_argument("config", metavar="CONFIG.toml", help="a TOML file with a [model] table")
    plan.add_argument("--pp-rank", type=_non_negative, default=None, metavar="N",
                      help="only this pipeline rank (default: every rank)")
    plan.add_argument("--vp-stage", type=_non_negative, default=None, metavar="M",
                      help="only this virtual pipeline stage (default: every stage)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--backend", metavar="NAME",
                      help="override [model] backend (as train --backend does), to compare "
                           "what each backend serves")
    plan.add_argument("--as-pattern", action="store_true",
                      help="print only the hybrid_layer_pattern equivalent to the config "
                           "(a pattern config: its own, normalised)")

    check = commands.add_parser(
        "check", help="check every slot a backend serves against attnplug's float64 references",
        description="Run each slot of BACKEND (attention, gated delta rule, DSA, convolution, "
                    "norms, linears, experts, a small hybrid model) on fresh random inputs and "
                    "compare outputs and gradients with attnplug's references in float64. "
                    "Exit status 1 when a slot is wrong or raises.")
    check.add_argument("backend", metavar="BACKEND", help="an installed backend's name")
    check.add_argument("--device", default="cpu", help="where the slots run (default: cpu)")
    check.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       default="float32", help="the inputs' and parameters' dtype")
    check.add_argument("--slots", nargs="+", metavar="SLOT",
                       help="only these slots (default: all; see attnplug.testing.CHECKED_SLOTS)")
    check.add_argument("--seed", type=_non_negative, default=0, help="the random inputs' seed")
    check.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="a TransformerConfig field for the configs the checks build (TOML "
                            "value; repeatable), e.g. --set kitchen_fallback_backend=local")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")

    train = commands.add_parser("train", help="build the model and train it",
                                add_help=with_train_arguments)
    if with_train_arguments:
        _add_train_arguments(train)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


# -- the commands -----------------------------------------------------------------------------
def _console() -> Console:
    """A rich console; written to a pipe or a file, tables take their natural width (not 80)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _run_backends(args: argparse.Namespace) -> int:
    from attnplug.backends import list_backends

    infos = list_backends()
    if args.json:
        _print_json([info.to_json() for info in infos])
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="attnplug backends")
    for column in ("name", "distribution", "version", "priority", "available", "notes"):
        table.add_column(column)
    for info in infos:
        notes = escape(info.error or "; ".join(info.reasons) or info.description)
        table.add_row(
            info.name,
            info.distribution or "?",
            info.version or "?",
            "" if info.priority is None else str(info.priority),
            "[green]yes[/]" if info.available else "[red]no[/]",
            notes,
            style=None if info.error is None else "red",
        )
    _console().print(table)
    return 0


def _slot_groups(layers: list[dict[str, Any]]) -> list[str]:
    groups: list[str] = []
    for layer in layers:
        for path in layer["slots"]:
            group = path.split(".", 1)[0]
            if group not in groups:
                groups.append(group)
    return groups


def _slot_cell(slots: dict[str, dict[str, str]], group: str) -> str:
    lines = []
    for path, served in slots.items():
        head, _, rest = path.partition(".")
        if head != group:
            continue
        shown = f"{served['class']} ({served['backend']})"
        lines.append(f"{rest}: {shown}" if rest else shown)
    return "\n".join(lines) or "-"


def _stage(layer: dict[str, Any]) -> str:
    if layer["vp_stage"] is None:
        return f"pp{layer['pp_rank']}"
    return f"pp{layer['pp_rank']}/vp{layer['vp_stage']}"


def _print_pattern(args: argparse.Namespace, config: Any) -> int:
    """``plan --as-pattern``: the config as one hybrid_layer_pattern line (or JSON)."""
    from attnplug.patterns import to_hybrid_pattern

    if args.pp_rank is not None or args.vp_stage is not None:
        raise _UserError("--as-pattern prints the whole model: it takes no --pp-rank or "
                         "--vp-stage ('|' in the pattern marks the pipeline stages)")
    pattern = to_hybrid_pattern(config)
    if args.json:
        _print_json({"hybrid_layer_pattern": pattern})
    else:
        sys.stdout.write(pattern + "\n")
    return 0


def _plan_caption(plan: dict[str, Any], config: Any) -> str:
    """The lines under the plan table: the pattern (or the equivalent one) and the final norm."""
    from attnplug.patterns import to_hybrid_pattern

    label = "hybrid_layer_pattern" if config.hybrid_layer_pattern else "as a hybrid_layer_pattern"
    lines = [f"{label}: {to_hybrid_pattern(config)}"]
    final = plan.get("final_layernorm")
    if final:
        lines.append(f"final layer norm: {final['class']} ({final['backend']})")
    return "\n".join(lines)


def _run_plan(args: argparse.Namespace) -> int:
    from attnplug.config import TransformerConfig
    from attnplug.plan import describe_plan

    config = TransformerConfig.from_toml(args.config)
    if args.backend is not None:
        import attrs

        config = attrs.evolve(config, backend=args.backend)
    if args.as_pattern:
        return _print_pattern(args, config)
    plan = describe_plan(config, pp_rank=args.pp_rank, vp_stage=args.vp_stage)
    if args.json:
        _print_json(plan)
        return 0
    from rich.markup import escape
    from rich.table import Table

    groups = _slot_groups(plan["layers"])
    table = Table(
        title=escape(f"attnplug plan: {args.config} (backend {plan['backend']!r})"),
        caption=escape(_plan_caption(plan, config)),
        show_lines=True,
    )
    for column in ("index", "stage", "attention", "mlp"):
        table.add_column(column, no_wrap=True)
    for group in groups:
        table.add_column(group)
    for layer in plan["layers"]:
        table.add_row(
            str(layer["index"]), _stage(layer), layer["attention"], layer["mlp"],
            *(_slot_cell(layer["slots"], group) for group in groups),
        )
    _console().print(table)
    return 0


_STATUS_STYLE = {"passed": "green", "FAILED": "bold red", "error": "bold red",
                 "not served": "dim", "not comparable": "yellow"}


def _errors_cell(errors: dict[str, float]) -> str:
    return "\n".join(f"{name} {value:.1e}" for name, value in errors.items()) or "-"


def _run_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from attnplug.config import parse_override
    from attnplug.testing import check_backend

    fields = dict(parse_override(item) for item in args.set)

    # On a terminal a status line; into a file or pipe one line per slot with the seconds so far
    # (a GPU run compiles and autotunes every kernel: a log then shows how far it got).
    console = Console(stderr=True)
    start = time.perf_counter()
    with (console.status(f"attnplug check {args.backend}") if console.is_terminal
          else contextlib.nullcontext()) as status:
        def progress(slot: str) -> None:
            if status is not None:
                status.update(f"checking {slot}")
            else:
                print(f"attnplug check {args.backend}: checking {slot} "
                      f"({time.perf_counter() - start:.0f} s so far)", file=sys.stderr,
                      flush=True)

        try:
            results = check_backend(args.backend, device=args.device, dtype=args.dtype,
                                    slots=args.slots, seed=args.seed, config=fields,
                                    progress=progress)
        except ValueError as exc:
            raise _UserError(str(exc)) from None
    passed = all(result.ok for result in results)
    if args.json:
        _print_json({"backend": args.backend, "device": args.device, "dtype": args.dtype,
                     "passed": passed, "checks": [result.to_json() for result in results]})
        return 0 if passed else 1
    from rich.markup import escape
    from rich.table import Table

    failed = sum(not result.ok for result in results)
    table = Table(title=escape(f"attnplug check: backend {args.backend!r} on {args.device}, "
                               f"{args.dtype}"),
                  caption="relative error ‖got − ref‖/‖ref‖ against float64 references; "
                          + (f"{failed} of {len(results)} checks wrong or raised" if failed
                             else "every check passed"),
                  show_lines=True)
    for column in ("slot", "case", "status", "errors", "tolerance", "detail"):
        table.add_column(column)
    for result in results:
        table.add_row(result.slot, escape(result.case),
                      f"[{_STATUS_STYLE[result.status]}]{result.status}[/]",
                      escape(_errors_cell(result.errors)),
                      "" if result.tolerance is None else f"{result.tolerance:.0e}",
                      escape(result.detail))
    _console().print(table)
    return 0 if passed else 1


def _run_train(args: argparse.Namespace) -> int:
    from attnplug.train import run_train

    return run_train(args)


_COMMANDS = {"backends": _run_backends, "plan": _run_plan, "train": _run_train,
             "check": _run_check}


class _Logging:
    """Send the ``attnplug`` logger to stderr while a command runs, then restore it."""

    def __init__(self, verbose: bool) -> None:
        self.logger = logging.getLogger("attnplug")
        self.level = logging.INFO if verbose else logging.WARNING
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))

    def __enter__(self) -> None:
        self.saved_level = self.logger.level
        self.logger.setLevel(self.level)
        self.logger.addHandler(self.handler)

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnplug`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 2 for a usage error, a bad config or a backend that
    cannot be used (after printing ``attnplug: error: <message>`` to stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(with_train_arguments=_command_of(argv) == "train")
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse has printed its usage message or --help
            return exc.code if isinstance(exc.code, int) else USAGE_ERROR
        with _Logging(args.verbose):
            return _COMMANDS[args.command](args)
    except (ConfigError, BackendError, _UserError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return USAGE_ERROR
