"""Where a training step's time goes, per backend: each layer part's forward and backward.

The model and sizes of ``bench_backends.py`` (the example hybrid at hidden 2048, 16 layers,
T = 4096, bf16 on a GPU). For each backend, after warm-up steps, one step runs with a timer on
every part of every layer (``input_layernorm``, ``self_attention``, ``pre_mlp_layernorm``,
``mlp``) and on the embedding, final norm and output layer: forward between the module's
pre-hook and hook, backward between its full backward pre-hook and hook, measured with CUDA
events on the GPU (wall clock with synchronisation on the CPU). Parts are grouped by what they
are — ``GatedDeltaNet``, ``SelfAttention``, ``MoELayer``, ``MLP``, the norms — and printed with
their share of the step, so the next optimisation goes where the time is.

    python3 benchmarks/profile_step.py                           # te, triton, local on the GPU
    python3 benchmarks/profile_step.py --backends triton --top 25  # ... and the top CUDA kernels
    python3 benchmarks/profile_step.py --device cpu --set num_layers=4 --set hidden_size=256 \\
        --seq-len 128 --vocab 512 --backends local               # a quick CPU check

The timers synchronise nothing on the GPU, but hooks that wrap module outputs for the backward
cost a little; the step time printed is that of the timed step, the un-instrumented median is
``bench_backends.py``'s. ``--json PATH`` writes the rows. Exit status 0 when every backend ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backends import DEFAULT_CONFIG, model_config  # noqa: E402

from attnplug import BackendError, ConfigError  # noqa: E402
from attnplug.backends import get_provider  # noqa: E402
from attnplug.layers.model import GPTModel  # noqa: E402

LAYER_PARTS = ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp")


class Timer:
    """Start/stop marks on the device's stream (CUDA events) or the wall clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, str, Any, Any]] = []  # (group, phase, start, stop)
        self._open: dict[tuple[int, str], Any] = {}

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, key: int, phase: str) -> None:
        self._open[(key, phase)] = self.mark()

    def stop(self, key: int, phase: str, group: str) -> None:
        begin = self._open.pop((key, phase), None)
        if begin is not None:
            self.spans.append((group, phase, begin, self.mark()))

    def totals(self) -> dict[tuple[str, str], float]:
        """Milliseconds per (group, phase), summed over the spans."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[tuple[str, str], float] = defaultdict(float)
        for group, phase, begin, end in self.spans:
            out[(group, phase)] += begin.elapsed_time(end) if self.cuda else 1e3 * (end - begin)
        return out


def _part_group(name: str, module: nn.Module) -> str:
    """What a timed part is: a layer's attention or MLP by its class (``GatedDeltaNet``,
    ``MoELayer``, ...), anything else by its name and class (``pre_mlp_layernorm (RMSNorm)``)."""
    kind = type(module).__name__
    return kind if name in ("self_attention", "mlp") else f"{name} ({kind})"


def instrument(model: GPTModel, timer: Timer) -> list[Any]:
    """Forward and backward hooks on every timed part; returns the handles."""
    parts: list[tuple[str, nn.Module]] = [("embedding", model.embedding)]
    for layer in model.decoder.layers:
        parts += [(name, getattr(layer, name)) for name in LAYER_PARTS]
    parts += [("final_layernorm", model.decoder.final_layernorm),
              ("output_layer", model.output_layer)]
    handles = []
    for name, module in parts:
        if module is None:
            continue
        group = _part_group(name, module)
        key = id(module)

        def fwd_pre(mod, args, key=key):
            timer.start(key, "forward")

        def fwd_post(mod, args, out, key=key, group=group):
            timer.stop(key, "forward", group)

        def bwd_pre(mod, grad_out, key=key):
            timer.start(key, "backward")

        def bwd_post(mod, grad_in, grad_out, key=key, group=group):
            timer.stop(key, "backward", group)

        handles += [module.register_forward_pre_hook(fwd_pre),
                    module.register_forward_hook(fwd_post)]
        if name != "embedding":  # its input (token ids) has no gradient: no backward hook
            handles += [module.register_full_backward_pre_hook(bwd_pre),
                        module.register_full_backward_hook(bwd_post)]
    return handles


def profile_backend(name: str, config: Any, args: argparse.Namespace,
                    device: torch.device) -> dict[str, Any]:
    """One backend's row: the timed step's total and the per-group forward/backward times."""
    provider = get_provider(name).configure(config)
    reasons = provider.supports(config)
    if reasons:
        raise BackendError("; ".join(reasons))
    torch.manual_seed(0)
    with device:
        model = GPTModel(config, args.vocab, backend=provider)
    model.to(device).train()
    # fused on CUDA, as bench_backends.py times it
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    timer = Timer(device)
    handles = instrument(model, timer)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    step()
    sync()
    step_ms = 1e3 * (time.perf_counter() - begin)
    for handle in handles:
        handle.remove()
    groups = {f"{group} {phase}": ms for (group, phase), ms in sorted(timer.totals().items())}
    row = {"backend": name, "kernels": provider.served_by("gated_delta_rule"),
           "step_ms": step_ms, "groups": groups}
    if args.top and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        kernel_names = {e.name for e in kernels}
        kernel_rows = [e for e in averages if e.key in kernel_names]
        kernel_rows.sort(key=lambda e: -e.self_device_time_total)
        row["top_kernels"] = "\n".join(
            f"  {e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}×  {e.key[:150]}"
            for e in kernel_rows[:args.top])
        # the torch ops that launched them, by input shapes: which copy or cast of which
        # tensor an anonymous elementwise kernel is
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.self_device_time_total > 0 and e.key not in kernel_names]
        ops.sort(key=lambda e: -e.self_device_time_total)
        row["top_ops"] = "\n".join(
            f"  {e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}×  {e.key} "
            f"{str(e.input_shapes)[:120]}" for e in ops[:args.top])
        # how many kernels a step launches and how long they keep the GPU busy: far fewer
        # busy milliseconds than the step's means the host (launches, syncs) is the limit
        row["kernel_launches"] = len(kernels)
        row["kernel_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    return row


def report(row: dict[str, Any]) -> None:
    total = row["step_ms"]
    print(f"\n{row['backend']} (gated delta rule from {row['kernels']}): timed step "
          f"{total:.1f} ms")
    timed = 0.0
    for label, ms in sorted(row["groups"].items(), key=lambda item: -item[1]):
        timed += ms
        print(f"  {label:<46} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'(not in a timed part: loss, optimizer, glue)':<46} {total - timed:9.2f} ms  "
          f"{100 * (total - timed) / total:5.1f}%")
    if "top_kernels" in row:
        print(f"  one profiled step: {row['kernel_launches']} kernels, {row['kernel_ms']:.1f} ms "
              f"of GPU time in them")
        print("  kernels with the most GPU time (ms, launches, name):")
        print(row["top_kernels"])
        print("  torch ops whose own kernels took the most GPU time (ms, calls, op, input shapes):")
        print(row["top_ops"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a TOML with [model]")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a [model] field after the GPU sizes (TOML value syntax)")
    parser.add_argument("--backends", nargs="+", default=["te", "triton", "local"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--top", type=int, default=0,
                        help="also profile a step and print the N kernels with the most CUDA time")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_step: no CUDA device (use --device cpu for a small CPU run)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        config = model_config(args)
    except ConfigError as exc:
        print(f"profile_step: {exc}", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{where} — torch {torch.__version__}; {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.params_dtype}, batch {args.batch_size} × T "
          f"{args.seq_len}, vocab {args.vocab}")
    rows, failed = [], False
    for name in args.backends:
        try:
            row = profile_backend(name, config, args, device)
        except (BackendError, torch.cuda.OutOfMemoryError) as exc:
            print(f"\n{name}: not measured: {type(exc).__name__}: {exc}")
            rows.append({"backend": name, "status": f"{type(exc).__name__}: {exc}"})
            failed = True
            continue
        report(row)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
