"""Pipeline slicing: which global decoder layers a ``(pp_rank, vp_stage)`` builds.

Megatron-Core's semantics, without its distributed state:

* even split: ``num_layers`` (plus one for the embedding and one for the loss when
  ``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split`` are set)
  split evenly over ``pipeline_model_parallel_size`` ranks, and each rank's share evenly over
  ``virtual_pipeline_model_parallel_size`` chunks;
* uneven first/last stage: ``num_layers_in_first_pipeline_stage`` and/or
  ``num_layers_in_last_pipeline_stage``, the rest split evenly over the middle ranks;
* an explicit ``pipeline_model_parallel_layout`` such as ``"Et|(tt|)*2tL"``, which decides alone;
* the ``|`` stage markers of a ``hybrid_layer_pattern`` such as ``"(G-)*2|*E(G-)*2"``, which
  decide alone the same way (each symbol is one decoder sublayer, a ``t`` of the layout).

A pattern config counts sublayers: ``num_layers`` is the number of its symbols, and a pattern
without ``|`` is split by the other fields like any ``num_layers``.

With virtual stages, chunk ``vp_stage`` of rank ``pp_rank`` holds the layers after every chunk of
a lower ``vp_stage``, then of a lower ``pp_rank`` ("virtual-stage-major" order): over all
``(pp_rank, vp_stage)`` in that order the slices partition ``range(num_layers)``.

There is no process group here, so ``pp_rank=None`` means rank 0 (Megatron would ask
``parallel_state`` for the calling rank).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from attnplug._errors import ConfigError
from attnplug._grammar import MAX_SYMBOLS, SymbolParser
from attnplug._grammar import quote as _quote
from attnplug._grammar import syntax_error as _syntax_error
from attnplug.patterns import hybrid_pattern_stages

__all__ = [
    "check_pipeline",
    "get_layer_ids",
    "get_num_layers_to_build",
    "get_transformer_layer_offset",
    "parse_pipeline_layout",
]

LAYOUT_FIELD = "pipeline_model_parallel_layout"
PATTERN_FIELD = "hybrid_layer_pattern"
MAX_LAYOUT_SYMBOLS = MAX_SYMBOLS
"""How many symbols a layout string may expand to."""

_EMBEDDING, _DECODER, _LOSS, _BOUNDARY = "E", "t", "L", "|"
_IGNORED = " \t\r\n,"
_LAYOUT_ACCEPTED = (
    "'E' (embedding), 't' (decoder layer), 'L' (loss), '|' (next stage), '(...)', '*N'"
)


class _Pipeline(NamedTuple):
    """The pipeline fields of a config, checked."""

    num_layers: int
    pp: int
    vp: int | None
    first: int | None
    last: int | None
    embedding: bool
    loss: bool
    layout: list[list[str]] | None
    pattern: bool = False  # the layers are the sublayers of a hybrid_layer_pattern


# -- the layout string -------------------------------------------------------------------------


def _layout_symbols(text: str) -> list[tuple[str, int]]:
    """The symbols of a layout string with their columns, ``(...)*N`` and ``X*N`` expanded."""
    return SymbolParser(
        text, field=LAYOUT_FIELD, symbols=_EMBEDDING + _DECODER + _LOSS + _BOUNDARY,
        accepted=_LAYOUT_ACCEPTED, ignored=_IGNORED, noun="layout",
        refused={"m": "'m' (multi-token prediction) is not supported; expected "
                      + _LAYOUT_ACCEPTED},
    ).parse()


def _split_stages(symbols: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    stages: list[list[tuple[str, int]]] = [[]]
    for symbol, pos in symbols:
        if symbol == _BOUNDARY:
            stages.append([])
        else:
            stages[-1].append((symbol, pos))
    return stages


def _check_layout_ends(text: str, stages: list[list[tuple[str, int]]]) -> None:
    """The embedding must come once, first in the first stage; the loss once, last in the last."""
    embeddings = [pos for stage in stages for symbol, pos in stage if symbol == _EMBEDDING]
    if not stages[0] or stages[0][0][0] != _EMBEDDING:
        raise _syntax_error(LAYOUT_FIELD, text, embeddings[0] if embeddings else 0,
                            "the first stage must begin with the embedding 'E'")
    if len(embeddings) > 1:
        raise _syntax_error(LAYOUT_FIELD, text, embeddings[1],
                            "'E' may appear only once, at the start of the first stage")
    losses = [pos for stage in stages for symbol, pos in stage if symbol == _LOSS]
    if not stages[-1] or stages[-1][-1][0] != _LOSS:
        raise _syntax_error(LAYOUT_FIELD, text, losses[-1] if losses else len(text),
                            "the last stage must end with the loss 'L'")
    if len(losses) > 1:
        raise _syntax_error(LAYOUT_FIELD, text, losses[0],
                            "'L' may appear only once, at the end of the last stage")


def parse_pipeline_layout(text: str, pp: int, vp: int | None = None) -> list[list[str]]:
    """Read a ``pipeline_model_parallel_layout`` string into its stages.

    Stages are separated by ``|``; ``E`` is the embedding, ``t`` one decoder layer, ``L`` the
    loss; ``X*N`` repeats a symbol and ``(...)*N`` a group (which may hold ``|``); whitespace and
    commas are ignored. There must be ``pp * vp`` stages (``vp=None`` counts as 1), listed
    virtual-stage-major (stage ``vp_stage * pp + pp_rank``); ``E`` must open the first stage and
    ``L`` close the last, each once. Returns one list of symbols per stage, in that order.
    Raises ``ConfigError`` naming ``pipeline_model_parallel_layout`` (with the column) for a
    malformed string, a wrong stage count or a misplaced ``E``/``L``; ``ConfigError`` naming
    ``pp`` or ``vp`` when they are not integers >= 1.
    """
    _check_positive("pp", pp)
    if vp is not None:
        _check_positive("vp", vp)
    if not isinstance(text, str):
        raise ConfigError(f"{LAYOUT_FIELD}={_quote(text)} is not accepted: expected a string "
                          "such as 'Et|tt|tL' or None")
    stages = _split_stages(_layout_symbols(text))
    expected = pp * (vp or 1)
    if len(stages) != expected:
        raise ConfigError(
            f"{LAYOUT_FIELD}={_quote(text)} is not accepted: it lists {len(stages)} stage(s), "
            f"expected pipeline_model_parallel_size * virtual_pipeline_model_parallel_size = "
            f"{pp} * {vp or 1} = {expected}, separated by '|'"
        )
    _check_layout_ends(text, stages)
    return [[symbol for symbol, _ in stage] for stage in stages]


# -- checking a config -------------------------------------------------------------------------


def _check_positive(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} is not accepted: expected an integer >= 1")
    return value


def _check_optional_positive(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r} is not accepted: expected None or an integer >= 1")
    return value


def _check_flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not accepted: expected true or false")
    return value


def _read_pipeline(config: Any) -> _Pipeline:
    """The pipeline fields of ``config``, checked so that they slice cleanly."""
    pattern = getattr(config, PATTERN_FIELD, None)
    p = _Pipeline(
        num_layers=_check_positive("num_layers", config.num_layers),
        pp=_check_positive("pipeline_model_parallel_size", config.pipeline_model_parallel_size),
        vp=_check_optional_positive("virtual_pipeline_model_parallel_size",
                                    config.virtual_pipeline_model_parallel_size),
        first=_check_optional_positive("num_layers_in_first_pipeline_stage",
                                       config.num_layers_in_first_pipeline_stage),
        last=_check_optional_positive("num_layers_in_last_pipeline_stage",
                                      config.num_layers_in_last_pipeline_stage),
        embedding=_check_flag("account_for_embedding_in_pipeline_split",
                              config.account_for_embedding_in_pipeline_split),
        loss=_check_flag("account_for_loss_in_pipeline_split",
                         config.account_for_loss_in_pipeline_split),
        layout=None,
        pattern=pattern is not None,
    )
    if p.vp is not None and p.pp == 1:
        raise ConfigError(
            f"virtual_pipeline_model_parallel_size={p.vp} is not accepted with "
            "pipeline_model_parallel_size=1: virtual stages need pipeline_model_parallel_size >= 2"
        )
    text = config.pipeline_model_parallel_layout
    stages = None if pattern is None else hybrid_pattern_stages(pattern, p.pp, p.vp)
    if stages is not None:
        return p._replace(layout=_checked_pattern_stages(p, text, stages))
    if text is not None:
        return p._replace(layout=_checked_layout(p, text))
    if p.first is not None or p.last is not None:
        _check_uneven(p)
    else:
        _check_even(p)
    return p


def _check_split_alone(p: _Pipeline, decider: str) -> None:
    """Refuse the uneven and accounting fields next to a ``decider`` that splits alone."""
    others = {
        "num_layers_in_first_pipeline_stage": p.first,
        "num_layers_in_last_pipeline_stage": p.last,
        "account_for_embedding_in_pipeline_split": p.embedding or None,
        "account_for_loss_in_pipeline_split": p.loss or None,
    }
    for field, value in others.items():
        if value is not None:
            raise ConfigError(
                f"{field}={value!r} is not accepted together with {decider}: one way of "
                f"splitting the layers at a time; unset {field}"
            )


def _checked_pattern_stages(p: _Pipeline, layout: Any,
                            stages: list[list[str]]) -> list[list[str]]:
    """The stages a ``|``-marked hybrid pattern gives, as layout stages of ``t`` symbols."""
    decider = f"the '|' stage markers of {PATTERN_FIELD}"
    if layout is not None:
        raise ConfigError(f"{LAYOUT_FIELD}={_quote(layout)} is not accepted together with "
                          f"{decider}: one way of splitting the layers at a time; unset one of "
                          "them")
    _check_split_alone(p, decider)
    sublayers = sum(len(stage) for stage in stages)
    if sublayers != p.num_layers:
        raise ConfigError(f"num_layers={p.num_layers} is not accepted: {PATTERN_FIELD} has "
                          f"{sublayers} sublayers")
    return [[_DECODER] * len(stage) for stage in stages]


def _checked_layout(p: _Pipeline, text: Any) -> list[list[str]]:
    _check_split_alone(p, LAYOUT_FIELD)
    stages = parse_pipeline_layout(text, p.pp, p.vp)
    decoders = sum(stage.count(_DECODER) for stage in stages)
    if decoders != p.num_layers:
        raise ConfigError(
            f"{LAYOUT_FIELD}={_quote(text)} is not accepted: it has {decoders} decoder layer(s) "
            f"'t', expected num_layers={p.num_layers}"
        )
    return stages


def _middle(p: _Pipeline) -> tuple[int, int]:
    """``(middle_stages, middle_layers)`` of an uneven split (unset first/last count as 0)."""
    middle_stages = p.pp - (p.first is not None) - (p.last is not None)
    middle_layers = p.num_layers - (p.first or 0) - (p.last or 0)
    return middle_stages, middle_layers


def _edges(p: _Pipeline) -> str:
    """The uneven first/last fields that are set, as ``name=value`` text."""
    fields = (("num_layers_in_first_pipeline_stage", p.first),
              ("num_layers_in_last_pipeline_stage", p.last))
    return " and ".join(f"{name}={value}" for name, value in fields if value is not None)


def _check_uneven(p: _Pipeline) -> None:
    edges = _edges(p)
    if p.embedding or p.loss:
        flag = ("account_for_embedding_in_pipeline_split" if p.embedding
                else "account_for_loss_in_pipeline_split")
        raise ConfigError(
            f"{flag}=True is not accepted together with {edges}: an uneven first/last stage "
            "cannot also count the embedding or the loss as a layer"
        )
    if p.pp == 1:
        raise ConfigError(
            f"{edges} is not accepted with pipeline_model_parallel_size=1: an uneven first/last "
            "stage needs pipeline_model_parallel_size >= 2"
        )
    middle_stages, middle_layers = _middle(p)
    if middle_layers < 0:
        raise ConfigError(
            f"{edges} is not accepted: the stages would hold more than num_layers="
            f"{p.num_layers} layers"
        )
    if middle_stages == 0 and middle_layers > 0:
        raise ConfigError(
            f"{edges} is not accepted: with pipeline_model_parallel_size={p.pp} there is no "
            f"middle stage for the other {middle_layers} of num_layers={p.num_layers} layers; "
            "expected first + last = num_layers"
        )
    if middle_stages > 0 and (middle_layers == 0 or middle_layers % middle_stages):
        raise ConfigError(
            f"{edges} is not accepted: the {middle_layers} layer(s) left of num_layers="
            f"{p.num_layers} must split evenly, at least one each, over the {middle_stages} "
            f"middle stage(s) of pipeline_model_parallel_size={p.pp}"
        )
    if p.vp is not None:
        shares = {
            "num_layers_in_first_pipeline_stage": p.first,
            "num_layers_in_last_pipeline_stage": p.last,
            "layers per middle stage": middle_layers // middle_stages if middle_stages else None,
        }
        for name, count in shares.items():
            if count is not None and count % p.vp:
                raise ConfigError(
                    f"{name}={count} is not accepted: expected a multiple of "
                    f"virtual_pipeline_model_parallel_size={p.vp} ({edges})"
                )


def _split_size(p: _Pipeline) -> int:
    """``num_layers``, plus one each for an accounted embedding and loss."""
    return p.num_layers + p.embedding + p.loss


def _pattern_hint(p: _Pipeline) -> str:
    if not p.pattern:
        return ""
    return (f" (num_layers counts the sublayers of {PATTERN_FIELD}; '|' in the pattern can mark "
            "the stages instead)")


def _check_even(p: _Pipeline) -> None:
    total = _split_size(p)
    if total % p.pp:
        extra = "".join(
            f" + 1 ({flag})" for flag, on in (
                ("account_for_embedding_in_pipeline_split", p.embedding),
                ("account_for_loss_in_pipeline_split", p.loss),
            ) if on
        )
        raise ConfigError(
            f"num_layers={p.num_layers}{extra and f'{extra} = {total}'} is not accepted: it is "
            f"not divisible by "
            f"pipeline_model_parallel_size={p.pp}; change the sizes, or set "
            "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage or "
            f"{LAYOUT_FIELD}" + _pattern_hint(p)
        )
    per_rank = total // p.pp
    if p.vp is not None and per_rank % p.vp:
        raise ConfigError(
            f"virtual_pipeline_model_parallel_size={p.vp} is not accepted: each of the "
            f"pipeline_model_parallel_size={p.pp} ranks holds {per_rank} layer(s), which must be "
            "a multiple of it" + _pattern_hint(p)
        )


def check_pipeline(config: Any) -> None:
    """Check that the pipeline fields of ``config`` split its layers cleanly.

    Returns None. Raises ``ConfigError`` naming the field for: a size or flag of the wrong type
    or below 1; virtual stages without pipeline parallelism; ``num_layers`` (with the accounted
    embedding/loss) not divisible by ``pipeline_model_parallel_size``, or a rank's share not
    divisible by ``virtual_pipeline_model_parallel_size``; an uneven first/last stage combined
    with embedding/loss accounting, larger than ``num_layers``, leaving layers that do not split
    evenly over the middle stages, or not divisible by the virtual size; a layout that is
    malformed, lists the wrong number of stages or decoder layers, misplaces ``E``/``L``, or is
    combined with the uneven or accounting fields; ``hybrid_layer_pattern`` stage markers ``|``
    that mark another number of stages than ``pp * (vp or 1)`` (naming the column), or that are
    combined with a layout or the uneven or accounting fields.
    """
    _read_pipeline(config)


# -- slicing -----------------------------------------------------------------------------------


def _position(p: _Pipeline, vp_stage: Any, pp_rank: Any) -> tuple[int | None, int]:
    """``(vp_stage, pp_rank)`` checked against the sizes; ``pp_rank=None`` is rank 0."""
    if pp_rank is None:
        pp_rank = 0
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, int) or not 0 <= pp_rank < p.pp:
        raise ConfigError(f"pp_rank={pp_rank!r} is not accepted: expected an integer in "
                          f"[0, {p.pp}) (pipeline_model_parallel_size={p.pp})")
    if p.vp is None:
        if vp_stage is not None:
            raise ConfigError(f"vp_stage={vp_stage!r} is not accepted: "
                              "virtual_pipeline_model_parallel_size is not set; expected None")
        return None, pp_rank
    if isinstance(vp_stage, bool) or not isinstance(vp_stage, int) or not 0 <= vp_stage < p.vp:
        raise ConfigError(
            f"vp_stage={vp_stage!r} is not accepted: virtual_pipeline_model_parallel_size="
            f"{p.vp}, so expected an integer in [0, {p.vp})"
        )
    return vp_stage, pp_rank


def _is_first_chunk(vp_stage: int | None, pp_rank: int) -> bool:
    return pp_rank == 0 and (vp_stage or 0) == 0


def _is_last_chunk(p: _Pipeline, vp_stage: int | None, pp_rank: int) -> bool:
    return pp_rank == p.pp - 1 and (vp_stage is None or vp_stage == p.vp - 1)


def _layout_stage(p: _Pipeline, vp_stage: int | None, pp_rank: int) -> int:
    return (vp_stage or 0) * p.pp + pp_rank


def _uneven_offset(p: _Pipeline, vp_stage: int | None, pp_rank: int) -> int:
    first = p.first or 0
    middle_stages, middle_layers = _middle(p)
    middle_rank = pp_rank if p.first is None else pp_rank - 1
    if p.vp is None:
        per_middle_rank = middle_layers // middle_stages if middle_stages else 0
        return 0 if pp_rank == 0 else middle_rank * per_middle_rank + first
    first_chunk = first // p.vp
    middle_chunk = middle_layers // p.vp
    last_chunk = (p.last or 0) // p.vp
    chunks_before = vp_stage * (first_chunk + middle_chunk + last_chunk)
    if pp_rank == 0:
        return chunks_before
    per_middle_chunk = middle_chunk // middle_stages if middle_stages else 0
    return chunks_before + first_chunk + middle_rank * per_middle_chunk


def _even_offset(p: _Pipeline, vp_stage: int | None, pp_rank: int) -> int:
    total = _split_size(p)
    per_rank = total // p.pp
    if p.vp is None:
        offset = pp_rank * per_rank
    else:
        offset = vp_stage * (total // p.vp) + pp_rank * (per_rank // p.vp)
    if p.embedding and not _is_first_chunk(vp_stage, pp_rank):
        offset -= 1
    return offset


def get_transformer_layer_offset(config: Any, vp_stage: int | None = None,
                                 pp_rank: int | None = None) -> int:
    """The global index of the first decoder layer that ``(pp_rank, vp_stage)`` builds.

    ``pp_rank=None`` means rank 0; ``vp_stage`` is required when
    ``virtual_pipeline_model_parallel_size`` is set and must be None when it is not. Returns 0
    without pipeline parallelism. Raises ``ConfigError`` naming ``pp_rank`` or ``vp_stage`` when
    out of range, or the field at fault when the config does not split (see
    :func:`check_pipeline`).
    """
    p = _read_pipeline(config)
    vp_stage, pp_rank = _position(p, vp_stage, pp_rank)
    if p.layout is not None:
        before = p.layout[: _layout_stage(p, vp_stage, pp_rank)]
        return sum(stage.count(_DECODER) for stage in before)
    if p.pp == 1:
        return 0
    if p.first is not None or p.last is not None:
        return _uneven_offset(p, vp_stage, pp_rank)
    return _even_offset(p, vp_stage, pp_rank)


def _rank_share(p: _Pipeline, pp_rank: int) -> int:
    """How many split units (layers, with an accounted embedding/loss) rank ``pp_rank`` holds."""
    if p.first is None and p.last is None:
        return _split_size(p) // p.pp
    if pp_rank == 0 and p.first is not None:
        return p.first
    if pp_rank == p.pp - 1 and p.last is not None:
        return p.last
    middle_stages, middle_layers = _middle(p)
    return middle_layers // middle_stages


def get_num_layers_to_build(config: Any, vp_stage: int | None = None,
                            pp_rank: int | None = None) -> int:
    """How many decoder layers ``(pp_rank, vp_stage)`` builds (may be 0).

    Same arguments and errors as :func:`get_transformer_layer_offset`. The first chunk builds one
    layer fewer when the embedding is accounted for, the last chunk when the loss is.
    """
    p = _read_pipeline(config)
    vp_stage, pp_rank = _position(p, vp_stage, pp_rank)
    if p.layout is not None:
        return p.layout[_layout_stage(p, vp_stage, pp_rank)].count(_DECODER)
    share = _rank_share(p, pp_rank)
    count = share if p.vp is None else share // p.vp
    if p.embedding and _is_first_chunk(vp_stage, pp_rank):
        count -= 1
    if p.loss and _is_last_chunk(p, vp_stage, pp_rank):
        count -= 1
    return count


def get_layer_ids(config: Any, pp_rank: int | None, vp_stage: int | None = None) -> list[int]:
    """The global indices of the decoder layers ``(pp_rank, vp_stage)`` builds, in order.

    ``range(offset, offset + count)`` of :func:`get_transformer_layer_offset` and
    :func:`get_num_layers_to_build`, as a list; same arguments and errors.
    """
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + count))
