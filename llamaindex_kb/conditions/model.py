"""Dify's ``metadata_condition`` as a request states it: parsed, checked and reduced to
``Check``s, with the semantics of Dify's own knowledge base.

Dify evaluates conditions in SQL over its JSON metadata column
(``dataset_retrieval.process_metadata_filter_func``); this package mirrors that SQL
(the value forms it compares are in ``values``), and the decisions it leaves open are
these.

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

Evaluating a condition is ``compiled``'s business: ``compile_condition`` turns the
checks of a ``MetadataCondition`` into a ``Predicate``, once per request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from llamaindex_kb.conditions.values import describe, json_number, numeric_form
from llamaindex_kb.errors import InvalidFilterError
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, over_limit


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


class CheckKind(Enum):
    """What a check tests; the operator and its value's type together decide it."""

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


class Check(NamedTuple):
    """One effective condition reduced to what evaluating it needs; hashable.

    ``text`` is the operand of the text kinds, ``number`` (a numeric form) that of the
    numeric ones, ``items`` (text forms) that of ``IN``/``NOT_IN``.
    """

    key: str
    kind: CheckKind
    text: str = ""
    number: float = 0.0
    items: frozenset[str] = frozenset()


_STRING_KINDS = {
    Operator.CONTAINS: CheckKind.CONTAINS,
    Operator.NOT_CONTAINS: CheckKind.NOT_CONTAINS,
    Operator.START_WITH: CheckKind.PREFIX,
    Operator.END_WITH: CheckKind.SUFFIX,
}
_EQUALITY_KINDS = {  # (string value, number value)
    Operator.IS: (CheckKind.TEXT_EQ, CheckKind.NUM_EQ),
    Operator.EQ: (CheckKind.TEXT_EQ, CheckKind.NUM_EQ),
    Operator.IS_NOT: (CheckKind.TEXT_NE, CheckKind.NUM_NE),
    Operator.NE: (CheckKind.TEXT_NE, CheckKind.NUM_NE),
}
_ORDER_KINDS = {
    Operator.LT: CheckKind.LT,
    Operator.BEFORE: CheckKind.LT,
    Operator.GT: CheckKind.GT,
    Operator.AFTER: CheckKind.GT,
    Operator.LE: CheckKind.LE,
    Operator.GE: CheckKind.GE,
}
_MEMBERSHIP_KINDS = {Operator.IN: CheckKind.IN, Operator.NOT_IN: CheckKind.NOT_IN}


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
            raise ValueError(f"expected a non-empty string, got {describe(name)}")
        return name

    @field_validator("comparison_operator", mode="before")
    @classmethod
    def _canonical_operator(cls, spelling: Any) -> Operator:
        if isinstance(spelling, Operator):
            return spelling
        if isinstance(spelling, str) and spelling in _OPERATORS:
            return _OPERATORS[spelling]
        raise ValueError(
            f"unknown operator {describe(spelling)}; expected one of {_EXPECTED_OPERATORS}"
        )

    @field_validator("value")
    @classmethod
    def _value_fits_operator(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("comparison_operator")
        if value is not None and op is not None and op not in _VALUELESS:
            _check_of("", op, value)
        return value

    @property
    def skipped(self) -> bool:
        """True when Dify leaves this condition out: no value, and one is needed."""
        return self.value is None and self.comparison_operator not in _VALUELESS

    @property
    def check(self) -> Check | None:
        """What evaluating this condition needs; ``None`` when it is skipped."""
        op = self.comparison_operator
        if op is Operator.EMPTY:
            return Check(self.name, CheckKind.EMPTY)
        if op is Operator.NOT_EMPTY:
            return Check(self.name, CheckKind.NOT_EMPTY)
        if self.skipped:
            return None
        return _check_of(self.name, op, self.value)


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

    @property
    def checks(self) -> tuple[Check, ...]:
        """The effective conditions' checks, in order."""
        found = (condition.check for condition in self.conditions)
        return tuple(check for check in found if check is not None)


def _check_of(key: str, op: Operator, value: Any) -> Check:
    """The check for a non-null ``value``; ``ValueError`` if the value cannot fit ``op``."""
    if op in _STRING_KINDS:
        if isinstance(value, str):
            return Check(key, _STRING_KINDS[op], text=value)
        if json_number(value) is not None:
            return Check(key, _STRING_KINDS[op], text=json.dumps(value))
        raise ValueError(f"'{op}' needs a string or a number, got {describe(value)}")
    if op in _EQUALITY_KINDS:
        text_kind, number_kind = _EQUALITY_KINDS[op]
        if isinstance(value, str):
            return Check(key, text_kind, text=value)
        number = json_number(value)
        if number is not None:
            return Check(key, number_kind, number=number)
        raise ValueError(f"'{op}' needs a string or a finite number, got {describe(value)}")
    if op in _ORDER_KINDS:
        number = numeric_form(value) if isinstance(value, str) else json_number(value)
        if number is None:
            raise ValueError(
                f"'{op}' needs a number, a numeric string or an ISO-8601 time,"
                f" got {describe(value)}"
            )
        return Check(key, _ORDER_KINDS[op], number=number)
    if op in _MEMBERSHIP_KINDS:
        return Check(key, _MEMBERSHIP_KINDS[op], items=_membership_items(op, value))
    raise AssertionError(f"{op} takes no value")  # empty / not empty never get here


def _membership_items(op: Operator, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(item.strip() for item in value.split(",") if item.strip())
    if not isinstance(value, list):
        raise ValueError(
            f"'{op}' needs an array or a comma-separated string, got {describe(value)}"
        )
    items: set[str] = set()
    for index, item in enumerate(value):
        if isinstance(item, str):
            items.add(item)
        elif json_number(item) is not None:
            items.add(json.dumps(item))
        elif item is not None:  # Dify drops null items
            raise ValueError(f"item {index} must be a string or a number, got {describe(item)}")
    return frozenset(items)


def parse_metadata_condition(
    raw: object, limits: Limits = DEFAULT_LIMITS
) -> MetadataCondition | None:
    """Validate a request's ``metadata_condition``; ``None`` means "no filter"."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidFilterError(f"metadata_condition: expected an object, got {describe(raw)}")
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
            problem += f", got {describe(first['input'])}"
    else:
        problem = first["msg"]
    others = len(errors) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return f"{place}: {problem}{more}"
