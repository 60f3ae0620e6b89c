"""``KitchenSpecProvider``: serves the recipe-driven slots itself, delegates the rest.

Kitchen's own slots: ``linear``, ``column_parallel_linear``, ``row_parallel_linear``,
``column_parallel_layer_norm_linear`` and ``grouped_mlp_modules`` (recipe-driven, see
:mod:`attnplug_kitchen.layers`), and ``core_attention`` when ``use_kitchen_attention``.
Every other slot (``layer_norm``, ``activation_func``, ``fuse_layernorm_and_linear``, the
kernels, ``core_attention`` otherwise) comes from the fallback backend, and ``served_by(slot)``
says which. ``fuse_layernorm_and_linear()`` follows the fallback (as Megatron-Core's kitchen
does): over a fusing fallback such as TE the attention and MLP inputs go through kitchen's
norm-fused linear; over ``local`` they get the fallback's norm and a plain kitchen linear.

Importing this module imports neither torch nor the layers.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attnplug._errors import BackendError, ConfigError
from attnplug.backends.base import SLOTS, BackendSpecProvider, SlotNotServed
from attnplug.config import KITCHEN_ATTENTION_BACKENDS, KITCHEN_RECIPES

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = ["KitchenSpecProvider", "KITCHEN_LINEAR_SLOTS", "TRITON_INSTALL"]

logger = logging.getLogger("attnplug")

KITCHEN_LINEAR_SLOTS = (
    "linear",
    "column_parallel_linear",
    "row_parallel_linear",
    "column_parallel_layer_norm_linear",
    "grouped_mlp_modules",
)
TRITON_INSTALL = 'pip install "attnplug[triton]"'
_FLASH_ATTENTION = "attnplug_triton.provider:TritonSpecProvider"


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, bool) or value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ConfigError(
            f"KitchenSpecProvider: {field}={value!r} is not accepted: expected one of {accepted}"
        )
    return value


# -- flash attention from attnplug-triton -------------------------------------------------------
def flash_attention_problem() -> str | None:
    """Why ``kitchen_attention_backend="fa"`` cannot run here, or ``None`` when it may.

    Cheap: looks for ``attnplug_triton`` and ``triton`` without importing them and asks torch
    for a CUDA device. The provider itself is imported only by the ``core_attention`` slot.
    """
    fix_sdpa = "or set kitchen_attention_backend = 'sdpa'"
    if importlib.util.find_spec("attnplug_triton") is None:
        return ("kitchen_attention_backend='fa' needs the flash attention of attnplug-triton, "
                f"which is not installed: {TRITON_INSTALL} ({fix_sdpa})")
    if importlib.util.find_spec("triton") is None:
        return ("kitchen_attention_backend='fa' needs triton, which is not installed: "
                f"{TRITON_INSTALL} ({fix_sdpa})")
    import torch

    if not torch.cuda.is_available():
        return ("kitchen_attention_backend='fa' runs attnplug-triton's flash attention, and "
                "triton cannot run here: torch sees no CUDA device; set "
                "kitchen_attention_backend = 'sdpa' on this machine")
    return None


def triton_flash_attention() -> type:
    """attnplug-triton's flash attention: ``TritonSpecProvider().core_attention()``.

    Raises:
        BackendError: attnplug-triton or triton is missing (with the ``pip install`` line),
            triton cannot run here, or the installed attnplug-triton has no flash attention.
    """
    problem = flash_attention_problem()
    if problem is not None:
        raise BackendError(problem)
    module_name, _, class_name = _FLASH_ATTENTION.partition(":")
    try:
        provider_cls = getattr(importlib.import_module(module_name), class_name)
        attention = provider_cls().core_attention()
    except Exception as exc:
        raise BackendError(
            "kitchen_attention_backend='fa' needs the flash attention of attnplug-triton "
            f"({_FLASH_ATTENTION}().core_attention()), which the installed attnplug-triton "
            f"does not provide ({type(exc).__name__}: {exc}); upgrade it: "
            f"pip install -U \"attnplug[triton]\", or set kitchen_attention_backend = 'sdpa'"
        ) from exc
    return attention


# -- the provider -------------------------------------------------------------------------------
class KitchenSpecProvider(BackendSpecProvider):
    """A recipe wrapper: kitchen's own linears (and attention), the fallback's everything else.

    Args:
        fallback: the provider that serves every slot kitchen does not (``None``: unconfigured,
            as the registry's zero-argument factory makes it; :meth:`configure` fills it from
            ``config.kitchen_fallback_backend``).
        use_kitchen_attention: serve ``core_attention`` too (else the fallback's).
        kitchen_attention_backend: ``"sdpa"`` (kitchen's torch-SDPA attention) or ``"fa"``
            (attnplug-triton's flash attention).
        recipe: ``"bf16"`` (no quantisation) or ``"fp8_current"`` (fp8 per-tensor current
            scaling), see :mod:`attnplug_kitchen.recipes`.

    Raises:
        ConfigError: a bad ``kitchen_attention_backend`` or ``recipe`` (naming the config field
            ``kitchen_attention_backend`` / ``kitchen_recipe``) or ``use_kitchen_attention``.
        ValueError: ``fallback`` is not a ``BackendSpecProvider`` or is itself kitchen.
    """

    name = "kitchen"

    def __init__(self, fallback: BackendSpecProvider | None,
                 use_kitchen_attention: bool = False,
                 kitchen_attention_backend: str = "sdpa",
                 recipe: str = "bf16") -> None:
        if fallback is not None and not isinstance(fallback, BackendSpecProvider):
            raise ValueError(f"KitchenSpecProvider: fallback={fallback!r} is not accepted: "
                             "expected a BackendSpecProvider (or None, unconfigured)")
        if isinstance(fallback, KitchenSpecProvider):
            raise ValueError("KitchenSpecProvider: fallback is itself a kitchen provider; "
                             "expected another backend, such as 'te' or 'local'")
        if not isinstance(use_kitchen_attention, bool):
            raise ConfigError(f"KitchenSpecProvider: use_kitchen_attention="
                              f"{use_kitchen_attention!r} is not accepted: expected true or false")
        self.fallback = fallback
        self.use_kitchen_attention = use_kitchen_attention
        self.kitchen_attention_backend = _choice(
            "kitchen_attention_backend", kitchen_attention_backend, KITCHEN_ATTENTION_BACKENDS
        )
        self.recipe = _choice("kitchen_recipe", recipe, KITCHEN_RECIPES)

    @classmethod
    def unconfigured(cls) -> KitchenSpecProvider:
        """The registry's instance: no fallback yet; :meth:`configure` makes a usable one."""
        return cls(None)

    # -- configuration ----------------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        """Whether this provider has a fallback (and so can serve slots)."""
        return self.fallback is not None

    @property
    def kitchen_slots(self) -> tuple[str, ...]:
        """The slots kitchen serves itself (the rest go to the fallback)."""
        return KITCHEN_LINEAR_SLOTS + (("core_attention",) if self.use_kitchen_attention else ())

    @staticmethod
    def load_fallback(config: TransformerConfig) -> BackendSpecProvider:
        """``get_provider(config.kitchen_fallback_backend)``, configured for ``config``.

        Raises:
            BackendError: the fallback cannot run here or cannot be created; the message names
                ``kitchen_fallback_backend``, gives the registry's reasons and says how to fix
                it (``kitchen_fallback_backend = 'local'`` always works).
        """
        from attnplug.backends import get_provider

        name = config.kitchen_fallback_backend
        fix = ("set kitchen_fallback_backend = 'local' (plain PyTorch under kitchen's recipes), "
               "or make the backend available")
        try:
            fallback = get_provider(name).configure(config)
        except (BackendError, ConfigError) as exc:
            raise BackendError(
                f"kitchen_fallback_backend={name!r} cannot run here: {exc}; {fix}"
            ) from exc
        if isinstance(fallback, KitchenSpecProvider):
            raise BackendError(f"kitchen_fallback_backend={name!r} is a kitchen backend; "
                               f"expected another backend; {fix}")
        return fallback

    def configure(self, config: TransformerConfig) -> KitchenSpecProvider:
        """The provider for ``config``.

        Unconfigured (the registry's instance): a new provider whose fallback is
        ``config.kitchen_fallback_backend`` (configured for ``config``) and whose attention and
        recipe are ``config.use_kitchen_attention``, ``config.kitchen_attention_backend`` and
        ``config.kitchen_recipe``. Already configured (built with a fallback): its own settings
        stand; only its fallback is configured for ``config``.

        Raises:
            BackendError: the fallback cannot run here (see :meth:`load_fallback`).
        """
        if self.fallback is not None:
            fallback = self.fallback.configure(config)
            if fallback is self.fallback:
                return self
            return self._copy(fallback, self.use_kitchen_attention,
                              self.kitchen_attention_backend, self.recipe)
        return self._copy(self.load_fallback(config), config.use_kitchen_attention,
                          config.kitchen_attention_backend, config.kitchen_recipe)

    def _copy(self, fallback: BackendSpecProvider, use_kitchen_attention: bool,
              kitchen_attention_backend: str, recipe: str) -> KitchenSpecProvider:
        provider = type(self)(fallback, use_kitchen_attention=use_kitchen_attention,
                              kitchen_attention_backend=kitchen_attention_backend, recipe=recipe)
        provider.name = self.name
        return provider

    def supports(self, config: TransformerConfig) -> list[str]:
        """Reasons kitchen cannot build ``config``: the fallback's (each prefixed with its
        name), a fallback that cannot run, and ``"fa"`` attention that cannot run here.

        An unconfigured provider judges the fallback and attention ``config`` asks for.
        Returns an empty list when it can.
        """
        reasons: list[str] = []
        fallback = self.fallback
        if fallback is None:
            try:
                fallback = self.load_fallback(config)
            except BackendError as exc:
                reasons.append(str(exc))
        if fallback is not None:
            reasons += [f"its fallback {fallback.name!r}: {r}" for r in fallback.supports(config)]
        attention = (self.use_kitchen_attention, self.kitchen_attention_backend)
        if self.fallback is None:
            attention = (config.use_kitchen_attention, config.kitchen_attention_backend)
        if attention == (True, "fa"):
            problem = flash_attention_problem()
            if problem is not None:
                reasons.append(problem)
        return reasons

    def served_by(self, slot: str) -> str:
        """``"kitchen"`` (this provider's name) for kitchen's own slots, else the fallback's
        ``served_by(slot)``.

        Raises:
            ValueError: ``slot`` is not a slot name.
            BackendError: a delegated slot on an unconfigured provider.
        """
        if slot not in SLOTS:
            raise ValueError(f"served_by: slot={slot!r} is not accepted: expected one of "
                             + ", ".join(SLOTS))
        if slot in self.kitchen_slots:
            return self.name
        return self._require_fallback(slot).served_by(slot)

    # -- delegation -------------------------------------------------------------------------------
    def _require_fallback(self, slot: str) -> BackendSpecProvider:
        if self.fallback is None:
            raise BackendError(
                f"backend {self.name!r} is not configured, so it cannot serve slot {slot!r} "
                "(it delegates it to its fallback backend): use "
                "provider.configure(config), which reads kitchen_fallback_backend, or "
                "KitchenSpecProvider(fallback=...)"
            )
        return self.fallback

    def _delegate(self, slot: str, *args: Any, **kwargs: Any) -> Any:
        fallback = self._require_fallback(slot)
        try:
            return getattr(fallback, slot)(*args, **kwargs)
        except SlotNotServed as exc:
            raise SlotNotServed(
                f"slot {slot!r} is served by neither backend {self.name!r} (it delegates this "
                f"slot) nor its fallback {fallback.name!r}: {exc}"
            ) from exc

    # -- kitchen's own slots ----------------------------------------------------------------------
    def _recipe_class(self, base_name: str) -> type:
        from attnplug_kitchen import layers

        return layers.recipe_class(getattr(layers, base_name), self.recipe)

    def linear(self) -> type:
        """A recipe-driven ``Linear`` (``KitchenLinear_<recipe>``)."""
        return self._recipe_class("KitchenLinear")

    def column_parallel_linear(self) -> type:
        """A recipe-driven ``Linear`` (no tensor parallelism in attnplug)."""
        return self._recipe_class("KitchenLinear")

    def row_parallel_linear(self) -> type:
        """A recipe-driven ``Linear`` (no tensor parallelism in attnplug)."""
        return self._recipe_class("KitchenLinear")

    def column_parallel_layer_norm_linear(self) -> type | None:
        """A norm then a recipe-driven linear (``KitchenLayerNormLinear_<recipe>``); the spec
        builders use it only when :meth:`fuse_layernorm_and_linear` (the fallback's) is true."""
        return self._recipe_class("KitchenLayerNormLinear")

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> type:
        """Sequential experts whose matmuls go through the recipe, whatever
        ``moe_use_grouped_gemm`` says (each expert's matmul is scaled on its own)."""
        return self._recipe_class("KitchenSequentialExperts")

    def core_attention(self) -> type:
        """Kitchen's attention when ``use_kitchen_attention`` (``"sdpa"``: its torch-SDPA class;
        ``"fa"``: attnplug-triton's flash attention), else the fallback's.

        Raises:
            BackendError: ``"fa"`` cannot run here (naming the package and the pip line).
            SlotNotServed: the fallback does not serve it.
        """
        if not self.use_kitchen_attention:
            logger.debug("kitchen: core attention from the fallback %r", self.fallback)
            return self._delegate("core_attention")
        if self.kitchen_attention_backend == "fa":
            return triton_flash_attention()
        from attnplug_kitchen.layers import KitchenDotProductAttention

        return KitchenDotProductAttention

    # -- the fallback's slots ---------------------------------------------------------------------
    def fuse_layernorm_and_linear(self) -> bool:
        """The fallback's answer: kitchen follows the fallback's topology."""
        return self._delegate("fuse_layernorm_and_linear")

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> type:
        """The fallback's norm."""
        return self._delegate("layer_norm", rms_norm=rms_norm, for_qk=for_qk,
                              has_residual=has_residual)

    def activation_func(self) -> Callable | None:
        """The fallback's activation."""
        return self._delegate("activation_func")

    def gated_delta_rule(self) -> Callable:
        """The fallback's Gated DeltaNet kernel."""
        return self._delegate("gated_delta_rule")

    def dsa_indexer_topk(self) -> Callable:
        """The fallback's DSA indexer kernel."""
        return self._delegate("dsa_indexer_topk")

    def sparse_attention(self) -> Callable:
        """The fallback's DSA sparse attention kernel."""
        return self._delegate("sparse_attention")

    def dsa_indexer_loss(self) -> Callable:
        """The fallback's DSA indexer loss kernel."""
        return self._delegate("dsa_indexer_loss")

    def causal_conv1d(self) -> Callable:
        """The fallback's GDN short-convolution kernel."""
        return self._delegate("causal_conv1d")

    def __repr__(self) -> str:
        if self.fallback is None:
            return f"<{type(self).__name__} backend={self.name!r} unconfigured>"
        attention = ("kitchen " + self.kitchen_attention_backend
                     if self.use_kitchen_attention else "fallback")
        return (f"<{type(self).__name__} backend={self.name!r} recipe={self.recipe!r} "
                f"attention={attention} fallback={self.fallback.name!r}>")
