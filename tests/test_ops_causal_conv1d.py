"""GatedDeltaNet's short convolution (``attnplug.ops.causal_conv1d``) against float64 sums."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnplug.ops import causal_conv1d, naive_causal_conv1d


def _loop(x, w, state, silu):
    """The definition, one output at a time (float64)."""
    B, T, C = x.shape
    K = w.shape[1]
    u = torch.cat((torch.zeros(B, K - 1, C, dtype=x.dtype) if state is None else state, x), 1)
    y = torch.zeros(B, T, C, dtype=x.dtype)
    for t in range(T):
        for j in range(K):
            y[:, t] += w[:, j] * u[:, t + j]  # u[:, t + j] is input position t − K + 1 + j
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("B,T,C,K", [(1, 1, 1, 4), (2, 2, 5, 4), (2, 9, 7, 3), (1, 6, 3, 1),
                                     (3, 17, 12, 4)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_the_definition(B, T, C, K, with_state, activation) -> None:
    torch.manual_seed(B * 100 + T * 10 + C + K)
    x = torch.randn(B, T, C, dtype=torch.float64)
    w = torch.randn(C, K, dtype=torch.float64)
    s = torch.randn(B, K - 1, C, dtype=torch.float64) if with_state else None
    want = _loop(x, w, s, activation == "silu")
    for fn in (causal_conv1d, naive_causal_conv1d):
        got = fn(x, w, initial_state=s, activation=activation)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_low_precision_tracks_float64(dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 33, 20, dtype=torch.float64)
    w = torch.randn(20, 4, dtype=torch.float64) / 2
    ref = naive_causal_conv1d(x, w)
    got = causal_conv1d(x.to(dtype), w.to(dtype))
    assert got.dtype == dtype
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2)


def test_causal_conv1d_gradients_in_every_input() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(a[0], a[1], initial_state=a[2]),
                                    (x, w, s))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 12), split=st.integers(0, 12), K=st.integers(1, 5))
def test_splitting_the_sequence_with_the_state_changes_nothing(T, split, K) -> None:
    """Running ``x[:, :split]`` then ``x[:, split:]`` with the last K − 1 inputs carried as
    ``initial_state`` gives the whole sequence's output (what decoding relies on)."""
    split = min(split, T)
    g = torch.Generator().manual_seed(T * 31 + split * 7 + K)
    x = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
    w = torch.randn(3, K, dtype=torch.float64, generator=g)
    whole = causal_conv1d(x, w)
    u = torch.cat((torch.zeros(2, K - 1, 3, dtype=torch.float64), x[:, :split]), 1)
    state = u[:, u.shape[1] - (K - 1):]
    parts = torch.cat((causal_conv1d(x[:, :split], w),
                       causal_conv1d(x[:, split:], w, initial_state=state)), 1)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(2, 3)), "x must be a \\[B, T, C\\] tensor"),
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), "x must be a float tensor"),
    (dict(weight=torch.zeros(5, 4)), "weight must be \\[C, K\\] with C = x.shape\\[2\\] = 4"),
    (dict(weight=torch.zeros(4, 0)), "at least one tap"),
    (dict(weight=torch.zeros(4, 3, dtype=torch.float64)), "weight must have x's dtype"),
    (dict(initial_state=torch.zeros(2, 3, 4)), "initial_state must be \\[B, K-1, C\\]"),
    (dict(activation="gelu"), "activation='gelu' is not accepted; accepted: 'silu', None"),
])
def test_bad_arguments_are_named(kwargs, match) -> None:
    args = dict(x=torch.zeros(2, 3, 4), weight=torch.zeros(4, 3), initial_state=None,
                activation="silu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(args.pop("x"), args.pop("weight"), **args)
