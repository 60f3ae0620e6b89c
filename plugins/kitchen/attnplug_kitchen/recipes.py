"""Kitchen's quantisation recipes: how a recipe-driven linear layer does its matmuls.

Two recipes (``TransformerConfig.kitchen_recipe``):

- ``"bf16"``: no quantisation. ``y = x Wᵀ + b`` is one plain matmul in the input's dtype (the
  name is the recipe's, not a cast: float32 parameters stay float32, and the result is exactly
  the local backend's ``Linear``).
- ``"fp8_current"``: per-tensor *current* scaling (Transformer Engine's
  ``Float8CurrentScaling``). Every matmul input is quantised with a scale taken from its own
  absolute maximum at that moment, ``scale = amax / fmax``, and ``q = cast(t / scale)``:

  ====================  ==========  ========  =================================
  tensor                format      fmax      used by
  ====================  ==========  ========  =================================
  activations ``x``     e4m3fn      448       forward, weight gradient
  weights ``W``         e4m3fn      448       forward, input gradient
  output gradient       e5m2        57344     input gradient, weight gradient
  ====================  ==========  ========  =================================

  forward ``y = (qx·sx)(qw·sw)ᵀ + b``; backward ``dx = (qg·sg)(qw·sw)``,
  ``dW = (qg·sg)ᵀ(qx·sx)``, ``db = Σ g`` (the bias gradient is not quantised). A tensor whose
  amax is 0 gets scale 1. On Hopper (CUDA capability >= 9.0) each matmul runs through
  ``torch._scaled_mm`` when its shapes allow (the contracted and output dims multiples of 16);
  elsewhere it is emulated by quantise-dequantise, ``q.to(dtype).mul(scale)`` followed by a
  matmul in the input dtype, with the same scales, so CPU results predict the GPU's.
  ``ATTNPLUG_KITCHEN_FP8_EMULATE=1`` forces the emulation on Hopper too.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from attnplug._errors import ConfigError
from attnplug.config import KITCHEN_RECIPES

__all__ = [
    "E4M3",
    "E5M2",
    "EMULATE_ENV",
    "FP8Format",
    "KITCHEN_RECIPES",
    "check_recipe",
    "dequantize",
    "fp8_current_linear",
    "quantize",
    "recipe_linear",
    "uses_scaled_mm",
]

EMULATE_ENV = "ATTNPLUG_KITCHEN_FP8_EMULATE"


@attrs.frozen
class FP8Format:
    """One 8-bit float format: its torch dtype and largest finite value ``fmax``."""

    name: str
    dtype: torch.dtype
    fmax: float


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0)


def check_recipe(recipe: Any, owner: str = "kitchen") -> str:
    """Return ``recipe`` when it names a kitchen recipe.

    Raises:
        ConfigError: naming the field ``kitchen_recipe``, the value and the accepted names.
    """
    if isinstance(recipe, bool) or recipe not in KITCHEN_RECIPES:
        accepted = ", ".join(repr(r) for r in KITCHEN_RECIPES)
        raise ConfigError(
            f"{owner}: kitchen_recipe={recipe!r} is not accepted: expected one of {accepted}"
        )
    return recipe


# -- quantisation -----------------------------------------------------------------------------
def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales and the division by them are float32 (float64 for float64 tensors)."""
    return torch.promote_types(dtype, torch.float32)


