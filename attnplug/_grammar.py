"""The shared machinery of attnplug's small string grammars: errors with a column and a caret,
and the parser of symbol strings with ``(...)*N`` repetition.

Two grammars are symbol strings: ``pipeline_model_parallel_layout`` (``"Et|(tt|)*2tL"``, in
:mod:`attnplug.pipeline`) and ``hybrid_layer_pattern`` (``"(G-G-G-*E)*6"``, in
:mod:`attnplug.patterns`). Both are read here, never with ``eval``: a config file is untrusted
input, so nesting and the expanded length are bounded, and every error names the field, quotes
the text and points at the column of the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from attnplug._errors import ConfigError

__all__ = [
    "MAX_NESTING",
    "MAX_SYMBOLS",
    "ListParser",
    "SymbolParser",
    "quote",
    "render_list",
    "render_symbols",
    "syntax_error",
]

MAX_NESTING = 100
"""How deeply parentheses may nest in a pattern or layout string."""

MAX_SYMBOLS = 1_000_000
"""How many symbols a symbol string may expand to."""

WHITESPACE = " \t\r\n"
DIGITS = "0123456789"
_EXCERPT_RADIUS = 30
_MAX_QUOTED = 200
_REPEAT = "*"
_MAX_RENDER_PERIOD = 64
LIST_ACCEPTED = "integers, lists of integers like [1,0], '+', '*', parentheses"


def quote(value: Any) -> str:
    """``repr(value)``, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def excerpt(text: str, pos: int) -> str:
    """Two lines: the text around ``pos`` (non-ASCII shown as ``?``) and a caret under ``pos``."""
    start = max(0, pos - _EXCERPT_RADIUS)
    end = min(len(text), pos + _EXCERPT_RADIUS)
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[start:end])
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    return f"    {prefix}{shown}{suffix}\n    {' ' * (len(prefix) + pos - start)}^"


def syntax_error(field: str, text: str, pos: int, problem: str) -> ConfigError:
    """A ``ConfigError`` naming ``field``, quoting ``text`` and pointing at column ``pos + 1``."""
    return ConfigError(
        f"{field}={quote(text)} is not accepted: at column {pos + 1}, {problem}\n"
        f"{excerpt(text, pos)}"
    )


