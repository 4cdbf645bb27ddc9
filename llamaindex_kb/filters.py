"""Dify's ``metadata_condition``, with the semantics of Dify's own knowledge base.

Five parts, all agreeing on one definition of what a condition means:

* ``parse_metadata_condition``: the request edge (pydantic), turning anything
  malformed into an ``InvalidFilterError`` that names the offending place;
* ``matches``: the reference evaluator over one metadata mapping;
* ``MetadataTable``: a columnar evaluator for the embedded store whose
  ``mask`` equals ``[matches(condition, m) for m in metadatas]`` exactly;
* ``to_metadata_filters``: the part LlamaIndex ``MetadataFilters`` express
  exactly, for pushing down to an external store as a pre-filter.
* ``sql_prefilter``: the same for PostgreSQL, where our own SQL can also push
  numeric comparisons down.

Dify evaluates conditions in SQL over its JSON metadata column
(``dataset_retrieval.process_metadata_filter_func``); everything below mirrors
that SQL, and the decisions it leaves open are these.

Parsing
    * ``metadata_condition`` absent, ``null``, ``{}``, ``conditions`` ``null`` or
      ``[]``, or only skipped conditions (below): no filter, ``None``.
    * ``name``: a non-empty string or a one-element list of one (old Dify docs
      showed ``["category"]``). Matched exactly: no trimming, no case folding.
    * ``comparison_operator``: one of the 18 Dify spellings or the aliases
      ``!=``, ``>=``, ``<=``, matched exactly (Dify sends them verbatim).
      ``is``/``=``, ``before``/``<`` and ``after``/``>`` stay distinct members
      but mean the same thing.
    * ``logical_operator``: ``"and"``, ``"or"``, or ``null`` meaning ``"and"``.
    * Unknown fields are ignored (newer Dify versions may add some).
    * ``value`` ``null`` skips the condition (except ``empty``/``not empty``,
      which ignore ``value`` altogether). Other values must fit the operator,
      else ``InvalidFilterError``: Dify either silently drops those conditions
      or fails the whole query in PostgreSQL, and a clear 400 beats both.
      JSON ``true``/``false`` are rejected everywhere: Dify's metadata types are
      string, number and time, and Dify's SQL would read ``true`` as ``1``.

Values: the two forms of a metadata value
    * *Text form*, what PostgreSQL's ``->>`` gives: a string as itself,
      ``true``/``false``, a number or a list/object as its JSON text
      (``5``, ``5.0``, ``["a", "b"]``, Python's ``json`` layout, which is
      jsonb's except that jsonb reorders object keys and prints ``1e+16`` as
      ``10000000000000000``); another Python type as ``str(value)``.
    * *Numeric form*, derived from the text form: a decimal number (surrounding
      whitespace allowed, ASCII digits only, finite), or an ISO-8601 time
      (``YYYY-MM-DD`` first, parsed by ``datetime.fromisoformat``; naive means
      UTC) as Unix epoch seconds. Anything else has none: booleans, lists, other
      strings, ``NaN``/``Infinity``. Where PostgreSQL would abort the query on a
      failed ``::float`` cast, such a record simply does not match.
    * A missing key and ``null`` are the same everywhere: SQL NULL.

Operators
    * ``contains``, ``not contains``, ``start with``, ``end with``:
      case-sensitive substring / prefix / suffix on the text form (so
      ``contains "a"`` matches the list ``["a", "b"]``). ``%`` and ``_`` are
      literal, as in current Dify which escapes its LIKE pattern. A number as
      ``value`` is used as its text (``5`` → ``"5"``).
    * ``is``, ``=``: a string ``value`` compares text forms (``"5"`` matches the
      number ``5`` and the string ``"5"``, not ``5.0``); a number ``value``
      compares numeric forms (``5`` matches ``5``, ``5.0``, ``"5"``, ``" 5 "``,
      and an ISO time at epoch second 5).
    * ``is not``, ``≠``: the negation of the above, for records that have a value.
    * ``empty``: missing, ``null``, ``""`` or ``[]`` (Dify itself only counts
      missing and ``null``; users expect more, Dify issue 24275).
      ``not empty``: everything else.
    * ``in``, ``not in``: ``value`` a list (``null`` items dropped, numbers
      taken as their text, strings kept verbatim) or a comma-separated string
      (items stripped, empty items dropped); the text form must (not) be one of
      them. An empty item list: ``in`` matches nothing, ``not in`` matches every
      record, even those lacking the key (Dify emits a literal TRUE).
    * ``<``/``before``, ``>``/``after``, ``≤``, ``≥``: numeric forms; ``value``
      a number, a numeric string or an ISO-8601 time.
    * SQL NULL: apart from ``empty`` and ``not in`` with no items, no operator
      matches a record lacking the key; in particular ``is not``, ``≠``,
      ``not contains`` and ``not in`` do not.

Combining
    Skipped conditions are left out, as Dify leaves them out of its SQL; what
    remains is combined with ``and`` or ``or``, and nothing remaining means no
    filter (every record matches), for ``and`` and ``or`` alike.

Pushdown (``to_metadata_filters``)
    Only these translate with LlamaIndex's meaning equal to Dify's:

    ====================================  =====================================
    Dify                                  LlamaIndex
    ====================================  =====================================
    ``is`` / ``=`` with a plain string     ``FilterOperator.EQ`` (string)
    ``in`` with only plain strings         ``FilterOperator.IN`` (list of str)
    ====================================  =====================================

    A *plain* string is not the text form of any non-string JSON value (not
    parseable by ``float()``, not ``true``/``false``, not starting with ``[``
    or ``{``), and has no ``'`` or NUL: LlamaIndex's ``PGVectorStore`` pastes
    values into SQL text unquoted and casts float-like strings to float. Keys
    with ``.``, ``[``, ``]``, quotes or NUL are never pushed (Qdrant reads them
    as paths, PostgreSQL as SQL). Never pushed:

    * ``is``/``=``/``is not``/``≠`` with a number, and every numeric comparison:
      Dify also matches numeric strings and ISO times, which ``EQ``/``GT`` miss
      (LlamaIndex's in-memory ``GT`` raises on a string, pgvector's ``::float``
      cast aborts the query).
    * ``is not``/``≠`` → ``NE`` and ``not in`` → ``NIN``: LlamaIndex counts a
      missing key as a match, SQL NULL does not; and no store-independent
      "key exists" test can be combined with them (nested filters are not
      supported by ``SimpleVectorStore``).
    * ``contains``/``not contains``/``start with``/``end with``: ``CONTAINS`` is
      list membership and ``TEXT_MATCH`` raises on non-strings; no prefix or
      suffix operator exists.
    * ``empty`` → ``IS_EMPTY``: stores disagree on it (pgvector-like ones test
      NULL only, Qdrant ignores ``""``), so records would be lost.
    * ``not empty``: needs ``FilterCondition.NOT``, unsupported or ignored by
      several stores; ``in`` with no items: pgvector renders ``IN ()``.

    For ``and`` the pushed filters are the translatable conditions (the others
    dropped, so the result is a superset); for ``or`` all of them or nothing.
    The translation assumes JSON-typed metadata (what an external store holds),
    and callers always re-check results with ``matches``.

Pushdown to PostgreSQL (``sql_prefilter``)
    Text equality and membership as above, compared by ``metadata ->> key``. Numeric
    comparisons too (``is``/``is not`` with a number, ``<``, ``>``, ``≤``, ``≥``,
    ``before``, ``after``): a value whose text form is a plain decimal of at most 40
    characters with an exponent of at most two digits is compared as ``float8``, which
    reads it exactly as Python's ``float`` does and can never reject it; any other
    present value passes (ISO times, odd numbers, words: ``matches`` decides), a
    missing one never does. The test sits in ``CASE``, which alone fixes the order in
    which PostgreSQL evaluates it, so the cast never sees a text that is not a number.

``MetadataTable``
    Per key: the raw values (an object array, ``None`` where missing or null),
    and derived on first use: a dictionary encoding of the text forms
    (``int32`` codes, ``-1`` for no value), the numeric form as ``float64``
    (``NaN`` for none) and an "empty" mask. Text operators evaluate once per
    *distinct* text and gather by code, so ``is``/``in`` cost an index lookup
    and substring operators one Python test per distinct value. Masks are
    cached per normalised condition in a small LRU and returned read-only.
    ``extend`` appends rows and drops derived arrays and cached masks; nothing
    else changes a table. ``save``/``load`` write and read JSON (no pickle):
    non-JSON values are saved as ``str(value)``, which is also their text form.
    Queries may run concurrently with each other and with ``extend``; a mask
    reflects the rows present when it started.

    Measured on 100k rows (5 keys): building 55 ms; ``=``, ``in``, ``>`` and
    ``after`` with an ISO time 0.1-0.3 ms uncached, 0.03 ms cached;
    ``contains`` 12 ms when all 100k values are distinct (one C-level test per
    distinct text, so far less for typical per-document metadata). The first
    query touching a key derives its arrays: 20-80 ms, once per table.
"""

