"""Per-layer patterns and the pattern-string grammar (attnplug.patterns)."""

from __future__ import annotations

import builtins
import contextlib
import re
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnplug._errors import ConfigError
from attnplug.config import TransformerConfig
from attnplug.patterns import (
    check_pattern,
    get_linear_attention_pattern,
    get_moe_layer_pattern,
    is_linear_attention_variant,
    parse_pattern,
    parse_pattern_field,
    render_pattern,
)

SMALL = 10_000  # max_length for fuzzing: keeps any accepted result small


def make_config(**fields) -> TransformerConfig:
    fields.setdefault("num_layers", 8)
    return TransformerConfig(hidden_size=64, num_attention_heads=4, **fields)


def namespace(**fields) -> SimpleNamespace:
    """A stand-in config for values a real TransformerConfig would refuse to hold."""
    values = dict(num_layers=8, moe_layer_freq=1, linear_attention_freq=None,
                  experimental_attention_variant=None, num_moe_experts=None)
    values.update(fields)
    return SimpleNamespace(**values)


@contextlib.contextmanager
def code_execution_recorded():
    """Replace eval/exec/compile by recorders while the parser runs; yields the calls seen."""
    calls: list[tuple] = []
    original = builtins.eval, builtins.exec, builtins.compile
    builtins.eval = builtins.exec = builtins.compile = lambda *args, **kwargs: calls.append(args)
    try:
        yield calls
    finally:
        builtins.eval, builtins.exec, builtins.compile = original


def parse_refused(text: str, **kwargs) -> str:
    """The message of the ConfigError that parse_pattern raises for ``text``, run without eval."""
    with code_execution_recorded() as calls:
        try:
            parse_pattern(text, **kwargs)
        except ConfigError as error:
            message = str(error)
        else:
            message = ""
    assert not calls, "the pattern parser must never evaluate code"
    assert message, f"{text!r} was accepted"
    return message


# -- parse_pattern: accepted forms -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("([1]*3+[0])*2", [1, 1, 1, 0, 1, 1, 1, 0]),
        ("[1,0,1]", [1, 0, 1]),
        ("[1,0,]", [1, 0]),
        (" [ 1 , 0 ] *\t2\n", [1, 0, 1, 0]),
        ("2*[1]+[0]", [1, 1, 0]),
        ("[1]*(1+2)", [1, 1, 1]),
        ("[1]*2*3", [1] * 6),
        ("2*3*[0]", [0] * 6),
        ("[1]*0+[0]", [0]),
        ("[]+[1]", [1]),
        ("((([0])))", [0]),
        ("[007]", [7]),
    ],
)
def test_parse_pattern_reads_the_string_form(text, expected):
    assert parse_pattern(text) == expected


def test_parse_pattern_field_gives_int_for_an_integer_string():
    assert parse_pattern_field("moe_layer_freq", " 4 ") == 4
    assert parse_pattern_field("moe_layer_freq", "(2*2)") == 4
    assert parse_pattern_field("moe_layer_freq", "[1,0]*2") == [1, 0, 1, 0]


def test_parse_pattern_field_passes_other_values_through_and_checks_when_asked():
    assert parse_pattern_field("moe_layer_freq", (1, 0)) == (1, 0)
    assert parse_pattern_field("moe_layer_freq", (1, 0), 2) == [1, 0]
    with pytest.raises(ConfigError, match="moe_layer_freq.*3 entries, expected 2"):
        parse_pattern_field("moe_layer_freq", "[1]*3", 2)
    with pytest.raises(ConfigError, match="moe_layer_freq.*empty"):
        parse_pattern_field("moe_layer_freq", "[]")


def test_parse_pattern_wants_a_list_not_an_integer():
    with pytest.raises(ConfigError, match=r"pattern='4'.*integer 4"):
        parse_pattern("4")


def test_parse_pattern_rejects_non_strings():
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        parse_pattern([1, 0], field="moe_layer_freq")


