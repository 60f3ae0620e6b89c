"""Transformer Engine modules with attnplug's constructor arguments: the ``te`` backend's classes.

Each adapter *is* the TE module (a subclass), so TE's own features — FP8 autocast, activation
checkpointing, its state dict — apply unchanged; it only translates attnplug's constructor
arguments (DESIGN §7, ``attnplug.backends.base``) to TE's and, where needed, the shapes of
``forward``. Parameters are created on the current CUDA device in ``config.torch_dtype``; their
names are the local layers' (``weight``, ``bias``) except where TE fuses or groups parameters:
``TELayerNormLinear`` (``layer_norm_weight``/``layer_norm_bias`` + ``weight``/``bias``) and
``TEGroupedExperts`` (``linear_fc1.weight{e}`` ...); ``attnplug_te.convert`` maps those.

Importing this module imports ``transformer_engine.pytorch``: only the provider does, when a
slot is asked for. Every touch-point with TE's API is in this file.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import transformer_engine.pytorch as te
from torch import nn

from attnplug import ConfigError
from attnplug.layers.linear import init_normal, output_layer_init_method
from attnplug.layers.mlp import activation_function, glu

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = [
    "TELinear",
    "TELayerNormLinear",
    "TERMSNorm",
    "TELayerNorm",
    "TEDotProductAttention",
    "TEGroupedExperts",
]

logger = logging.getLogger("attnplug")

InitMethod = Callable[[torch.Tensor], object]

try:  # the mask types this TE build knows (TE >= 1.x has the bottom-right causal mask)
    from transformer_engine.pytorch.constants import AttnMaskTypes as _MASK_TYPES
except ImportError:  # pragma: no cover - depends on the TE version
    _MASK_TYPES = ("causal",)
BOTTOM_RIGHT_CAUSAL = "causal_bottom_right" in _MASK_TYPES


@functools.cache
def _log_sdpa_fallback() -> None:
    logger.warning("te: this Transformer Engine has no 'causal_bottom_right' mask; attention with "
                   "more keys than queries runs on torch SDPA")


# -- argument checks (a bad argument names itself) ---------------------------------------------
def _check_config(owner: str, config: object) -> None:
    from attnplug.config import TransformerConfig

    if not isinstance(config, TransformerConfig):
        raise ConfigError(f"{owner}: config={type(config).__name__} is not accepted: expected an "
                          "attnplug.TransformerConfig")


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}: {name}={value!r} is not accepted: expected an integer >= 1")
    return value


def _eps(owner: str, eps: float | None, config: TransformerConfig) -> float:
    if eps is None:
        return config.layernorm_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps={eps!r} is not accepted: expected a number > 0 or None")
    return float(eps)


def _linear_args(owner: str, input_size: int, output_size: int, config: TransformerConfig,
                 bias: bool, init_method: InitMethod | None) -> InitMethod:
    """Check a linear slot's arguments; return the init method to give TE."""
    _check_config(owner, config)
    _positive_int(owner, "input_size", input_size)
    _positive_int(owner, "output_size", output_size)
    if not isinstance(bias, bool):
        raise ValueError(f"{owner}: bias={bias!r} is not accepted: expected true or false")
    if init_method is not None and not callable(init_method):
        raise ValueError(f"{owner}: init_method={init_method!r} is not accepted: expected None or "
                         "a function that fills a tensor in place")
    return init_method or init_normal(config.init_method_std)


def _device() -> torch.device:
    """The current CUDA device, where TE creates parameters."""
    return torch.device("cuda", torch.cuda.current_device())


