"""The two forms of a metadata value that Dify's SQL compares, and how a request value
is named in an error message.

* *Text form*, what PostgreSQL's ``->>`` gives: a string as itself, ``true``/``false``,
  a number or a list/object as its JSON text (``5``, ``5.0``, ``["a", "b"]``, Python's
  ``json`` layout, which is jsonb's except that jsonb reorders object keys and prints
  ``1e+16`` as ``10000000000000000``); another Python type as ``str(value)``.
* *Numeric form*, derived from the text form: a decimal number (surrounding whitespace
  allowed, ASCII digits only, finite), or an ISO-8601 time (``YYYY-MM-DD`` first, parsed
  by ``datetime.fromisoformat``; naive means UTC) as Unix epoch seconds. Anything else
  has none: booleans, lists, other strings, ``NaN``/``Infinity``. Where PostgreSQL would
  abort the query on a failed ``::float`` cast, such a record simply does not match.
* A missing key and ``null`` are the same everywhere: SQL NULL (``None`` here).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def text_form(value: Any) -> str | None:
    """What PostgreSQL's ``->>`` gives for a JSON value; ``None`` for SQL NULL."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    # json.dumps writes these two reprs, at a fraction of its cost per call.
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and math.isfinite(value):
        return float.__repr__(value)
    if isinstance(value, float | list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def numeric_form(text: str) -> float | None:
    """A number or an ISO-8601 time (epoch seconds, naive = UTC); ``None`` otherwise."""
    if _NUMBER.fullmatch(text):
        number = float(text)
        return number if math.isfinite(number) else None
    if _ISO_DATE.match(text):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # Subtracting instead of .timestamp() cannot overflow at year 1 or 9999.
        return (moment - _EPOCH).total_seconds()
    return None


def json_number(value: Any) -> float | None:
    """A finite JSON number as a float; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def is_empty(value: Any) -> bool:
    """What ``empty`` matches: missing, ``null``, ``""`` or ``[]``."""
    return value is None or (isinstance(value, str | list | tuple) and not value)


def describe(value: Any) -> str:
    """A short rendering of a request value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"
