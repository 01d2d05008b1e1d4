"""A documented subset of go-bexpr, the filter language of Consul's ``?filter=``.

Supported: selectors ``A.B.C``, ``A["key"]``, ``A.key`` (map keys); matching operators
``==``, ``!=``, ``contains``, ``not contains``, ``in``, ``not in``, ``matches``,
``not matches``, ``is empty``, ``is not empty``; ``and``, ``or``, ``not`` and parentheses;
values as ``"double quoted"`` or ```backtick``` strings, numbers and bare words. A selector
that crosses a list matches when any element does (``Checks.Status == "passing"``);
numbers and booleans compare as their text (``Port == "8080"``). ``matches`` uses Python's
``re`` rather than RE2. Anything else is a parse error (the stand-in answers 400).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["FilterError", "compile_filter"]


class FilterError(ValueError):
    """The expression is not in the supported subset."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<op>==|!=|\(|\)|\[|\]|\.)
      | (?P<word>[A-Za-z0-9_\-:/+*@]+)
    )""",
    re.VERBOSE,
)

Predicate = Callable[[Any], bool]


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise FilterError(f"1:{pos + 1}: unexpected character {text[pos : pos + 1]!r}")
        kind = match.lastgroup
        assert kind is not None
        value = match.group(kind)
        if kind == "str":
            value = bytes(value[1:-1], "utf-8").decode("unicode_escape")
            kind = "string"
        elif kind == "raw":
            value = value[1:-1]
            kind = "string"
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def is_word(self, word: str, offset: int = 0) -> bool:
        token = self.peek(offset)
        return token is not None and token[0] == "word" and token[1] == word

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise FilterError("unexpected end of expression")
        self.pos += 1
        return token

    def expect(self, kind: str, value: str) -> None:
        token = self.take()
        if token != (kind, value):
            raise FilterError(f"expected {value!r}, got {token[1]!r}")

    def parse(self) -> Predicate:
        if not self.tokens:
            raise FilterError("empty expression")
        predicate = self.parse_or()
        if self.peek() is not None:
            raise FilterError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return predicate

    def parse_or(self) -> Predicate:
        left = self.parse_and()
        while self.is_word("or"):
            self.take()
            right = self.parse_and()
            left = (lambda a, b: lambda e: a(e) or b(e))(left, right)
        return left

    def parse_and(self) -> Predicate:
        left = self.parse_not()
        while self.is_word("and"):
            self.take()
            right = self.parse_not()
            left = (lambda a, b: lambda e: a(e) and b(e))(left, right)
        return left

    def parse_not(self) -> Predicate:
        if self.is_word("not"):
            self.take()
            inner = self.parse_not()
            return lambda e: not inner(e)
        return self.parse_primary()

    def parse_primary(self) -> Predicate:
        token = self.peek()
        if token == ("op", "("):
            self.take()
            inner = self.parse_or()
            self.expect("op", ")")
            return inner
        if token is not None and token[0] == "string" or self._value_then_in():
            value = self.parse_value()
            negate = False
            if self.is_word("not"):
                self.take()
                negate = True
            if not self.is_word("in"):
                raise FilterError("expected 'in' after a value")
            self.take()
            selector = self.parse_selector()
            return _negate(_contains(selector, value), negate)
        selector = self.parse_selector()
        return self.parse_match(selector)

    def _value_then_in(self) -> bool:
        return self.is_word("in", 1) or (self.is_word("not", 1) and self.is_word("in", 2))

    def parse_value(self) -> str:
        kind, value = self.take()
        if kind not in ("string", "word"):
            raise FilterError(f"expected a value, got {value!r}")
        return value

    def parse_selector(self) -> list[str]:
        kind, value = self.take()
        if kind != "word" or not re.match(r"^[A-Za-z_][A-Za-z0-9_\-]*$", value):
            raise FilterError(f"expected a selector, got {value!r}")
        path = [value]
        while True:
            token = self.peek()
            if token == ("op", "."):
                self.take()
                kind, value = self.take()
                if kind != "word":
                    raise FilterError(f"expected a field after '.', got {value!r}")
                path.append(value)
            elif token == ("op", "["):
                self.take()
                kind, value = self.take()
                if kind != "string":
                    raise FilterError("expected a quoted key inside [ ]")
                path.append(value)
                self.expect("op", "]")
            else:
                return path

    def parse_match(self, selector: list[str]) -> Predicate:
        token = self.take()
        if token == ("op", "=="):
            return _equals(selector, self.parse_value())
        if token == ("op", "!="):
            return _negate(_equals(selector, self.parse_value()), True)
        negate = False
        if token == ("word", "not"):
            negate = True
            token = self.take()
        if token == ("word", "contains"):
            return _negate(_contains(selector, self.parse_value()), negate)
        if token == ("word", "matches"):
            pattern = self.parse_value()
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise FilterError(f"invalid regular expression {pattern!r}: {exc}") from None
            return _negate(_matches(selector, regex), negate)
        if token == ("word", "is") and not negate:
            empty_negate = False
            if self.is_word("not"):
                self.take()
                empty_negate = True
            if not self.is_word("empty"):
                raise FilterError("expected 'empty' after 'is'")
            self.take()
            return _negate(_empty(selector), empty_negate)
        raise FilterError(f"unsupported operator {token[1]!r}")


def _negate(predicate: Predicate, negate: bool) -> Predicate:
    return (lambda e: not predicate(e)) if negate else predicate


def _field(obj: Any, name: str) -> tuple[bool, Any]:
    if isinstance(obj, dict):
        if name in obj:
            return True, obj[name]
        for key, value in obj.items():
            if isinstance(key, str) and key.lower() == name.lower():
                return True, value
    return False, None


def _resolve(entry: Any, path: list[str]) -> list[Any]:
    """Every value the selector reaches; lists fan out (any-element semantics)."""
    current = [entry]
    for name in path:
        following: list[Any] = []
        for obj in current:
            items = obj if isinstance(obj, list) else [obj]
            for item in items:
                found, value = _field(item, name)
                if found:
                    following.append(value)
        current = following
    return current


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _equals(selector: list[str], expected: str) -> Predicate:
    def check(entry: Any) -> bool:
        for value in _resolve(entry, selector):
            items = value if isinstance(value, list) else [value]
            if any(not isinstance(v, dict | list) and _text(v) == expected for v in items):
                return True
        return False

    return check


def _contains(selector: list[str], expected: str) -> Predicate:
    def check(entry: Any) -> bool:
        for value in _resolve(entry, selector):
            if isinstance(value, list) and any(_text(v) == expected for v in value):
                return True
            if isinstance(value, dict) and expected in value:
                return True
            if isinstance(value, str) and expected in value:
                return True
        return False

    return check


def _matches(selector: list[str], regex: re.Pattern[str]) -> Predicate:
    def check(entry: Any) -> bool:
        for value in _resolve(entry, selector):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, str) and regex.search(v) for v in items):
                return True
        return False

    return check


def _empty(selector: list[str]) -> Predicate:
    def check(entry: Any) -> bool:
        values = _resolve(entry, selector)
        return all(v is None or (isinstance(v, list | dict | str) and not v) for v in values)

    return check


def compile_filter(expression: str) -> Predicate:
    """Compile an expression into a predicate over a JSON-like entry.

    Raises:
        FilterError: Not in the supported subset.
    """
    return _Parser(expression).parse()
