"""Correctness of attnplug's Triton kernels at real shapes on the GPU, against float64.

    python3 benchmarks/gpu_check_triton.py                  # all; JSON in $OUT when set
    python3 benchmarks/gpu_check_triton.py --quick          # fewer shapes, no config sweep
    python3 benchmarks/gpu_check_triton.py --parts configs  # only the per-config sweep

Three parts, each printing the relative error ‖out − ref‖ / ‖ref‖ and the largest absolute
error of the output and of every gradient, against a float64 reference computed on the GPU:

1. flash attention through the autotuner at real shapes (bf16, fp16, fp32; GQA and MQA; head
   dims 64–256 and D ≠ Dv; T not a multiple of any block; S > T; T = 1), with torch SDPA's error
   in the same dtype against the same reference as the yardstick;
2. every block configuration of every attention kernel (forward, dK/dV, dQ), forced one at a
   time at head dims 64, 128 and 256 in bf16 — the check for Triton's Hopper miscompilation of
   64-wide blocks (shared/gpu/README.md), at every block size the autotuner may pick;
3. RMSNorm, LayerNorm and the gated RMSNorm at model widths, bf16 and fp32.

A row fails when its error exceeds the dtype's tolerance, or (attention) is more than 4× SDPA's
error plus that tolerance's tenth. Exit status 1 when any row fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import finish_checks  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (label, B, T, S, H, Hkv, D, Dv, dtype)
ATTENTION_SHAPES = [
    ("mha 2k d128", 2, 2048, 2048, 8, 8, 128, 128, torch.bfloat16),
    ("gqa odd T, S>T", 2, 1000, 1100, 8, 2, 128, 128, torch.bfloat16),
    ("mqa d64", 1, 777, 777, 8, 1, 64, 64, torch.bfloat16),
    ("d256 gqa", 1, 513, 600, 4, 2, 256, 256, torch.bfloat16),
    ("d80 dv48", 2, 300, 333, 4, 4, 80, 48, torch.float16),
    ("decode T=1", 4, 1, 1025, 8, 2, 128, 128, torch.bfloat16),
    ("fp16 4k", 1, 4096, 4096, 8, 8, 128, 128, torch.float16),
    ("fp32 gqa", 1, 513, 513, 4, 2, 128, 128, torch.float32),
    ("fp32 d40", 2, 67, 80, 4, 2, 40, 24, torch.float32),
]
QUICK = {"mha 2k d128", "gqa odd T, S>T", "d256 gqa", "fp32 gqa"}
NORM_CASES = [  # (label, rows, width, rms, gated, dtype)
    ("rms 4096", 8192, 4096, True, False, torch.bfloat16),
    ("rms 5120", 4096, 5120, True, False, torch.bfloat16),
    ("ln 4096", 8192, 4096, False, False, torch.bfloat16),
    ("ln 1000", 4096, 1000, False, False, torch.float32),
    ("qk rms 128", 65536, 128, True, False, torch.bfloat16),
    ("gated rms 128", 65536, 128, True, True, torch.bfloat16),
    ("gated rms 96 fp32", 16384, 96, True, True, torch.float32),
    ("gated ln 2048", 4096, 2048, False, True, torch.bfloat16),
]


def errors(outs: list[Tensor], refs: list[Tensor]) -> list[tuple[float, float]]:
    """(relative L2 error, largest absolute error) of each output against its reference."""
    result = []
    for out, ref in zip(outs, refs, strict=True):
        diff = out.double() - ref
        result.append(((diff.norm() / ref.norm().clamp_min(1e-30)).item(), diff.abs().max().item()))
    return result


def attention_reference(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> list[Tensor]:
    """o, dq, dk, dv of float64 causal attention."""
    from attnplug_triton.ops.attention.naive import naive_attention

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o = naive_attention(*leaves)
    o.backward(do.double())
    return [o.detach()] + [x.grad for x in leaves]


def run_attention(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor,
                  do: Tensor) -> list[Tensor]:
    """o, dq, dk, dv of ``fn`` (outputs and gradients detached)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The local backend's attention (torch SDPA, whichever backend it picks)."""
    from attnplug.ops.attention import causal_attention

    return causal_attention(q, k, v)


def row(part: str, label: str, dtype: torch.dtype, errs: list[tuple[float, float]],
        names: list[str], yardstick: list[tuple[float, float]] | None = None) -> dict:
    """A result row; ``ok`` is False when an error exceeds its tolerance."""
    tol = TOLERANCE[dtype]
    ok = True
    cells = {}
    for i, (name, (rel, mx)) in enumerate(zip(names, errs, strict=True)):
        limit = tol
        if yardstick is not None:
            limit = min(tol, 4 * yardstick[i][0] + tol / 10)
        ok &= rel == rel and rel <= limit  # NaN fails
        cells[name] = {"rel": rel, "max_abs": mx,
                       "sdpa_rel": yardstick[i][0] if yardstick is not None else None}
    return {"part": part, "case": label, "dtype": NAMES[dtype], "ok": bool(ok), "errors": cells}


def check_attention(quick: bool) -> list[dict]:
    """Part 1: the autotuned kernels at real shapes."""
    from attnplug_triton.ops.attention.fused import flash_attention

    rows = []
    for label, B, T, S, H, Hkv, D, Dv, dtype in ATTENTION_SHAPES:
        if quick and label not in QUICK:
            continue
        q = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype)
        v = torch.randn(B, S, Hkv, Dv, device="cuda", dtype=dtype)
        do = torch.randn(B, T, H, Dv, device="cuda", dtype=dtype)
        refs = attention_reference(q, k, v, do)
        errs = errors(run_attention(flash_attention, q, k, v, do), refs)
        try:
            yard = errors(run_attention(sdpa, q, k, v, do), refs)
        except RuntimeError:  # SDPA without a kernel for this shape: no yardstick
            yard = None
        name = f"{label} B{B} T{T} S{S} H{H}/{Hkv} D{D}/{Dv}"
        rows.append(row("attention", name, dtype, errs, ["o", "dq", "dk", "dv"], yard))
        print_row(rows[-1])
    return rows