from __future__ import annotations

import json
import math
import operator
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum, StrEnum
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from llamaindex_kb.errors import InvalidFilterError
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, over_limit

__all__ = [
    "Condition",
    "MetadataCondition",
    "MetadataTable",
    "Operator",
    "matches",
    "parse_metadata_condition",
    "to_metadata_filters",
]


class Operator(StrEnum):
    """The 18 comparison operators of Dify, by their canonical spelling."""

    CONTAINS = "contains"
    NOT_CONTAINS = "not contains"
    START_WITH = "start with"
    END_WITH = "end with"
    IS = "is"
    IS_NOT = "is not"
    EMPTY = "empty"
    NOT_EMPTY = "not empty"
    IN = "in"
    NOT_IN = "not in"
    EQ = "="
    NE = "≠"
    GT = ">"
    LT = "<"
    GE = "≥"
    LE = "≤"
    BEFORE = "before"
    AFTER = "after"


_OPERATORS: dict[str, Operator] = {op.value: op for op in Operator} | {
    "!=": Operator.NE,
    ">=": Operator.GE,
    "<=": Operator.LE,
}
_EXPECTED_OPERATORS = ", ".join(repr(spelling) for spelling in _OPERATORS)
_VALUELESS = frozenset({Operator.EMPTY, Operator.NOT_EMPTY})


