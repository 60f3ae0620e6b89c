"""Per-layer patterns (which attention, which MLP) and the pattern-string grammar.

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
"""

from __future__ import annotations

from typing import Any

from attnplug._errors import ConfigError

__all__ = [
    "check_pattern",
    "get_linear_attention_pattern",
    "get_moe_layer_pattern",
    "is_linear_attention_variant",
    "parse_pattern",
    "parse_pattern_field",
    "render_pattern",
]

LINEAR_ATTENTION_VARIANTS = ("gdn", "gated_delta_net")
"""Values of ``experimental_attention_variant`` that mean linear attention (Gated DeltaNet)."""

MAX_NESTING = 100
"""How deeply parentheses may nest in a pattern or layout string."""

_WHITESPACE = " \t\r\n"
_DIGITS = "0123456789"
_EXCERPT_RADIUS = 30
_MAX_QUOTED = 200
_MAX_RENDER_PERIOD = 64
_ACCEPTED = "integers, lists of integers like [1,0], '+', '*', parentheses"


# -- errors ------------------------------------------------------------------------------------


def _quote(value: Any) -> str:
    """``repr(value)``, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _excerpt(text: str, pos: int) -> str:
    """Two lines: the text around ``pos`` (non-ASCII shown as ``?``) and a caret under ``pos``."""
    start = max(0, pos - _EXCERPT_RADIUS)
    end = min(len(text), pos + _EXCERPT_RADIUS)
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[start:end])
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    return f"    {prefix}{shown}{suffix}\n    {' ' * (len(prefix) + pos - start)}^"


def _syntax_error(field: str, text: str, pos: int, problem: str) -> ConfigError:
    """A ``ConfigError`` naming ``field``, quoting ``text`` and pointing at column ``pos + 1``."""
    return ConfigError(
        f"{field}={_quote(text)} is not accepted: at column {pos + 1}, {problem}\n"
        f"{_excerpt(text, pos)}"
    )


# -- the string form ---------------------------------------------------------------------------


def _is_digit(char: str) -> bool:
    """Whether ``char`` is one ASCII digit (``"" in "0123456789"`` is true, hence this)."""
    return len(char) == 1 and char in _DIGITS


class _PatternParser:
    """Recursive-descent evaluator of the pattern grammar; values are ``int`` or ``list[int]``."""

    def __init__(self, text: str, field: str, max_length: int) -> None:
        self.text = text
        self.field = field
        self.max_length = max_length
        self.pos = 0

    def error(self, problem: str, pos: int | None = None) -> ConfigError:
        return _syntax_error(self.field, self.text, self.pos if pos is None else pos, problem)

    def parse(self) -> int | list[int]:
        self.skip_whitespace()
        if self.pos == len(self.text):
            raise ConfigError(f"{self.field}={_quote(self.text)} is not accepted: the pattern is "
                              f"empty; expected {_ACCEPTED}")
        value = self.expr(depth=0)
        if self.pos < len(self.text):
            if self.text[self.pos] == ")":
                raise self.error("unbalanced ')'")
            raise self.unexpected("'+', '*' or the end")
        return value

    def skip_whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
            self.pos += 1

    def peek(self) -> str:
        """The next non-blank character, or ``""`` at the end."""
        self.skip_whitespace()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self, depth: int) -> int | list[int]:
        value = self.term(depth)
        while self.peek() == "+":
            op_pos = self.pos
            self.pos += 1
            value = self.add(value, self.term(depth), op_pos)
        return value

    def term(self, depth: int) -> int | list[int]:
        value = self.factor(depth)
        while self.peek() == "*":
            op_pos = self.pos
            self.pos += 1
            value = self.multiply(value, self.factor(depth), op_pos)
        return value

    def factor(self, depth: int) -> int | list[int]:
        char = self.peek()
        if _is_digit(char):
            return self.integer()
        if char == "[":
            return self.list_literal()
        if char == "(":
            return self.group(depth)
        raise self.unexpected("an integer, a list or '('")

    def group(self, depth: int) -> int | list[int]:
        if depth >= MAX_NESTING:
            raise self.error(f"parentheses nest deeper than {MAX_NESTING}")
        open_pos = self.pos
        self.pos += 1
        value = self.expr(depth + 1)
        if self.peek() != ")":
            raise self.unexpected(f"')' to close the '(' at column {open_pos + 1}")
        self.pos += 1
        return value

    def list_literal(self) -> list[int]:
        self.pos += 1
        items: list[int] = []
        while self.peek() != "]":
            if not _is_digit(self.peek()):
                raise self.unexpected("an integer or ']' (list items are plain integers)")
            if len(items) == self.max_length:
                raise self.error(f"the list is longer than the limit of {self.max_length}")
            items.append(self.integer())
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise self.unexpected("',' or ']'")
        self.pos += 1
        return items

    def integer(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _DIGITS:
            self.pos += 1
        digits = self.text[start : self.pos]
        if len(digits.lstrip("0")) > len(str(self.max_length)) or int(digits) > self.max_length:
            raise self.error(f"the integer is larger than the limit of {self.max_length}", start)
        return int(digits)

    def unexpected(self, expected: str) -> ConfigError:
        """An error for the character at the cursor, saying what was expected instead."""
        if self.pos == len(self.text):
            return self.error(f"the text ends early; expected {expected}")
        char = self.text[self.pos]
        if char == "-":
            return self.error("negative numbers and '-' are not accepted")
        if char == ".":
            return self.error("floats are not accepted, only whole numbers")
        if char.isdigit() and not _is_digit(char):
            return self.error("only the ASCII digits 0-9 are accepted")
        if char.isidentifier():
            end = self.pos
            while end < len(self.text) and (self.text[end].isalnum() or self.text[end] == "_"):
                end += 1
            name = _quote(self.text[self.pos : end][:_EXCERPT_RADIUS])
            return self.error(f"names such as {name} are not accepted; expected {expected}")
        return self.error(f"unexpected {char!r}; expected {expected}")

    def add(self, left: int | list[int], right: int | list[int], op_pos: int) -> int | list[int]:
        if isinstance(left, list) and isinstance(right, list):
            self.check_length(len(left) + len(right), op_pos)
            return left + right
        if isinstance(left, int) and isinstance(right, int):
            return self.check_integer(left + right, op_pos)
        raise self.error("'+' cannot join an integer and a list", op_pos)

    def multiply(
        self, left: int | list[int], right: int | list[int], op_pos: int
    ) -> int | list[int]:
        if isinstance(left, list) and isinstance(right, list):
            raise self.error("'*' cannot multiply two lists", op_pos)
        if isinstance(left, int) and isinstance(right, int):
            return self.check_integer(left * right, op_pos)
        items, count = (left, right) if isinstance(left, list) else (right, left)
        self.check_length(len(items) * count, op_pos)
        return items * count

    def check_length(self, length: int, op_pos: int) -> None:
        if length > self.max_length:
            raise self.error(
                f"the result would have {length} entries, more than the limit of "
                f"{self.max_length}",
                op_pos,
            )

    def check_integer(self, value: int, op_pos: int) -> int:
        if value > self.max_length:
            raise self.error(f"the integer {value} is larger than the limit of "
                             f"{self.max_length}", op_pos)
        return value


def _evaluate(text: Any, field: str, max_length: int) -> int | list[int]:
    """The value of a pattern string: an ``int`` or a ``list[int]``. Raises ``ConfigError``."""
    if not isinstance(text, str):
        raise ConfigError(f"{field}={_quote(text)} is not accepted: expected a pattern string")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length={max_length!r} is not accepted: expected an integer >= 1")
    return _PatternParser(text, field, max_length).parse()


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
    does). Returns a new list of ``num_layers`` ints; raises ``ConfigError`` naming
    ``moe_layer_freq`` for a bad value.
    """
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
    pattern. Returns a new list of ``num_layers`` ints; raises ``ConfigError`` naming
    ``linear_attention_freq`` for a bad or missing value.
    """
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
    items = _check_render_values(values)
    return _render_shortest(items)


def _check_render_values(values: Any) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"values={_quote(values)} is not accepted: expected a non-empty list "
                          "of non-negative integers")
    for index, item in enumerate(values):
        if not isinstance(item, int) or item < 0:
            raise ConfigError(f"values[{index}]={item!r} is not accepted: expected a "
                              "non-negative integer")
    return [int(item) for item in values]


def _render_literal(items: list[int]) -> str:
    return "[" + ",".join(str(item) for item in items) + "]"


def _render_shortest(items: list[int]) -> str:
    compact = _render_sequence(items)
    literal = _render_literal(items)
    return compact if len(compact) < len(literal) else literal


def _render_sequence(items: list[int]) -> str:
    """Greedy left-to-right: at each place take the repetition covering most items, if it pays."""
    terms: list[str] = []
    pending: list[int] = []
    start = 0
    while start < len(items):
        period, count = _longest_repetition(items, start)
        if count >= 2:
            text = _render_repetition(items[start : start + period], count)
            if len(text) <= 2 * period * count:
                if pending:
                    terms.append(_render_literal(pending))
                    pending = []
                terms.append(text)
                start += period * count
                continue
        pending.append(items[start])
        start += 1
    if pending:
        terms.append(_render_literal(pending))
    return "+".join(terms)


def _longest_repetition(items: list[int], start: int) -> tuple[int, int]:
    """``(period, count)``: the block at ``start`` repeated most often back to back (by items
    covered; the shorter period wins a tie)."""
    best_period, best_count = 1, 1
    for period in range(1, min(_MAX_RENDER_PERIOD, (len(items) - start) // 2) + 1):
        block = items[start : start + period]
        count = 1
        while items[start + count * period : start + (count + 1) * period] == block:
            count += 1
        if period * count > best_period * best_count:
            best_period, best_count = period, count
    return best_period, best_count


def _render_repetition(block: list[int], count: int) -> str:
    inner = _render_shortest(block)
    if inner == _render_literal(block):
        return f"{inner}*{count}"
    return f"({inner})*{count}"
