"""Dify metadata filters: parsing, the reference semantics, the columnar table, and the
exact part a store may push down (the stores' own translations of it are tested against
real PostgreSQL and Qdrant in test_store_contract.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaindex_kb.conditions.compiled import (
    ExactCheck,
    ExactPart,
    NumberCompare,
    Predicate,
    Pushdown,
    TextEquals,
    TextIn,
    compile_condition,
)
from llamaindex_kb.conditions.model import (
    MetadataCondition,
    Operator,
    parse_metadata_condition,
)
from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.errors import InvalidFilterError

JAN_1_2024 = 1704067200  # 2024-01-01T00:00:00Z in epoch seconds

# Text forms: None, None, "", "[]", "5", "5.0", "5", "abc", "Abc", '["a", "b"]', ...
RECORDS: list[dict[str, Any]] = [
    {},  # 0: key missing
    {"k": None},  # 1
    {"k": ""},  # 2
    {"k": []},  # 3
    {"k": 5},  # 4
    {"k": 5.0},  # 5
    {"k": "5"},  # 6
    {"k": "abc"},  # 7
    {"k": "Abc"},  # 8
    {"k": ["a", "b"]},  # 9
    {"k": "2024-01-01"},  # 10: JAN_1_2024
    {"k": "2024-01-01T00:00:00+01:00"},  # 11: JAN_1_2024 - 3600
    {"k": JAN_1_2024},  # 12
    {"k": True},  # 13
    {"k": "x, y"},  # 14
]
ALL = set(range(len(RECORDS)))
PRESENT = ALL - {0, 1}


def condition(spelling: str, value: Any = None, name: Any = "k") -> MetadataCondition:
    raw = {"conditions": [{"name": name, "comparison_operator": spelling, "value": value}]}
    return MetadataCondition.model_validate(raw)


def matching(cond: MetadataCondition, records: list[dict[str, Any]]) -> set[int]:
    """The records the reference evaluator accepts, by index."""
    predicate = compile_condition(cond)
    return {i for i, record in enumerate(records) if predicate.matches(record)}


def mask(cond: MetadataCondition, table: MetadataTable) -> np.ndarray:
    return compile_condition(cond).mask(table)


OPERATOR_CASES = [
    ("contains", "a", {7, 9}),
    ("contains", "A", {8}),
    ("contains", 5, {4, 5, 6}),
    ("not contains", "a", PRESENT - {7, 9}),
    ("start with", "2024", {10, 11}),
    ("start with", "[", {3, 9}),
    ("end with", "c", {7, 8}),
    ("is", "5", {4, 6}),
    ("is", "abc", {7}),
    ("is", "true", {13}),
    ("is not", "abc", PRESENT - {7}),
    ("empty", None, {0, 1, 2, 3}),
    ("empty", "ignored", {0, 1, 2, 3}),
    ("not empty", None, PRESENT - {2, 3}),
    ("in", ["5", "abc"], {4, 6, 7}),
    ("in", " abc , x,", {7}),
    ("in", [5.0, None], {5}),
    ("in", [], set()),
    ("not in", ["abc"], PRESENT - {7}),
    ("not in", "", ALL),
    ("=", 5, {4, 5, 6}),
    ("=", "2024-01-01", {10}),
    ("≠", 5, {10, 11, 12}),
    ("!=", "5", PRESENT - {4, 6}),
    (">", 5, {10, 11, 12}),
    ("<", 6, {4, 5, 6}),
    ("≥", "2024-01-01T00:00:00", {10, 12}),
    (">=", JAN_1_2024, {10, 12}),
    ("≤", " 5 ", {4, 5, 6}),
    ("<=", JAN_1_2024 - 3600, {4, 5, 6, 11}),
    ("before", "2024-01-01", {4, 5, 6, 11}),
    ("after", "2023-12-31T23:30:00Z", {10, 12}),
]


def test_every_operator_spelling_is_covered() -> None:
    covered = {spelling for spelling, _, _ in OPERATOR_CASES}
    assert covered == {op.value for op in Operator} | {"!=", ">=", "<="}


@pytest.mark.parametrize(("spelling", "value", "expected"), OPERATOR_CASES)
def test_operator_matches_dify_semantics(spelling: str, value: Any, expected: set[int]) -> None:
    cond = condition(spelling, value)
    assert matching(cond, RECORDS) == expected
    assert set(np.flatnonzero(mask(cond, MetadataTable(RECORDS)))) == expected


def test_aliases_become_canonical_operators() -> None:
    spellings = {"!=": Operator.NE, ">=": Operator.GE, "<=": Operator.LE, "≠": Operator.NE}
    for spelling, canonical in spellings.items():
        assert condition(spelling, 1).conditions[0].comparison_operator is canonical


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {},
        {"logical_operator": "and", "conditions": []},
        {"logical_operator": None, "conditions": None},
        {"conditions": [{"name": "k", "comparison_operator": "is", "value": None}]},
        {"conditions": [{"name": "k", "comparison_operator": "contains"}]},
    ],
)
def test_absent_empty_or_fully_skipped_condition_means_no_filter(raw: Any) -> None:
    assert parse_metadata_condition(raw) is None


def test_name_may_be_a_one_element_list() -> None:
    parsed = parse_metadata_condition(
        {"conditions": [{"name": ["category"], "comparison_operator": "is", "value": "a"}]}
    )
    assert parsed is not None
    assert parsed.conditions[0].name == "category"


def test_null_logical_operator_means_and() -> None:
    parsed = parse_metadata_condition(
        {
            "logical_operator": None,
            "conditions": [{"name": "k", "comparison_operator": "not empty"}],
        }
    )
    assert parsed is not None
    assert parsed.logical_operator == "and"


def test_condition_without_value_is_skipped_for_and_and_or() -> None:
    for logical_operator in ("and", "or"):
        parsed = parse_metadata_condition(
            {
                "logical_operator": logical_operator,
                "conditions": [
                    {"name": "k", "comparison_operator": "is"},
                    {"name": "k", "comparison_operator": "is", "value": "abc"},
                ],
            }
        )
        assert parsed is not None
        assert [c.value for c in parsed.effective_conditions] == ["abc"]
        assert matching(parsed, RECORDS) == {7}


def test_only_skipped_conditions_match_everything() -> None:
    for logical_operator in ("and", "or"):
        cond = MetadataCondition.model_validate(
            {
                "logical_operator": logical_operator,
                "conditions": [{"name": "k", "comparison_operator": "<", "value": None}],
            }
        )
        assert matching(cond, RECORDS) == ALL
        assert mask(cond, MetadataTable(RECORDS)).all()


def test_or_matches_either_condition() -> None:
    cond = MetadataCondition.model_validate(
        {
            "logical_operator": "or",
            "conditions": [
                {"name": "k", "comparison_operator": "is", "value": "abc"},
                {"name": "k", "comparison_operator": "empty"},
            ],
        }
    )
    assert matching(cond, RECORDS) == {0, 1, 2, 3, 7}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {
                "conditions": [
                    {"name": "k", "comparison_operator": "is", "value": "a"},
                    {"name": "k", "comparison_operator": "is", "value": "a"},
                    {"name": "k", "comparison_operator": "like", "value": "a"},
                ]
            },
            "metadata_condition.conditions[2].comparison_operator: unknown operator 'like';"
            " expected one of 'contains',",
        ),
        ("and", "metadata_condition: expected an object, got 'and'"),
        ({"conditions": {"name": "k"}}, "metadata_condition.conditions: expected an array"),
        ({"conditions": ["k"]}, "metadata_condition.conditions[0]: expected an object"),
        ({"logical_operator": "xor"}, "metadata_condition.logical_operator: expected 'and', 'or'"),
        (
            {"conditions": [{"comparison_operator": "is", "value": "a"}]},
            "metadata_condition.conditions[0].name: required",
        ),
        (
            {"conditions": [{"name": ["a", "b"], "comparison_operator": "is", "value": "a"}]},
            "metadata_condition.conditions[0].name: expected a string or a one-element list",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": None, "value": "a"}]},
            "metadata_condition.conditions[0].comparison_operator: unknown operator null",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": "in", "value": 5}]},
            "metadata_condition.conditions[0].value: 'in' needs an array or a comma-separated",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": "not in", "value": [["a"]]}]},
            "metadata_condition.conditions[0].value: item 0 must be a string or a number",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": ">", "value": "soon"}]},
            "metadata_condition.conditions[0].value: '>' needs a number, a numeric string or",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": "=", "value": True}]},
            "metadata_condition.conditions[0].value: '=' needs a string or a finite number",
        ),
        (
            {"conditions": [{"name": "k", "comparison_operator": "contains", "value": {}}]},
            "metadata_condition.conditions[0].value: 'contains' needs a string or a number",
        ),
    ],
)
def test_malformed_condition_is_an_invalid_filter_error_naming_the_place(
    raw: Any, message: str
) -> None:
    with pytest.raises(InvalidFilterError) as caught:
        parse_metadata_condition(raw)
    assert caught.value.message.startswith(message), caught.value.message
    assert caught.value.status == 400


def test_table_answers_keys_no_record_has() -> None:
    table = MetadataTable(RECORDS)
    assert not mask(condition("is", "abc", name="other"), table).any()
    assert mask(condition("empty", name="other"), table).all()
    assert mask(condition("not in", [], name="other"), table).all()


def test_table_masks_are_cached_read_only_and_refreshed_by_extend() -> None:
    table = MetadataTable(RECORDS[:8])
    cond = condition("is", "abc")
    first = mask(cond, table)
    assert mask(cond, table) is first  # another request's predicate, the same condition
    assert not first.flags.writeable
    table.extend(RECORDS[8:])
    assert len(table) == len(RECORDS)
    assert list(np.flatnonzero(mask(cond, table))) == [7]
    table.extend([{"k": "abc", "new": 1}])
    assert list(np.flatnonzero(mask(cond, table))) == [7, len(RECORDS)]
    assert list(np.flatnonzero(mask(condition("=", 1, name="new"), table))) == [len(RECORDS)]


def test_table_survives_save_and_load(tmp_path: Path) -> None:
    table = MetadataTable(RECORDS)
    table.save(tmp_path / "metadata.json")
    loaded = MetadataTable.load(tmp_path / "metadata.json")
    assert loaded.to_columns() == table.to_columns()
    for spelling, value, expected in OPERATOR_CASES:
        assert set(np.flatnonzero(mask(condition(spelling, value), loaded))) == expected


def test_from_columns_rejects_ragged_columns() -> None:
    with pytest.raises(ValueError, match="column 'k' has 1 values for 2 rows"):
        MetadataTable.from_columns(2, {"k": [1]})


def _checks(*conditions: dict[str, Any], logical_operator: str = "and") -> ExactPart:
    raw = {"logical_operator": logical_operator, "conditions": list(conditions)}
    return compile_condition(MetadataCondition.model_validate(raw)).exact_part


def _is(name: str, value: Any, spelling: str = "is") -> dict[str, Any]:
    return {"name": name, "comparison_operator": spelling, "value": value}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_is("k", "abc"), TextEquals("k", "abc")),
        (_is("k", "abc", "="), TextEquals("k", "abc")),
        (_is("k", "b, a", "in"), TextIn("k", ("a", "b"))),
        # Keys are the stores' business: PostgreSQL takes any, Qdrant reads dots as paths.
        (_is("a.b", "x"), TextEquals("a.b", "x")),
        # Numeric forms include numeric strings and ISO times: only a store that can
        # guard a cast can take these, but they are stated exactly.
        (_is("k", 5, "="), NumberCompare("k", "=", 5.0)),
        (_is("k", 5, "!="), NumberCompare("k", "≠", 5.0)),
        (_is("k", 5, ">"), NumberCompare("k", ">", 5.0)),
        (_is("k", " 5 ", "≤"), NumberCompare("k", "≤", 5.0)),
        (_is("k", "2024-01-01", "before"), NumberCompare("k", "<", JAN_1_2024)),
        (_is("k", "2024-01-01", "after"), NumberCompare("k", ">", JAN_1_2024)),
        # Text equality also matches numbers, booleans and lists by their JSON text.
        (_is("k", "5"), None),
        (_is("k", "true"), None),
        (_is("k", "[]"), None),
        (_is("k", ["a", 5], "in"), None),
        # SQL NULL: a missing key never matches these, stores' NE / NIN match it.
        (_is("k", "a", "is not"), None),
        (_is("k", ["a"], "not in"), None),
        (_is("k", "a", "contains"), None),
        (_is("k", None, "empty"), None),
        (_is("k", [], "in"), None),
        # Unsafe for stores that build SQL text; NUL cannot reach PostgreSQL.
        (_is("k", "it's"), None),
        (_is("k", "a\x00"), None),
    ],
)
def test_exact_part_states_only_what_a_store_can_test_exactly(
    raw: dict[str, Any], expected: ExactCheck | None
) -> None:
    exact = _checks(raw)
    assert exact.checks == (() if expected is None else (expected,))
    assert exact.total == 1


def test_exact_part_keeps_the_logical_operator_and_counts_every_effective_check() -> None:
    conditions = (_is("k", "abc"), _is("n", 1, ">"), _is("k", None), _is("k", "a", "contains"))
    for logical_operator in ("and", "or"):
        exact = _checks(*conditions, logical_operator=logical_operator)
        assert exact == ExactPart(
            logical_operator, (TextEquals("k", "abc"), NumberCompare("n", ">", 1.0)), 3)


def _text_only(check: ExactCheck) -> str | None:
    """A store that can express only text equality."""
    return f"{check.key} = {check.text}" if isinstance(check, TextEquals) else None


def test_translate_pushes_what_a_store_expresses_of_an_and_and_all_or_nothing_of_an_or(
) -> None:
    both = (_is("k", "abc"), _is("j", "x"))
    mixed = (_is("k", "abc"), _is("n", 1, ">"))
    assert _checks(*both).translate(_text_only) == Pushdown("and", ("k = abc", "j = x"), True)
    assert _checks(*mixed).translate(_text_only) == Pushdown("and", ("k = abc",), False)
    assert _checks(*both, logical_operator="or").translate(_text_only) == Pushdown(
        "or", ("k = abc", "j = x"), True)
    assert _checks(*mixed, logical_operator="or").translate(_text_only) is None
    assert _checks(_is("n", 1, ">")).translate(_text_only) is None
    assert _checks(_is("k", "a", "contains")).translate(_text_only) is None


# --- generated records and conditions -------------------------------------------

# A dotted key is a path to Qdrant, a plain key to PostgreSQL; no store holds a NUL key.
KEYS = ["a", "b", "a.b"]
CONDITION_KEYS = [*KEYS, "absent", "a\x00"]
SHARED_VALUES: list[Any] = [
    0, 1, 5, -3, 5.0, 2.5, JAN_1_2024, "5", "5.0", " 5 ", "1e3", "abc", "a", "Abc", "",
    "x, y", "true", "2024-01-01", "2024-01-01T00:00:00+01:00", "2024-01-01T00:00:00",
    [], ["a", "b"], [1], True, False, {"a": 1},
    "é\x00", "1e400", "2024-01-01T10:00:00.5Z", "2024-13-01", 10**30, "[]", "-0",
]  # fmt: skip
metadata_values = st.one_of(
    st.sampled_from(SHARED_VALUES),
    st.one_of(
        st.integers(-10, 10),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(alphabet="ab5 ,.-", max_size=4),
        st.lists(st.sampled_from(["a", "b", 1, 5.0]), max_size=2),
    ),
)
WORDS = ["abc", "a", "Abc", "b", "x, y"]  # texts only a JSON string has
TEXTS = st.sampled_from(
    [v for v in SHARED_VALUES if isinstance(v, str)] + ["b", "[", '"', "[]", "false"]
)
NUMBERS = st.one_of(
    st.integers(-10, 10),
    st.sampled_from([5.0, 2.5, JAN_1_2024, JAN_1_2024 - 3600]),
    st.floats(allow_nan=False, allow_infinity=False),
)
TIMES = st.sampled_from(["5", " 5 ", "2024-01-01", "2023-12-31T23:30:00Z", "1e3"])
STRING_OPERATORS = ("contains", "not contains", "start with", "end with")
EQUALITY_OPERATORS = ("is", "is not", "=", "≠", "!=")
ORDER_OPERATORS = (">", "<", "≥", "≤", ">=", "<=", "before", "after")
MEMBERSHIP_OPERATORS = ("in", "not in")
ALL_SPELLINGS = (
    *STRING_OPERATORS, *EQUALITY_OPERATORS, *ORDER_OPERATORS, *MEMBERSHIP_OPERATORS,
    "empty", "not empty",
)  # fmt: skip


def value_strategy(
    spelling: str, texts: st.SearchStrategy[str], numbers: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Values that fit the operator, drawn from ``texts`` and ``numbers`` where they can be."""
    if spelling in STRING_OPERATORS:
        return st.one_of(texts, st.integers(0, 6))
    if spelling in EQUALITY_OPERATORS:
        return st.one_of(texts, numbers)
    if spelling in ORDER_OPERATORS:
        return st.one_of(numbers, TIMES)
    if spelling in MEMBERSHIP_OPERATORS:
        return st.one_of(
            st.lists(st.one_of(texts, numbers, st.none()), max_size=3),
            st.sampled_from(["a, b", "5,abc", "", " , ", "x, y"]),
        )
    return texts  # empty / not empty ignore it