class Condition(BaseModel):
    """One condition; after validation ``comparison_operator`` is canonical."""

    model_config = ConfigDict(frozen=True)

    name: str
    comparison_operator: Operator
    value: Any = None

    @field_validator("name", mode="before")
    @classmethod
    def _single_name(cls, name: Any) -> Any:
        if isinstance(name, list):
            if len(name) != 1:
                raise ValueError(f"expected a string or a one-element list, got {len(name)} items")
            name = name[0]
        if not isinstance(name, str) or not name:
            raise ValueError(f"expected a non-empty string, got {_describe(name)}")
        return name

    @field_validator("comparison_operator", mode="before")
    @classmethod
    def _canonical_operator(cls, spelling: Any) -> Operator:
        if isinstance(spelling, Operator):
            return spelling
        if isinstance(spelling, str) and spelling in _OPERATORS:
            return _OPERATORS[spelling]
        raise ValueError(
            f"unknown operator {_describe(spelling)}; expected one of {_EXPECTED_OPERATORS}"
        )

    @field_validator("value")
    @classmethod
    def _value_fits_operator(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("comparison_operator")
        if value is not None and op is not None and op not in _VALUELESS:
            _compile_value("", op, value)
        return value

    @property
    def skipped(self) -> bool:
        """True when Dify leaves this condition out: no value, and one is needed."""
        return self.value is None and self.comparison_operator not in _VALUELESS


class MetadataCondition(BaseModel):
    """Dify's ``metadata_condition``: conditions combined with ``and`` or ``or``."""

    model_config = ConfigDict(frozen=True)

    logical_operator: Literal["and", "or"] = "and"
    conditions: list[Condition] = Field(default_factory=list)

    @field_validator("logical_operator", mode="before")
    @classmethod
    def _null_means_and(cls, logical_operator: Any) -> Any:
        return "and" if logical_operator is None else logical_operator

    @field_validator("conditions", mode="before")
    @classmethod
    def _null_means_none(cls, conditions: Any) -> Any:
        return [] if conditions is None else conditions

    @property
    def effective_conditions(self) -> list[Condition]:
        """The conditions that constrain anything (the skipped ones left out)."""
        return [condition for condition in self.conditions if not condition.skipped]


def parse_metadata_condition(
    raw: object, limits: Limits = DEFAULT_LIMITS
) -> MetadataCondition | None:
    """Validate a request's ``metadata_condition``; ``None`` means "no filter"."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidFilterError(f"metadata_condition: expected an object, got {_describe(raw)}")
    _check_sizes(raw, limits)
    try:
        condition = MetadataCondition.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidFilterError(_first_problem(exc)) from exc
    return condition if condition.effective_conditions else None


def _check_sizes(raw: Mapping[str, Any], limits: Limits) -> None:
    """Count before validating: what pydantic would walk is bounded by the limits."""
    conditions = raw.get("conditions")
    if not isinstance(conditions, list):
        return
    if len(conditions) > limits.conditions:
        raise over_limit("metadata_condition.conditions", len(conditions), "conditions",
                         limits.conditions, "conditions")
    for i, condition in enumerate(conditions):
        value = condition.get("value") if isinstance(condition, Mapping) else None
        if isinstance(value, list) and len(value) > limits.condition_values:
            raise over_limit(f"metadata_condition.conditions[{i}].value", len(value),
                             "condition_values", limits.condition_values, "values")


# Wording for pydantic's own error types; our validators' messages are used as they are.
_PYDANTIC_PROBLEMS = {
    "missing": "required",
    "list_type": "expected an array",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
    "literal_error": "expected 'and', 'or' or null",
}


def _first_problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    place = "metadata_condition" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
    )
    if first["type"] == "value_error":
        problem = str(first["ctx"]["error"])
    elif first["type"] in _PYDANTIC_PROBLEMS:
        problem = _PYDANTIC_PROBLEMS[first["type"]]
        if first["type"] != "missing":
            problem += f", got {_describe(first['input'])}"
    else:
        problem = first["msg"]
    others = len(errors) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"{place}: {problem}{more}"


def _describe(value: Any) -> str:
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


# --- value forms -----------------------------------------------------------------

_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _text_form(value: Any) -> str | None:
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


def _numeric_of_text(text: str) -> float | None:
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


def _json_number(value: Any) -> float | None:
    """A finite JSON number as a float; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple) and not value)


