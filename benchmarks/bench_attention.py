"""Causal attention, forward and forward+backward: attnplug's Triton kernel against the anchors.

Anchor: torch SDPA with its flash backend (``sdpa-flash``); also TE's ``DotProductAttention``
when ``transformer_engine`` imports, and SDPA with the backend torch chooses itself
(``sdpa-default``, for orientation: on Hopper it may pick another kernel than flash).
Default shape (kernels-notes §5.2): B=8, H=16, D=128, bfloat16, T ∈ {1K, 4K, 16K}; every
implementation reads the same ``[B, T, H, D]`` tensors.

    python3 benchmarks/bench_attention.py --out runs/bench-attention

``triton`` is the kernels as served (``attnplug_triton.ops.attention.fused.TENSOR_DESCRIPTORS``
names the kernels that load their loop tiles through tensor descriptors, TMA on Hopper);
``triton-ptr`` every kernel through pointers, ``triton-tma`` every kernel through descriptors,
``triton-tma-dkdv`` and ``triton-tma-dq`` one backward kernel through them — the rows that
choose ``TENSOR_DESCRIPTORS`` (the one the served kernels already are is left out).

Before timing, each case compares the Triton kernel's output (and gradients) with SDPA's and
prints the largest difference, so a fast wrong kernel shows in the same table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, add_common_args  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA's flash backend on ``[B, T, H, D]`` tensors (viewed as ``[B, H, T, D]``)."""
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True, **gqa)
    return o.transpose(1, 2)  # (B, T, H, D)


def sdpa_default(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with the backend torch picks itself (cuDNN, flash, ...), for orientation."""
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, **gqa)
    return o.transpose(1, 2)  # (B, T, H, D)


def triton_flash(desc: bool | tuple[str, ...] | None = None) -> Attention | str:
    """attnplug's Triton kernels, or why they cannot run here. ``desc``: the kernels that load
    their loop tiles through tensor descriptors (``None``: as served). It goes to the launchers
    through ``FlashAttentionFunction``, so the backward (run later, under ``.backward()``)
    gets it too."""
    try:
        from attnplug_triton.ops.attention import fused
    except ImportError as exc:
        return f"attnplug_triton does not import ({exc})"
    if desc is None:
        return fused.flash_attention
    return lambda q, k, v: fused.FlashAttentionFunction.apply(q, k, v, q.shape[-1] ** -0.5,
                                                              desc)


def desc_names(desc: bool | tuple[str, ...] | None) -> frozenset[str] | None:
    """The kernels ``desc`` puts on tensor descriptors (None where the plugin is missing)."""
    try:
        from attnplug_triton.ops.attention.fused import descriptor_kernels
    except ImportError:
        return None
    return descriptor_kernels(desc)


def te_attention(heads: int, kv_heads: int, head_dim: int) -> Attention | str:
    """TE's DotProductAttention (causal, bshd), or why it cannot run here."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as exc:
        return f"transformer_engine does not import ({type(exc).__name__})"
    module = te.DotProductAttention(num_attention_heads=heads, kv_channels=head_dim,
                                    num_gqa_groups=kv_heads, attn_mask_type="causal",
                                    qkv_format="bshd")

    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return module(q, k, v).view(*q.shape[:3], v.shape[-1])  # (B, T, H, Dv)

    return run


def causal_flops(B: int, T: int, H: int, D: int) -> float:
    """Forward FLOPs of causal attention, counting the T(T+1)/2 visible pairs (§5.3)."""
    return 4.0 * D * (T * (T + 1) / 2) * B * H


def max_differences(fn: Attention, ref: Attention, q: Tensor, k: Tensor, v: Tensor,
                    backward: bool) -> str:
    """Largest |fn − ref| of the output (and of dq, dk, dv with ``backward``), as text."""
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    others = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    out, ref_out = fn(*leaves), ref(*others)
    diffs = [(out.float() - ref_out.float()).abs().max().item()]
    if backward:
        do = torch.randn_like(out)
        out.backward(do)
        ref_out.backward(do)
        diffs += [(a.grad.float() - b.grad.float()).abs().max().item()
                  for a, b in zip(leaves, others, strict=True)]
    return "/".join(f"{d:.1e}" for d in diffs)


def run_case(bench: Bench, impls: dict[str, Attention | str], B: int, T: int, H: int,
             Hkv: int, D: int, dtype: torch.dtype, mode: str) -> None:
    """Measure one (T, mode) case for every implementation."""
    device = "cuda"
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
    backward = mode == "fwd+bwd"
    for x in (q, k, v):
        x.requires_grad_(backward)
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    timed: dict[str, Callable[[], object] | str] = {}
    extra: dict[str, dict[str, str]] = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            timed[name] = fn
            continue
        if backward:
            timed[name] = lambda fn=fn: fn(q, k, v).backward(do)
        else:
            timed[name] = lambda fn=fn: fn(q, k, v)
        if name != bench.anchor:
            try:
                diff = max_differences(fn, impls[bench.anchor], q, k, v, backward)
            except Exception as exc:  # reported in the table, the run goes on
                diff = f"{type(exc).__name__}"
            extra[name] = {"max |Δ| vs anchor (o/dq/dk/dv)": diff}
    flops = causal_flops(B, T, H, D) * (3.5 if backward else 1.0)
    bench.measure(f"T={T} {mode}", timed, flops=flops,
                  grad_to_none=[q, k, v] if backward else None, extra=extra)


def tuned_configs() -> list[str]:
    """The configs the Triton autotuner chose, per kernel and tuning key."""
    try:
        from attnplug_triton.ops.attention.fused import chosen_configs
    except ImportError:
        return []
    return chosen_configs()


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; nothing to measure", file=sys.stderr)
        return 1
    H, D = args.heads, args.head_dim
    Hkv = args.kv_heads or H
    variants = {"triton-ptr": False, "triton-tma": True, "triton-tma-dkdv": ("dkdv",),
                "triton-tma-dq": ("dq",)}
    impls: dict[str, Attention | str] = {
        "sdpa-flash": sdpa_flash,
        "sdpa-default": sdpa_default,
        "triton": triton_flash(),
        # the variants the served kernels are not (a row equal to "triton" measures nothing new)
        **{name: triton_flash(desc=desc) for name, desc in variants.items()
           if desc_names(desc) != desc_names(None)},
        "te": te_attention(H, Hkv, D),
    }
    bench = Bench("attention", anchor="sdpa-flash", out=args.out, warmup=args.warmup,
                  rep=args.rep, rounds=args.rounds)
    bench.note(f"B={args.batch}, H={H}, Hkv={Hkv}, D={D}, {args.dtype}, causal; TFLOP/s count "
               "the T(T+1)/2 visible pairs, backward as 2.5× forward")
    for T in args.seqlens:
        for mode in args.modes:
            run_case(bench, impls, args.batch, T, H, Hkv, D, DTYPES[args.dtype], mode)
            torch.cuda.empty_cache()
    for line in tuned_configs():
        bench.note(f"autotuned {line}")
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
