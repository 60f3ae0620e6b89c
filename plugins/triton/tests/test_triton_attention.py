"""Triton flash attention against a float64 reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from triton_cases import DEVICE, DTYPES, HAS_CUDA, assert_matches

# (B, T, S, H, Hkv, D, Dv): one token, S > T, GQA (Hkv = 2) and MQA (Hkv = 1), D = 40 (not a
# power of two), Dv != D, T = 64 + 3 (not a multiple of any block).
SHAPES = [
    (2, 1, 1, 4, 2, 16, 16),
    (1, 1, 9, 4, 1, 16, 16),
    (2, 17, 17, 4, 2, 40, 40),
    (1, 67, 80, 4, 1, 16, 24),
    (1, 67, 67, 4, 4, 40, 16),
]
# On a GPU also real sizes, at the block sizes the autotuner picks there.
GPU_SHAPES = [
    (2, 1024, 1024, 16, 16, 128, 128),
    (1, 4096, 4096, 8, 2, 128, 128),
    (2, 1000, 1100, 8, 2, 64, 64),
    (1, 513, 600, 4, 2, 256, 256),
    (4, 1, 1025, 8, 1, 128, 128),
]
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES if dtype != torch.float16] + [
    (SHAPES[3], torch.float16)
] + ([(shape, torch.bfloat16) for shape in GPU_SHAPES] if HAS_CUDA else [])


def _inputs(B: int, T: int, S: int, H: int, Hkv: int, D: int, Dv: int, dtype: torch.dtype
            ) -> tuple[torch.Tensor, ...]:
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, S, Hkv, Dv, device=DEVICE, dtype=dtype)
    do = torch.randn(B, T, H, Dv, device=DEVICE, dtype=dtype)
    return q, k, v, do


def _run(fn, q, k, v, do, **kwargs) -> list[torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, **kwargs)
    o.backward(do)
    return [o] + [x.grad for x in leaves]


@pytest.mark.parametrize("shape,dtype", CASES, ids=lambda x: str(x))
def test_flash_attention_matches_float64_reference(shape, dtype) -> None:
    from attnplug_triton.ops.attention.fused import flash_attention
    from attnplug_triton.ops.attention.naive import naive_attention

    q, k, v, do = _inputs(*shape, dtype)
    outs = _run(flash_attention, q, k, v, do)
    refs = _run(naive_attention, q.double(), k.double(), v.double(), do.double())
    for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, refs, strict=True):
        assert out.dtype == dtype
        assert_matches(f"{name} {shape} {dtype}", out, ref, dtype)


def test_softmax_scale_and_strided_inputs() -> None:
    from attnplug_triton.ops.attention.fused import flash_attention
    from attnplug_triton.ops.attention.naive import naive_attention

    B, T, H, Hkv, D = 2, 19, 4, 2, 16
    qkv = torch.randn(B, T, H + 2 * Hkv, D, device=DEVICE)  # one fused projection, split below
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)  # non-contiguous views
    do = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    outs = _run(flash_attention, q, k, v, do, softmax_scale=0.3)
    refs = _run(naive_attention, q.double(), k.double(), v.double(), do.double(),
                softmax_scale=0.3)
    for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, refs, strict=True):
        assert_matches(name, out, ref, torch.float32)


def test_matches_the_local_backend() -> None:
    from attnplug_triton.ops.attention.fused import flash_attention

    from attnplug.ops.attention import causal_attention

    q, k, v, _ = _inputs(1, 33, 40, 4, 2, 16, 16, torch.float32)
    assert_matches("o", flash_attention(q, k, v), causal_attention(q, k, v), torch.float32)


@pytest.mark.parametrize("bad,message", [
    (lambda q, k, v: (q, k[:, :, :, :8], v), "k must be"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "S >= T"),
    (lambda q, k, v: (q[:, :, :3], k, v), "multiple of the key/value heads"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float64"),
    (lambda q, k, v: (q, k.half(), v), "share one dtype"),
])
def test_bad_arguments_are_named(bad, message) -> None:
    from attnplug_triton.ops.attention.fused import flash_attention

    q, k, v, _ = _inputs(1, 5, 5, 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        flash_attention(*bad(q, k, v))