# --- compiled conditions ---------------------------------------------------------


class _Kind(Enum):
    EMPTY = "empty"
    NOT_EMPTY = "not empty"
    TEXT_EQ = "text ="
    TEXT_NE = "text ≠"
    NUM_EQ = "number ="
    NUM_NE = "number ≠"
    LT = "<"
    GT = ">"
    LE = "≤"
    GE = "≥"
    CONTAINS = "contains"
    NOT_CONTAINS = "not contains"
    PREFIX = "start with"
    SUFFIX = "end with"
    IN = "in"
    NOT_IN = "not in"


class _Test(NamedTuple):
    """One effective condition, reduced to what evaluation needs; hashable."""

    key: str
    kind: _Kind
    text: str = ""
    number: float = 0.0
    items: frozenset[str] = frozenset()


_STRING_KINDS = {
    Operator.CONTAINS: _Kind.CONTAINS,
    Operator.NOT_CONTAINS: _Kind.NOT_CONTAINS,
    Operator.START_WITH: _Kind.PREFIX,
    Operator.END_WITH: _Kind.SUFFIX,
}
_EQUALITY_KINDS = {  # (string value, number value)
    Operator.IS: (_Kind.TEXT_EQ, _Kind.NUM_EQ),
    Operator.EQ: (_Kind.TEXT_EQ, _Kind.NUM_EQ),
    Operator.IS_NOT: (_Kind.TEXT_NE, _Kind.NUM_NE),
    Operator.NE: (_Kind.TEXT_NE, _Kind.NUM_NE),
}
_ORDER_KINDS = {
    Operator.LT: _Kind.LT,
    Operator.BEFORE: _Kind.LT,
    Operator.GT: _Kind.GT,
    Operator.AFTER: _Kind.GT,
    Operator.LE: _Kind.LE,
    Operator.GE: _Kind.GE,
}
_MEMBERSHIP_KINDS = {Operator.IN: _Kind.IN, Operator.NOT_IN: _Kind.NOT_IN}

