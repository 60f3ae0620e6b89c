"""Kitchen's own modules: recipe-driven linears and experts, and a torch-SDPA core attention.

The linears and experts subclass the local backend's classes, so they take the same
constructor arguments, initialise their parameters the same way (same random draws) and have
the same parameter names: a state dict copies between ``local`` and ``kitchen`` models
unchanged. Only the matmuls differ: they run through the recipe (:mod:`attnplug_kitchen.recipes`).

Which recipe: the class attribute ``recipe``; ``None`` (the classes below) means
``config.kitchen_recipe``. :func:`recipe_class` gives the variant bound to one recipe
(``KitchenLinear_fp8_current``, ...), which is what :class:`KitchenSpecProvider` hands out, so
a provider built with ``recipe="fp8_current"`` gets fp8 layers whatever the config says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnplug.config import KITCHEN_RECIPES
from attnplug.layers._checks import check_config, check_positive_int
from attnplug.layers.linear import LayerNormLinear, Linear
from attnplug.layers.mlp import glu
from attnplug.layers.moe import SequentialExperts
from attnplug_kitchen.recipes import check_recipe, recipe_linear

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = [
    "KitchenDotProductAttention",
    "KitchenLayerNormLinear",
    "KitchenLinear",
    "KitchenSequentialExperts",
    "recipe_class",
]


def _resolve_recipe(owner: nn.Module, config: TransformerConfig) -> str:
    recipe = type(owner).recipe  # type: ignore[attr-defined]
    return check_recipe(config.kitchen_recipe if recipe is None else recipe,
                        type(owner).__name__)


class KitchenLinear(Linear):
    """``y = x Wᵀ (+ b)`` through the recipe; weight ``[output_size, input_size]``.

    Built as ``cls(input_size, output_size, *, config, bias=False, init_method=None)`` (the
    ``linear`` slots' contract, as :class:`attnplug.layers.linear.Linear`). Raises
    ``ConfigError`` / ``ValueError`` naming a bad argument.
    """

    recipe: ClassVar[str | None] = None

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method=None) -> None:
        super().__init__(input_size, output_size, config=config, bias=bias,
                         init_method=init_method)
        self.kitchen_recipe = _resolve_recipe(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recipe_linear(x, self.weight, self.bias, self.kitchen_recipe)  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.kitchen_recipe!r}"


class KitchenLayerNormLinear(LayerNormLinear):
    """A norm (``config.normalization``, ``config.layernorm_epsilon``) then a recipe linear.

    The ``column_parallel_layer_norm_linear`` slot: same arguments and parameter names as
    :class:`attnplug.layers.linear.LayerNormLinear` (``weight``, ``bias``,
    ``layer_norm.weight`` and, for LayerNorm, ``layer_norm.bias``). The norm itself is not
    quantised; its output is, as the linear's input.
    """

    recipe: ClassVar[str | None] = None

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 bias: bool = False, init_method=None) -> None:
        super().__init__(input_size, output_size, config=config, bias=bias,
                         init_method=init_method)
        self.kitchen_recipe = _resolve_recipe(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(x)  # (..., in)
        return recipe_linear(h, self.weight, self.bias, self.kitchen_recipe)  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.kitchen_recipe!r}"


class KitchenSequentialExperts(SequentialExperts):
    """The ``grouped_mlp_modules`` experts with every expert matmul through the recipe.

    Same contract and parameters as :class:`attnplug.layers.moe.SequentialExperts`
    (``fc1_weight [E, ffn or 2·ffn, hidden]``, ``fc2_weight [E, hidden, ffn]``, optional
    ``fc1_bias`` / ``fc2_bias``); ``forward(x[N, hidden], tokens_per_expert[E]) -> [N, hidden]``.
    Under ``fp8_current`` each expert's matmul is scaled on its own (its weight slice, its
    rows), as a grouped GEMM with per-GEMM scales would.
    """

    recipe: ClassVar[str | None] = None

    def __init__(self, num_local_experts: int, *, config: TransformerConfig) -> None:
        super().__init__(num_local_experts, config=config)
        self.kitchen_recipe = _resolve_recipe(self, config)

    def expert_mlp(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                   w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
        """One expert on its rows, both matmuls through the recipe: x (n, hidden) -> (n,
        hidden)."""
        h = recipe_linear(x, w1, b1, self.kitchen_recipe)  # (n, ffn or 2·ffn)
        h = glu(h, self.activation_func) if self.gated else self.activation_func(h)  # (n, ffn)
        return recipe_linear(h, w2, b2, self.kitchen_recipe)  # (n, hidden)

    def extra_repr(self) -> str:
        return f"num_local_experts={self.num_local_experts}, recipe={self.kitchen_recipe!r}"


class KitchenDotProductAttention(nn.Module):
    """Kitchen's ``core_attention`` for ``kitchen_attention_backend="sdpa"``: causal softmax
    attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Built as ``cls(config, layer_number=1, softmax_scale=None)``; ``forward(q[B,T,H,D],
    k[B,S,Hkv,D], v[B,S,Hkv,Dv]) -> o[B,T,H,Dv]``: query ``t`` sees key ``s`` when
    ``s <= t + S - T``, query head ``h`` uses key/value head ``h // (H // Hkv)``,
    ``softmax_scale`` defaults to ``D ** -0.5``. Not quantised under any recipe (the recipe
    applies to the linears around it). Raises ``ValueError`` for shapes that do not fit.
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_config(owner, config)
        self.layer_number = check_positive_int(owner, "layer_number", layer_number)
        if softmax_scale is not None and (isinstance(softmax_scale, bool) or not (
                isinstance(softmax_scale, (int, float)) and softmax_scale > 0)):
            raise ValueError(f"{owner}: softmax_scale={softmax_scale!r} is not accepted: "
                             "expected a number > 0 or None")
        self.softmax_scale = softmax_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"{owner}: q, k, v must be 4-D [batch, seq, heads, dim]; got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        B, T, H, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        if (k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3] or Hkv == 0
                or H % Hkv or S < T):
            raise ValueError(
                f"{owner}: expected q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv] with H a multiple "
                f"of Hkv and S >= T; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, seq, dim)
        if H != Hkv:
            kh = kh.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
            vh = vh.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dv)
        if S == T:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                               scale=self.softmax_scale)
        else:
            t = torch.arange(T, device=q.device)[:, None]  # (T, 1)
            s = torch.arange(S, device=q.device)[None, :]  # (1, S)
            mask = s <= t + (S - T)  # (T, S)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                               scale=self.softmax_scale)
        return o.transpose(1, 2)  # (B, T, H, Dv)