@st.composite
def records_and_condition(
    draw: st.DrawFn, pushable: bool = False
) -> tuple[list[dict[str, Any]], MetadataCondition]:
    """Records over a small universe of values, and a condition often naming those values.

    With ``pushable``, three conditions in four take the shapes whose exact part every
    store can push (``is`` / ``=`` / ``in`` with strings, mostly words), the others every
    shape.
    """
    universe = draw(st.lists(metadata_values, min_size=1, max_size=6))
    records = draw(
        st.lists(
            st.dictionaries(st.sampled_from(KEYS), st.sampled_from(universe), max_size=2),
            min_size=2,
            max_size=25,
        )
    )
    # The universe's text forms ("5" for 5, "true" for True) are the interesting strings.
    own_texts = sorted({v if isinstance(v, str) else json.dumps(v) for v in universe})
    texts = st.one_of(TEXTS, st.sampled_from(own_texts))
    own_words = [text for text in own_texts if text[:1].isalpha()]
    own_numbers = [
        v
        for v in universe
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    numbers = st.one_of(NUMBERS, st.sampled_from(own_numbers)) if own_numbers else NUMBERS
    items = []
    for _ in range(draw(st.integers(1, 3))):
        if pushable and draw(st.integers(0, 3)) > 0:
            words = st.one_of(texts, st.sampled_from(own_words or WORDS), st.sampled_from(WORDS))
            spelling = draw(st.sampled_from(["is", "=", "in"]))
            values = st.lists(words, max_size=3) if spelling == "in" else words
        else:
            spelling = draw(st.sampled_from(ALL_SPELLINGS))
            values = value_strategy(spelling, texts, numbers)
        skipped = draw(st.integers(0, 5)) == 0
        items.append(
            {
                "name": draw(st.sampled_from(CONDITION_KEYS)),
                "comparison_operator": spelling,
                "value": None if skipped else draw(values),
            }
        )
    logical_operator = draw(st.sampled_from(["and", "or", None]))
    cond = MetadataCondition.model_validate(
        {"logical_operator": logical_operator, "conditions": items}
    )
    return records, cond


@settings(max_examples=200, deadline=None)
@given(case=records_and_condition())
def test_table_mask_equals_reference_evaluator(
    case: tuple[list[dict[str, Any]], MetadataCondition],
) -> None:
    records, cond = case
    predicate = compile_condition(cond)
    expected = [predicate.matches(record) for record in records]
    table = MetadataTable(records)
    assert predicate.mask(table).tolist() == expected
    assert predicate.mask(table).tolist() == expected  # from the cache

    grown = MetadataTable(records[: len(records) // 2])
    predicate.mask(grown)
    grown.extend(records[len(records) // 2 :])
    assert predicate.mask(grown).tolist() == expected

    rows, columns = table.to_columns()
    reloaded = MetadataTable.from_columns(rows, json.loads(json.dumps(columns)))
    assert predicate.mask(reloaded).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(first=records_and_condition(pushable=True), second=records_and_condition())
def test_two_conditions_combined_match_what_both_match(
    first: tuple[list[dict[str, Any]], MetadataCondition],
    second: tuple[list[dict[str, Any]], MetadataCondition],
) -> None:
    """A view's filter AND a request's own: row by row, over a table, and pushed down
    (a pre-filter may let more through, never less)."""
    records = first[0] + second[0]
    one, other = compile_condition(first[1]), compile_condition(second[1])
    both = Predicate.all_of(one, other)
    assert both is not None
    expected = [one.matches(r) and other.matches(r) for r in records]
    assert [both.matches(r) for r in records] == expected
    assert both.mask(MetadataTable(records)).tolist() == expected
    # Pushed down, both must hold, so only checks each side requires may join: all of
    # an `and` side's exact checks, none of an `or` side's (of two or more checks).
    required = [p.exact_part.checks for p in (one, other)
                if p.exact_part.logical_operator == "and" or p.exact_part.total <= 1]
    assert both.exact_part.logical_operator == "and"
    assert both.exact_part.checks == tuple(check for checks in required for check in checks)
    assert both.exact_part.total == one.exact_part.total + other.exact_part.total
    assert Predicate.all_of(None, one) is one and Predicate.all_of(None, None) is None
