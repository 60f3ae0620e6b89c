"""Kitchen's fp8 recipe against its bf16 recipe: step time and loss after N steps, on the GPU.

Trains the example hybrid (``examples/qwen3_next_hybrid.toml`` unless ``--config``) twice from
the same initial weights and the same batches, once under ``kitchen_recipe = "bf16"`` and once
under ``"fp8_current"``, with the ``te`` fallback (the ``local`` fallback, with a printed note,
when TE cannot run here). Prints the card, the median step time of each recipe and their ratio
fp8_current / bf16, and the losses after N steps: the held-out loss (the same evaluation
batches for both; this is what the goal, fp8 within 2% of bf16, is judged on) and the mean
training loss of the last max(20, N/10) steps (noisier: shown for information).

    python benchmarks/bench_kitchen.py                  # the example, as is
    python benchmarks/bench_kitchen.py --set hidden_size=1024 --set moe_ffn_hidden_size=1024

``--set FIELD=VALUE`` overrides a [model] field (TOML syntax for the value); ``--json PATH``
also writes the results as JSON. Exit status 0 when fp8's held-out loss is within
``--tolerance`` of bf16's, 1 when not, 2 for a bad argument or a machine that cannot run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from attnplug import BackendError, ConfigError, TransformerConfig
from attnplug.backends import get_provider
from attnplug.config import parse_override
from attnplug.data import make_task
from attnplug.layers.model import GPTModel
from attnplug.train import (
    TrainConfig,
    cross_entropy,
    evaluate,
    make_optimizer,
    make_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "qwen3_next_hybrid.toml"
RECIPES = ("bf16", "fp8_current")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a TOML with [model]")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a [model] field, e.g. --set hidden_size=1024")
    parser.add_argument("--task", default="lm", choices=("lm", "mqar"),
                        help="attnplug's synthetic task (lm: the loss falls from the start)")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="training steps per recipe")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="params_dtype of both runs (activations follow it)")
    parser.add_argument("--fallback", default="te",
                        help="kitchen_fallback_backend; 'te' falls back to 'local' with a note")
    parser.add_argument("--timing-skip", type=int, default=10,
                        help="leading steps left out of the step-time median (warm-up)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest accepted relative held-out loss difference fp8 vs bf16")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> TransformerConfig:
    """The [model] table with ``--set`` overrides and ``params_dtype``.

    Raises:
        ConfigError: a bad file or override.
    """
    base = TransformerConfig.from_toml(args.config)
    overrides = dict(parse_override(item) for item in args.set)
    return attrs.evolve(base, params_dtype=args.dtype, **overrides)


def choose_fallback(config: TransformerConfig, wanted: str) -> tuple[str, str | None]:
    """``(fallback, note)``: ``wanted`` when kitchen can run over it here, else ``"local"`` and
    a note saying why (printed by the caller)."""
    trial = attrs.evolve(config, backend="kitchen", kitchen_fallback_backend=wanted)
    try:
        provider = get_provider("kitchen").configure(trial)
        reasons = provider.supports(trial)
        if reasons:
            raise BackendError("; ".join(reasons))
    except BackendError as exc:
        if wanted == "local":
            raise
        return "local", f"note: fallback {wanted!r} cannot run here ({exc}); using 'local'"
    return wanted, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_recipe(config: TransformerConfig, recipe: str, train_cfg: TrainConfig,
               initial: dict[str, torch.Tensor] | None, device: torch.device,
               args: argparse.Namespace) -> dict[str, Any]:
    """Train ``config`` under ``recipe`` for ``train_cfg.steps`` steps.

    Returns:
        ``{"recipe", "step_seconds" (median after the warm-up), "losses", "final_loss" (mean of
        the last max(20, steps/10) steps), "eval_loss", "eval_accuracy", "state"}`` (``state``: the
        initial weights, so the next recipe starts from them).
    """
    config = attrs.evolve(config, kitchen_recipe=recipe)
    task = make_task(train_cfg)
    torch.manual_seed(train_cfg.seed)
    model = GPTModel(config, task.vocab_size, train_cfg.seq_len, backend="kitchen").to(device)
    if initial is not None:
        model.load_state_dict(initial)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg)
    losses: list[float] = []
    times: list[float] = []
    for step in range(train_cfg.steps):
        inputs, targets = (t.to(device) for t in task.train_batch(step))
        _sync(device)
        start = time.perf_counter()
        logits = model(inputs)
        ce = cross_entropy(logits, targets)
        loss = ce + model.auxiliary_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(ce.item())
        if not torch.isfinite(torch.tensor(losses[-1])):
            raise ConfigError(f"{recipe}: the loss is not finite at step {step + 1}; lower --lr")
    tail = losses[-max(20, len(losses) // 10):]
    eval_loss, eval_accuracy = evaluate(model, task, args.eval_batches, device)
    timed = times[args.timing_skip:] or times
    return {"recipe": recipe, "step_seconds": statistics.median(timed), "losses": losses,
            "final_loss": sum(tail) / len(tail), "eval_loss": eval_loss,
            "eval_accuracy": eval_accuracy, "state": state, "backend_slots": model.slots}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (module docstring)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kitchen: no CUDA device; this benchmark times fp8 on the GPU",
              file=sys.stderr)
        return 2
    from attnplug_kitchen.recipes import uses_scaled_mm

    device = torch.device("cuda")
    try:
        config = model_config(args)
        fallback, note = choose_fallback(config, args.fallback)
        train_cfg = TrainConfig(task=args.task, steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                                vocab_size=args.vocab_size,
                                warmup_steps=min(30, args.steps // 10), device="cuda")
    except (ConfigError, BackendError) as exc:
        print(f"bench_kitchen: {exc}", file=sys.stderr)
        return 2
    if note:
        print(note)
    config = attrs.evolve(config, backend="kitchen", kitchen_fallback_backend=fallback)
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    fp8_path = "torch._scaled_mm" if uses_scaled_mm(device) else "quantise-dequantise emulation"
    print(f"card: {name} (capability {capability[0]}.{capability[1]}), torch {torch.__version__}")
    print(f"model: {args.config} hidden={config.hidden_size} layers={config.num_layers} "
          f"params_dtype={config.params_dtype}; fallback={fallback!r}; fp8 matmuls: {fp8_path}")
    print(f"train: {args.task} (vocab {args.vocab_size}), {args.steps} steps, "
          f"batch {args.batch_size} x {args.seq_len}, lr {args.lr}, seed {args.seed}")
    results: dict[str, dict[str, Any]] = {}
    initial = None
    for recipe in RECIPES:
        result = run_recipe(config, recipe, train_cfg, initial, device, args)
        initial = result.pop("state")
        results[recipe] = result
        print(f"  {recipe:12s} step {result['step_seconds'] * 1e3:8.2f} ms   "
              f"eval loss {result['eval_loss']:.4f}   eval acc {result['eval_accuracy']:.3f}   "
              f"train-tail loss {result['final_loss']:.4f}")
    bf16, fp8 = results["bf16"], results["fp8_current"]
    ratio = fp8["step_seconds"] / bf16["step_seconds"]
    rel = abs(fp8["final_loss"] - bf16["final_loss"]) / abs(bf16["final_loss"])
    rel_eval = abs(fp8["eval_loss"] - bf16["eval_loss"]) / abs(bf16["eval_loss"])
    ok = rel_eval <= args.tolerance
    print(f"step-time ratio fp8_current / bf16: {ratio:.3f}")
    print(f"loss difference fp8 vs bf16: held-out {rel_eval:.2%} (goal: within "
          f"{args.tolerance:.0%}) -> {'PASS' if ok else 'FAIL'}; training tail {rel:.2%}")
    if args.json:
        summary = {
            "card": name, "capability": list(capability), "torch": torch.__version__,
            "fallback": fallback, "fallback_note": note, "fp8_path": fp8_path,
            "config": config.to_dict(), "task": args.task, "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "step_time_ratio": ratio,
            "loss_rel_diff": rel, "eval_loss_rel_diff": rel_eval, "pass": ok,
            "recipes": {r: {k: v for k, v in res.items() if k != "backend_slots"}
                        for r, res in results.items()},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
