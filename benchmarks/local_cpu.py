"""CPU figures for the `local` backend (a benchmark, not a test).

1. Tokens per second of a training step (forward + backward + AdamW) of each example config.
2. The speed-up of the chunked gated delta rule over the per-token recurrence at T = 4096
   (goal: >= 20x), with the two outputs compared so the speed is not bought with wrong answers.

Usage: python benchmarks/local_cpu.py [--out DIR] [--steps N] [--seq-len T] [--threads N]
Writes results.json under --out when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from attnplug import GPTModel, TransformerConfig

ROOT = Path(__file__).resolve().parent.parent


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step_throughput(path: Path, steps: int, batch: int, seq_len: int) -> dict:
    """Median tokens/s of one training step of the model ``path`` describes."""
    config = TransformerConfig.from_toml(path)
    torch.manual_seed(0)
    vocab = 256
    model = GPTModel(config, vocab_size=vocab, max_sequence_length=seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1))

    def step() -> None:
        logits = model(tokens[:, :-1])  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _median_seconds(step, steps)
    return {
        "config": path.name,
        "backend": model.backend_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "seq_len": seq_len,
        "step_ms": seconds * 1e3,
        "tokens_per_second": batch * seq_len / seconds,
    }


def gdn_chunked_vs_recurrent(T: int = 4096, B: int = 1, H: int = 2, HV: int = 4,
                             K: int = 64, V: int = 64) -> dict:
    """Forward time of the chunked and the per-token gated delta rule at one shape."""
    from attnplug.ops import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, HV, V, generator=g)
    gate = -torch.rand(B, T, HV, generator=g) * 0.1
    beta = torch.rand(B, T, HV, generator=g)
    with torch.no_grad():
        chunked = _median_seconds(lambda: chunk_gated_delta_rule(q, k, v, gate, beta), 3)
        recurrent = _median_seconds(
            lambda: naive_recurrent_gated_delta_rule(q, k, v, gate, beta), 1
        )
        o_chunk, _ = chunk_gated_delta_rule(q, k, v, gate, beta)
        o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, gate, beta)
    return {
        "shape": dict(B=B, T=T, H=H, HV=HV, K=K, V=V),
        "chunked_ms": chunked * 1e3,
        "recurrent_ms": recurrent * 1e3,
        "speedup": recurrent / chunked,
        "max_abs_diff": (o_chunk - o_ref).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gdn-T", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a busy machine "
                        "1 thread is often faster than 2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    print(f"attnplug local backend on the CPU ({machine}), torch {torch.__version__}")
    rows = [
        training_step_throughput(path, args.steps, args.batch, args.seq_len)
        for path in sorted((ROOT / "examples").glob("*.toml"))
    ]
    print(f"\ntraining step, batch {args.batch} x {args.seq_len} tokens (median of {args.steps})")
    print(f"{'config':<26}{'params':>10}{'step ms':>10}{'tokens/s':>12}")
    for row in rows:
        print(f"{row['config']:<26}{row['parameters']:>10,}{row['step_ms']:>10.1f}"
              f"{row['tokens_per_second']:>12,.0f}")
    gdn = gdn_chunked_vs_recurrent(T=args.gdn_T)
    print(f"\ngated delta rule forward at {gdn['shape']}")
    print(f"  chunked {gdn['chunked_ms']:.1f} ms, per-token {gdn['recurrent_ms']:.1f} ms: "
          f"{gdn['speedup']:.1f}x (goal >= 20x); max |diff| {gdn['max_abs_diff']:.2e}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine, "torch": torch.__version__, "training": rows, "gdn": gdn}
        (args.out / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