def quantize(t: torch.Tensor, fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling of ``t`` into ``fmt``.

    Returns:
        ``(q, scale)``: ``q`` in ``fmt.dtype`` with ``t ≈ q · scale``, and ``scale = amax(|t|) /
        fmt.fmax`` as a 0-dim float32 tensor (float64 for float64 ``t``); ``scale = 1`` when
        ``t`` is all zeros or empty. Values are clamped to ``±fmax`` before the cast (the
        division can overshoot by a rounding error).
    """
    dtype = _scale_dtype(t.dtype)
    t = t.detach()
    if t.numel() == 0:
        scale = torch.ones((), dtype=dtype, device=t.device)
        return t.to(fmt.dtype), scale
    amax = t.abs().amax().to(dtype)
    scale = torch.where(amax > 0, amax / fmt.fmax, torch.ones_like(amax))
    q = (t.to(dtype) / scale).clamp_(-fmt.fmax, fmt.fmax).to(fmt.dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q.to(dtype).mul(scale)``: the value an fp8 tensor stands for, in ``dtype``."""
    return q.to(dtype).mul(scale)


def _is_hopper(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def uses_scaled_mm(device: torch.device | str) -> bool:
    """Whether fp8 matmuls on ``device`` go through ``torch._scaled_mm`` (Hopper, CUDA
    capability >= 9.0, and ``ATTNPLUG_KITCHEN_FP8_EMULATE`` unset) rather than the emulation.
    Individual matmuls whose shapes ``_scaled_mm`` cannot take are still emulated."""
    if os.environ.get(EMULATE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return _is_hopper(torch.device(device))


_SCALED_MM_OUT = (torch.bfloat16, torch.float16, torch.float32)


def _fp8_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """``(a·sa) @ (b·sb)`` for fp8 ``a[M, K]`` and ``b[K, N]``, returned in ``dtype``.

    ``torch._scaled_mm`` when the device and shapes allow it, else the emulation in ``dtype``.
    """
    M, K = a.shape
    N = b.shape[1]
    if (dtype in _SCALED_MM_OUT and K % 16 == 0 and N % 16 == 0 and M > 0
            and uses_scaled_mm(a.device)):
        out = torch._scaled_mm(
            a.contiguous(),  # row-major [M, K]
            b.t().contiguous().t(),  # column-major [K, N]
            scale_a=sa.float(),
            scale_b=sb.float(),
            out_dtype=dtype,
        )
        return out[0] if isinstance(out, tuple) else out  # torch < 2.5 returned (out, amax)
    return dequantize(a, sa, dtype) @ dequantize(b, sb, dtype)


class _FP8CurrentScalingLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` under the ``fp8_current`` recipe (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)  # (N, in)
        qx, sx = quantize(x2, E4M3)
        qw, sw = quantize(weight, E4M3)
        y = _fp8_mm(qx, sx, qw.t(), sw, dtype)  # (N, out)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(qx, sx, qw, sw)
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qx, sx, qw, sw = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype = ctx.shapes
        out_features = qw.shape[0]
        dtype = grad_out.dtype
        g2 = grad_out.reshape(-1, out_features)  # (N, out)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x or need_w:
            qg, sg = quantize(g2, E5M2)
            if need_x:
                grad_x = _fp8_mm(qg, sg, qw, sw, dtype).reshape(x_shape).to(x_dtype)  # (..., in)
            if need_w:
                grad_w = _fp8_mm(qg.t(), sg, qx, sx, dtype).to(w_dtype)  # (out, in)
        if need_b:
            grad_b = g2.sum(0).to(b_dtype)  # (out,)
        return grad_x, grad_w, grad_b


def fp8_current_linear(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ (+ b)`` with fp8 per-tensor current scaling in forward and backward.

    ``x[..., in]``, ``weight[out, in]``, ``bias[out]`` or ``None``; returns ``y[..., out]`` in
    ``x``'s dtype. Gradients flow to all three (``x`` and ``weight`` through the quantised
    matmuls, ``bias`` unquantised).
    """
    return _FP8CurrentScalingLinear.apply(x, weight, bias)


def recipe_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  recipe: str) -> torch.Tensor:
    """``x Wᵀ (+ b)`` under ``recipe`` (``"bf16"`` or ``"fp8_current"``), in ``x``'s dtype.

    Raises:
        ConfigError: an unknown recipe (naming ``kitchen_recipe``).
    """
    if recipe == "bf16":
        dtype = x.dtype
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    if recipe == "fp8_current":
        return fp8_current_linear(x, weight, bias)
    check_recipe(recipe)
    raise AssertionError("unreachable")  # check_recipe raised