# -- linears -----------------------------------------------------------------------------------
class TELinear(te.Linear):
    """``te.pytorch.Linear`` as the ``linear`` / column / row slots: ``y = x Wᵀ (+ b)``.

    Built ``(input_size, output_size, *, config, bias=False, init_method=None)``; ``weight``
    ``[output_size, input_size]`` (``normal(0, config.init_method_std)`` unless
    ``init_method``), ``bias`` zeros. ``forward(x[..., in]) -> [..., out]``; ``x`` must be on
    the GPU in the parameters' dtype (TE raises ``TypeError`` otherwise).
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method: InitMethod | None = None) -> None:
        init = _linear_args(type(self).__name__, input_size, output_size, config, bias,
                            init_method)
        super().__init__(input_size, output_size, bias=bias, init_method=init,
                         params_dtype=config.torch_dtype, device=_device())


class TELayerNormLinear(te.LayerNormLinear):
    """``te.pytorch.LayerNormLinear``: ``config.normalization`` (``layernorm_epsilon``), then the
    linear, in one fused module (the ``column_parallel_layer_norm_linear`` slot).

    Parameters: ``layer_norm_weight`` (ones) and, for LayerNorm, ``layer_norm_bias`` (zeros);
    ``weight`` and ``bias`` as in :class:`TELinear`. Same arguments and ``forward`` as
    :class:`TELinear`.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method: InitMethod | None = None) -> None:
        init = _linear_args(type(self).__name__, input_size, output_size, config, bias,
                            init_method)
        super().__init__(input_size, output_size, eps=config.layernorm_epsilon, bias=bias,
                         normalization=config.normalization, init_method=init,
                         params_dtype=config.torch_dtype, zero_centered_gamma=False,
                         device=_device())


# -- norms -------------------------------------------------------------------------------------
class TERMSNorm(te.RMSNorm):
    """``te.pytorch.RMSNorm`` over the last dimension (``layer_norm(rms_norm=True)``, q/k norms).

    Built ``(*, config, hidden_size, eps=None)`` (``eps=None``: ``config.layernorm_epsilon``);
    ``weight`` ``[hidden_size]`` (ones). ``forward(x[..., hidden])`` returns ``x``'s dtype, as the
    local norm does: TE normalises in the weight's dtype (computing in float32 inside), so an
    input of another dtype is cast to it and the output cast back.
    """

    def __init__(self, *, config: TransformerConfig, hidden_size: int,
                 eps: float | None = None) -> None:
        owner = type(self).__name__
        _check_config(owner, config)
        _positive_int(owner, "hidden_size", hidden_size)
        super().__init__(hidden_size, eps=_eps(owner, eps, config), device=_device(),
                         params_dtype=config.torch_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)  # (..., hidden)


class TELayerNorm(te.LayerNorm):
    """``te.pytorch.LayerNorm`` over the last dimension (``layer_norm(rms_norm=False)``).

    Built ``(*, config, hidden_size, eps=None)``; ``weight`` (ones) and ``bias`` (zeros)
    ``[hidden_size]``. Dtypes as in :class:`TERMSNorm`.
    """

    def __init__(self, *, config: TransformerConfig, hidden_size: int,
                 eps: float | None = None) -> None:
        owner = type(self).__name__
        _check_config(owner, config)
        _positive_int(owner, "hidden_size", hidden_size)
        super().__init__(hidden_size, eps=_eps(owner, eps, config), device=_device(),
                         params_dtype=config.torch_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)  # (..., hidden)


