"""Training throughput of the example hybrid with the ``te``, ``triton`` and ``local`` backends.

Builds the model of ``examples/qwen3_next_hybrid.toml`` at a GPU size (hidden 2048, 16 layers:
Gated DeltaNet in three layers of four, gated softmax attention in the fourth, MoE everywhere;
bfloat16), and times whole training steps — forward, backward, AdamW step — at T = 4096 tokens
per sequence with each backend in turn, in one run on one card. Prints the card, the
configuration actually used, and per backend the median step time, tokens/s and the ratio of
its tokens/s to local's, with the backend that served the kernel slots, and the host's time
per step (until the step's last kernel was queued: close to the step time, the GPU waited for
Python).

    python benchmarks/bench_backends.py                       # all three, GPU-sized
    python benchmarks/bench_backends.py --backends te local --set num_layers=8

When a backend runs out of GPU memory, the batch and then the number of layers are halved and
every backend is measured again at the smaller size (printed), so the ratios always compare one
configuration. ``--json PATH`` also writes the results. Exit status 0 when local and at least one
other backend were measured, 1 when not, 2 for a bad argument or a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from attnplug import BackendError, ConfigError, TransformerConfig
from attnplug.backends import get_provider
from attnplug.config import parse_override, read_toml_table
from attnplug.layers.model import GPTModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "qwen3_next_hybrid.toml"
BACKENDS = ("te", "triton", "local")
# The example at a GPU size (Qwen3-Next-like proportions; head dims of 128 every kernel takes).
GPU_SIZE: dict[str, Any] = {
    "num_layers": 16, "hidden_size": 2048, "num_attention_heads": 16, "num_query_groups": 2,
    "kv_channels": 128, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "num_moe_experts": 16,
    "moe_router_topk": 2, "moe_ffn_hidden_size": 1024, "moe_shared_expert_intermediate_size": 1024,
    "params_dtype": "bfloat16",
    # experts as grouped/batched GEMMs, as GPU training runs them (te: GroupedLinear, which it
    # uses either way; local and triton: BatchedExperts instead of one expert after another)
    "moe_grouped_gemm": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a TOML with [model]")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a [model] field after the GPU sizes (TOML value syntax)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        help="backends to measure, in order (local is always measured)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backend")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per backend")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if "local" not in args.backends:
        args.backends.append("local")
    for name in ("batch_size", "seq_len", "vocab", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def model_config(args: argparse.Namespace) -> TransformerConfig:
    """The example's [model] with the GPU sizes and ``--set`` overrides applied.

    Raises ``ConfigError`` for a bad field or value.
    """
    fields = {**read_toml_table(args.config, "model"), **GPU_SIZE,
              **dict(parse_override(item) for item in args.set)}
    fields["backend"] = "local"
    return TransformerConfig.from_dict(fields, source=f"{args.config} [model] with overrides")


def kernel_source(provider: Any) -> str:
    """Which backend serves the gated delta rule for ``provider``."""
    try:
        return provider.served_by("gated_delta_rule")
    except BackendError as exc:
        return f"? ({exc})"


def time_training(provider: Any, config: TransformerConfig, args: argparse.Namespace,
                  batch: int) -> tuple[list[float], list[float]]:
    """Seconds per training step (forward, backward, AdamW step) of ``args.steps`` steps, and
    the host's share of each: the seconds until the step's last kernel was queued. A host
    time close to the step time means the GPU waited for the host (a host-bound step)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPTModel(config, args.vocab, backend=provider)
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, args.vocab, (batch, args.seq_len + 1), device="cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times, host = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, host