class SymbolParser:
    """Expands a string of one-character symbols into ``(symbol, column)`` pairs (0-based).

    ``(...)`` groups symbols; ``*N`` after a group repeats it N times (N >= 0), and after a
    single symbol too when ``repeat_symbols`` is true. When ``*`` is itself one of ``symbols``
    (``hybrid_layer_pattern``'s softmax attention), it is a repetition only when a whole number
    follows it, and only a group may be repeated: ``"G*3"`` is refused rather than guessed at.
    Characters in ``ignored`` are skipped; ``refused`` maps a character to the reason it is not
    accepted. ``accepted`` describes the grammar in error messages. Raises ``ConfigError`` (see
    :func:`syntax_error`) for anything else, for nesting deeper than :data:`MAX_NESTING` and for
    an expansion longer than ``max_symbols`` (``noun`` names the text in that message).
    """

    def __init__(self, text: str, *, field: str, symbols: str, accepted: str,
                 ignored: str = WHITESPACE, refused: Mapping[str, str] | None = None,
                 repeat_symbols: bool = True, max_symbols: int = MAX_SYMBOLS,
                 noun: str = "text") -> None:
        self.text = text
        self.field = field
        self.symbols = symbols
        self.accepted = accepted
        self.ignored = ignored
        self.refused = dict(refused or {})
        self.repeat_symbols = repeat_symbols
        self.max_symbols = max_symbols
        self.star_is_symbol = _REPEAT in symbols
        self.noun = noun
        self.pos = 0

    def error(self, problem: str, pos: int | None = None) -> ConfigError:
        return syntax_error(self.field, self.text, self.pos if pos is None else pos, problem)

    def too_long(self, pos: int) -> ConfigError:
        return self.error(f"the {self.noun} expands to more than {self.max_symbols} symbols", pos)

    def parse(self) -> list[tuple[str, int]]:
        """Every symbol of the text, expanded, with the column it was written at."""
        symbols = self.sequence(depth=0)
        if self.pos < len(self.text):
            raise self.error("unbalanced ')'")
        return symbols

    def skip_ignored(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in self.ignored:
            self.pos += 1

    def sequence(self, depth: int) -> list[tuple[str, int]]:
        symbols: list[tuple[str, int]] = []
        self.skip_ignored()
        while self.pos < len(self.text) and self.text[self.pos] != ")":
            start = self.pos
            item = self.item(depth)
            if len(symbols) + len(item) > self.max_symbols:
                raise self.too_long(start)
            symbols.extend(item)
            self.skip_ignored()
        return symbols

    def item(self, depth: int) -> list[tuple[str, int]]:
        start = self.pos
        char = self.text[start]
        if char == "(":
            return self.repeated(self.group(depth))
        if char in self.refused:
            raise self.error(self.refused[char])
        if char not in self.symbols:
            raise self.unexpected(char)
        if char == _REPEAT and self.count_follows(start + 1):
            raise self.error("a repeat count '*N' may follow only a parenthesised group, "
                             "such as '(G-)*3'")
        self.pos += 1
        atom = [(char, start)]
        return self.repeated(atom) if self.repeat_symbols else atom

    def unexpected(self, char: str) -> ConfigError:
        hint = ""
        if char in DIGITS and self.star_is_symbol:
            hint = " (a number may only follow '*' after a ')' group)"
        elif char.upper() in self.symbols and char.upper() != char:
            hint = f" (symbols are case-sensitive: did you mean {char.upper()!r}?)"
        return self.error(f"unexpected {char!r}; expected {self.accepted}{hint}")

    def count_follows(self, pos: int) -> bool:
        """Whether a whole number comes next from ``pos`` on (ignored characters skipped)."""
        while pos < len(self.text) and self.text[pos] in self.ignored:
            pos += 1
        return pos < len(self.text) and self.text[pos] in DIGITS

    def repeated(self, atom: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """``atom``, repeated when ``*N`` follows it."""
        self.skip_ignored()
        if self.pos == len(self.text) or self.text[self.pos] != _REPEAT:
            return atom
        if self.star_is_symbol and not self.count_follows(self.pos + 1):
            return atom  # the '*' is the next symbol, not a repetition
        star = self.pos
        self.pos += 1
        count = self.repeat_count()
        if len(atom) * count > self.max_symbols:
            raise self.too_long(star)
        return atom * count

    def group(self, depth: int) -> list[tuple[str, int]]:
        if depth >= MAX_NESTING:
            raise self.error(f"parentheses nest deeper than {MAX_NESTING}")
        open_pos = self.pos
        self.pos += 1
        inner = self.sequence(depth + 1)
        if self.pos == len(self.text):
            raise self.error(f"the text ends early; expected ')' to close the '(' at column "
                             f"{open_pos + 1}")
        self.pos += 1
        return inner

    def repeat_count(self) -> int:
        self.skip_ignored()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in DIGITS:
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits:
            raise self.error("expected a repeat count (a whole number >= 0) after '*'")
        if len(digits.lstrip("0")) > len(str(self.max_symbols)):
            raise self.error(f"the repeat count is larger than {self.max_symbols}", start)
        return int(digits)


# -- lists of integers ("([1]*3+[0])*2") -----------------------------------------------------


def is_digit(char: str) -> bool:
    """Whether ``char`` is one ASCII digit (``"" in "0123456789"`` is true, hence this)."""
    return len(char) == 1 and char in DIGITS


class ListParser:
    """Recursive-descent evaluator of the 0/1-pattern grammar (``"([1]*3+[0])*2"``); values are
    ``int`` or ``list[int]``. Every integer and every list made on the way is bounded by
    ``max_length``, checked before the list is made."""

    def __init__(self, text: str, field: str, max_length: int) -> None:
        self.text = text
        self.field = field
        self.max_length = max_length
        self.pos = 0

    def error(self, problem: str, pos: int | None = None) -> ConfigError:
        return syntax_error(self.field, self.text, self.pos if pos is None else pos, problem)

    def parse(self) -> int | list[int]:
        self.skip_whitespace()
        if self.pos == len(self.text):
            raise ConfigError(f"{self.field}={quote(self.text)} is not accepted: the pattern is "
                              f"empty; expected {LIST_ACCEPTED}")
        value = self.expr(depth=0)
        if self.pos < len(self.text):
            if self.text[self.pos] == ")":
                raise self.error("unbalanced ')'")
            raise self.unexpected("'+', '*' or the end")
        return value

    def skip_whitespace(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in WHITESPACE:
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
        if is_digit(char):
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
            if not is_digit(self.peek()):
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
        while self.pos < len(self.text) and self.text[self.pos] in DIGITS:
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
        if char.isdigit() and not is_digit(char):
            return self.error("only the ASCII digits 0-9 are accepted")
        if char.isidentifier():
            end = self.pos
            while end < len(self.text) and (self.text[end].isalnum() or self.text[end] == "_"):
                end += 1
            name = quote(self.text[self.pos : end][:_EXCERPT_RADIUS])
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


# -- rendering ---------------------------------------------------------------------------------


class _Spelling(NamedTuple):
    """How one grammar writes a sequence: its literal form, a repetition, how terms join, and
    whether a repetition pays off (``pays(text, items_covered)``)."""

    literal: Callable[[list], str]
    repeat: Callable[[str, bool, int], str]
    join: str
    pays: Callable[[str, int], bool]


def _repeat_list(inner: str, is_literal: bool, count: int) -> str:
    return f"{inner}*{count}" if is_literal else f"({inner})*{count}"


_LIST = _Spelling(
    literal=lambda items: "[" + ",".join(str(item) for item in items) + "]",
    repeat=_repeat_list,
    join="+",
    pays=lambda text, covered: len(text) <= 2 * covered,
)
_SYMBOLS = _Spelling(
    literal="".join,
    repeat=lambda inner, is_literal, count: f"({inner})*{count}",
    join="",
    pays=lambda text, covered: len(text) < covered,
)


def render_list(items: list[int]) -> str:
    """The shortest spelling this renderer finds of a list of integers, in the 0/1-pattern
    grammar: ``[1,1,1,0,1,1,1,0]`` → ``"[1,1,1,0]*2"``. ``items`` must be non-empty."""
    return _render_shortest(items, _LIST)


def render_symbols(items: list[str]) -> str:
    """A compact spelling of one-character symbols with ``(...)*N`` groups, never longer than
    the symbols written out: ``list("G-G-G-*E" * 2)`` → ``"(G-G-G-*E)*2"``."""
    return _render_shortest(items, _SYMBOLS) if items else ""


def _render_shortest(items: list, spelling: _Spelling) -> str:
    compact = _render_sequence(items, spelling)
    literal = spelling.literal(items)
    return compact if len(compact) < len(literal) else literal


def _render_sequence(items: list, spelling: _Spelling) -> str:
    """Greedy left-to-right: at each place take the repetition covering most items, if it pays."""
    terms: list[str] = []
    pending: list = []
    start = 0
    while start < len(items):
        period, count = _longest_repetition(items, start)
        if count >= 2:
            text = _render_repetition(items[start : start + period], count, spelling)
            if spelling.pays(text, period * count):
                if pending:
                    terms.append(spelling.literal(pending))
                    pending = []
                terms.append(text)
                start += period * count
                continue
        pending.append(items[start])
        start += 1
    if pending:
        terms.append(spelling.literal(pending))
    return spelling.join.join(terms)


def _longest_repetition(items: list, start: int) -> tuple[int, int]:
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


def _render_repetition(block: list, count: int, spelling: _Spelling) -> str:
    inner = _render_shortest(block, spelling)
    return spelling.repeat(inner, inner == spelling.literal(block), count)
