"""Pipeline slicing (attnplug.pipeline): Megatron-Core's semantics, partition properties."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnplug._errors import ConfigError
from attnplug.config import TransformerConfig
from attnplug.pipeline import (
    check_pipeline,
    get_layer_ids,
    get_num_layers_to_build,
    get_transformer_layer_offset,
    parse_pipeline_layout,
)

PIPELINE_DEFAULTS = dict(
    num_layers=8,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None,
    account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False,
    pipeline_model_parallel_layout=None,
)


def make_config(**fields) -> TransformerConfig:
    fields.setdefault("num_layers", 8)
    return TransformerConfig(hidden_size=64, num_attention_heads=4, **fields)


def namespace(**fields) -> SimpleNamespace:
    """A stand-in config, for values a real TransformerConfig would refuse to hold."""
    return SimpleNamespace(**{**PIPELINE_DEFAULTS, **fields})


def positions(config) -> list[tuple[int, int | None]]:
    """Every ``(pp_rank, vp_stage)``, virtual-stage-major."""
    vp = config.virtual_pipeline_model_parallel_size
    stages = range(vp) if vp is not None else [None]
    return [(pp_rank, vp_stage) for vp_stage in stages
            for pp_rank in range(config.pipeline_model_parallel_size)]


def slices(config) -> dict[tuple[int, int | None], list[int]]:
    return {pos: get_layer_ids(config, pos[0], pos[1]) for pos in positions(config)}


def assert_partition(config) -> None:
    """The slices, virtual-major, concatenate to range(num_layers); offset/count agree."""
    joined: list[int] = []
    for pp_rank, vp_stage in positions(config):
        ids = get_layer_ids(config, pp_rank, vp_stage)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        assert count >= 0
        assert ids == list(range(offset, offset + count))
        assert offset == len(joined)
        joined.extend(ids)
    assert joined == list(range(config.num_layers))


# -- Megatron-Core's verified examples ---------------------------------------------------------


def test_no_pipeline_builds_everything_from_zero():
    config = make_config(num_layers=5)
    assert get_transformer_layer_offset(config) == 0
    assert get_num_layers_to_build(config) == 5
    assert get_layer_ids(config, None) == get_layer_ids(config, 0) == [0, 1, 2, 3, 4]


def test_even_split():
    config = make_config(num_layers=8, pipeline_model_parallel_size=2)
    assert slices(config) == {(0, None): [0, 1, 2, 3], (1, None): [4, 5, 6, 7]}


def test_even_split_with_virtual_stages():
    config = make_config(num_layers=8, pipeline_model_parallel_size=2,
                         virtual_pipeline_model_parallel_size=2)
    assert slices(config) == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}


def test_uneven_first_and_last_stage():
    config = make_config(num_layers=10, pipeline_model_parallel_size=4,
                         num_layers_in_first_pipeline_stage=1,
                         num_layers_in_last_pipeline_stage=1)
    assert list(slices(config).values()) == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_embedding_and_loss_accounted_in_the_split():
    config = make_config(num_layers=6, pipeline_model_parallel_size=4,
                         account_for_embedding_in_pipeline_split=True,
                         account_for_loss_in_pipeline_split=True)
    assert list(slices(config).values()) == [[0], [1, 2], [3, 4], [5]]


def test_uneven_first_and_last_stage_with_virtual_stages():
    config = make_config(num_layers=12, pipeline_model_parallel_size=4,
                         virtual_pipeline_model_parallel_size=2,
                         num_layers_in_first_pipeline_stage=2,
                         num_layers_in_last_pipeline_stage=2)
    assert slices(config) == {
        (0, 0): [0], (1, 0): [1, 2], (2, 0): [3, 4], (3, 0): [5],
        (0, 1): [6], (1, 1): [7, 8], (2, 1): [9, 10], (3, 1): [11],
    }


def test_indivisible_even_split_is_refused():
    with pytest.raises(ConfigError, match=r"num_layers=8 .*pipeline_model_parallel_size=3"):
        make_config(num_layers=8, pipeline_model_parallel_size=3)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(num_layers=8, pipeline_model_parallel_size=2), {1: [4, 5, 6, 7]}),
        (dict(num_layers=8, pipeline_model_parallel_size=4,
              virtual_pipeline_model_parallel_size=2), {0: [0]}),
        (dict(num_layers=7, pipeline_model_parallel_size=2,
              account_for_embedding_in_pipeline_split=True), {0: [0, 1, 2], 1: [3, 4, 5, 6]}),
        (dict(num_layers=7, pipeline_model_parallel_size=2,
              account_for_loss_in_pipeline_split=True), {0: [0, 1, 2, 3], 1: [4, 5, 6]}),
        (dict(num_layers=7, pipeline_model_parallel_size=3,
              num_layers_in_first_pipeline_stage=1), {0: [0], 1: [1, 2, 3], 2: [4, 5, 6]}),
        (dict(num_layers=7, pipeline_model_parallel_size=3,
              num_layers_in_last_pipeline_stage=1), {0: [0, 1, 2], 1: [3, 4, 5], 2: [6]}),
        (dict(num_layers=5, pipeline_model_parallel_size=2,
              num_layers_in_first_pipeline_stage=2,
              num_layers_in_last_pipeline_stage=3), {0: [0, 1], 1: [2, 3, 4]}),
    ],
)
def test_more_splits(fields, expected):
    config = make_config(**fields)
    vp_stage = 0 if config.virtual_pipeline_model_parallel_size else None
    for pp_rank, ids in expected.items():
        assert get_layer_ids(config, pp_rank, vp_stage) == ids
    assert_partition(config)


def test_embedding_accounting_with_virtual_stages():
    config = make_config(num_layers=6, pipeline_model_parallel_size=2,
                         virtual_pipeline_model_parallel_size=2,
                         account_for_embedding_in_pipeline_split=True,
                         account_for_loss_in_pipeline_split=True)
    assert slices(config) == {(0, 0): [0], (1, 0): [1, 2], (0, 1): [3, 4], (1, 1): [5]}


# -- arguments ---------------------------------------------------------------------------------


def test_vp_stage_is_required_with_virtual_stages():
    config = make_config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    for get in (get_transformer_layer_offset, get_num_layers_to_build):
        with pytest.raises(ConfigError, match="vp_stage=None .*virtual_pipeline_model_parallel"):
            get(config, pp_rank=0)
    with pytest.raises(ConfigError, match="vp_stage=None"):
        get_layer_ids(config, 0)


@pytest.mark.parametrize("vp_stage", [0, 1])
def test_vp_stage_is_refused_without_virtual_stages(vp_stage):
    config = make_config(pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=f"vp_stage={vp_stage} .*expected None"):
        get_layer_ids(config, 0, vp_stage)


@pytest.mark.parametrize("vp_stage", [-1, 2, True, 1.0, "0"])
def test_vp_stage_is_range_checked(vp_stage):
    config = make_config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=re.escape(f"vp_stage={vp_stage!r}")):
        get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=0)


@pytest.mark.parametrize("pp_rank", [-1, 2, True, 1.0, "1"])
def test_pp_rank_is_range_checked(pp_rank):
    config = make_config(pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=re.escape(f"pp_rank={pp_rank!r}")):
        get_num_layers_to_build(config, pp_rank=pp_rank)


def test_pp_rank_none_means_rank_zero():
    config = make_config(pipeline_model_parallel_size=2)
    assert get_layer_ids(config, None) == get_layer_ids(config, 0) == [0, 1, 2, 3]


# -- check_pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(num_layers=0), "num_layers=0"),
        (dict(pipeline_model_parallel_size=0), "pipeline_model_parallel_size=0"),
        (dict(pipeline_model_parallel_size=True), "pipeline_model_parallel_size=True"),
        (dict(pipeline_model_parallel_size=2.0), "pipeline_model_parallel_size=2.0"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=0),
         "virtual_pipeline_model_parallel_size=0"),
        (dict(num_layers_in_first_pipeline_stage=-1, pipeline_model_parallel_size=2),
         "num_layers_in_first_pipeline_stage=-1"),
        (dict(num_layers_in_last_pipeline_stage=0, pipeline_model_parallel_size=2),
         "num_layers_in_last_pipeline_stage=0"),
        (dict(account_for_loss_in_pipeline_split=1), "account_for_loss_in_pipeline_split=1"),
        (dict(pipeline_model_parallel_layout=["E", "t", "L"]), "pipeline_model_parallel_layout"),
    ],
)
def test_check_pipeline_rejects_bad_types(fields, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        check_pipeline(namespace(**fields))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(num_layers=8, pipeline_model_parallel_size=3),
         r"num_layers=8 is not accepted: it is not divisible by pipeline_model_parallel_size=3"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              account_for_embedding_in_pipeline_split=True),
         r"num_layers=8 \+ 1 \(account_for_embedding_in_pipeline_split\) = 9"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              virtual_pipeline_model_parallel_size=3),
         r"virtual_pipeline_model_parallel_size=3 .* 4 layer\(s\)"),
        (dict(num_layers=8, virtual_pipeline_model_parallel_size=2),
         r"virtual_pipeline_model_parallel_size=2 .*pipeline_model_parallel_size=1"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              num_layers_in_first_pipeline_stage=2,
              account_for_embedding_in_pipeline_split=True),
         r"account_for_embedding_in_pipeline_split=True .*num_layers_in_first_pipeline_stage=2"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              num_layers_in_last_pipeline_stage=2, account_for_loss_in_pipeline_split=True),
         r"account_for_loss_in_pipeline_split=True"),
        (dict(num_layers=8, num_layers_in_first_pipeline_stage=8),
         r"num_layers_in_first_pipeline_stage=8 .*pipeline_model_parallel_size=1"),
        (dict(num_layers=8, pipeline_model_parallel_size=3,
              num_layers_in_first_pipeline_stage=5, num_layers_in_last_pipeline_stage=4),
         r"more than num_layers=8"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              num_layers_in_first_pipeline_stage=9),
         r"num_layers_in_first_pipeline_stage=9 .*more than num_layers=8"),
        (dict(num_layers=10, pipeline_model_parallel_size=4,
              num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=2),
         r"5 layer\(s\) left of num_layers=10 must split evenly"),
        (dict(num_layers=4, pipeline_model_parallel_size=3,
              num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2),
         r"the 0 layer\(s\) left"),
        (dict(num_layers=8, pipeline_model_parallel_size=2,
              num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=3),
         r"no middle stage for the other 2"),
        (dict(num_layers=12, pipeline_model_parallel_size=4,
              virtual_pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1,
              num_layers_in_last_pipeline_stage=1),
         r"num_layers_in_first_pipeline_stage=1 is not accepted: expected a multiple of "
         r"virtual_pipeline_model_parallel_size=2"),
        (dict(num_layers=8, pipeline_model_parallel_size=3,
              virtual_pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=2),
         r"layers per middle stage=3 is not accepted"),
    ],
)
def test_check_pipeline_rejects_splits_that_do_not_work(fields, problem):
    with pytest.raises(ConfigError, match=problem):
        check_pipeline(namespace(**fields))
    with pytest.raises(ConfigError, match=problem):
        make_config(**fields)


# -- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pp", "vp", "stages"),
    [
        ("EtL", 1, None, [["E", "t", "L"]]),
        ("Et|tL", 2, None, [["E", "t"], ["t", "L"]]),
        ("E t*3 | t t , t | (t|)*1 t L", 4, None,
         [["E", "t", "t", "t"], ["t", "t", "t"], ["t"], ["t", "L"]]),
        ("Ett|(tt|)*2tL", 2, 2, [["E", "t", "t"], ["t", "t"], ["t", "t"], ["t", "L"]]),
        ("E|t*0|(t)*2|L", 2, 2, [["E"], [], ["t", "t"], ["L"]]),
        ("E((t)*2|)*1t*1L", 2, None, [["E", "t", "t"], ["t", "L"]]),
    ],
)
def test_parse_pipeline_layout(text, pp, vp, stages):
    assert parse_pipeline_layout(text, pp, vp) == stages


def test_layout_slices_virtual_stage_major():
    config = make_config(num_layers=7, pipeline_model_parallel_size=2,
                         virtual_pipeline_model_parallel_size=2,
                         pipeline_model_parallel_layout="Et|ttt|t|ttL")
    assert slices(config) == {(0, 0): [0], (1, 0): [1, 2, 3], (0, 1): [4], (1, 1): [5, 6]}


def test_layout_overrides_the_even_split():
    config = make_config(num_layers=5, pipeline_model_parallel_size=2,
                         pipeline_model_parallel_layout="Et|ttttL")
    assert slices(config) == {(0, None): [0], (1, None): [1, 2, 3, 4]}


def test_layout_vp_stage_rules_are_the_same():
    config = make_config(num_layers=2, pipeline_model_parallel_size=2,
                         pipeline_model_parallel_layout="Et|tL")
    with pytest.raises(ConfigError, match="vp_stage=0"):
        get_layer_ids(config, 0, 0)


@pytest.mark.parametrize(
    ("text", "pp", "vp", "column", "problem"),
    [
        ("Etx|tL", 2, None, 3, r"unexpected 'x'"),
        ("Etm|tL", 2, None, 3, r"'m' \(multi-token prediction\) is not supported"),
        ("E(t|tL", 2, None, 7, r"expected '\)' to close the '\(' at column 2"),
        ("Et)|tL", 2, None, 3, r"unbalanced '\)'"),
        ("Et*|tL", 2, None, 4, r"expected a repeat count"),
        ("Et*-1|tL", 2, None, 4, r"expected a repeat count"),
        ("*2Et|tL", 2, None, 1, r"unexpected '\*'"),
        ("E(t)*99999999999|L", 2, None, 6, r"repeat count is larger"),
        ("E((t*1000)*1000)*2|L", 2, None, 17, r"more than 1000000 symbols"),
        ("tE|tL", 2, None, 2, r"first stage must begin with the embedding 'E'"),
        ("t|tL", 2, None, 1, r"first stage must begin with the embedding 'E'"),
        ("Et|EtL", 2, None, 4, r"'E' may appear only once"),
        ("Et|tLt", 2, None, 5, r"last stage must end with the loss 'L'"),
        ("Et|t", 2, None, 5, r"last stage must end with the loss 'L'"),
        ("EtL|tL", 2, None, 3, r"'L' may appear only once"),
        ("Et|t\u00e9L", 2, None, 5, r"unexpected"),
    ],
)
def test_bad_layouts_point_at_the_column(text, pp, vp, column, problem):
    with pytest.raises(ConfigError) as info:
        parse_pipeline_layout(text, pp, vp)
    message = str(info.value)
    assert message.startswith("pipeline_model_parallel_layout=")
    assert re.search(problem, message), message
    assert f"at column {column}," in message


def test_deeply_nested_layout_is_refused():
    with pytest.raises(ConfigError, match="nest deeper"):
        parse_pipeline_layout("E" + "(" * 500 + "t" + ")" * 500 + "L", 1)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(num_layers=3, pipeline_model_parallel_size=2,
              pipeline_model_parallel_layout="Et|tL"), r"2 decoder layer\(s\) 't', expected "
                                                       r"num_layers=3"),
        (dict(num_layers=2, pipeline_model_parallel_size=2,
              pipeline_model_parallel_layout="EttL"), r"1 stage\(s\), expected .* = 2"),
        (dict(num_layers=2, pipeline_model_parallel_size=2,
              virtual_pipeline_model_parallel_size=2,
              pipeline_model_parallel_layout="Et|tL"), r"2 stage\(s\), expected .*2 \* 2 = 4"),
        (dict(num_layers=2, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1,
              pipeline_model_parallel_layout="Et|tL"),
         r"num_layers_in_first_pipeline_stage=1 is not accepted together with "
         r"pipeline_model_parallel_layout"),
        (dict(num_layers=2, pipeline_model_parallel_size=2,
              account_for_embedding_in_pipeline_split=True,
              pipeline_model_parallel_layout="Et|tL"),
         r"account_for_embedding_in_pipeline_split=True is not accepted together"),
    ],
)
def test_layout_must_agree_with_the_config(fields, problem):
    with pytest.raises(ConfigError, match=problem):
        check_pipeline(namespace(**fields))
    with pytest.raises(ConfigError, match=problem):
        make_config(**fields)


@pytest.mark.parametrize(("pp", "vp"), [(0, None), (True, None), (2, 0), (2, "2")])
def test_parse_pipeline_layout_checks_its_sizes(pp, vp):
    with pytest.raises(ConfigError, match="pp=|vp="):
        parse_pipeline_layout("EtL", pp, vp)


# -- properties --------------------------------------------------------------------------------

virtual_sizes = st.one_of(st.none(), st.integers(1, 4))


@st.composite
def even_configs(draw) -> dict:
    pp = draw(st.integers(1, 6))
    vp = draw(virtual_sizes) if pp > 1 else None
    embedding, loss = draw(st.booleans()), draw(st.booleans())
    per_chunk = draw(st.integers(1, 4))
    num_layers = pp * (vp or 1) * per_chunk - embedding - loss
    if num_layers < 1:
        embedding = loss = False
        num_layers = pp * (vp or 1) * per_chunk
    return dict(num_layers=num_layers, pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vp,
                account_for_embedding_in_pipeline_split=embedding,
                account_for_loss_in_pipeline_split=loss)


@st.composite
def uneven_configs(draw) -> dict:
    pp = draw(st.integers(2, 6))
    vp = draw(virtual_sizes)
    unit = vp or 1
    has_first, has_last = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    first = unit * draw(st.integers(1, 3)) if has_first else None
    last = unit * draw(st.integers(1, 3)) if has_last else None
    middle_stages = pp - has_first - has_last
    middle = middle_stages * unit * draw(st.integers(1, 3))
    return dict(num_layers=(first or 0) + (last or 0) + middle, pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vp,
                num_layers_in_first_pipeline_stage=first,
                num_layers_in_last_pipeline_stage=last)


@st.composite
def layout_text(draw, counts: list[int]) -> str:
    """A random spelling of a layout whose stages hold ``counts`` decoder layers."""
    spellings = []
    shared_form = draw(st.one_of(st.none(), st.integers(0, 3)))  # alike stages spelt alike
    for count in counts:
        form = draw(st.integers(0, 3)) if shared_form is None else shared_form
        if count == 0:
            spellings.append(draw(st.sampled_from(["", "t*0", " "])))
        elif form == 0:
            spellings.append("t" * count)
        elif form == 1:
            spellings.append(f"t*{count}")
        elif form == 2:
            spellings.append(f"(t)*{count}")
        else:
            spellings.append(" ".join("t" * count))
    spellings[0] = "E" + draw(st.sampled_from(["", " ", ","])) + spellings[0]
    spellings[-1] = spellings[-1] + draw(st.sampled_from(["", " "])) + "L"
    parts: list[str] = []
    index = 0
    while index < len(spellings):  # group runs of equal middle stages as (...|)*k
        run = 1
        while (0 < index and index + run < len(spellings) - 1
               and spellings[index + run] == spellings[index]):
            run += 1
        if run > 1 and draw(st.booleans()):
            parts.append(f"({spellings[index]}|)*{run - 1}{spellings[index]}")
        else:
            run = 1
            parts.append(spellings[index])
        index += run
    return "|".join(parts)


@st.composite
def layout_configs(draw) -> dict:
    pp = draw(st.integers(1, 5))
    vp = draw(virtual_sizes) if pp > 1 else None
    counts = draw(st.lists(st.integers(0, 3) | st.just(2), min_size=pp * (vp or 1),
                           max_size=pp * (vp or 1)))
    if sum(counts) == 0:
        counts[0] = 1
    text = draw(layout_text(counts))
    assert parse_pipeline_layout(text, pp, vp) is not None
    return dict(num_layers=sum(counts), pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vp, pipeline_model_parallel_layout=text)


valid_configs = st.one_of(even_configs(), uneven_configs(), layout_configs())


@settings(max_examples=150, deadline=None)
@given(valid_configs)
def test_valid_configs_partition_the_layers(fields):
    assert_partition(make_config(**fields))


@settings(deadline=None)
@given(layout_configs())
def test_layout_counts_match_the_parsed_stages(fields):
    config = make_config(**fields)
    stages = parse_pipeline_layout(fields["pipeline_model_parallel_layout"],
                                   fields["pipeline_model_parallel_size"],
                                   fields["virtual_pipeline_model_parallel_size"])
    for index, (pp_rank, vp_stage) in enumerate(positions(config)):
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        assert count == stages[index].count("t")


@settings(deadline=None)
@given(st.integers(1, 24), st.integers(1, 6), virtual_sizes,
       st.one_of(st.none(), st.integers(1, 8)), st.one_of(st.none(), st.integers(1, 8)),
       st.booleans(), st.booleans())
def test_any_config_either_slices_cleanly_or_is_refused(num_layers, pp, vp, first, last,
                                                        embedding, loss):
    config = namespace(num_layers=num_layers, pipeline_model_parallel_size=pp,
                       virtual_pipeline_model_parallel_size=vp,
                       num_layers_in_first_pipeline_stage=first,
                       num_layers_in_last_pipeline_stage=last,
                       account_for_embedding_in_pipeline_split=embedding,
                       account_for_loss_in_pipeline_split=loss)
    try:
        check_pipeline(config)
    except ConfigError:
        return
    assert_partition(config)


@given(even_configs())
def test_one_layer_more_breaks_an_even_split(fields):
    if fields["pipeline_model_parallel_size"] == 1:
        return
    fields["num_layers"] += 1
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size"):
        check_pipeline(namespace(**fields))


@given(uneven_configs(), st.integers(1, 20))
def test_edges_larger_than_the_model_are_refused(fields, extra):
    first = fields["num_layers_in_first_pipeline_stage"]
    if first is not None:
        fields["num_layers_in_first_pipeline_stage"] = fields["num_layers"] + extra
    else:
        fields["num_layers_in_last_pipeline_stage"] = fields["num_layers"] + extra
    with pytest.raises(ConfigError, match="num_layers_in_(first|last)_pipeline_stage"):
        check_pipeline(namespace(**fields))


@given(layout_configs(), st.sampled_from(["drop_t", "add_t", "drop_bar", "add_bar"]))
def test_spoiled_layouts_are_refused(fields, spoil):
    text = fields["pipeline_model_parallel_layout"]
    if spoil == "drop_t":
        fields["num_layers"] += 1
    elif spoil == "add_t":
        text = text.replace("L", "tL")
    elif spoil == "drop_bar" and "|" in text:
        text = text.replace("|", "", 1)
    else:
        text = text.replace("L", "|L")
    fields["pipeline_model_parallel_layout"] = text
    with pytest.raises(ConfigError, match="pipeline_model_parallel_layout"):
        check_pipeline(namespace(**fields))
