"""``BackendSpecProvider``: the slots a backend fills.

Module slots (Megatron-Core's names) return a class or a builder; kernel slots (attnplug's own)
return a function with the signature fixed in DESIGN §8. A provider that does not serve a slot
raises :class:`SlotNotServed` with the reason: it never hands back a silent stand-in.

What the layers do with each slot (the contract a third-party backend implements):

- ``linear()``, ``column_parallel_linear()``, ``row_parallel_linear()``: a class built as
  ``cls(input_size, output_size, *, config, bias=False, init_method=None)``; ``forward(x[..., in])
  -> y[..., out]``. ``init_method`` is ``None`` (use ``normal(0, config.init_method_std)``) or a
  function that fills a weight tensor in place.
- ``column_parallel_layer_norm_linear()``: the same signature; it normalises its input
  (``config.normalization``, ``config.layernorm_epsilon``) and then applies the linear. ``None``
  when the backend does not fuse; ``fuse_layernorm_and_linear()`` says which.
- ``layer_norm(rms_norm=False, for_qk=False, has_residual=False)``: a class built as
  ``cls(*, config, hidden_size, eps=None)`` that normalises the last dimension (RMSNorm when
  ``rms_norm``, else LayerNorm; ``eps=None`` means ``config.layernorm_epsilon``). A norm class
  whose ``accepts_gate`` class attribute is true also takes ``forward(x, gate=z)`` and returns
  ``norm(x)·SiLU(z)`` fused; GatedDeltaNet's output norm uses it when offered.
- ``core_attention()``: a class built as ``cls(config, layer_number=1, softmax_scale=None)``;
  ``forward(q[B,T,H,D], k[B,S,Hkv,D], v[B,S,Hkv,Dv]) -> o[B,T,H,Dv]``, causal with the S >= T
  offset.
- ``grouped_mlp_modules(moe_use_grouped_gemm)``: an experts class built as
  ``cls(num_local_experts, *, config)``; ``forward(x[N, hidden], tokens_per_expert[E]) ->
  y[N, hidden]`` where the rows of ``x`` are sorted by expert and ``tokens_per_expert`` (int64,
  on any device) says how many rows each expert owns. A class attribute ``host_counts = True``
  asks for it on the host (a CPU tensor, copied without draining the GPU's queue); otherwise
  it comes on the tokens' device, where reading it on the host synchronises.
- ``activation_func()``: a function ``act(x) -> y`` that replaces ``config.activation_func`` in
  MLPs, or ``None`` to use the config's.
- ``gated_delta_rule()``, ``dsa_indexer_topk()``, ``sparse_attention()``: kernels (DESIGN §8).
- ``dsa_indexer_loss()``: a kernel (attnplug's extension of DESIGN §8) computing the DSA
  indexer's KL loss from the main attention's q, k and the indexer's q, k, weights:
  ``fn(q[B,T,H,D], k[B,S,Hkv,D], index_q[B,T,HI,DI], index_k[B,S,DI], index_weights[B,T,HI], *,
  softmax_scale=None, causal=True, relu=True) -> scalar``, differentiable in the indexer's
  inputs only (``attnplug.ops.dsa_indexer_loss`` is the reference).
- ``load_local_state(module, local_module)`` and ``parameter_pairs(module, local_module)``
  (optional; attnplug's extension): how this backend's modules hold the weights of the same
  layers built with ``local`` — by default the same names and shapes, the norm inside
  attnplug's own norm-fused linear (``LayerNormLinear.layer_norm``) taken from the layer norm
  ``local`` keeps apart (:func:`local_sources`); a backend that fuses or groups parameters its
  own way (te) overrides both. ``attnplug check`` (:mod:`attnplug.testing`) uses
  them to give a backend's module or model the weights of ``local``'s and compare gradients.
- ``causal_conv1d()``: a kernel (attnplug's extension of DESIGN §8) computing GatedDeltaNet's
  short convolution: ``fn(x[B,T,C], weight[C,K], *, initial_state=None, activation="silu") ->
  y[B,T,C]``, depthwise and causal over time, ``initial_state[B,K-1,C]`` the inputs before
  ``x`` (zeros when None), then SiLU (or nothing for ``activation=None``); differentiable in
  all three (``attnplug.ops.causal_conv1d`` is the reference).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from attnplug._errors import BackendError

if TYPE_CHECKING:
    from torch import nn

    from attnplug.config import TransformerConfig

__all__ = ["BackendSpecProvider", "SlotNotServed", "MODULE_SLOTS", "KERNEL_SLOTS", "SLOTS",
           "local_sources"]

MODULE_SLOTS = (
    "linear",
    "column_parallel_linear",
    "row_parallel_linear",
    "fuse_layernorm_and_linear",
    "column_parallel_layer_norm_linear",
    "layer_norm",
    "core_attention",
    "grouped_mlp_modules",
    "activation_func",
)
KERNEL_SLOTS = ("gated_delta_rule", "dsa_indexer_topk", "sparse_attention", "dsa_indexer_loss",
                "causal_conv1d")
SLOTS = MODULE_SLOTS + KERNEL_SLOTS


class SlotNotServed(BackendError):
    """A backend was asked for a slot it does not serve; the message says which and why."""


class BackendSpecProvider:
    """Base class of every backend. Subclasses override the slots they serve.

    ``name`` is the backend's registered name. ``served_by(slot)`` names the backend that really
    serves a slot (a wrapper such as kitchen delegates some slots to another backend).
    ``supports(config)`` returns the reasons this backend cannot build a model for ``config``
    (an empty list: it can).
    """

    name: str = "unnamed"

    def served_by(self, slot: str) -> str:
        """The name of the backend that serves ``slot`` for this provider."""
        return self.name

    def configure(self, config: TransformerConfig) -> BackendSpecProvider:
        """The provider to use for ``config``: ``self`` unless the backend depends on config
        fields (kitchen builds its fallback from ``kitchen_fallback_backend``, say). Called by
        the registry when a config selects this backend; raises ``ConfigError``/``BackendError``
        when the config asks for something this backend cannot do."""
        return self

    def supports(self, config: TransformerConfig) -> list[str]:
        """Reasons this provider cannot serve ``config``; empty when it can."""
        return []

    def _not_served(self, slot: str, reason: str | None = None) -> SlotNotServed:
        why = reason or "it does not implement this slot"
        return SlotNotServed(f"backend {self.name!r} does not serve slot {slot!r}: {why}")

    # -- module slots (Megatron-Core's) ---------------------------------------------------------
    def linear(self) -> type:
        raise self._not_served("linear")

    def column_parallel_linear(self) -> type:
        raise self._not_served("column_parallel_linear")

    def row_parallel_linear(self) -> type:
        raise self._not_served("row_parallel_linear")

    def fuse_layernorm_and_linear(self) -> bool:
        raise self._not_served("fuse_layernorm_and_linear")

    def column_parallel_layer_norm_linear(self) -> type | None:
        raise self._not_served("column_parallel_layer_norm_linear")

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> type:
        raise self._not_served("layer_norm")

    def core_attention(self) -> type:
        raise self._not_served("core_attention")

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> Any:
        raise self._not_served("grouped_mlp_modules")

    def activation_func(self) -> Callable | None:
        raise self._not_served("activation_func")

    # -- kernel slots (attnplug's) --------------------------------------------------------------
    def gated_delta_rule(self) -> Callable:
        raise self._not_served("gated_delta_rule")

    def dsa_indexer_topk(self) -> Callable:
        raise self._not_served("dsa_indexer_topk")

    def sparse_attention(self) -> Callable:
        raise self._not_served("sparse_attention")

    def dsa_indexer_loss(self) -> Callable:
        raise self._not_served("dsa_indexer_loss")

    def causal_conv1d(self) -> Callable:
        raise self._not_served("causal_conv1d")

    # -- weights across backends (optional) ------------------------------------------------------
    def load_local_state(self, module: nn.Module, local_module: nn.Module) -> None:
        """Copy the parameters of ``local_module`` (the same layers built with ``local``) into
        ``module`` (built with this backend), in place, converting device and dtype.

        The default takes every parameter of ``module`` from the local parameter
        :func:`local_sources` names (the same name, or the norm a norm-fused linear absorbed),
        and buffers of the same name; state of its own that is not a parameter (FP8 metadata,
        buffers ``local`` lacks) stays as built. Raises ``ValueError`` naming the parameters
        that do not correspond or whose shapes differ."""
        params = dict(module.named_parameters())
        local = local_module.state_dict()
        sources = local_sources(params, local)
        state = {key: value for key, value in local.items() if key not in params}
        for name, source in sources.items():
            if tuple(local[source].shape) != tuple(params[name].shape):
                raise ValueError(f"parameter {name} is {list(params[name].shape)}, local's "
                                 f"{source} {list(local[source].shape)}")
            state[name] = local[source]
        used = set(sources.values())
        own = module.state_dict()
        extra = [key for key in state if key not in own and key not in used]
        if extra:
            raise ValueError(f"parameters are not laid out as local's (local's not in its: "
                             f"{extra[:4]})")
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def parameter_pairs(self, module: nn.Module,
                        local_module: nn.Module) -> list[tuple[str, str, int | None]]:
        """Each parameter of ``module`` with the parameter of ``local_module`` it mirrors:
        ``(name, local_name, index)``, where ``index`` selects one expert's slice of a stacked
        local parameter (``None``: the whole of it). The default pairs what
        :func:`local_sources` finds; raises ``ValueError`` when a parameter has no
        counterpart."""
        sources = local_sources((name for name, _ in module.named_parameters()),
                                (name for name, _ in local_module.named_parameters()))
        return [(name, source, None) for name, source in sources.items()]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.name!r}>"


# A norm-fused linear of attnplug's (``attnplug.layers.linear.LayerNormLinear``) keeps the norm it
# absorbed as its ``layer_norm`` submodule; ``local`` keeps that norm apart, as the layer's
# ``input_layernorm`` (any linear of the mixer: qkv, GatedDeltaNet's in_proj) or
# ``pre_mlp_layernorm`` (the dense MLP's first linear).
_FUSED_NORM = re.compile(r"(?P<layer>(?:.*\.)?)(?P<part>self_attention\.[^.]+|mlp\.linear_fc1)"
                         r"\.layer_norm\.(?P<kind>weight|bias)")


def local_sources(names: Iterable[str], local_names: Iterable[str]) -> dict[str, str]:
    """Where each parameter of a model (or module) built by a backend lives in the same layers
    built with ``local``: ``{name: local_name}``. The same name where ``local`` has it; the
    ``layer_norm`` of a norm-fused linear (attnplug's ``LayerNormLinear``, as kitchen builds
    over a fusing fallback) from the layer's ``input_layernorm`` or ``pre_mlp_layernorm``.

    Raises ``ValueError`` naming the parameters with no local counterpart, and the local
    parameters two of them would both take (two linears that absorbed one norm: their
    gradients cannot be compared with the norm's).
    """
    local = set(local_names)
    sources: dict[str, str] = {}
    alone = []
    for name in names:
        source = name
        fused = None if name in local else _FUSED_NORM.fullmatch(name)
        if fused is not None:
            norm = ("input_layernorm" if fused["part"].startswith("self_attention.")
                    else "pre_mlp_layernorm")
            source = f"{fused['layer']}{norm}.{fused['kind']}"
        if source in local:
            sources[name] = source
        else:
            alone.append(name)
    if alone:
        raise ValueError(f"parameters are not laid out as local's (without a local "
                         f"counterpart: {alone[:4]})")
    taken: dict[str, list[str]] = {}
    for name, source in sources.items():
        taken.setdefault(source, []).append(name)
    for source, absorbers in taken.items():
        if len(absorbers) > 1:
            raise ValueError(f"parameters are not laid out as local's (local's {source} would "
                             f"be absorbed by more than one: {absorbers[:4]})")
    return sources