# (text, operand) -> bool, and whether a hit means a match; mapped over distinct texts.
_SUBSTRING_TESTS: dict[_Kind, tuple[Callable[[str, str], bool], bool]] = {
    _Kind.CONTAINS: (operator.contains, True),
    _Kind.NOT_CONTAINS: (operator.contains, False),
    _Kind.PREFIX: (str.startswith, True),
    _Kind.SUFFIX: (str.endswith, True),
}
# Work on Python floats and on numpy arrays alike.
_NUMERIC_COMPARE: dict[_Kind, Callable[[Any, float], Any]] = {
    _Kind.NUM_EQ: operator.eq,
    _Kind.NUM_NE: operator.ne,
    _Kind.LT: operator.lt,
    _Kind.GT: operator.gt,
    _Kind.LE: operator.le,
    _Kind.GE: operator.ge,
}


def _compile_value(key: str, op: Operator, value: Any) -> _Test:
    """The test for a non-null ``value``; ``ValueError`` if the value cannot fit ``op``."""
    if op in _STRING_KINDS:
        if isinstance(value, str):
            return _Test(key, _STRING_KINDS[op], text=value)
        if _json_number(value) is not None:
            return _Test(key, _STRING_KINDS[op], text=json.dumps(value))
        raise ValueError(f"'{op}' needs a string or a number, got {_describe(value)}")
    if op in _EQUALITY_KINDS:
        text_kind, number_kind = _EQUALITY_KINDS[op]
        if isinstance(value, str):
            return _Test(key, text_kind, text=value)
        number = _json_number(value)
        if number is not None:
            return _Test(key, number_kind, number=number)
        raise ValueError(f"'{op}' needs a string or a finite number, got {_describe(value)}")
    if op in _ORDER_KINDS:
        number = _numeric_of_text(value) if isinstance(value, str) else _json_number(value)
        if number is None:
            raise ValueError(
                f"'{op}' needs a number, a numeric string or an ISO-8601 time,"
                f" got {_describe(value)}"
            )
        return _Test(key, _ORDER_KINDS[op], number=number)
    if op in _MEMBERSHIP_KINDS:
        return _Test(key, _MEMBERSHIP_KINDS[op], items=_membership_items(op, value))
    raise AssertionError(f"{op} takes no value")  # empty / not empty never get here


