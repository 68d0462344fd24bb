"""The one error type the command line turns into a one-line message, and a bounded repr for messages."""

from __future__ import annotations

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