# -- attention ---------------------------------------------------------------------------------
class TEDotProductAttention(te.DotProductAttention):
    """``te.pytorch.DotProductAttention`` as ``core_attention``: causal, ``bshd``, grouped-query.

    Built ``(config, layer_number=1, softmax_scale=None)``: ``H = num_attention_heads`` query
    heads, ``Hkv = query_groups`` key/value heads, head dim ``D = head_dim``, scale ``D ** -0.5``
    unless given, no dropout. ``forward(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,D]) -> [B,T,H,D]``,
    query ``t`` seeing keys ``s <= t + S - T``: TE's ``"causal"`` mask when ``S == T``, its
    ``"causal_bottom_right"`` mask when ``S > T`` (TE picks a backend that supports it — cuDNN,
    flash-attn or its unfused PyTorch path). A TE build without the bottom-right mask gets
    ``S > T`` from ``attnplug.ops.attention.causal_attention`` (torch SDPA) instead, logged
    once. No parameters (its state dict holds only TE's ``_extra_state``).
    Raises ``ValueError`` when the shapes do not match the config or ``S < T``.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 softmax_scale: float | None = None) -> None:
        owner = type(self).__name__
        _check_config(owner, config)
        _positive_int(owner, "layer_number", layer_number)
        if softmax_scale is not None and not (
            isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
            and softmax_scale > 0
        ):
            raise ValueError(f"{owner}: softmax_scale={softmax_scale!r} is not accepted: expected "
                             "a number > 0 or None")
        heads, groups, head_dim = config.num_attention_heads, config.query_groups, config.head_dim
        scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
        super().__init__(heads, head_dim, num_gqa_groups=groups, attention_dropout=0.0,
                         qkv_format="bshd", attn_mask_type="causal", layer_number=layer_number,
                         softmax_scale=scale)
        self._attnplug_shape = (heads, groups, head_dim)
        self._attnplug_scale = scale

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        H, G, D = self._attnplug_shape
        shapes = tuple(tuple(x.shape) for x in (q, k, v))
        if (any(x.dim() != 4 for x in (q, k, v)) or q.shape[2:] != (H, D)
                or k.shape[2:] != (G, D) or v.shape[2:] != (G, D)
                or k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]):
            raise ValueError(
                f"{type(self).__name__}: expected q [B, T, {H}, {D}], k and v [B, S, {G}, {D}] "
                f"(from the config); got q, k, v of shapes {shapes}"
            )
        if k.shape[1] < q.shape[1]:
            raise ValueError(f"{type(self).__name__}: causal attention needs S >= T; got "
                             f"S={k.shape[1]} keys for T={q.shape[1]} queries")

    def forward(self, q: torch.Tensor, k: torch.Tensor,  # type: ignore[override]
                v: torch.Tensor) -> torch.Tensor:
        self._check(q, k, v)
        B, T, H, _ = q.shape
        S = k.shape[1]
        if S == T:
            mask = "causal"
        elif BOTTOM_RIGHT_CAUSAL:
            mask = "causal_bottom_right"
        else:
            return self._sdpa_bottom_right(q, k, v)
        out = super().forward(q, k, v, qkv_format="bshd", attn_mask_type=mask)  # (B, T, H·D)
        return out.reshape(B, T, H, -1)  # (B, T, H, D)

    def _sdpa_bottom_right(self, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> torch.Tensor:
        from attnplug.ops.attention import causal_attention

        _log_sdpa_fallback()
        return causal_attention(q, k, v, softmax_scale=self._attnplug_scale)  # (B, T, H, D)


# -- mixture of experts ------------------------------------------------------------------------
class TEGroupedExperts(nn.Module):
    """The ``grouped_mlp_modules`` experts: two ``te.pytorch.GroupedLinear`` (grouped GEMMs).

    Built ``(num_local_experts, *, config)``. ``linear_fc1`` holds ``weight{e}``
    ``[ffn or 2·ffn, hidden]`` (and ``bias{e}`` with ``add_bias_linear``), ``linear_fc2``
    ``weight{e}`` ``[hidden, ffn]`` — the local experts' ``fc1_weight[e]`` / ``fc2_weight[e]``;
    the gated linear unit and activation are the config's, as in the local experts.
    ``forward(x[N, hidden], tokens_per_expert[E]) -> [N, hidden]``, the rows of ``x`` sorted by
    expert. TE takes the split sizes as host integers, so ``host_counts`` asks the MoE layer for
    ``tokens_per_expert`` on the host: it copies the counts while the GPU still has the
    dispatch and the shared expert queued, where a ``.tolist()`` here would drain the GPU's
    queue (a device tensor still works: then it is that synchronisation).
    """

    host_counts = True

    def __init__(self, num_local_experts: int, *, config: TransformerConfig) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_config(owner, config)
        E = _positive_int(owner, "num_local_experts", num_local_experts)
        self.num_local_experts = E
        self.gated = config.gated_linear_unit
        self.activation_func = activation_function(config.activation_func)
        ffn, hidden = config.moe_ffn_size, config.hidden_size
        common = dict(bias=config.add_bias_linear, params_dtype=config.torch_dtype,
                      device=_device())
        self.linear_fc1 = te.GroupedLinear(E, hidden, 2 * ffn if self.gated else ffn,
                                           init_method=init_normal(config.init_method_std),
                                           **common)
        self.linear_fc2 = te.GroupedLinear(E, ffn, hidden,
                                           init_method=output_layer_init_method(config), **common)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        splits = [int(c) for c in tokens_per_expert.tolist()]  # host sync if on the device
        if len(splits) != self.num_local_experts or sum(splits) != x.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: tokens_per_expert={splits} must have "
                f"{self.num_local_experts} entries summing to the {x.shape[0]} rows of x"
            )
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        h = self.linear_fc1(x, splits)  # (N, ffn or 2·ffn)
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)  # (N, ffn)
        return self.linear_fc2(h, splits)  # (N, hidden)

    def extra_repr(self) -> str:
        return f"num_local_experts={self.num_local_experts}, gated={self.gated}"
