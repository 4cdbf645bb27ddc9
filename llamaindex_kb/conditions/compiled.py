"""A ``metadata_condition`` compiled once per request: the ``Predicate`` every store
evaluates, row by row (``matches``), over a ``MetadataTable`` (``mask``), or by
pushing its ``exact_part`` down as a pre-filter that the store translates itself.

``matches`` is the reference: ``mask`` equals ``[matches(m) for m in rows]`` exactly,
and a pushed-down pre-filter lets through at least every record ``matches`` accepts
(stores re-check what it lets through with ``matches``).

The exact part
    The checks a store may test itself, each in a typed form that says exactly what it
    means (``TextEquals``, ``TextIn``, ``NumberCompare``); ``ExactPart.translate``
    takes a store's translation of one check and combines them by the one rule: for
    ``and`` the translated checks (the others dropped, so the result is a superset);
    for ``or`` all of them or nothing. Left out, because no store's own operators mean
    the same as Dify's:

    * ``is``/``=`` and ``in`` with a text that is not *plain*: a plain text is not the
      text form of any non-string JSON value (not parseable by ``float()``, not
      ``true``/``false``, not starting with ``[`` or ``{``) and has no ``'`` or NUL.
      Text equality also matches numbers, booleans and lists by their JSON text, which
      a store's string equality misses; NUL cannot be sent to PostgreSQL.
    * ``is not``/``≠`` and ``not in``: a store's NE / NIN (LlamaIndex's, Qdrant's)
      count a missing key as a match, SQL NULL does not.
    * ``contains``/``not contains``/``start with``/``end with``: LlamaIndex's
      ``CONTAINS`` is list membership and ``TEXT_MATCH`` raises on non-strings; no
      prefix or suffix operator exists.
    * ``empty``: stores disagree on it (pgvector-like ones test NULL only, Qdrant
      ignores ``""``), so records would be lost; ``not empty``: needs a NOT that
      several stores lack; ``in`` with no items: pgvector renders ``IN ()``.

    Numeric checks (``is``/``is not`` with a number, ``<``, ``>``, ``≤``, ``≥``,
    ``before``, ``after``) are in the exact part as ``NumberCompare``, defined on the
    numeric form (``values.numeric_form``, which includes numeric strings and ISO
    times): a store whose numbers are only JSON numbers cannot express it (Qdrant's
    ranges, LlamaIndex's ``GT``), a store that can guard a cast can (PostgreSQL).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Literal

import numpy as np

from llamaindex_kb.conditions.model import Check, CheckKind, MetadataCondition
from llamaindex_kb.conditions.table import Columns, MetadataTable
from llamaindex_kb.conditions.values import is_empty, numeric_form, text_form

# (text, operand) -> bool, and whether a hit means a match; mapped over distinct texts.
_SUBSTRING_TESTS: dict[CheckKind, tuple[Callable[[str, str], bool], bool]] = {
    CheckKind.CONTAINS: (operator.contains, True),
    CheckKind.NOT_CONTAINS: (operator.contains, False),
    CheckKind.PREFIX: (str.startswith, True),
    CheckKind.SUFFIX: (str.endswith, True),
}
# Work on Python floats and on numpy arrays alike.
_NUMERIC_COMPARE: dict[CheckKind, Callable[[Any, float], Any]] = {
    CheckKind.NUM_EQ: operator.eq,
    CheckKind.NUM_NE: operator.ne,
    CheckKind.LT: operator.lt,
    CheckKind.GT: operator.gt,
    CheckKind.LE: operator.le,
    CheckKind.GE: operator.ge,
}


# --- the exact part ---------------------------------------------------------------

Comparison = Literal["=", "≠", "<", ">", "≤", "≥"]
_COMPARISONS: dict[CheckKind, Comparison] = {
    CheckKind.NUM_EQ: "=",
    CheckKind.NUM_NE: "≠",
    CheckKind.LT: "<",
    CheckKind.GT: ">",
    CheckKind.LE: "≤",
    CheckKind.GE: "≥",
}


@dataclass(frozen=True)
class TextEquals:
    """The value at ``key`` is the JSON string ``text`` (a plain text, see above)."""

    key: str
    text: str


@dataclass(frozen=True)
class TextIn:
    """The value at ``key`` is one of the JSON strings ``texts`` (plain, sorted, at
    least one)."""

    key: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class NumberCompare:
    """The numeric form of the value at ``key`` compares so with ``number``; a value
    without a numeric form (and a missing one) fails, ``≠`` included."""

    key: str
    comparison: Comparison
    number: float


ExactCheck = TextEquals | TextIn | NumberCompare


@dataclass(frozen=True)
class Pushdown[T]:
    """A store's pre-filter: its translated checks, combined by ``logical_operator``.

    ``complete``: every check of the condition is in ``parts``, so what the store lets
    through is exactly what the condition matches.
    """

    logical_operator: Literal["and", "or"]
    parts: tuple[T, ...]
    complete: bool


@dataclass(frozen=True)
class ExactPart:
    """The checks of a condition a store may test itself, and how many it has in all."""

    logical_operator: Literal["and", "or"]
    checks: tuple[ExactCheck, ...]
    total: int  # the condition's checks, exact or not

    def translate[T](self, translate: Callable[[ExactCheck], T | None]) -> Pushdown[T] | None:
        """A pre-filter letting through every record the condition matches, from a
        store's ``translate`` of one check (``None`` where the store cannot express it
        exactly); ``None`` when nothing can be pushed down."""
        parts = tuple(part for part in map(translate, self.checks) if part is not None)
        complete = len(parts) == self.total
        if not parts or (self.logical_operator == "or" and not complete):
            return None  # nothing to push, or an `or` branch that could match anything
        return Pushdown(self.logical_operator, parts, complete)


def _plain(text: str) -> bool:
    """Only a JSON string has this text form, and stores can take it as it is."""
    if "'" in text or "\x00" in text or text in ("true", "false") or text.startswith(("[", "{")):
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


_PATH_CHARACTERS = frozenset(".[]'\"\x00")


def plain_key(key: str) -> bool:
    """A key that stores reading keys as paths (Qdrant: ``a.b``, ``a[]``) or pasting them
    into query text take as it is: no ``.``, ``[``, ``]``, quotes or NUL."""
    return not _PATH_CHARACTERS.intersection(key)


def _exact(check: Check) -> ExactCheck | None:
    if check.kind is CheckKind.TEXT_EQ:
        return TextEquals(check.key, check.text) if _plain(check.text) else None
    if check.kind is CheckKind.IN:
        texts = tuple(sorted(check.items))
        return TextIn(check.key, texts) if texts and all(map(_plain, texts)) else None
    comparison = _COMPARISONS.get(check.kind)
    return None if comparison is None else NumberCompare(check.key, comparison, check.number)


# --- the predicate ----------------------------------------------------------------


# Checks joined by one logical operator.
Group = tuple[Literal["and", "or"], tuple[Check, ...]]


class Predicate:
    """A condition's checks, ready to evaluate; immutable, shared by a request's stores.

    One predicate may hold several conditions that must all match (``all_of``: a view's
    filter and the request's own): ``groups``, each checks joined by its own operator.
    """

    __slots__ = ("groups", "exact_part")

    def __init__(self, groups: tuple[Group, ...]) -> None:
        self.groups = groups
        self.exact_part = _exact_part(groups)

    @classmethod
    def all_of(cls, *predicates: Predicate | None) -> Predicate | None:
        """What every one of ``predicates`` matches (None ones match everything)."""
        given = [p for p in predicates if p is not None]
        if len(given) <= 1:
            return given[0] if given else None
        return cls(tuple(group for p in given for group in p.groups))

    def __repr__(self) -> str:
        return f"Predicate{self.groups!r}"

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        """Whether one record's metadata satisfies the condition, exactly as Dify's SQL."""
        for logical_operator, checks in self.groups:
            if not checks:
                continue
            results = (_check_value(check, metadata.get(check.key)) for check in checks)
            if not (all(results) if logical_operator == "and" else any(results)):
                return False
        return True

    def mask(self, table: MetadataTable) -> np.ndarray:
        """``[self.matches(m) for m in table's rows]`` as a read-only bool array."""
        masks = [table.cached_mask(group, functools.partial(_group_mask, group=group))
                 for group in self.groups]
        if len(masks) == 1:
            return masks[0]
        both = np.logical_and.reduce(masks)
        both.flags.writeable = False
        return both


def _group_mask(columns: Columns, group: Group) -> np.ndarray:
    logical_operator, checks = group
    if not checks:
        return np.ones(columns.rows, dtype=bool)
    masks = [_check_mask(columns, check) for check in checks]
    combine = np.logical_and if logical_operator == "and" else np.logical_or
    return combine.reduce(masks) if len(masks) > 1 else masks[0].copy()


def _exact_part(groups: tuple[Group, ...]) -> ExactPart:
    """One group's exact part as it is; of several (all of which must match), the
    exact checks of the `and` groups: an `or` group's checks cannot join them, so they
    only count, making the part incomplete."""
    if len(groups) == 1:
        logical_operator, checks = groups[0]
        return ExactPart(logical_operator,
                         tuple(e for e in map(_exact, checks) if e is not None), len(checks))
    joinable = [check for logical_operator, checks in groups if logical_operator == "and"
                for check in checks]
    return ExactPart("and", tuple(e for e in map(_exact, joinable) if e is not None),
                     sum(len(checks) for _, checks in groups))


def compile_condition(condition: MetadataCondition) -> Predicate:
    """The predicate of a parsed ``metadata_condition``: compile it once per request."""
    checks = condition.checks
    # `and` and `or` agree on zero or one check: one spelling shares cached masks.
    return Predicate(((condition.logical_operator if len(checks) > 1 else "and", checks),))


# --- row by row: the reference ----------------------------------------------------


def _check_value(check: Check, value: Any) -> bool:
    if check.kind is CheckKind.EMPTY:
        return is_empty(value)
    if check.kind is CheckKind.NOT_EMPTY:
        return not is_empty(value)
    text = text_form(value)
    if text is None:
        # SQL NULL matches nothing, except Dify's literal TRUE for `not in` no items.
        return check.kind is CheckKind.NOT_IN and not check.items
    return _check_text(check, text)


def _check_text(check: Check, text: str) -> bool:
    """A non-empty-family check on a present value, given its text form."""
    compare = _NUMERIC_COMPARE.get(check.kind)
    if compare is not None:
        number = numeric_form(text)
        return number is not None and bool(compare(number, check.number))
    if check.kind in _SUBSTRING_TESTS:
        predicate, hit_matches = _SUBSTRING_TESTS[check.kind]
        return predicate(text, check.text) == hit_matches
    match check.kind:
        case CheckKind.TEXT_EQ:
            return text == check.text
        case CheckKind.TEXT_NE:
            return text != check.text
        case CheckKind.IN:
            return text in check.items
        case CheckKind.NOT_IN:
            return text not in check.items
    raise AssertionError(f"{check.kind} is not a text check")


# --- column by column: the same answers for a whole table ---------------------------


def _check_mask(columns: Columns, check: Check) -> np.ndarray:
    column = columns.by_key.get(check.key)
    if column is None:
        return np.full(columns.rows, _check_value(check, None))
    if check.kind is CheckKind.EMPTY:
        return column.empty()
    if check.kind is CheckKind.NOT_EMPTY:
        return ~column.empty()
    compare = _NUMERIC_COMPARE.get(check.kind)
    if compare is not None:
        numbers = column.numeric()
        hits = compare(numbers, check.number)
        # NaN (no numeric form) already fails every comparison but ≠.
        return hits & ~np.isnan(numbers) if check.kind is CheckKind.NUM_NE else hits
    codes, texts, code_of = column.encoding()
    # One answer per distinct text, plus a last slot (code -1) for rows without a value.
    answers = np.empty(len(texts) + 1, dtype=bool)
    if check.kind in (CheckKind.TEXT_EQ, CheckKind.TEXT_NE, CheckKind.IN, CheckKind.NOT_IN):
        wanted = ((check.text,) if check.kind in (CheckKind.TEXT_EQ, CheckKind.TEXT_NE)
                  else check.items)
        positive = check.kind in (CheckKind.TEXT_EQ, CheckKind.IN)
        answers[:-1] = not positive
        answers[[code_of[text] for text in wanted if text in code_of]] = positive
    else:
        predicate, hit_matches = _SUBSTRING_TESTS[check.kind]
        hits = np.fromiter(map(predicate, texts, repeat(check.text)), dtype=bool,
                           count=len(texts))
        answers[:-1] = hits if hit_matches else ~hits
    answers[-1] = _check_value(check, None)
    return answers[codes]
