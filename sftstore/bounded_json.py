"""JSON read from untrusted bytes, bounded before anything can go wrong: nesting depth is counted
without recursion before parsing, an object giving a key twice is refused, and an integer too long
for Python to convert becomes a marker (`OversizedInt`) for a schema to refuse by field.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import reprlib
from collections import Counter
from collections.abc import Callable
from itertools import chain, compress, repeat
from typing import Any

from .errors import DeltaFormatError, SftError

MAX_JSON_DEPTH = 64  # arrays and objects, the outermost one included
MAX_JSON_INT_DIGITS = 4300  # Python's default int-string limit: a longer integer is refused, by field
_MAX_JSON_INT_BITS = int(MAX_JSON_INT_DIGITS * math.log2(10))
_JSON_STRING_PATTERN = rb'"[^"\\]*(?:\\.[^"\\]*)*"?'
_JSON_STRING = re.compile(_JSON_STRING_PATTERN, re.DOTALL)
_JSON_TOKEN = re.compile(_JSON_STRING_PATTERN + rb"|[\[\]{}]", re.DOTALL)
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKET_STEP)


class OversizedInt:
    """What the manifest reader puts in place of an integer too long for Python to convert (its field is
    then refused by name, instead of the whole file with Python's int-string-limit error)."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


class _BriefRepr(reprlib.Repr):
    """reprlib, never failing on an integer too long to convert to a string."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1024:  # repr itself fails from 4300 digits; reprlib shortens what it gives
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_BRIEF = _BriefRepr()
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlevel = 80, 80, 3


def brief(value: Any) -> str:
    """A short repr of `value` for an error message."""
    return _BRIEF.repr(value)


def json_problem(value: Any, depth: int = 1) -> str | None:
    """What keeps `value` (at nesting `depth`) from being a JSON value nested at most `MAX_JSON_DEPTH` levels, or None.

    Walks one nesting level at a time, without recursion (so any depth is reported, never a `RecursionError`)
    and with C-level scans of each level (so a large loaded manifest is checked quickly).
    """
    items = [value]
    while items:
        problem = _scalar_problem(items)
        if problem is not None:
            return problem
        dicts = list(compress(items, map(isinstance, items, repeat(dict))))
        sequences = list(compress(items, map(isinstance, items, repeat((list, tuple)))))
        if (dicts or sequences) and depth > MAX_JSON_DEPTH:
            return f"is nested more than {MAX_JSON_DEPTH} levels deep"
        if not all(map(isinstance, chain.from_iterable(dicts), repeat(str))):
            key = next(key for obj in dicts for key in obj if not isinstance(key, str))
            return f"has a key that is not a string: {brief(key)}"
        items = [*chain.from_iterable(map(dict.values, dicts)), *chain.from_iterable(sequences)]
        depth += 1
    return None


def _scalar_problem(items: list[Any]) -> str | None:
    """A value among `items` that is neither a JSON value nor a container of them, or an integer too long."""
    for kind in set(map(type, items)):
        if not issubclass(kind, (str, int, float, type(None), dict, list, tuple)):
            return f"holds {brief(next(item for item in items if type(item) is kind))}; expected JSON values"
    integers = list(compress(items, map(isinstance, items, repeat(int))))
    if integers and max(map(int.bit_length, integers)) > _MAX_JSON_INT_BITS:
        longest = max(integers, key=int.bit_length)
        return f"holds {brief(longest)}; expected integers of at most {MAX_JSON_INT_DIGITS} digits"
    return None


def parse_int(text: str) -> int | OversizedInt:
    """A JSON integer; one too long for Python to convert is kept as a marker, for the schema to refuse by field."""
    return OversizedInt(text) if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS else int(text)


def load_json(data: bytes, path: Any, what: str, error: type[SftError] = DeltaFormatError, **options: Any) -> Any:
    """Parse UTF-8 JSON bytes; `error` (naming `path`) when nested deeper than `MAX_JSON_DEPTH` (checked before
    parsing, so it cannot recurse too deep), when an object gives a key twice, or when not `what` (not JSON)."""
    if _json_depth(data) > MAX_JSON_DEPTH:
        key = _too_deep_key(data)
        where = f"field {brief(key)}" if key is not None else "a value"
        raise error(f"{path}: {where} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys(path, error), **options)
    except SftError:
        raise
    except ValueError as exc:  # not UTF-8, not JSON, an integer too long for Python
        raise error(f"{path}: not {what} ({exc})") from None


def _unique_keys(path: Any, error: type[SftError]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON `object_pairs_hook` refusing an object that gives a key twice (`json` would keep the last)."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            key = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
            raise error(f"{path}: key {brief(key)} appears more than once in one JSON object")
        return obj

    return build


def _json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON bytes, counted without recursion (strings skipped)."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _too_deep_key(data: bytes) -> str | None:
    """The top-level key whose value nests deeper than `MAX_JSON_DEPTH` (a slower scan, for the message)."""
    depth, key = 0, None
    for match in _JSON_TOKEN.finditer(data):
        token = match.group()
        if token.startswith(b'"'):
            key = token[1:-1].decode("utf-8", "replace") if depth == 1 else key
            continue
        depth += _BRACKET_STEP[token[0]]
        if depth > MAX_JSON_DEPTH:
            return key
    return None
