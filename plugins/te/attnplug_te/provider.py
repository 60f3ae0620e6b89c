"""``TESpecProvider``: the ``te`` backend's slots.

Module slots are Transformer Engine modules behind thin adapters (``attnplug_te.modules``) that
take attnplug's constructor arguments and keep the local layers' parameter names where TE's
allow (``attnplug_te.convert`` maps the rest):

=====================================  ====================================================
slot                                   served by
=====================================  ====================================================
``linear`` / column / row              ``TELinear`` (``te.pytorch.Linear``)
``fuse_layernorm_and_linear``          ``True``: GDN ``in_proj``, attention ``linear_qkv`` and
                                       the dense MLP's ``linear_fc1`` absorb their input norm
``column_parallel_layer_norm_linear``  ``TELayerNormLinear`` (``te.pytorch.LayerNormLinear``)
``layer_norm``                         ``TERMSNorm`` / ``TELayerNorm`` (q/k norms too)
``core_attention``                     ``TEDotProductAttention`` (causal, ``bshd``, GQA)
``grouped_mlp_modules``                ``TEGroupedExperts`` (two ``te.pytorch.GroupedLinear``)
``activation_func``                    ``None``: the config's activation (see below)
kernel slots                           the triton backend when it can run, else local
=====================================  ====================================================

``activation_func`` is ``None`` because attnplug's MLP applies the activation itself, as an
element-wise function inside its gated linear unit; TE's activations are fused GLU operations
with a different contract, and an element-wise TE activation would compute exactly what the
config's torch function computes. TE has no kernel for the gated delta rule, the DSA indexer or
sparse attention that runs here (TE 2.20's experimental ``GatedDeltaNetAttention`` needs the
cuDNN frontend's CuTe DSL ops), so those slots come from another backend and ``served_by`` names
it, which ``attnplug plan`` shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from attnplug.backends.base import KERNEL_SLOTS, BackendSpecProvider, SlotNotServed
from attnplug.backends.local import LocalSpecProvider

if TYPE_CHECKING:
    from torch import nn

    from attnplug.config import TransformerConfig

__all__ = ["TESpecProvider", "KERNEL_FALLBACKS"]

logger = logging.getLogger("attnplug")

# The backends asked, in order, for the kernel slots TE has no kernel for ("local" always serves).
KERNEL_FALLBACKS = ("triton", "local")
INSTALL_HINT = 'pip install "attnplug[te]"'


def _te_modules() -> ModuleType:
    """``attnplug_te.modules`` (which imports ``transformer_engine.pytorch``).

    Raises ``ImportError`` naming the cause and the ``pip install`` line.
    """
    try:
        import attnplug_te.modules as modules
    except ImportError as exc:
        raise ImportError(
            f"the te backend cannot import Transformer Engine ({type(exc).__name__}: {exc}); "
            f"install it with its PyTorch extension: {INSTALL_HINT}"
        ) from exc
    return modules


def _fallback_provider(name: str) -> BackendSpecProvider | None:
    """The ready provider of backend ``name``, or ``None`` when it cannot run here."""
    if name == "local":
        return LocalSpecProvider()
    from attnplug.backends import BackendError, get_provider

    try:
        return get_provider(name)
    except BackendError as exc:
        logger.debug("te: kernel fallback %r is not usable: %s", name, exc)
        return None


class TESpecProvider(LocalSpecProvider):
    """The ``te`` backend: Transformer Engine modules, kernels from another backend.

    ``kernel_backend`` names the backend asked first for the kernel slots
    (``gated_delta_rule``, ``dsa_indexer_topk``, ``sparse_attention``, ``dsa_indexer_loss``);
    ``None`` means :data:`KERNEL_FALLBACKS` (``"triton"`` when it can run, else ``"local"``). A
    slot the chosen backend does not serve comes from ``local``.

    Creating the provider imports ``transformer_engine.pytorch``; raises ``ImportError`` (with
    ``pip install "attnplug[te]"``) when it cannot be imported.
    """

    name = "te"

    def __init__(self, kernel_backend: str | None = None) -> None:
        if kernel_backend is not None and not isinstance(kernel_backend, str):
            raise ValueError(f"TESpecProvider: kernel_backend={kernel_backend!r} is not accepted: "
                             "expected None or a backend name such as 'triton' or 'local'")
        self._modules = _te_modules()
        self._kernel_order = KERNEL_FALLBACKS if kernel_backend is None else (kernel_backend,
                                                                              "local")
        self._kernel_backends: list[BackendSpecProvider] | None = None
        self._kernels: dict[str, tuple[str, Callable]] = {}

    # -- which backend serves what ------------------------------------------------------------
    def _kernel_providers(self) -> list[BackendSpecProvider]:
        if self._kernel_backends is None:
            found = [_fallback_provider(name) for name in dict.fromkeys(self._kernel_order)]
            self._kernel_backends = [p for p in found if p is not None]
            logger.info("te: kernel slots from %s",
                        " then ".join(repr(p.name) for p in self._kernel_backends))
        return self._kernel_backends

    def _kernel(self, slot: str) -> tuple[str, Callable]:
        """``(backend name, kernel)`` of a kernel slot: the first fallback that serves it."""
        if slot not in self._kernels:
            reasons = []
            for provider in self._kernel_providers():
                try:
                    self._kernels[slot] = (provider.served_by(slot), getattr(provider, slot)())
                    break
                except SlotNotServed as exc:
                    reasons.append(str(exc))
            else:
                raise self._not_served(slot, "no fallback backend serves it: "
                                             + "; ".join(reasons))
        return self._kernels[slot]

    def served_by(self, slot: str) -> str:
        """``"te"`` for module slots; for a kernel slot, the backend whose kernel is used."""
        if slot in KERNEL_SLOTS:
            return self._kernel(slot)[0]
        return self.name

    def supports(self, config: TransformerConfig) -> list[str]:
        """Reasons this backend cannot build ``config``: TE has no float64 kernels."""
        if config.params_dtype == "float64":
            return ["Transformer Engine has no float64 kernels (params_dtype='float64'); use "
                    "'float32', 'bfloat16' or 'float16', or backend='local'"]
        return []

    def configure(self, config: TransformerConfig) -> BackendSpecProvider:
        """``self``; a copy whose kernels come from ``local`` when the first kernel fallback
        cannot build ``config`` (its ``supports(config)`` gives reasons); or a copy whose first
        kernel fallback is that backend configured for ``config`` (its ``configure(config)``:
        triton's gives ``local``'s gated delta rule at head dims it has not verified)."""
        first, *rest = self._kernel_providers()
        reasons = [] if first.name == "local" else first.supports(config)
        if reasons:
            logger.info("te: %r cannot build this config (%s); its kernel slots come from "
                        "'local'", first.name, "; ".join(reasons))
            return TESpecProvider(kernel_backend="local")
        configured = first.configure(config)
        if configured is first:
            return self
        copy = TESpecProvider(kernel_backend=first.name)
        copy._kernel_backends = [configured, *rest]
        return copy

    # -- module slots ---------------------------------------------------------------------------
    def linear(self) -> type:
        return self._modules.TELinear

    def column_parallel_linear(self) -> type:
        return self._modules.TELinear

    def row_parallel_linear(self) -> type:
        return self._modules.TELinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return self._modules.TELayerNormLinear

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> type:
        if has_residual:
            raise self._not_served(
                "layer_norm",
                "has_residual=True asks for a norm fused with the residual add; TE's RMSNorm and "
                "LayerNorm modules do not add the residual (attnplug's layers add it themselves)",
            )
        return self._modules.TERMSNorm if rms_norm else self._modules.TELayerNorm

    def core_attention(self) -> type:
        return self._modules.TEDotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> type:
        """``TEGroupedExperts`` whatever ``moe_use_grouped_gemm`` says: one grouped GEMM per
        projection computes what per-expert GEMMs would, only faster."""
        return self._modules.TEGroupedExperts

    def activation_func(self) -> Callable | None:
        return None

    # -- kernel slots ---------------------------------------------------------------------------
    def gated_delta_rule(self) -> Callable:
        return self._kernel("gated_delta_rule")[1]

    def dsa_indexer_topk(self) -> Callable:
        return self._kernel("dsa_indexer_topk")[1]

    def sparse_attention(self) -> Callable:
        return self._kernel("sparse_attention")[1]

    def dsa_indexer_loss(self) -> Callable:
        return self._kernel("dsa_indexer_loss")[1]

    def causal_conv1d(self) -> Callable:
        return self._kernel("causal_conv1d")[1]

    # -- weights across backends ------------------------------------------------------------
    def load_local_state(self, module: nn.Module, local_module: nn.Module) -> None:
        """The local module's weights into the TE one: fused norms (``layer_norm_weight``) and
        per-expert weights (``weight{e}``) mapped by :mod:`attnplug_te.convert`."""
        from attnplug_te.convert import load_local_state

        load_local_state(module, local_module)

    def parameter_pairs(self, module: nn.Module,
                        local_module: nn.Module) -> list[tuple[str, str, int | None]]:
        """Each TE parameter with the local one (or expert slice) it mirrors, by
        :func:`attnplug_te.convert.paired_parameters`."""
        from attnplug_te.convert import paired_parameters

        return [(pair.te_name, pair.local_name, pair.index)
                for pair in paired_parameters(module, local_module)]

    def __repr__(self) -> str:
        return f"<TESpecProvider backend={self.name!r} kernels={list(self._kernel_order)!r}>"