def _membership_items(op: Operator, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(item.strip() for item in value.split(",") if item.strip())
    if not isinstance(value, list):
        raise ValueError(
            f"'{op}' needs an array or a comma-separated string, got {_describe(value)}"
        )
    items: set[str] = set()
    for index, item in enumerate(value):
        if isinstance(item, str):
            items.add(item)
        elif _json_number(item) is not None:
            items.add(json.dumps(item))
        elif item is not None:  # Dify drops null items
            raise ValueError(f"item {index} must be a string or a number, got {_describe(item)}")
    return frozenset(items)


def _compile(condition: Condition) -> _Test | None:
    op = condition.comparison_operator
    if op is Operator.EMPTY:
        return _Test(condition.name, _Kind.EMPTY)
    if op is Operator.NOT_EMPTY:
        return _Test(condition.name, _Kind.NOT_EMPTY)
    if condition.skipped:
        return None
    return _compile_value(condition.name, op, condition.value)


def _tests(condition: MetadataCondition) -> tuple[_Test, ...]:
    compiled = (_compile(c) for c in condition.conditions)
    return tuple(test for test in compiled if test is not None)


# --- reference evaluator ---------------------------------------------------------


def matches(condition: MetadataCondition, metadata: Mapping[str, Any]) -> bool:
    """Whether one record's metadata satisfies ``condition``, exactly as Dify's SQL."""
    tests = _tests(condition)
    if not tests:
        return True
    results = (_test_value(test, metadata.get(test.key)) for test in tests)
    return all(results) if condition.logical_operator == "and" else any(results)


def _test_value(test: _Test, value: Any) -> bool:
    if test.kind is _Kind.EMPTY:
        return _is_empty(value)
    if test.kind is _Kind.NOT_EMPTY:
        return not _is_empty(value)
    text = _text_form(value)
    if text is None:
        # SQL NULL matches nothing, except Dify's literal TRUE for `not in` no items.
        return test.kind is _Kind.NOT_IN and not test.items
    return _test_text(test, text)


def _test_text(test: _Test, text: str) -> bool:
    """A non-empty-family test on a present value, given its text form."""
    compare = _NUMERIC_COMPARE.get(test.kind)
    if compare is not None:
        number = _numeric_of_text(text)
        return number is not None and bool(compare(number, test.number))
    if test.kind in _SUBSTRING_TESTS:
        predicate, hit_matches = _SUBSTRING_TESTS[test.kind]
        return predicate(text, test.text) == hit_matches
    match test.kind:
        case _Kind.TEXT_EQ:
            return text == test.text
        case _Kind.TEXT_NE:
            return text != test.text
        case _Kind.IN:
            return text in test.items
        case _Kind.NOT_IN:
            return text not in test.items
    raise AssertionError(f"{test.kind} is not a text test")


# --- columnar evaluator ----------------------------------------------------------


def _object_array(values: Sequence[Any]) -> np.ndarray:
    # fromiter keeps list values as elements where np.array would add dimensions.
    return np.fromiter(values, dtype=object, count=len(values))


class _Column:
    """One key: raw values (``None`` for no value) and arrays derived on first use.

    Derivations are deterministic, so two threads racing to compute one store
    equal results and either may win.
    """

    __slots__ = ("raw", "_codes", "_texts", "_code_of", "_numeric", "_empty")

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw
        self._codes: np.ndarray | None = None
        self._texts: list[str] = []
        self._code_of: dict[str, int] = {}
        self._numeric: np.ndarray | None = None
        self._empty: np.ndarray | None = None

    def encoding(self) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """int32 codes into the distinct text forms (-1: no value), and the lookup."""
        if self._codes is None:
            code_of: dict[str, int] = {}

            def code(value: Any) -> int:
                text = _text_form(value)
                return -1 if text is None else code_of.setdefault(text, len(code_of))

            codes = np.fromiter(map(code, self.raw), dtype=np.int32, count=len(self.raw))
            self._texts, self._code_of = list(code_of), code_of
            self._codes = codes
        return self._codes, self._texts, self._code_of

    def numeric(self) -> np.ndarray:
        """float64 numeric forms, NaN where there is none."""
        if self._numeric is None:
            codes, texts, _ = self.encoding()
            per_text = [_numeric_of_text(text) for text in texts]
            # The extra last slot is what code -1 (no value) picks.
            lookup = np.array([np.nan if n is None else n for n in per_text] + [np.nan])
            self._numeric = lookup[codes]
        return self._numeric

    def empty(self) -> np.ndarray:
        if self._empty is None:
            self._empty = np.fromiter(
                (_is_empty(value) for value in self.raw), dtype=bool, count=len(self.raw)
            )
        return self._empty


class _State(NamedTuple):
    rows: int
    columns: dict[str, _Column]


_CacheKey = tuple[str, tuple[_Test, ...]]


class MetadataTable:
    """Row-aligned metadata of a chunk store, answering conditions as boolean masks."""

    def __init__(
        self, metadatas: Iterable[Mapping[str, Any]] = (), *, cache_size: int = 32
    ) -> None:
        self._state = _State(0, {})
        self._cache: OrderedDict[_CacheKey, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._extend_lock = threading.Lock()
        self.extend(metadatas)

    def __len__(self) -> int:
        return self._state.rows

    def extend(self, metadatas: Iterable[Mapping[str, Any]]) -> None:
        """Append rows; derived arrays and cached masks are dropped."""
        added = list(metadatas)
        with self._extend_lock:
            old = self._state
            columns: dict[str, _Column] = {}
            for key in old.columns.keys() | set().union(*added):
                head = (
                    old.columns[key].raw
                    if key in old.columns
                    else np.full(old.rows, None, dtype=object)
                )
                tail = _object_array([metadata.get(key) for metadata in added])
                columns[key] = _Column(np.concatenate([head, tail]))
            with self._cache_lock:
                self._state = _State(old.rows + len(added), columns)
                self._cache.clear()

    def mask(self, condition: MetadataCondition) -> np.ndarray:
        """``[matches(condition, m) for m in rows]`` as a read-only bool array."""
        tests = _tests(condition)
        # `and` and `or` agree on zero or one condition: share their cache entry.
        key = (condition.logical_operator if len(tests) > 1 else "and", tests)
        with self._cache_lock:
            state = self._state
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        result = self._compute(state, key)
        result.setflags(write=False)
        with self._cache_lock:
            if self._state is state:  # an extend() meanwhile makes this mask stale
                self._cache[key] = result
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def to_columns(self) -> tuple[int, dict[str, list[Any]]]:
        """(row count, {key: one value per row, None where missing}) for persisting."""
        state = self._state
        return state.rows, {key: column.raw.tolist() for key, column in state.columns.items()}

    @classmethod
    def from_columns(
        cls, rows: int, columns: Mapping[str, Sequence[Any]], *, cache_size: int = 32
    ) -> MetadataTable:
        """The inverse of ``to_columns``."""
        for key, values in columns.items():
            if len(values) != rows:
                raise ValueError(f"column {key!r} has {len(values)} values for {rows} rows")
        table = cls(cache_size=cache_size)
        table._state = _State(
            rows, {key: _Column(_object_array(values)) for key, values in columns.items()}
        )
        return table

    def save(self, path: Path) -> None:
        """Write ``to_columns()`` as JSON (no pickle; non-JSON values as ``str``)."""
        rows, columns = self.to_columns()
        document = {"format": 1, "rows": rows, "columns": columns}
        path.write_text(json.dumps(document, ensure_ascii=False, default=str), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> MetadataTable:
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_columns(document["rows"], document["columns"])

    @staticmethod
    def _compute(state: _State, key: _CacheKey) -> np.ndarray:
        logical_operator, tests = key
        if not tests:
            return np.ones(state.rows, dtype=bool)
        masks = [_test_mask(state, test) for test in tests]
        combine = np.logical_and if logical_operator == "and" else np.logical_or
        return combine.reduce(masks) if len(masks) > 1 else masks[0].copy()


def _test_mask(state: _State, test: _Test) -> np.ndarray:
    column = state.columns.get(test.key)
    if column is None:
        return np.full(state.rows, _test_value(test, None))
    if test.kind is _Kind.EMPTY:
        return column.empty()
    if test.kind is _Kind.NOT_EMPTY:
        return ~column.empty()
    compare = _NUMERIC_COMPARE.get(test.kind)
    if compare is not None:
        numbers = column.numeric()
        hits = compare(numbers, test.number)
        # NaN (no numeric form) already fails every comparison but ≠.
        return hits & ~np.isnan(numbers) if test.kind is _Kind.NUM_NE else hits
    codes, texts, code_of = column.encoding()
    # One answer per distinct text, plus a last slot (code -1) for rows without a value.
    answers = np.empty(len(texts) + 1, dtype=bool)
    if test.kind in (_Kind.TEXT_EQ, _Kind.TEXT_NE, _Kind.IN, _Kind.NOT_IN):
        wanted = (test.text,) if test.kind in (_Kind.TEXT_EQ, _Kind.TEXT_NE) else test.items
        positive = test.kind in (_Kind.TEXT_EQ, _Kind.IN)
        answers[:-1] = not positive
        answers[[code_of[text] for text in wanted if text in code_of]] = positive
    else:
        predicate, hit_matches = _SUBSTRING_TESTS[test.kind]
        hits = np.fromiter(map(predicate, texts, repeat(test.text)), dtype=bool, count=len(texts))
        answers[:-1] = hits if hit_matches else ~hits
    answers[-1] = _test_value(test, None)
    return answers[codes]


# --- pushdown to LlamaIndex ------------------------------------------------------

# Dify kinds whose LlamaIndex operator means exactly the same, given plain strings.
_PUSHDOWN: dict[_Kind, FilterOperator] = {
    _Kind.TEXT_EQ: FilterOperator.EQ,
    _Kind.IN: FilterOperator.IN,
}
_UNSAFE_KEY_CHARACTERS = frozenset(".[]'\"\x00")


def to_metadata_filters(condition: MetadataCondition) -> MetadataFilters | None:
    """A pre-filter matching every record ``condition`` matches; ``None``: none exists."""
    tests = _tests(condition)
    exact = [f for f in map(_pushdown, tests) if f is not None]
    if not exact or (condition.logical_operator == "or" and len(exact) < len(tests)):
        return None  # nothing to push, or an `or` branch that could match anything
    return MetadataFilters(filters=exact, condition=FilterCondition(condition.logical_operator))


def _pushdown(test: _Test) -> MetadataFilter | None:
    operator_ = _PUSHDOWN.get(test.kind)
    if operator_ is None or _UNSAFE_KEY_CHARACTERS.intersection(test.key):
        return None
    if test.kind is _Kind.TEXT_EQ:
        if not _plain(test.text):
            return None
        return MetadataFilter(key=test.key, operator=operator_, value=test.text)
    items = sorted(test.items)
    if not items or not all(_plain(item) for item in items):
        return None
    return MetadataFilter(key=test.key, operator=operator_, value=items)


def _plain(text: str) -> bool:
    """Only a JSON string has this text form, and stores can take it as it is."""
    if "'" in text or "\x00" in text or text in ("true", "false") or text.startswith(("[", "{")):
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


# --- pushdown to PostgreSQL ------------------------------------------------------

# A decimal that PostgreSQL's float8 input reads exactly as Python's float() does and
# can never reject: _NUMBER's whitespace, a two-digit exponent, and (checked beside
# it) at most 40 characters. Other numeric texts are left to ``matches``.
_SQL_NUMBER = (r"^[ \t\n\r\f\v]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)"
               r"([eE][+-]?[0-9]{1,2})?[ \t\n\r\f\v]*$")
_SQL_COMPARE = {
    _Kind.NUM_EQ: "=",
    _Kind.NUM_NE: "<>",
    _Kind.LT: "<",
    _Kind.GT: ">",
    _Kind.LE: "<=",
    _Kind.GE: ">=",
}


def sql_prefilter(condition: MetadataCondition) -> tuple[str, list[Any]] | None:
    """A PostgreSQL condition over a jsonb column ``metadata`` that every record
    ``condition`` matches satisfies, with ``%s`` placeholders and their values;
    ``None``: none exists. Callers re-check what it lets through with ``matches``.

    Text equality and membership go as in ``to_metadata_filters``. Numeric tests go
    too, which LlamaIndex filters cannot express: a value whose text is a short plain
    decimal is compared as float8; any other present value passes (an ISO time, an odd
    number, a word: ``matches`` decides); a missing one never does.
    """
    tests = _tests(condition)
    parts: list[str] = []
    params: list[Any] = []
    for test in tests:
        translated = _sql_test(test)
        if translated is not None:
            parts.append(translated[0])
            params += translated[1]
    if not parts or (condition.logical_operator == "or" and len(parts) < len(tests)):
        return None  # nothing to push, or an `or` branch that could match anything
    joiner = " AND " if condition.logical_operator == "and" else " OR "
    return "(" + joiner.join(parts) + ")", params


def _sql_test(test: _Test) -> tuple[str, list[Any]] | None:
    compare = _SQL_COMPARE.get(test.kind)
    value = "(metadata ->> %s)"
    if compare is not None:
        # CASE, not AND: PostgreSQL may evaluate AND's operands in any order, and the
        # cast would abort the query on a text that is not a number.
        return (f"CASE WHEN length({value}) <= 40 AND {value} ~ %s "
                f"THEN {value}::float8 {compare} %s ELSE {value} IS NOT NULL END",
                [test.key, test.key, _SQL_NUMBER, test.key, test.number, test.key])
    if _pushdown(test) is None:
        return None
    if test.kind is _Kind.TEXT_EQ:
        return f"{value} = %s", [test.key, test.text]
    return f"{value} = ANY(%s)", [test.key, sorted(test.items)]