def test_max_length_bounds_the_result():
    assert parse_pattern("[1]*5", max_length=5) == [1] * 5
    with pytest.raises(ConfigError, match="6 entries, more than the limit of 5"):
        parse_pattern("[1]*3+[0]*3", max_length=5)
    with pytest.raises(ConfigError, match="max_length"):
        parse_pattern("[1]", max_length=0)


# -- parse_pattern: malformed input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "problem"),
    [
        ("", None, "empty"),
        ("   ", None, "empty"),
        ("[]", None, "empty"),
        ("[1]+", 5, "ends early"),
        ("*[1]", 1, r"unexpected '\*'"),
        ("[1]**2", 5, r"unexpected '\*'"),
        ("([1]*2", 7, r"expected '\)' to close the '\(' at column 1"),
        ("[1]*2)", 6, r"unbalanced '\)'"),
        ("[1,0", 5, "ends early"),
        ("[1 0]", 4, "expected ',' or ']'"),
        ("[[1]]", 2, "list items are plain integers"),
        ("[1,,0]", 4, "unexpected ','"),
        ("x", 1, "names such as 'x'"),
        ("[1]*n", 5, "names such as 'n'"),
        ("__import__('os').system('true')", 1, "names such as '__import__'"),
        ("[1]*len([1,2])", 5, "names such as 'len'"),
        ("[1.0]", 3, "floats"),
        ("[1]*2.5", 6, "floats"),
        ("[1]*1e3", 6, "names such as 'e3'"),
        ("[-1]", 2, "negative"),
        ("[1]*-2", 5, "negative"),
        ("[1]-[1]", 4, "negative"),
        ("[1]*10**12", 8, r"unexpected '\*'"),
        ("[1]*1000000000000", 5, "larger than the limit"),
        ("[1]*1000*1000*1000", 14, "more than the limit"),
        ("([1]*1000)*1000*1000", 16, "more than the limit"),
        ("1001*1000*[1]", 5, "larger than the limit"),
        ("1+[1]", 2, "cannot join an integer and a list"),
        ("[1]+1", 4, "cannot join an integer and a list"),
        ("[1]*[1]", 4, "cannot multiply two lists"),
        ("[1]*٣", 5, "ASCII digits"),
        ("[1]\u00a0*2", 4, "unexpected"),
        ("[1]/2", 4, r"unexpected '/'"),
        ("[1];[0]", 4, "unexpected ';'"),
        ("{1}", 1, "unexpected '{'"),
        ("'[1]'", 1, "unexpected \"'\""),
    ],
)
def test_malformed_text_is_a_config_error_pointing_at_the_column(text, column, problem):
    message = parse_refused(text, field="moe_layer_freq")
    assert message.startswith("moe_layer_freq=")
    assert repr(text)[:40] in message
    assert re.search(problem, message), message
    if column is not None:
        assert f"at column {column}," in message
        excerpt, caret = message.splitlines()[-2:]
        at = caret.index("^")
        shown = excerpt[at] if at < len(excerpt) else ""
        wanted = text[column - 1] if column <= len(text) else ""
        assert shown == (wanted if wanted.isascii() and wanted.isprintable() else "?")


def test_deep_nesting_is_refused_without_recursion_error():
    text = "(" * 5000 + "[1]" + ")" * 5000
    with pytest.raises(ConfigError, match="nest deeper than"):
        parse_pattern(text)
    assert parse_pattern("(" * 50 + "[1]" + ")" * 50) == [1]


def test_long_text_is_quoted_short_in_the_message():
    text = "[1]*2+" * 10_000 + "x"
    with pytest.raises(ConfigError) as info:
        parse_pattern(text)
    assert len(str(info.value)) < 800
    assert "..." in str(info.value)


