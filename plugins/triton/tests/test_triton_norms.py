"""Triton RMSNorm / LayerNorm / gated norms against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from triton_cases import DEVICE, DTYPES, HAS_CUDA, assert_matches

# (shape, rms, bias, gate): awkward widths (1, 40, 100, 300), leading dims folded into rows.
SHAPES = [
    ((5, 1), True, False, False),
    ((3, 5, 40), True, False, False),
    ((7, 100), False, True, False),
    ((2, 3, 4, 24), True, False, True),
    ((33, 300), False, True, True),
]
GPU_SHAPES = [
    ((4096, 4096), True, False, False),
    ((1024, 5120), False, True, False),
    ((8, 128, 16, 128), True, False, True),
]
CASES = [(s, dtype) for s in SHAPES for dtype in DTYPES] + (
    [(s, torch.bfloat16) for s in GPU_SHAPES] if HAS_CUDA else [])


def _run(fn, x, w, b, g, dy, rms) -> list[torch.Tensor]:
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b, g)]
    y = fn(*leaves, eps=1e-5, rms=rms)
    y.backward(dy)
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("case,dtype", CASES, ids=lambda x: str(x))
def test_fused_norm_matches_float64_reference(case, dtype) -> None:
    from attnplug_triton.ops.norms.fused import fused_norm
    from attnplug_triton.ops.norms.naive import naive_norm

    shape, rms, has_bias, has_gate = case
    width = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = 1 + 0.1 * torch.randn(width, device=DEVICE, dtype=dtype)
    b = 0.1 * torch.randn(width, device=DEVICE, dtype=dtype) if has_bias else None
    g = torch.randn(shape, device=DEVICE, dtype=dtype) if has_gate else None
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    outs = _run(fused_norm, x, w, b, g, dy, rms)
    refs = _run(naive_norm, *(None if t is None else t.double() for t in (x, w, b, g)),
                dy.double(), rms)
    names = ["y", "dx", "dw"] + (["db"] if has_bias else []) + (["dgate"] if has_gate else [])
    for name, out, ref in zip(names, outs, refs, strict=True):
        assert_matches(f"{name} {case} {dtype}", out, ref, dtype)


def test_bad_arguments_are_named() -> None:
    from attnplug_triton.ops.norms.fused import fused_norm

    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        fused_norm(x, torch.ones(7, device=DEVICE), eps=1e-5, rms=True)
    with pytest.raises(ValueError, match="gate must have"):
        fused_norm(x, torch.ones(8, device=DEVICE), gate=x[:, :4], eps=1e-5, rms=True)