# -- the variants bound to one recipe -----------------------------------------------------------
_RECIPE_BASES = (KitchenLinear, KitchenLayerNormLinear, KitchenSequentialExperts)
_VARIANTS: dict[tuple[type, str], type] = {}


def recipe_class(base: type, recipe: str) -> type:
    """The subclass of ``base`` (one of the recipe-driven classes above) bound to ``recipe``.

    Named ``f"{base.__name__}_{recipe}"`` (``KitchenLinear_fp8_current``) and importable from
    this module under that name, so models holding it pickle.

    Raises:
        ConfigError: an unknown recipe (naming ``kitchen_recipe``).
        ValueError: ``base`` is not a recipe-driven kitchen class.
    """
    check_recipe(recipe)
    if base not in _RECIPE_BASES:
        names = ", ".join(b.__name__ for b in _RECIPE_BASES)
        raise ValueError(f"recipe_class: base={base!r} is not accepted: expected one of {names}")
    return _VARIANTS[(base, recipe)]


def _make_variants() -> None:
    for base in _RECIPE_BASES:
        for recipe in KITCHEN_RECIPES:
            name = f"{base.__name__}_{recipe}"
            variant = type(name, (base,), {
                "recipe": recipe,
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"{base.__name__} bound to the {recipe!r} recipe.",
            })
            globals()[name] = variant
            _VARIANTS[(base, recipe)] = variant


_make_variants()