# -- check_pattern -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 3, 100])
def test_check_pattern_accepts_positive_ints(value):
    assert check_pattern("moe_layer_freq", value, 8) == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "moe_layer_freq=0 is not accepted"),
        (-2, "moe_layer_freq=-2 is not accepted"),
        (True, "a bool is ambiguous"),
        (False, "a bool is ambiguous"),
        (1.0, "moe_layer_freq=1.0 is not accepted"),
        (None, "moe_layer_freq=None is not accepted"),
        ({"a": 1}, "moe_layer_freq=\\{'a': 1\\} is not accepted"),
        ("[1]*8", "unparsed string"),
        ([1] * 7, "7 entries, expected 8"),
        ([1] * 9, "9 entries, expected 8"),
        ([], "0 entries, expected 8"),
        ([1, 0, 2, 0, 1, 0, 1, 0], r"moe_layer_freq\[2\]=2 is not accepted: expected 0 or 1"),
        ([1, 0, -1, 0, 1, 0, 1, 0], r"moe_layer_freq\[2\]=-1"),
        ([1, 0, 1, 0, 1, 0, 1, "0"], r"moe_layer_freq\[7\]='0'"),
        ([1, 0, 1.0, 0, 1, 0, 1, 0], r"moe_layer_freq\[2\]=1.0"),
        ([1, 0, None, 0, 1, 0, 1, 0], r"moe_layer_freq\[2\]=None"),
    ],
)
def test_check_pattern_rejects_bad_values(value, problem):
    with pytest.raises(ConfigError, match=problem):
        check_pattern("moe_layer_freq", value, 8)


def test_check_pattern_returns_a_new_int_list():
    original = (True, False, 1, 0)
    checked = check_pattern("linear_attention_freq", original, 4)
    assert checked == [1, 0, 1, 0]
    assert all(type(item) is int for item in checked)
    source = [1, 0]
    assert check_pattern("moe_layer_freq", source, 2) is not source


@pytest.mark.parametrize("num_layers", [0, -1, True, 2.0, None])
def test_check_pattern_rejects_a_bad_num_layers(num_layers):
    with pytest.raises(ConfigError, match="num_layers="):
        check_pattern("moe_layer_freq", 1, num_layers)


# -- the per-layer patterns --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("freq", "num_layers", "expected"),
    [
        (1, 4, [1, 1, 1, 1]),
        (2, 4, [1, 0, 1, 0]),
        (3, 8, [1, 0, 0, 1, 0, 0, 1, 0]),
        (10, 3, [1, 0, 0]),
        ([0, 1, 1], 3, [0, 1, 1]),
        ("[0,1]*2", 4, [0, 1, 0, 1]),
        ("2", 4, [1, 0, 1, 0]),
    ],
)
def test_moe_layer_pattern(freq, num_layers, expected):
    config = make_config(num_layers=num_layers, moe_layer_freq=freq)
    assert get_moe_layer_pattern(config) == expected


@pytest.mark.parametrize(
    ("freq", "num_layers", "expected"),
    [
        (4, 8, [1, 1, 1, 0, 1, 1, 1, 0]),
        (4, 6, [1, 1, 1, 0, 1, 1]),
        (1, 3, [0, 0, 0]),
        (2, 5, [1, 0, 1, 0, 1]),
        ([1, 0, 1], 3, [1, 0, 1]),
        ("([1]*3+[0])*2", 8, [1, 1, 1, 0, 1, 1, 1, 0]),
    ],
)
def test_linear_attention_pattern(freq, num_layers, expected):
    config = make_config(num_layers=num_layers, linear_attention_freq=freq,
                         experimental_attention_variant="gdn")
    assert get_linear_attention_pattern(config) == expected


@pytest.mark.parametrize("variant", [None, "dsa"])
def test_linear_attention_pattern_is_all_softmax_without_a_frequency(variant):
    config = namespace(num_layers=5, experimental_attention_variant=variant)
    assert get_linear_attention_pattern(config) == [0] * 5


@pytest.mark.parametrize("variant", ["gdn", "gated_delta_net"])
def test_linear_attention_pattern_needs_a_frequency_for_gdn(variant):
    config = namespace(experimental_attention_variant=variant)
    with pytest.raises(ConfigError, match="linear_attention_freq=None.*(gdn|gated_delta_net)"):
        get_linear_attention_pattern(config)


