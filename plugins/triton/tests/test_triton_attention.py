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


DESC_CASES = [(shape, torch.float16) for shape in SHAPES] + (
    [(shape, torch.bfloat16) for shape in GPU_SHAPES] if HAS_CUDA else [])


@pytest.mark.parametrize("shape,dtype", DESC_CASES, ids=lambda x: str(x))
def test_descriptor_kernels_match_the_pointer_kernels_and_float64(shape, dtype) -> None:
    """The kernels with their loop tiles through tensor descriptors (TMA on Hopper): o, the
    log-sum-exp, dq, dk and dv as the pointer kernels' (same products, same order) and
    against float64 — padded head dims, S > T, GQA/MQA, one token."""
    from attnplug_triton.ops.attention import fused
    from attnplug_triton.ops.attention.naive import naive_attention

    q, k, v, do = _inputs(*shape, dtype)
    meta = fused._meta(q, k, v)
    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        assert fused._descriptors(k, v, meta) is None  # no TMA before Hopper
        pytest.skip("tensor descriptors need a Hopper GPU or the interpreter")
    assert fused._descriptors(k, v, meta) is not None
    scale = shape[5] ** -0.5
    o_desc, lse_desc = fused.attention_forward(q, k, v, scale, desc=True)
    o_ptrs, lse_ptrs = fused.attention_forward(q, k, v, scale, desc=False)
    # under the interpreter the same products in the same order: equal; on a GPU the autotuner
    # may choose other blocks for the descriptor kernels (another summation order): equal up
    # to a few roundings of the 16-bit outputs
    exact = 2e-2 if HAS_CUDA else 0.0
    torch.testing.assert_close(o_desc, o_ptrs, rtol=exact, atol=exact)
    torch.testing.assert_close(lse_desc, lse_ptrs, rtol=1e-4 if HAS_CUDA else 1e-6, atol=1e-6)
    assert fused._qo_descriptors(q, do, meta, None) is not None
    grads_desc = fused.attention_backward(do, q, k, v, o_ptrs, lse_ptrs, scale, desc=True)
    grads_ptrs = fused.attention_backward(do, q, k, v, o_ptrs, lse_ptrs, scale, desc=False)
    refs = _run(naive_attention, q.double(), k.double(), v.double(), do.double())
    for name, got, want, ref in zip(("o", "dq", "dk", "dv"), (o_desc, *grads_desc),
                                    (o_ptrs, *grads_ptrs), refs, strict=True):
        torch.testing.assert_close(got, want, rtol=exact, atol=exact,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert_matches(f"{name} {shape} {dtype} (descriptors)", got, ref, dtype)


def test_served_kernels_take_descriptors_as_tensor_descriptors_names(monkeypatch) -> None:
    """flash_attention launches each kernel on descriptors exactly when TENSOR_DESCRIPTORS
    names it (where TMA takes the tensors), and ``desc`` arguments are checked."""
    from attnplug_triton.ops.attention import fused

    seen = {}
    real = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda name, grid, args, meta, config:
                        seen.__setitem__(name, bool(meta.get(fused._DESC_FLAGS[name])))
                        or real(name, grid, args, meta, config))
    q, k, v, do = _inputs(1, 20, 24, 4, 2, 16, 16, torch.float16)
    for names in (fused.TENSOR_DESCRIPTORS, frozenset(), frozenset({"fwd"}),
                  frozenset({"dkdv", "dq", "fwd"})):
        monkeypatch.setattr(fused, "TENSOR_DESCRIPTORS", names)
        seen.clear()
        _run(fused.flash_attention, q, k, v, do)
        assert seen == {name: name in names for name in ("fwd", "dkdv", "dq")}, names
    assert fused.descriptor_kernels(True) == {"fwd", "dkdv", "dq"}
    assert fused.descriptor_kernels(False) == frozenset()
    assert fused.descriptor_kernels("dq") == {"dq"}
    with pytest.raises(ValueError, match=r"unknown kernels \['bwd'\].*'fwd', 'dkdv', 'dq'"):
        fused.descriptor_kernels(("dq", "bwd"))
    with pytest.raises(ValueError, match="desc=3 is not accepted"):
        fused.descriptor_kernels(3)


def test_descriptors_only_where_tma_takes_the_tensors(monkeypatch) -> None:
    """float32 (the tf32x3 path), strides that are not multiples of 16 bytes, and for q/dO a
    head group that a row block cannot hold whole: the pointer kernels; with every kernel in
    ``TENSOR_DESCRIPTORS``, flash_attention's forward and backward still match float64 — also
    with a group of 3 heads (q/dO through pointers, K/V through descriptors)."""
    from attnplug_triton.ops.attention import fused
    from attnplug_triton.ops.attention.naive import naive_attention

    q, k, v, do = _inputs(1, 20, 24, 4, 2, 16, 16, torch.float32)
    assert fused._descriptors(k, v, fused._meta(q, k, v)) is None  # float32
    q, k, v, do = (x.half() for x in (q, k, v, do))
    assert fused._descriptors(k, v, fused._meta(q, k, v)) is not None
    odd = torch.randn(1, 24, 2, 20, device=DEVICE, dtype=torch.float16)[..., :12]  # 40-byte rows
    assert fused._descriptors(odd, odd, fused._meta(q[..., :12], odd, odd)) is None
    monkeypatch.setattr(fused, "TENSOR_DESCRIPTORS", frozenset({"fwd", "dkdv", "dq"}))
    outs = _run(fused.flash_attention, q, k, v, do)
    refs = _run(naive_attention, q.double(), k.double(), v.double(), do.double())
    for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, refs, strict=True):
        assert_matches(f"{name} (descriptors on)", out, ref, torch.float16)
    q3, k3, v3, do3 = _inputs(1, 21, 21, 6, 2, 16, 16, torch.float16)  # 3 heads a group
    assert fused._qo_descriptors(q3, do3, fused._meta(q3, k3, v3), None) is None
    assert fused._descriptors(k3, v3, fused._meta(q3, k3, v3)) is not None
    outs = _run(fused.flash_attention, q3, k3, v3, do3)
    refs = _run(naive_attention, q3.double(), k3.double(), v3.double(), do3.double())
    for name, out, ref in zip(("o", "dq", "dk", "dv"), outs, refs, strict=True):
        assert_matches(f"{name} (descriptors on, group of 3)", out, ref, torch.float16)


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
