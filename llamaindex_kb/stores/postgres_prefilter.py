"""PostgreSQL's translation of a condition's exact part: a pre-filter in SQL.

Over the jsonb column ``metadata``, compared by ``metadata ->> key`` (the text form,
exactly as ``values.text_form`` defines it for plain texts):

* ``TextEquals`` and ``TextIn``: ``=`` and ``= ANY``, exact.
* ``NumberCompare``, which LlamaIndex filters and Qdrant cannot express: a value whose
  text form is a plain decimal of at most 40 characters with an exponent of at most two
  digits is compared as ``float8``, which reads it exactly as Python's ``float`` does
  and can never reject it; any other present value passes (ISO times, odd numbers,
  words: ``Predicate.matches`` decides), a missing one never does. The test sits in
  ``CASE``, which alone fixes the order in which PostgreSQL evaluates it, so the cast
  never sees a text that is not a number.

Keys travel as parameters, so any key goes, except one holding NUL, which PostgreSQL
text cannot hold (and so no stored metadata has).
"""

from __future__ import annotations

from typing import Any

from llamaindex_kb.conditions.compiled import (
    Comparison,
    ExactCheck,
    NumberCompare,
    Predicate,
    TextEquals,
    TextIn,
)

# A decimal that PostgreSQL's float8 input reads exactly as Python's float() does and
# can never reject: values.numeric_form's whitespace, a two-digit exponent, and
# (checked beside it) at most 40 characters. Other numeric texts are left to ``matches``.
_SQL_NUMBER = (r"^[ \t\n\r\f\v]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)"
               r"([eE][+-]?[0-9]{1,2})?[ \t\n\r\f\v]*$")
_SQL_COMPARE: dict[Comparison, str] = {
    "=": "=",
    "≠": "<>",
    "<": "<",
    ">": ">",
    "≤": "<=",
    "≥": ">=",
}
_VALUE = "(metadata ->> %s)"


def sql_prefilter(predicate: Predicate) -> tuple[str, list[Any]] | None:
    """A PostgreSQL condition over a jsonb column ``metadata`` that every record the
    predicate matches satisfies, with ``%s`` placeholders and their values; ``None``:
    none exists. Callers re-check what it lets through with ``predicate.matches``."""
    pushed = predicate.exact_part.translate(_sql_check)
    if pushed is None:
        return None
    joiner = " AND " if pushed.logical_operator == "and" else " OR "
    params = [param for _, part_params in pushed.parts for param in part_params]
    return "(" + joiner.join(sql for sql, _ in pushed.parts) + ")", params


def _sql_check(check: ExactCheck) -> tuple[str, list[Any]] | None:
    if "\x00" in check.key:
        return None
    match check:
        case TextEquals(key, text):
            return f"{_VALUE} = %s", [key, text]
        case TextIn(key, texts):
            return f"{_VALUE} = ANY(%s)", [key, list(texts)]
        case NumberCompare(key, comparison, number):
            # CASE, not AND: PostgreSQL may evaluate AND's operands in any order, and the
            # cast would abort the query on a text that is not a number.
            return (f"CASE WHEN length({_VALUE}) <= 40 AND {_VALUE} ~ %s "
                    f"THEN {_VALUE}::float8 {_SQL_COMPARE[comparison]} %s "
                    f"ELSE {_VALUE} IS NOT NULL END",
                    [key, key, _SQL_NUMBER, key, number, key])