def test_patterns_are_copies_not_aliases():
    moe = [1, 0, 1, 0]
    config = namespace(num_layers=4, moe_layer_freq=moe, linear_attention_freq=moe)
    for get in (get_moe_layer_pattern, get_linear_attention_pattern):
        result = get(config)
        assert result == moe and result is not moe
        result[0] = 0
        assert moe == [1, 0, 1, 0]


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("moe_layer_freq", 0, "moe_layer_freq=0"),
        ("moe_layer_freq", [1, 0], "moe_layer_freq=.*2 entries, expected 8"),
        ("moe_layer_freq", "([1]", "moe_layer_freq='\\(\\[1\\]'.*column 5"),
        ("linear_attention_freq", [2] * 8, r"linear_attention_freq\[0\]=2"),
        ("linear_attention_freq", 2.5, "linear_attention_freq=2.5"),
    ],
)
def test_getters_name_the_bad_field(field, value, problem):
    get = get_moe_layer_pattern if field == "moe_layer_freq" else get_linear_attention_pattern
    with pytest.raises(ConfigError, match=problem):
        get(namespace(**{field: value}))


def test_config_rejects_bad_patterns_with_the_field_name():
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        make_config(moe_layer_freq="[1]*7")
    with pytest.raises(ConfigError, match="linear_attention_freq.*column"):
        make_config(linear_attention_freq="[1]*8+", experimental_attention_variant="gdn")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gdn", True), ("gated_delta_net", True), ("dsa", False), (None, False), ("GDN", False),
     ("gdn2", False), ("", False), (1, False)],
)
def test_is_linear_attention_variant(name, expected):
    assert is_linear_attention_variant(name) is expected


# -- render_pattern ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1] * 12, "[1]*12"),
        ([1, 1, 1, 0] * 2 + [1, 1], "[1,1,1,0]*2+[1,1]"),
        (([1] * 7 + [0]) * 2, "([1]*7+[0])*2"),
        ([1, 0, 0, 1, 1, 0], "[1,0,0,1,1,0]"),
        ([0], "[0]"),
    ],
)
def test_render_pattern_examples(values, expected):
    assert render_pattern(values) == expected
    assert parse_pattern(expected) == values


@pytest.mark.parametrize("values", [[], (), [1, -1], [1, "0"], [0.0], "101", None])
def test_render_pattern_rejects_bad_values(values):
    with pytest.raises(ConfigError, match="values"):
        render_pattern(values)


# -- properties --------------------------------------------------------------------------------

bits = st.lists(st.integers(0, 1), min_size=1, max_size=80)
structured_bits = st.builds(
    lambda blocks, count, tail: blocks * count + tail,
    st.lists(st.integers(0, 1), min_size=1, max_size=9),
    st.integers(1, 12),
    st.lists(st.integers(0, 1), max_size=5),
)
patterns = st.one_of(bits, structured_bits)
blank = st.sampled_from(["", "", " ", "  ", "\t", "\n"])