def check_attention_configs() -> list[dict]:
    """Part 2: every block configuration of every kernel, forced, in bf16."""
    from attnplug_triton.ops.attention import fused

    rows = []
    dtype = torch.bfloat16
    for size in (64, 128, 256):
        B, T, S, H, Hkv = 1, 1000, 1100, 4, 2
        q = torch.randn(B, T, H, size, device="cuda", dtype=dtype)
        k = torch.randn(B, S, Hkv, size, device="cuda", dtype=dtype)
        v = torch.randn(B, S, Hkv, size, device="cuda", dtype=dtype)
        do = torch.randn(B, T, H, size, device="cuda", dtype=dtype)
        refs = attention_reference(q, k, v, do)
        scale = size**-0.5
        first = {"fwd": fused.FWD_CONFIGS[size][0], "dkdv": fused.DKDV_CONFIGS[size][0],
                 "dq": fused.DQ_CONFIGS[size][0]}
        tables = {"fwd": fused.FWD_CONFIGS, "dkdv": fused.DKDV_CONFIGS, "dq": fused.DQ_CONFIGS}
        runs = [(kernel, config) for kernel, table in tables.items() for config in table[size]]
        for kernel, config in runs:
            chosen = {**first, kernel: config}
            try:
                o, lse = fused.attention_forward(q, k, v, scale, chosen["fwd"])
                grads = fused.attention_backward(do, q, k, v, o, lse, scale, chosen["dkdv"],
                                                 chosen["dq"])
                errs = errors([o, *grads], refs)
            except Exception as exc:  # out of resources, compile failure: a failed row
                errs = [(float("nan"), float("nan"))] * 4
                print(f"  {kernel} {tuple(config)}: {type(exc).__name__}: {exc}"[:300])
            label = f"D{size} {kernel} {tuple(config)} T{T} S{S} H{H}/{Hkv}"
            rows.append(row("configs", label, dtype, errs, ["o", "dq", "dk", "dv"]))
            print_row(rows[-1])
    return rows


def run_norm(fn: Callable[..., Tensor], cast: Callable[[Tensor], Tensor], x: Tensor, w: Tensor,
             b: Tensor | None, g: Tensor | None, dy: Tensor, rms: bool) -> list[Tensor]:
    """y and the gradients of x, w (, b) (, g) of ``fn`` on ``cast`` copies of the inputs."""
    leaves = [None if t is None else cast(t).requires_grad_() for t in (x, w, b, g)]
    y = fn(*leaves, eps=1e-5, rms=rms)
    y.backward(cast(dy))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def check_norms(quick: bool) -> list[dict]:
    """Part 3: the norm kernels at model widths."""
    from attnplug_triton.ops.norms.fused import fused_norm
    from attnplug_triton.ops.norms.naive import naive_norm

    rows = []
    for label, n, width, rms, gated, dtype in NORM_CASES[: 4 if quick else None]:
        x = torch.randn(n, width, device="cuda", dtype=dtype)
        w = 1 + 0.1 * torch.randn(width, device="cuda", dtype=dtype)
        b = None if rms else 0.1 * torch.randn(width, device="cuda", dtype=dtype)
        g = torch.randn(n, width, device="cuda", dtype=dtype) if gated else None
        dy = torch.randn(n, width, device="cuda", dtype=dtype)
        names = ["y", "dx", "dw"] + ([] if rms else ["db"]) + (["dgate"] if gated else [])
        refs = run_norm(naive_norm, lambda t: t.detach().double(), x, w, b, g, dy, rms)
        errs = errors(run_norm(fused_norm, lambda t: t.detach().clone(), x, w, b, g, dy, rms),
                      refs)
        rows.append(row("norms", f"{label} N{n}", dtype, errs, names))
        print_row(rows[-1])
    return rows


_STARTED = time.time()


def print_row(r: dict) -> None:
    """One line: seconds so far, verdict, case, and each output's relative (max abs) error."""
    cells = "  ".join(
        f"{name} {e['rel']:.1e} ({e['max_abs']:.1e})"
        + (f" sdpa {e['sdpa_rel']:.1e}" if e["sdpa_rel"] is not None else "")
        for name, e in r["errors"].items()
    )
    verdict = "ok  " if r["ok"] else "FAIL"
    print(f"{time.time() - _STARTED:4.0f}s {verdict} {r['part']:9} {r['dtype']} {r['case']:44} "
          f"{cells}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes, no config sweep")
    parser.add_argument("--parts", nargs="+", choices=["attention", "configs", "norms"],
                        default=["attention", "configs", "norms"], help="which checks to run")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"])
                        if os.environ.get("OUT") else None, help="folder for the JSON "
                        "(default: $OUT when set)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_triton: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    started = time.time()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}; relative L2 error (max abs error)",
          flush=True)
    rows = check_attention(args.quick) if "attention" in args.parts else []
    if "configs" in args.parts and not args.quick:
        rows += check_attention_configs()
    if "norms" in args.parts:
        rows += check_norms(args.quick)
    return finish_checks("gpu_check_triton", rows, started, args.out)


if __name__ == "__main__":
    sys.exit(main())
