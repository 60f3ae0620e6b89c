"""Per-layer patterns (which attention, which MLP), the pattern-string grammar, and hybrid layer
pattern strings (Megatron-Core HybridModel's ``"G-G-G-*E"``).

A pattern is a list with one 0/1 entry per layer. ``moe_layer_freq`` and
``linear_attention_freq`` take an int N (a periodic pattern), a list of 0/1, or the string form
``"([1]*3+[0])*2"``. The string form is read by a small hand-written parser, never ``eval``: a
config file is untrusted input.

Grammar of the string form (whitespace anywhere between tokens)::

    expr   := term ("+" term)*
    term   := factor ("*" factor)*
    factor := INTEGER | "[" [INTEGER ("," INTEGER)* [","]] "]" | "(" expr ")"

``list + list`` concatenates, ``list * int`` and ``int * list`` repeat, ``int + int`` and
``int * int`` are arithmetic. Every integer, and the length of every list made on the way, is
bounded by ``max_length``, checked before the list is made.

A hybrid layer pattern (``hybrid_layer_pattern``) describes a whole stack in one string, one
symbol per *sublayer*: mixers ``*`` softmax attention, ``G`` Gated DeltaNet, ``D`` DeepSeek
Sparse Attention; MLPs ``-`` dense, ``E`` Mixture of Experts. ``|`` marks a pipeline stage
boundary, ``(...)*N`` repeats a group (only a group: ``*`` alone is softmax attention), and
whitespace is ignored::

    pattern := item*
    item    := SYMBOL | "|" | "(" pattern ")" ["*" COUNT]

Megatron's ``M`` (Mamba) and ``/`` (multi-token prediction) are refused with the reason.
:func:`to_hybrid_pattern` writes any config (an int/list frequency one too) as a pattern.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from attnplug._errors import ConfigError
from attnplug._grammar import MAX_NESTING as MAX_NESTING  # how deeply parentheses may nest
from attnplug._grammar import ListParser, SymbolParser, render_list, render_symbols
from attnplug._grammar import quote as _quote
from attnplug._grammar import syntax_error as _syntax_error

if TYPE_CHECKING:
    from attnplug.config import TransformerConfig

__all__ = [
    "HYBRID_SYMBOLS",
    "MIXER_SYMBOLS",
    "MLP_SYMBOLS",
    "NONE_KIND",
    "check_pattern",
    "from_hybrid_pattern",
    "get_attention_kinds",
    "get_linear_attention_pattern",
    "get_mlp_kinds",
    "get_moe_layer_pattern",
    "hybrid_pattern_stages",
    "is_linear_attention_variant",
    "normalize_hybrid_pattern",
    "parse_hybrid_pattern",
    "parse_pattern",
    "parse_pattern_field",
    "render_hybrid_pattern",
    "render_pattern",
    "to_hybrid_pattern",
    "to_hybrid_pattern_config",
]

LINEAR_ATTENTION_VARIANTS = ("gdn", "gated_delta_net")
"""Values of ``experimental_attention_variant`` that mean linear attention (Gated DeltaNet)."""



# -- the string form ---------------------------------------------------------------------------


def _evaluate(text: Any, field: str, max_length: int) -> int | list[int]:
    """The value of a pattern string: an ``int`` or a ``list[int]``. Raises ``ConfigError``."""
    if not isinstance(text, str):
        raise ConfigError(f"{field}={_quote(text)} is not accepted: expected a pattern string")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length={max_length!r} is not accepted: expected an integer >= 1")
    return ListParser(text, field, max_length).parse()


def parse_pattern(text: str, *, field: str = "pattern", max_length: int = 1_000_000) -> list[int]:
    """Read the string form of a per-layer pattern, e.g. ``"([1]*3+[0])*2"``.

    Returns a new, non-empty ``list[int]`` (values are not checked for 0/1 here; see
    :func:`check_pattern`). Raises ``ConfigError`` naming ``field``, quoting ``text`` and
    pointing at the column of the problem: malformed syntax, names, floats, negative numbers,
    an integer or a list longer than ``max_length``, an empty result, or a text that is an
    integer rather than a list (use :func:`parse_pattern_field` where an int N is accepted).
    """
    value = _evaluate(text, field, max_length)
    if isinstance(value, int):
        raise ConfigError(
            f"{field}={_quote(text)} is not accepted here: it is the integer {value}, "
            "expected a list such as '[1,0]*2'"
        )
    if not value:
        raise ConfigError(f"{field}={_quote(text)} is not accepted: the pattern is empty")
    return value


def parse_pattern_field(field: str, value: Any, num_layers: int | None = None) -> Any:
    """Read a pattern field as a config gives it: the string form becomes an int or a list.

    A string is evaluated (``"4"`` → ``4``, ``"[1,0]*2"`` → ``[1, 0, 1, 0]``); any other value is
    returned as it is. When ``num_layers`` is given the result is also checked with
    :func:`check_pattern` (and a new list returned for a list). Raises ``ConfigError`` naming
    ``field`` for a malformed or empty string, or a value that fails the check.
    """
    if isinstance(value, str):
        text, value = value, _evaluate(value, field, 1_000_000)
        if isinstance(value, list) and not value:
            raise ConfigError(f"{field}={_quote(text)} is not accepted: the pattern is empty")
    if num_layers is not None:
        return check_pattern(field, value, num_layers)
    return value


# -- checks and the per-layer patterns ---------------------------------------------------------


def _check_num_layers(num_layers: Any) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"num_layers={num_layers!r} is not accepted: expected an integer >= 1")
    return num_layers


def check_pattern(field: str, value: Any, num_layers: int) -> int | list[int]:
    """Check a pattern value: an int N >= 1, or a list/tuple of ``num_layers`` values 0/1.

    Returns the int, or a new ``list[int]`` (``True``/``False`` items become 1/0). Raises
    ``ConfigError`` naming ``field`` for a bool or an int below 1, a list of the wrong length,
    an item other than 0/1, a string (give it to :func:`parse_pattern_field` first) or any
    other type; ``ConfigError`` naming ``num_layers`` when that is not an integer >= 1.
    """
    num_layers = _check_num_layers(num_layers)
    accepted = (
        f"an int N >= 1 (every N-th layer), a list of {num_layers} values 0/1 "
        "(one per layer) or a pattern string such as '([1]*3+[0])*2'"
    )
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not accepted (a bool is ambiguous): "
                          f"expected {accepted}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{field}={value!r} is not accepted: expected {accepted}")
        return value
    if isinstance(value, str):
        raise ConfigError(f"{field}={_quote(value)} is an unparsed string: read it with "
                          "parse_pattern_field first")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field}={_quote(value)} is not accepted: expected {accepted}")
    if len(value) != num_layers:
        raise ConfigError(
            f"{field}={_quote(value)} is not accepted: it has {len(value)} entries, expected "
            f"{num_layers} (num_layers)"
        )
    for index, item in enumerate(value):
        if not isinstance(item, int) or item not in (0, 1):
            raise ConfigError(
                f"{field}[{index}]={item!r} is not accepted: expected 0 or 1 "
                f"(in {field}={_quote(value)})"
            )
    return [int(item) for item in value]


def is_linear_attention_variant(name: Any) -> bool:
    """Whether ``experimental_attention_variant`` ``name`` is linear attention.

    True for ``"gdn"`` and its deprecated alias ``"gated_delta_net"``; False for ``"dsa"``,
    ``None`` and anything else (the match is case-sensitive, so ``"GDN"`` is False). Never raises.
    """
    return isinstance(name, str) and name in LINEAR_ATTENTION_VARIANTS


def get_moe_layer_pattern(config: Any) -> list[int]:
    """Which layers have an MoE MLP (1) and which a dense one (0), from ``config.moe_layer_freq``.

    An int N puts MoE first in each block of N: ``[1 if i % N == 0 else 0 ...]``. A list (or
    the string form) is checked and copied. Reads ``num_layers`` and ``moe_layer_freq`` only:
    callers use the result only when ``num_moe_experts`` is set (as Megatron's block builder
    does). With a ``hybrid_layer_pattern`` the pattern decides alone: one entry per sublayer,
    1 for ``E``. Returns a new list of ``num_layers`` ints; raises ``ConfigError`` naming
    ``moe_layer_freq`` (or ``hybrid_layer_pattern``) for a bad value.
    """
    hybrid = _hybrid_text(config)
    if hybrid is not None:
        return [int(symbol == "E") for symbol in from_hybrid_pattern(hybrid)]
    num_layers = _check_num_layers(config.num_layers)
    freq = parse_pattern_field("moe_layer_freq", config.moe_layer_freq, num_layers)
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return freq


def get_linear_attention_pattern(config: Any) -> list[int]:
    """Which layers use linear attention (1) and which softmax attention (0).

    From ``config.linear_attention_freq``: an int N puts softmax attention last in each block of
    N, ``[0 if (i + 1) % N == 0 else 1 ...]`` (N = 1: no linear attention; a partial tail block
    stays linear); a list (or the string form) is checked and copied; ``None`` gives all zeros,
    unless ``experimental_attention_variant`` is a linear variant (``"gdn"``), which needs a
    pattern. With a ``hybrid_layer_pattern`` the pattern decides alone: one entry per sublayer,
    1 for ``G``. Returns a new list of ``num_layers`` ints; raises ``ConfigError`` naming
    ``linear_attention_freq`` (or ``hybrid_layer_pattern``) for a bad or missing value.
    """
    hybrid = _hybrid_text(config)
    if hybrid is not None:
        return [int(symbol == "G") for symbol in from_hybrid_pattern(hybrid)]
    num_layers = _check_num_layers(config.num_layers)
    variant = config.experimental_attention_variant
    if config.linear_attention_freq is None:
        if is_linear_attention_variant(variant):
            raise ConfigError(
                f"linear_attention_freq=None is not accepted with experimental_attention_variant="
                f"{variant!r}: expected an int N (softmax attention every N-th layer), a list of "
                f"{num_layers} values 0/1 or a pattern string"
            )
        return [0] * num_layers
    freq = parse_pattern_field("linear_attention_freq", config.linear_attention_freq, num_layers)
    if isinstance(freq, int):
        return [0 if (i + 1) % freq == 0 else 1 for i in range(num_layers)]
    return freq


# -- rendering ---------------------------------------------------------------------------------


def render_pattern(values: list[int] | tuple[int, ...]) -> str:
    """A compact string form of ``values`` that :func:`parse_pattern` reads back to the same list.

    Repeated blocks become ``[...]*k`` or ``(...)*k`` and runs ``[v]*k``, e.g.
    ``[1, 1, 1, 0, 1, 1, 1, 0, 1, 1]`` → ``"[1,1,1,0]*2+[1,1]"`` and ``[1]*7 + [0]`` twice →
    ``"([1]*7+[0])*2"``; the result is never longer than the plain ``"[a,b,...]"`` form. Raises
    ``ConfigError`` naming ``values`` for an empty sequence or an item that is not a
    non-negative integer.
    """
    return render_list(_check_render_values(values))


def _check_render_values(values: Any) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"values={_quote(values)} is not accepted: expected a non-empty list "
                          "of non-negative integers")
    for index, item in enumerate(values):
        if not isinstance(item, int) or item < 0:
            raise ConfigError(f"values[{index}]={item!r} is not accepted: expected a "
                              "non-negative integer")
    return [int(item) for item in values]


# -- hybrid layer patterns ("G-G-G-*E") --------------------------------------------------------

HYBRID_FIELD = "hybrid_layer_pattern"
MIXER_SYMBOLS = {"*": "sdpa", "G": "gdn", "D": "dsa"}
"""Mixer symbols of a hybrid layer pattern and the attention kind each builds."""
MLP_SYMBOLS = {"-": "dense", "E": "moe"}
"""MLP symbols of a hybrid layer pattern and the MLP kind each builds."""
HYBRID_SYMBOLS = {**MIXER_SYMBOLS, **MLP_SYMBOLS}
"""Every sublayer symbol and its kind."""
NONE_KIND = "-"
"""The attention kind of an MLP-only sublayer and the MLP kind of a mixer-only one."""
STAGE_BOUNDARY = "|"

_HYBRID_ACCEPTED = (
    "'*' (softmax attention), 'G' (Gated DeltaNet), 'D' (DSA), '-' (dense MLP), 'E' (MoE), "
    "'|' (next pipeline stage) or '(...)*N'"
)
_HYBRID_REFUSED = {
    "M": "'M' (Mamba) is not implemented by attnplug; expected a mixer '*' (softmax attention), "
         "'G' (Gated DeltaNet) or 'D' (DSA)",
    "/": "'/' (multi-token prediction layers) is not supported; expected " + _HYBRID_ACCEPTED,
}
_KIND_SYMBOLS = {kind: symbol for symbol, kind in HYBRID_SYMBOLS.items()}


def _hybrid_text(config: Any) -> str | None:
    """``config.hybrid_layer_pattern`` (``None`` for stand-ins that lack the field)."""
    return getattr(config, HYBRID_FIELD, None)


@functools.lru_cache(maxsize=128)
def _hybrid_symbols(text: str) -> tuple[tuple[str, int], ...]:
    """The expanded symbols of a pattern (``|`` included) with their 0-based columns."""
    symbols = SymbolParser(
        text, field=HYBRID_FIELD, symbols="".join(HYBRID_SYMBOLS) + STAGE_BOUNDARY,
        accepted=_HYBRID_ACCEPTED, refused=_HYBRID_REFUSED, repeat_symbols=False, noun="pattern",
    ).parse()
    if all(symbol == STAGE_BOUNDARY for symbol, _ in symbols):
        raise ConfigError(f"{HYBRID_FIELD}={_quote(text)} is not accepted: it has no sublayers; "
                          f"expected a string of {_HYBRID_ACCEPTED}, such as 'G-G-G-*E'")
    return tuple(symbols)


def _checked_symbols(text: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(text, str):
        raise ConfigError(f"{HYBRID_FIELD}={_quote(text)} is not accepted: expected None or a "
                          "pattern string such as 'G-G-G-*E'")
    return _hybrid_symbols(text)


def parse_hybrid_pattern(text: str) -> list[list[str]]:
    """The pipeline stages of a hybrid layer pattern: one list of sublayer symbols per stage.

    ``"(G-|)*2*E"`` → ``[["G", "-"], ["G", "-"], ["*", "E"]]``; without ``|`` there is one stage.
    A stage may be empty. Raises ``ConfigError`` naming ``hybrid_layer_pattern`` (with the
    column and a caret) for an unknown symbol, ``M`` (Mamba), ``/`` (MTP), a malformed group or
    repeat, an expansion past a million symbols, or a pattern with no sublayers.
    """
    stages: list[list[str]] = [[]]
    for symbol, _ in _checked_symbols(text):
        if symbol == STAGE_BOUNDARY:
            stages.append([])
        else:
            stages[-1].append(symbol)
    return stages


def from_hybrid_pattern(text: str) -> list[str]:
    """The sublayer symbols of a hybrid layer pattern, in order, stage markers dropped.

    Entry ``i`` is the symbol of sublayer ``i`` (its ``layer_id``): one of ``*``, ``G``, ``D``
    (mixer-only sublayers) or ``-``, ``E`` (MLP-only sublayers), e.g. ``"(G-)*2|*E"`` →
    ``["G", "-", "G", "-", "*", "E"]``; ``len(result)`` is the config's ``num_layers``. Raises
    ``ConfigError`` as :func:`parse_hybrid_pattern` does.
    """
    return [symbol for stage in parse_hybrid_pattern(text) for symbol in stage]


def render_hybrid_pattern(symbols: Sequence[str]) -> str:
    """The normal spelling of a sequence of sublayer symbols (``|`` allowed between stages).

    Each stage is written compactly (``(...)*N`` where that is shorter) and the stages are
    joined by ``|``, so ``list("G-G-G-*E" * 2)`` → ``"(G-G-G-*E)*2"``.
    :func:`from_hybrid_pattern` reads the result back to the same sublayers. Raises
    ``ConfigError`` naming ``symbols`` for an item that is not a symbol, or no sublayers.
    """
    if isinstance(symbols, str) or not isinstance(symbols, Sequence):
        raise ConfigError(f"symbols={_quote(symbols)} is not accepted: expected a list of "
                          "symbols such as ['G', '-', '*', 'E']")
    for index, symbol in enumerate(symbols):
        if symbol != STAGE_BOUNDARY and symbol not in HYBRID_SYMBOLS:
            raise ConfigError(f"symbols[{index}]={symbol!r} is not accepted: expected one of "
                              + _HYBRID_ACCEPTED.replace(" or '(...)*N'", ""))
    if all(symbol == STAGE_BOUNDARY for symbol in symbols):
        raise ConfigError(f"symbols={_quote(symbols)} is not accepted: it has no sublayers")
    stages = "".join(symbols).split(STAGE_BOUNDARY)
    return STAGE_BOUNDARY.join(render_symbols(list(stage)) for stage in stages)


def normalize_hybrid_pattern(text: str) -> str:
    """``text`` in its normal spelling: whitespace dropped, repetition recomputed, the stages
    kept (``"G- G- G- *E"`` → ``"(G-)*3*E"``). Raises ``ConfigError`` as
    :func:`parse_hybrid_pattern` does."""
    return render_hybrid_pattern([symbol for symbol, _ in _checked_symbols(text)])


def hybrid_pattern_stages(text: str, pp: int, vp: int | None = None) -> list[list[str]] | None:
    """The pipeline split a hybrid layer pattern marks with ``|``: ``None`` when it has no
    ``|`` (the pipeline fields split the sublayers then), else the symbols of each stage.

    Stages are listed virtual-stage-major (stage ``vp_stage * pp + pp_rank``), like the
    explicit layout, and there must be ``pp * (vp or 1)`` of them. Raises ``ConfigError``
    naming ``hybrid_layer_pattern`` and pointing at the first surplus ``|`` (or the end of the
    text, when stages are missing), or as :func:`parse_hybrid_pattern` does.
    """
    symbols = _checked_symbols(text)
    boundaries = [pos for symbol, pos in symbols if symbol == STAGE_BOUNDARY]
    if not boundaries:
        return None
    expected = pp * (vp or 1)
    found = len(boundaries) + 1
    if found != expected:
        pos = boundaries[expected - 1] if found > expected else len(text)
        raise _syntax_error(
            HYBRID_FIELD, text, pos,
            f"the pattern marks {found} pipeline stage(s) with '|', expected "
            f"pipeline_model_parallel_size * virtual_pipeline_model_parallel_size = "
            f"{pp} * {vp or 1} = {expected}"
            + (f"; this '|' would begin stage {expected + 1}" if found > expected else ""),
        )
    return parse_hybrid_pattern(text)


def _first_column(text: str, symbol: str) -> int:
    """The 1-based column where ``symbol`` is first written in a hybrid pattern (0: absent)."""
    return next((pos + 1 for s, pos in _checked_symbols(text) if s == symbol), 0)


# -- per-layer kinds and the equivalent pattern ------------------------------------------------


def get_attention_kinds(config: Any) -> list[str]:
    """Per layer, the mixer kind: ``"sdpa"`` (softmax attention), ``"gdn"`` or ``"dsa"``.

    With a ``hybrid_layer_pattern``, per sublayer, and ``"-"`` (:data:`NONE_KIND`) for an
    MLP-only one. Otherwise ``"dsa"`` everywhere for the DSA variant, the linear-attention
    pattern for ``"gdn"`` (1 → ``"gdn"``, 0 → ``"sdpa"``) and ``"sdpa"`` everywhere without a
    variant. Raises ``ConfigError`` as the pattern functions do.
    """
    hybrid = _hybrid_text(config)
    if hybrid is not None:
        return [MIXER_SYMBOLS.get(symbol, NONE_KIND) for symbol in from_hybrid_pattern(hybrid)]
    variant = config.experimental_attention_variant
    if variant == "dsa":
        return ["dsa"] * config.num_layers
    if is_linear_attention_variant(variant):
        return ["gdn" if p else "sdpa" for p in get_linear_attention_pattern(config)]
    return ["sdpa"] * config.num_layers


def get_mlp_kinds(config: Any) -> list[str]:
    """Per layer, the MLP kind: ``"moe"`` or ``"dense"``.

    With a ``hybrid_layer_pattern``, per sublayer, and ``"-"`` (:data:`NONE_KIND`) for a
    mixer-only one. Otherwise the MoE pattern when ``num_moe_experts`` is set, else ``"dense"``
    everywhere. Raises ``ConfigError`` as the pattern functions do.
    """
    hybrid = _hybrid_text(config)
    if hybrid is not None:
        return [MLP_SYMBOLS.get(symbol, NONE_KIND) for symbol in from_hybrid_pattern(hybrid)]
    if config.num_moe_experts is None:
        return ["dense"] * config.num_layers
    return ["moe" if p else "dense" for p in get_moe_layer_pattern(config)]


def _layer_symbols(config: Any) -> list[str]:
    """Per layer of a frequency config, its mixer symbol and MLP symbol (``"G-"``, ``"*E"``)."""
    return [
        _KIND_SYMBOLS[attention] + _KIND_SYMBOLS[mlp]
        for attention, mlp in zip(get_attention_kinds(config), get_mlp_kinds(config), strict=True)
    ]


def _pipeline_positions(config: Any) -> list[tuple[int, int | None]]:
    """Every ``(pp_rank, vp_stage)``, virtual-stage-major (the order of the stages)."""
    vp = config.virtual_pipeline_model_parallel_size
    stages: list[int | None] = [None] if vp is None else list(range(vp))
    return [(rank, stage) for stage in stages
            for rank in range(config.pipeline_model_parallel_size)]


def to_hybrid_pattern(config: Any) -> str:
    """The hybrid layer pattern that describes ``config``'s stack, in its normal spelling.

    For a pattern config, its own pattern normalised (:func:`normalize_hybrid_pattern`). For a
    frequency config (``experimental_attention_variant`` / ``linear_attention_freq`` /
    ``moe_layer_freq``), each layer becomes its mixer symbol then its MLP symbol, and with
    pipeline parallelism each ``(pp_rank, vp_stage)`` chunk becomes a ``|``-separated stage, so
    the pattern builds the same layers on the same stages: e.g. ``num_layers=8``,
    ``linear_attention_freq=4``, MoE in every layer → ``"(GEGEGE*E)*2"``. Raises
    ``ConfigError`` as the pattern and pipeline functions do.
    """
    hybrid = _hybrid_text(config)
    if hybrid is not None:
        return normalize_hybrid_pattern(hybrid)
    from attnplug.pipeline import get_layer_ids

    layers = _layer_symbols(config)
    positions = _pipeline_positions(config)
    if len(positions) == 1:
        return render_hybrid_pattern(list("".join(layers)))
    symbols: list[str] = []
    for index, (rank, stage) in enumerate(positions):
        if index:
            symbols.append(STAGE_BOUNDARY)
        symbols.extend("".join(layers[i] for i in get_layer_ids(config, rank, stage)))
    return render_hybrid_pattern(symbols)


_REPLACED_FIELDS = {
    "experimental_attention_variant": None,
    "linear_attention_freq": None,
    "moe_layer_freq": 1,
}
_PIPELINE_SPLIT_FIELDS = {
    "num_layers_in_first_pipeline_stage": None,
    "num_layers_in_last_pipeline_stage": None,
    "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False,
    "pipeline_model_parallel_layout": None,
}


def to_hybrid_pattern_config(config: TransformerConfig) -> TransformerConfig:
    """The pattern config equivalent to ``config``: same sizes, ``hybrid_layer_pattern`` =
    :func:`to_hybrid_pattern` (``num_layers`` derived from it), the fields the pattern replaces
    reset, and, with pipeline parallelism, the split fields reset (the ``|`` carry the split).

    A pattern config is returned as it is. The model built from the result has the same
    parameters, created in the same order, and computes the same logits: frequency layer ``i``
    is sublayers ``2i`` (``input_layernorm``, ``self_attention``) and ``2i + 1``
    (``pre_mlp_layernorm``, ``mlp``). Raises ``ConfigError`` for anything but a
    ``TransformerConfig``.
    """
    from attnplug.config import TransformerConfig

    if not isinstance(config, TransformerConfig):
        raise ConfigError(f"config={type(config).__name__} is not accepted: expected an "
                          "attnplug.TransformerConfig")
    if config.hybrid_layer_pattern is not None:
        return config
    changes: dict[str, Any] = dict(_REPLACED_FIELDS, num_layers=None,
                                   hybrid_layer_pattern=to_hybrid_pattern(config))
    if len(_pipeline_positions(config)) > 1:
        changes.update(_PIPELINE_SPLIT_FIELDS)
    return attrs.evolve(config, **changes)