@st.composite
def expression_for(draw, values: list[int], depth: int = 0) -> str:
    """A random expression in the pattern grammar that evaluates to ``values`` (non-empty)."""
    spaced = draw(blank)
    n = len(values)
    repeats = [k for k in range(2, n + 1) if n % k == 0 and values == values[: n // k] * k]
    choice = draw(st.integers(0, 3)) if depth < 5 else 0
    if choice == 0 or (n == 1 and choice != 3):
        return "[" + ",".join(f"{spaced}{v}" for v in values) + spaced + "]"
    if choice == 1 and repeats:
        k = draw(st.sampled_from(repeats))
        inner = draw(expression_for(values[: n // k], depth + 1))
        if draw(st.booleans()):
            return f"({inner}){spaced}*{spaced}{k}"
        return f"{k}*{spaced}({inner})"
    if choice == 3:
        noise = draw(st.sampled_from(["[]+", "[1]*0+", "0*[0,1]+", "[1,0]*(2*0)+"]))
        return f"{noise}({draw(expression_for(values, depth + 1))})"
    cut = draw(st.integers(1, n - 1))
    left = draw(expression_for(values[:cut], depth + 1))
    right = draw(expression_for(values[cut:], depth + 1))
    text = f"{left}{spaced}+{spaced}{right}"
    return f"({text})" if draw(st.booleans()) else text


@given(patterns)
def test_render_pattern_round_trips(values):
    text = render_pattern(values)
    assert parse_pattern(text) == values
    assert len(text) <= len(str(values).replace(" ", ""))


@given(patterns)
def test_plain_list_form_round_trips(values):
    assert parse_pattern("[" + ",".join(map(str, values)) + "]") == values


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), patterns)
def test_random_expressions_evaluate_to_their_pattern(data, values):
    text = data.draw(expression_for(values))
    assert parse_pattern(text) == values


@given(st.integers(1, 12), st.integers(1, 40))
def test_int_moe_pattern_has_period_n_and_moe_first(n, num_layers):
    pattern = get_moe_layer_pattern(make_config(num_layers=num_layers, moe_layer_freq=n))
    assert len(pattern) == num_layers
    for start in range(0, num_layers, n):
        block = pattern[start : start + n]
        assert block == [1] + [0] * (len(block) - 1)


@given(st.integers(1, 12), st.integers(1, 40))
def test_int_linear_pattern_has_period_n_and_softmax_last(n, num_layers):
    config = make_config(num_layers=num_layers, linear_attention_freq=n,
                         experimental_attention_variant="gdn")
    pattern = get_linear_attention_pattern(config)
    assert len(pattern) == num_layers
    for start in range(0, num_layers, n):
        block = pattern[start : start + n]
        expected = [1] * (n - 1) + [0] if len(block) == n else [1] * len(block)
        assert block == expected


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
non_ascii = st.characters(min_codepoint=128, max_codepoint=0x10FFFF,
                          blacklist_categories=("Cs",))


@st.composite
def malformed(draw) -> str:
    """A valid expression spoiled in one of the ways the parser must refuse."""
    text = draw(expression_for(draw(bits)))
    ident = draw(identifiers)
    huge = draw(st.integers(SMALL + 1, 10**30))
    corruptions = [
        text + "+", text + "*", "*" + text, "+" + text, text + "+*[1]",
        "(" + text, text + ")", "(" + text + "))",
        text + "+" + ident, ident + "+" + text, f"{ident}({text})", f"{text}*{ident}",
        f"__import__('os').system('echo {ident}')", f"{text}.count(1)",
        text + "*2.5", text + "+[1.0]", "[0.5]",
        text + "*-2", "[-1]+" + text, "-" + text,
        f"({text})*{huge}", f"{huge}*{text}", f"[1]*{SMALL}*{SMALL}",
        text + "+1", "1+" + text, f"({text})*({text})",
    ]
    spoiled = draw(st.sampled_from(corruptions))
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(text)))
        spoiled = text[:at] + draw(non_ascii) + text[at:]
    return spoiled


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_malformed_families_raise_config_error_and_run_no_code(text):
    message = parse_refused(text, field="moe_layer_freq", max_length=SMALL)
    assert message.startswith("moe_layer_freq=")


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_config_error(text):
    try:
        result = parse_pattern(text, max_length=SMALL)
    except ConfigError:
        return
    assert isinstance(result, list) and result
    assert all(type(item) is int and 0 <= item <= SMALL for item in result)


@given(st.text(alphabet="[](),+*0123456789 ", max_size=40))
def test_grammar_alphabet_parses_or_raises_config_error(text):
    try:
        result = parse_pattern(text, max_length=SMALL)
    except ConfigError as error:
        assert "column" in str(error) or "empty" in str(error) or "integer" in str(error)
        return
    assert 0 < len(result) <= SMALL


@given(st.integers(1, 30), st.data())
def test_wrong_lengths_are_refused(num_layers, data):
    length = data.draw(st.integers(0, 40).filter(lambda k: k != num_layers))
    with pytest.raises(ConfigError, match=f"{length} entries, expected {num_layers}"):
        check_pattern("moe_layer_freq", [1] * length, num_layers)


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30))
def test_values_other_than_0_and_1_are_refused(values):
    assume(any(v not in (0, 1) for v in values))
    index = next(i for i, v in enumerate(values) if v not in (0, 1))
    with pytest.raises(ConfigError, match=rf"moe_layer_freq\[{index}\]={values[index]}"):
        check_pattern("moe_layer_freq", values, len(values))
