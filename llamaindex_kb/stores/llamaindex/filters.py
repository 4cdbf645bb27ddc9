"""Dify's condition as LlamaIndex ``MetadataFilters``, for stores queried through LlamaIndex.

Only the condition's exact part goes, and of it only ``is`` and ``in`` on plain texts:
LlamaIndex's ``EQ`` and ``IN`` on a text mean what Dify's do, while its numeric filters
miss the numeric strings and ISO times Dify's comparisons read. Each store says which
keys (``key_ok``) and values (``value_ok``) it takes as they are; whatever is not sent
is still checked on every record, so a store sent less only returns more candidates.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from llamaindex_kb.conditions.compiled import ExactCheck, Predicate, TextEquals, TextIn, plain_key


def exact_metadata_filters(predicate: Predicate, key_ok: Callable[[str], bool],
                     value_ok: Callable[[str], bool] = lambda _: True
                     ) -> tuple[MetadataFilters | None, bool]:
    """(the part of ``predicate`` LlamaIndex expresses exactly, for the keys and values
    the store takes, or None when nothing can be sent; whether that is all of it)."""

    def one(check: ExactCheck) -> MetadataFilter | None:
        if not plain_key(check.key) or not key_ok(check.key):
            return None
        match check:
            case TextEquals(key, text) if value_ok(text):
                return MetadataFilter(key=key, value=text, operator=FilterOperator.EQ)
            case TextIn(key, texts) if all(map(value_ok, texts)):
                return MetadataFilter(key=key, value=list(texts), operator=FilterOperator.IN)
        return None

    pushed = predicate.exact_part.translate(one)
    if pushed is None:
        return None, False
    condition = FilterCondition.AND if pushed.logical_operator == "and" else FilterCondition.OR
    return MetadataFilters(filters=list(pushed.parts), condition=condition), pushed.complete