def measure_all(config: TransformerConfig, args: argparse.Namespace,
                batch: int) -> list[dict[str, Any]]:
    """One row per backend; raises ``torch.cuda.OutOfMemoryError`` when one does not fit."""
    rows = []
    for name in args.backends:
        row: dict[str, Any] = {"backend": name}
        try:
            provider = get_provider(name).configure(config)
            reasons = provider.supports(config)
            if reasons:
                raise BackendError("; ".join(reasons))
        except BackendError as exc:
            row["status"] = f"skipped: {exc}"
            rows.append(row)
            continue
        row["kernels"] = kernel_source(provider)
        times, host = time_training(provider, config, args, batch)
        gc.collect()  # the model and optimizer are gone: give their memory back
        torch.cuda.empty_cache()
        row["step_ms"] = 1e3 * statistics.median(times)
        row["steps_ms"] = [round(1e3 * t, 2) for t in times]  # each timed step, in order
        row["host_ms"] = 1e3 * statistics.median(host)  # until the last kernel was queued
        row["tokens_per_s"] = batch * args.seq_len / statistics.median(times)
        row["status"] = "ok"
        rows.append(row)
        print(f"  {name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"host {row['host_ms']:.1f} ms (steps: "
              f"{' '.join(f'{t:.1f}' for t in row['steps_ms'])})", flush=True)
    return rows


def smaller(config: TransformerConfig, batch: int) -> tuple[TransformerConfig, int] | None:
    """The next size to try after running out of memory: half the batch, then half the layers
    (keeping whole blocks of the attention pattern); ``None`` when nothing is left to halve."""
    if batch > 1:
        return config, batch // 2
    layers = config.num_layers // 2
    if layers < 4:
        return None
    fields = {"num_layers": layers}
    for name in ("linear_attention_freq", "moe_layer_freq"):
        if isinstance(getattr(config, name), list):
            fields[name] = getattr(config, name)[:layers]
    return attrs.evolve(config, **fields), batch


def report(rows: list[dict[str, Any]], config: TransformerConfig, args: argparse.Namespace,
           batch: int) -> None:
    """Print the table: step ms, tokens/s and the ratio to local's tokens/s."""
    local = next((r for r in rows if r["backend"] == "local" and r["status"] == "ok"), None)
    print(f"\n{torch.cuda.get_device_name()} — torch {torch.__version__}; training step "
          f"(forward + backward + AdamW) of the example hybrid: {config.num_layers} layers, "
          f"hidden {config.hidden_size}, {config.params_dtype}, batch {batch} × T {args.seq_len}"
          f" = {batch * args.seq_len} tokens, vocab {args.vocab}; median of {args.steps} steps")
    print(f"{'backend':<8} {'ms/step':>9} {'host ms':>8} {'tokens/s':>10} {'vs local':>9}  "
          "kernels  status")
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['backend']:<8} {'':>9} {'':>8} {'':>10} {'':>9}  {'':7}  "
                  f"{row['status']}")
            continue
        ratio = row["tokens_per_s"] / local["tokens_per_s"] if local else float("nan")
        row["ratio_vs_local"] = ratio
        print(f"{row['backend']:<8} {row['step_ms']:>9.1f} {row['host_ms']:>8.1f} "
              f"{row['tokens_per_s']:>10.0f} "
              f"{ratio:>8.2f}×  {row['kernels']:<7}  ok")


def versions() -> dict[str, str | None]:
    """torch, triton and transformer_engine versions (None where not installed)."""
    found: dict[str, str | None] = {}
    for module in ("torch", "triton", "transformer_engine"):
        try:
            found[module] = __import__(module).__version__
        except Exception:  # TE without its extension raises more than ImportError
            found[module] = None
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backends: no CUDA device; this benchmark runs on the GPU machine",
              file=sys.stderr)
        return 2
    try:
        config = model_config(args)
    except (ConfigError, OSError) as exc:
        print(f"bench_backends: {exc}", file=sys.stderr)
        return 2
    batch = args.batch_size
    print(f"card: {torch.cuda.get_device_name()}; versions: {versions()}")
    while True:
        print(f"measuring {config.num_layers} layers, batch {batch} × T {args.seq_len}",
              flush=True)
        try:
            rows = measure_all(config, args, batch)
            break
        except torch.cuda.OutOfMemoryError:
            pass  # leave the handler first, so the traceback's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        nxt = smaller(config, batch)
        if nxt is None:
            print("bench_backends: out of GPU memory even at 4 layers, batch 1", file=sys.stderr)
            return 1
        config, batch = nxt
        print(f"out of GPU memory: retrying every backend with {config.num_layers} layers, "
              f"batch {batch}", flush=True)
    report(rows, config, args, batch)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "versions": versions(),
            "config": config.to_dict(), "batch_size": batch, "seq_len": args.seq_len,
            "vocab": args.vocab, "steps": args.steps, "results": rows}, indent=2))
    measured = {r["backend"] for r in rows if r["status"] == "ok"}
    return 0 if "local" in measured and len(measured) > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
