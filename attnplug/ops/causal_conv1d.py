"""GatedDeltaNet's short convolution: depthwise, causal over time, then SiLU (DESIGN §8 extension).

``y[b, t, c] = act(Σ_{j<K} w[c, j] · u[b, t − K + 1 + j, c])`` where ``u`` is ``x`` preceded by
the ``K − 1`` steps of ``initial_state`` (zeros when none is given), ``K = weight.shape[1]``, and
``act`` SiLU (``activation="silu"``) or the identity (``None``). :func:`causal_conv1d` is the
reference every backend's kernel matches; :func:`naive_causal_conv1d` spells the sum out (the
float64 form the tests compare against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "naive_causal_conv1d", "check_causal_conv1d_args", "padded_input",
           "ACTIVATIONS"]

ACTIVATIONS = ("silu", None)


def check_causal_conv1d_args(owner: str, x: Tensor, weight: Tensor,
                             initial_state: Tensor | None, activation: str | None) -> None:
    """Raise ``ValueError`` naming ``owner`` and the argument when the shapes, dtypes or the
    activation are not what :func:`causal_conv1d` takes."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{owner}: x must be a [B, T, C] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: x must be a float tensor, got {x.dtype}")
    B, _, C = x.shape
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != C:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{owner}: weight must be [C, K] with C = x.shape[2] = {C}, got {got}")
    if weight.shape[1] < 1:
        raise ValueError(f"{owner}: weight must have at least one tap (K >= 1), got K = 0")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{owner}: weight must have x's dtype and device ({x.dtype}, "
                         f"{x.device}), got {weight.dtype} on {weight.device}")
    if initial_state is not None:
        want = (B, weight.shape[1] - 1, C)
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != want:
            got = (tuple(initial_state.shape) if isinstance(initial_state, Tensor)
                   else type(initial_state).__name__)
            raise ValueError(f"{owner}: initial_state must be [B, K-1, C] = {list(want)}, "
                             f"got {got}")
        if initial_state.device != x.device:
            raise ValueError(f"{owner}: initial_state must be on x's device {x.device}, got "
                             f"{initial_state.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation={activation!r} is not accepted; accepted: "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")


def padded_input(x: Tensor, initial_state: Tensor | None, kernel_size: int) -> Tensor:
    """``u[B, K−1+T, C]``: ``x`` preceded by the ``K − 1`` steps of ``initial_state`` (zeros
    when None), in x's dtype; ``u[:, K−1+t] = x[:, t]``."""
    B, _, C = x.shape
    history = (x.new_zeros(B, kernel_size - 1, C) if initial_state is None
               else initial_state.to(x.dtype))
    return torch.cat((history, x), dim=1)


def causal_conv1d(x: Tensor, weight: Tensor, *, initial_state: Tensor | None = None,
                  activation: str | None = "silu") -> Tensor:
    """``y[B, T, C]`` (x's dtype) from ``x[B, T, C]``, ``weight[C, K]`` and optionally
    ``initial_state[B, K−1, C]`` (the inputs before ``x``, oldest first; zeros when None).
    Differentiable in all three. torch's depthwise ``conv1d`` over the padded input."""
    check_causal_conv1d_args("causal_conv1d", x, weight, initial_state, activation)
    T, C = x.shape[1:]
    K = weight.shape[1]
    if T == 0:  # an empty output, still connected to x and the weight
        return x * weight[:, 0]
    padded = padded_input(x, initial_state, K)  # (B, K−1+T, C)
    y = F.conv1d(padded.transpose(1, 2), weight.unsqueeze(1), groups=C).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def naive_causal_conv1d(x: Tensor, weight: Tensor, *, initial_state: Tensor | None = None,
                        activation: str | None = "silu") -> Tensor:
    """The same function as a sum of ``K`` shifted products, in the inputs' dtype (pass
    float64 tensors for the reference the tests use)."""
    check_causal_conv1d_args("naive_causal_conv1d", x, weight, initial_state, activation)
    T, K = x.shape[1], weight.shape[1]
    u = padded_input(x, initial_state, K)  # u[:, K−1+t] = x[:, t]
    y = sum(weight[:, j] * u[:, j:j + T] for j in range(K))
    return y * torch.sigmoid(y) if activation == "silu" else y
