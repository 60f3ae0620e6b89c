"""GatedDeltaNet's causal depthwise convolution (kernel 4, then SiLU): three ways, on the GPU.

The GDN layer runs ``F.conv1d`` over ``[B, C, T]`` with ``groups = C`` (C = 2·qk + v channels:
8192 at the GPU size of ``bench_backends.py``). Depthwise 1-D convolutions over long sequences
are a known slow spot of cuDNN and of torch's own depthwise kernels (Mamba and fla ship causal
conv kernels of their own); this measures whether that holds here, against two formulations
in plain PyTorch that move the same bytes a few times over:

- ``conv1d``: the layer's code (anchor): pad, transpose, ``F.conv1d(groups=C)``, SiLU;
- ``unfold``: ``padded.unfold(1, 4, 1)`` — a ``[B, T, C, 4]`` view — times the weights, summed
  over the last dim;
- ``shifts``: the four shifted views of the same ``unfold`` accumulated in float32;
- ``triton``: the triton backend's fused kernels as served (``attnplug_triton.ops.conv.fused``:
  one pass over ``[B, T, C]`` forward with the SiLU inside, a two-pass backward, autotuned
  blocks), when attnplug-triton imports; ``triton-1pass``: the same forward with fixed blocks
  and the one-pass backward served until session 6.

Forward and forward+backward at B=2, T=4096, C=8192, bf16 (``--batch``, ``--seqlen``,
``--channels``), each checked against a float64 ``conv1d`` first (largest difference printed).

    python3 benchmarks/bench_conv.py --out runs/bench-conv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnplug.ops import causal_conv1d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_common_args  # noqa: E402


def pad_history(x: Tensor, width: int) -> Tensor:
    """``x[B, T, C]`` with ``width`` zero steps in front: ``[B, T + width, C]``."""
    return F.pad(x, (0, 0, width, 0))


def conv1d(x: Tensor, w: Tensor) -> Tensor:
    """The GDN layer's convolution as ``local`` serves it (``attnplug.ops.causal_conv1d``):
    x (B, T, C), w (C, 1, K) -> (B, T, C)."""
    return causal_conv1d(x, w[:, 0])


def unfold(x: Tensor, w: Tensor) -> Tensor:
    """Σ_j w[c, j] · x[t − K + 1 + j] through a ``[B, T, C, K]`` view of the padded input."""
    windows = pad_history(x, w.shape[-1] - 1).unfold(1, w.shape[-1], 1)  # (B, T, C, K)
    return F.silu((windows * w[:, 0]).sum(-1))


def shifts(x: Tensor, w: Tensor) -> Tensor:
    """The same sum, one shifted view at a time, accumulated in float32."""
    windows = pad_history(x, w.shape[-1] - 1).unfold(1, w.shape[-1], 1)  # (B, T, C, K)
    taps = w[:, 0].float().unbind(-1)  # K of (C,)
    y = None
    for view, tap in zip(windows.unbind(-1), taps, strict=True):  # (B, T, C) each
        term = view.float() * tap
        y = term if y is None else y + term
    return F.silu(y).to(x.dtype)


def triton_convs() -> dict[str, object]:
    """The triton backend's kernels as ``fn(x, w[C, 1, K])`` (``triton``: served, the two-pass
    backward; ``triton-1pass``: the one-pass backward served until session 6), none when it
    does not import."""
    try:
        from attnplug_triton.ops.conv.fused import causal_conv1d, causal_conv1d_one_pass
    except ImportError as exc:
        print(f"bench_conv: no triton rows ({exc})", file=sys.stderr)
        return {}
    return {"triton": lambda x, w: causal_conv1d(x, w[:, 0]),
            "triton-1pass": lambda x, w: causal_conv1d_one_pass(x, w[:, 0])}


IMPLS = {"conv1d": conv1d, "unfold": unfold, "shifts": shifts}


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=8192)
    parser.add_argument("--kernel", type=int, default=4)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: only the correctness check (timing needs do_bench on a GPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_conv: no CUDA device (--device cpu checks correctness only)",
              file=sys.stderr)
        return 1
    B, T, C, K = args.batch, args.seqlen, args.channels, args.kernel
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = torch.randn(B, T, C, device=args.device, dtype=dtype, requires_grad=True)
    w = (torch.randn(C, 1, K, device=args.device, dtype=dtype) / K).requires_grad_()
    dy = torch.randn(B, T, C, device=args.device, dtype=dtype)
    impls = dict(IMPLS)
    if args.device == "cuda":
        impls.update(triton_convs())
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    conv1d(x64, w64).backward(dy.double())
    failed = False
    for name, fn in impls.items():
        y = fn(x, w)
        y.backward(dy)
        errors = {what: ((got.double() - ref).abs().max() / ref.abs().max()).item()
                  for what, got, ref in (("y", y.detach(), conv1d(x64, w64).detach()),
                                         ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad))}
        x.grad = w.grad = None
        failed |= any(e > (2e-2 if dtype == torch.bfloat16 else 1e-5) for e in errors.values())
        print(f"{name:7} vs float64 conv1d, max error / max: "
              + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if args.device == "cpu":
        return 1 if failed else 0
    common = {"out": args.out, "warmup": args.warmup, "rep": args.rep, "rounds": args.rounds}
    shape = f"B={B}, T={T}, C={C}, kernel {K}, bf16"
    fwd = Bench("conv_fwd", anchor="conv1d", **common)
    fwd.note(shape)
    with torch.no_grad():
        fwd.measure(f"T={T} fwd", {n: (lambda f=f: f(x, w)) for n, f in impls.items()})
    both = Bench("conv_fwd_bwd", anchor="conv1d", **common)
    both.note(shape)
    both.measure(f"T={T} fwd+bwd", {n: (lambda f=f: f(x, w).backward(dy))
                                    for n, f in impls.items()}, grad_to_none=[x, w])
    fwd.report()
    both.report()
    if "triton" in impls:
        from attnplug_triton.ops.conv.fused import chosen_configs

        for line in chosen_configs():
            print(f"note: autotuned {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
