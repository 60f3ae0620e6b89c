"""Weights across backends: a model built with ``local`` and the same model built with ``te``.

The ``te`` adapters keep the local parameter names (``weight``, ``bias``) except where TE fuses
or groups parameters. Keys of a TE state dict map to local keys by these rules, in order:

1. ``…_extra_state`` (TE's FP8 metadata): TE's own, nothing local.
2. The same key in the local state dict (linears, norms, conv, gates, embedding, router, ...).
3. ``P.linear_fc{1,2}.{weight,bias}{e}`` (``TEGroupedExperts``) ← ``P.fc{1,2}_{weight,bias}[e]``
   (``SequentialExperts``' stacked parameters); without ``{e}`` (TE's experimental single grouped
   parameter, ``NVTE_GROUPED_LINEAR_SINGLE_PARAM=1``) ← the whole stacked tensor.
4. ``P.M.layer_norm_{weight,bias}`` (``TELayerNormLinear``, which absorbed the norm before it)
   ← ``P.M.layer_norm.{weight,bias}`` (a local ``LayerNormLinear``), else the layer's own norm:
   ``L.input_layernorm.*`` for ``L.self_attention.M`` (attention ``linear_qkv``, GDN
   ``in_proj``), ``L.pre_mlp_layernorm.*`` for ``L.mlp.linear_fc1`` (dense MLP).

Any TE key without a source, or local key nobody reads, is an error: the two models must have
the same architecture. Only torch is imported here (not TE), so the mapping is usable anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "ParameterPair",
    "te_key_sources",
    "local_to_te_state_dict",
    "te_to_local_state_dict",
    "load_local_state",
    "paired_parameters",
]

Source = tuple[str, int | None]

_EXTRA_STATE = "_extra_state"
_GROUPED = re.compile(r"(?P<owner>(?:.*\.)?)linear_fc(?P<n>[12])\.(?P<kind>weight|bias)(?P<e>\d*)")
_FUSED_NORM = re.compile(r"(?P<path>(?:.*\.)?)layer_norm_(?P<kind>weight|bias)")
_ATTENTION, _MLP = "self_attention.", "mlp."


def _fused_norm_sources(path: str, kind: str) -> list[str]:
    """Local keys that may hold the norm a ``TELayerNormLinear`` at ``path`` (its key prefix,
    ``""`` at the top) absorbed."""
    candidates = [f"{path}layer_norm.{kind}"]
    owner, _, module = path[:-1].rpartition(".")
    owner = owner + "." if owner else ""
    if owner.endswith(_ATTENTION):
        candidates.append(f"{owner[:-len(_ATTENTION)]}input_layernorm.{kind}")
    if owner.endswith(_MLP) and module == "linear_fc1":
        candidates.append(f"{owner[:-len(_MLP)]}pre_mlp_layernorm.{kind}")
    return candidates


def _source(key: str, local: set[str]) -> Source | None:
    if key in local:
        return key, None
    grouped = _GROUPED.fullmatch(key)
    if grouped is not None:
        name = f"{grouped['owner']}fc{grouped['n']}_{grouped['kind']}"
        index = int(grouped["e"]) if grouped["e"] else None  # None: TE's stacked single param
        return (name, index) if name in local else None
    fused = _FUSED_NORM.fullmatch(key)
    if fused is not None:
        found = [c for c in _fused_norm_sources(fused["path"], fused["kind"]) if c in local]
        return (found[0], None) if found else None
    return None


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def te_key_sources(te_keys: Iterable[str], local_keys: Iterable[str]) -> dict[str, Source]:
    """Where every TE key's value lives in the local model: ``{te_key: (local_key, index)}``.

    ``index`` is the expert for grouped-expert weights (the local tensor is stacked), else
    ``None``. ``…_extra_state`` keys are left out. Raises ``ValueError`` listing the TE keys
    with no local source and the local keys no TE key reads (different architectures).
    """
    local = set(local_keys)
    sources: dict[str, Source] = {}
    missing = []
    for key in te_keys:
        if key.rpartition(".")[2] == _EXTRA_STATE:
            continue
        source = _source(key, local)
        if source is None:
            missing.append(key)
        else:
            sources[key] = source
    unused = sorted(local - {name for name, _ in sources.values()})
    if missing or unused:
        problems = []
        if missing:
            problems.append(f"TE keys with no local source: {_listing(missing)}")
        if unused:
            problems.append(f"local keys no TE key reads: {_listing(unused)}")
        raise ValueError("the local and te models do not match: " + "; ".join(problems))
    return sources


def _checked(value: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} where {tuple(like.shape)} is "
                         "expected")
    return value


def local_to_te_state_dict(local_state: Mapping[str, torch.Tensor],
                           te_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for the TE model (``te_state`` gives its keys and TE's ``_extra_state``)
    holding the local model's values.

    Returns a new dict (values are the local tensors or views of them; ``load_state_dict``
    copies them to the TE parameters' device and dtype). Raises ``ValueError`` when the
    architectures differ or a shape does not match.
    """
    out = dict(te_state)
    for key, (name, index) in te_key_sources(te_state, local_state).items():
        value = local_state[name] if index is None else local_state[name][index]
        out[key] = _checked(value, te_state[key], f"local {name}" + (
            f"[{index}]" if index is not None else "") + f" for te {key}")
    return out


def te_to_local_state_dict(te_state: Mapping[str, torch.Tensor],
                           local_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`local_to_te_state_dict`: a state dict for the local model
    (``local_state`` gives its keys, devices and dtypes) holding the TE model's values.

    Returns new tensors on the local tensors' devices and dtypes. Raises ``ValueError`` when
    the architectures differ or a shape does not match.
    """
    out = {name: value.detach().clone() for name, value in local_state.items()}
    for key, (name, index) in te_key_sources(te_state, local_state).items():
        target = out[name] if index is None else out[name][index]
        target.copy_(_checked(te_state[key].detach(), target, f"te {key} for local {name}"))
    return out


def load_local_state(te_module: nn.Module, local_module: nn.Module) -> None:
    """Copy the weights of ``local_module`` (built with ``local``) into ``te_module`` (the same
    architecture built with ``te``), in place. Returns nothing; raises ``ValueError`` when the
    two do not match."""
    te_module.load_state_dict(
        local_to_te_state_dict(local_module.state_dict(), te_module.state_dict())
    )


class ParameterPair(NamedTuple):
    """One TE parameter and the local parameter (or expert ``index`` of it) it mirrors."""

    te_name: str
    te_param: nn.Parameter
    local_name: str
    local_param: nn.Parameter
    index: int | None

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of a local-shaped tensor (the parameter, its ``.grad``) this pair covers."""
        return tensor if self.index is None else tensor[self.index]


def paired_parameters(te_module: nn.Module, local_module: nn.Module) -> list[ParameterPair]:
    """Every parameter of ``te_module`` with its local counterpart, to compare values or
    gradients (``pair.local_part(pair.local_param.grad)`` against ``pair.te_param.grad``).

    Raises ``ValueError`` when the two modules do not match.
    """
    te_params = dict(te_module.named_parameters())
    local_params = dict(local_module.named_parameters())
    return [
        ParameterPair(key, te_params[key], name, local_params[name], index)
        for key, (name, index) in te_key_sources(te_params, local_params).items()
    ]
