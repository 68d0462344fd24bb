"""How lorakit refuses bad input: the one error type the command line turns into a one-line message,
a bounded repr for messages, and the type check every config runs on its fields.

At the bottom of lorakit's layers: this module imports nothing of lorakit.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from typing import Any


class LorakitError(Exception):
    """A problem with the user's input or run (bad data, missing model, diverged loss).

    `lorakit` prints `error: <message>` and exits with status 2 instead of a traceback.
    """


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: a 5,000-digit number or a 3,000-deep list stays one short line."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother, shortener.maxlong = 2, 60, 60, 40
    return shortener.repr(value)


def closest(word: Any, choices: Any) -> str | None:
    """The one of `choices` closest to `word` (difflib, case aside), or None when none is close."""
    import difflib

    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close and by_lower[close[0]] != str(word) else None


def did_you_mean(word: Any, choices: Any) -> str:
    """` (did you mean 'lora'?)` when `word` is close to one of `choices`, else ''."""
    found = closest(word, choices)
    return f" (did you mean {found!r}?)" if found is not None else ""


def check_text(text: str, where: str) -> str:
    """`text`, when a tokenizer can take it: no lone surrogate (a JSON escape such as "\\ud800" without its
    pair, or bytes of a command-line argument that are not UTF-8), else one `LorakitError` line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LorakitError(
            f"{where} holds an invalid character ({text[err.start]!r}: a lone surrogate, from an escape "
            "such as \\ud800 without its pair or from bytes that are not UTF-8)"
        ) from None
    return text


_SCALAR_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
_INT_LIMIT = 2**31  # ranks, steps, seeds: anything larger is a typo or an attack, never a setting
_FLOAT_LIMIT = 3.0e38  # a float that a float32 tensor can hold


def _check_scalar(value: Any, kind: str, where: str) -> None:
    kinds = _SCALAR_TYPES[kind]
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
        raise ValueError(f"{where} must be {words}, got {short_repr(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        limit = _INT_LIMIT if kind == "int" else _FLOAT_LIMIT
        if abs(value) >= limit:
            raise ValueError(f"{where} = {short_repr(value)} is out of range")


def check_field_types(config: Any) -> None:
    """Fields hold what they declare: a bool is True or False (not "no"), an int or float is not a
    bool and within range, a float is finite; `list[...]` and `dict[str, ...]` fields hold lists and
    mappings of those. Config files and flags are user input; nothing is coerced."""
    for f in dataclasses.fields(config):
        declared = str(f.type).replace(" ", "")
        optional = declared.endswith("|None")
        declared = declared.removesuffix("|None")
        value = getattr(config, f.name)
        where = f"{type(config).__name__}.{f.name}"
        if value is None and optional:
            continue
        if declared in _SCALAR_TYPES:
            _check_scalar(value, declared, where)
        elif (inner := re.fullmatch(r"list\[(\w+)\]", declared)) and inner.group(1) in _SCALAR_TYPES:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where} must be a list of {inner.group(1)}, got {short_repr(value)}")
            for item in value:
                _check_scalar(item, inner.group(1), f"{where}[...]")
        elif (inner := re.fullmatch(r"dict\[str,(\w+)\]", declared)) and inner.group(1) in _SCALAR_TYPES:
            if not isinstance(value, dict):
                raise ValueError(f"{where} must be a mapping of names to {inner.group(1)}, got {short_repr(value)}")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"{where}: the key {short_repr(key)} is not a string")
                _check_scalar(item, inner.group(1), f"{where}[{key!r}]")
