"""Views: a ``knowledge_id`` that reads a knowledge base through its own filter.

Dify offers no way to set a metadata filter on an external knowledge base, so a view
carries one: a request to the view is answered from its knowledge base with the view's
filter AND the request's own ``metadata_condition``, the view's retrieval mode and
weight instead of the base's, and ``top_k`` capped. Views are read-only (documents are
added to their knowledge base), share the knowledge ids' namespace with knowledge
bases, and are kept in the store's records (``stores/records.py``) like keys.

Everything a view says is checked when it is made (the filter with Dify's rules,
3003), so a query never meets a view that cannot be evaluated; its knowledge base may
be dropped later, and the view then answers as a missing knowledge base (404, 2001).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llamaindex_kb.conditions.compiled import Predicate, compile_condition
from llamaindex_kb.conditions.model import MetadataCondition, parse_metadata_condition
from llamaindex_kb.config import RetrievalMode
from llamaindex_kb.contract import MAX_TOP_K, fraction_field, retrieval_mode_field
from llamaindex_kb.errors import (
    AlreadyExistsError,
    InvalidFieldError,
    InvalidFilterError,
    KnowledgeBaseNotFound,
    ReadOnlyViewError,
    shown,
)
from llamaindex_kb.ids import validate_knowledge_id
from llamaindex_kb.stores.base import KnowledgeStore
from llamaindex_kb.stores.records import Records

KIND = "view"


class View(BaseModel):
    """A view as stored and listed."""

    model_config = ConfigDict(frozen=True)

    name: str
    knowledge_base: str
    # Dify's metadata_condition format, as given (checked when the view was made).
    metadata_condition: dict[str, Any] | None = None
    retrieval_mode: RetrievalMode | None = None  # None: the base's (or the server's)
    semantic_weight: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k_max: int | None = Field(default=None, ge=1, le=MAX_TOP_K)
    created_at: float = Field(default_factory=time.time)

    @property
    def condition(self) -> MetadataCondition | None:
        return parse_metadata_condition(self.metadata_condition)

    def predicate(self) -> Predicate | None:
        condition = self.condition
        return None if condition is None else compile_condition(condition)

    def top_k(self, asked: int) -> int:
        return asked if self.top_k_max is None else min(asked, self.top_k_max)


class Views:
    """The views kept in ``records``, over the knowledge bases of ``store``."""

    def __init__(self, records: Records, store: KnowledgeStore) -> None:
        self.records = records
        self.store = store

    def get(self, name: str) -> View | None:
        record = self.records.records(KIND).get(name)
        return None if record is None else View.model_validate(record)

    def list(self) -> list[View]:
        return sorted((View.model_validate(record)
                       for record in self.records.records(KIND).values()),
                      key=lambda view: view.name)

    def create(self, name: str, knowledge_base: str, *,
               metadata_condition: object = None, retrieval_mode: object = None,
               semantic_weight: object = None, top_k_max: object = None) -> View:
        """A new view, every part checked now; the field of the first problem is named."""
        validate_knowledge_id(name, "name")
        validate_knowledge_id(knowledge_base, "knowledge_base", creating=False)
        if metadata_condition is not None:
            _check_known_fields(metadata_condition)
            if parse_metadata_condition(metadata_condition) is None:
                raise InvalidFilterError(
                    "metadata_condition: no condition has a value, so the view would filter "
                    "nothing; give each condition a value, or leave the filter out")
        view = View(name=name, knowledge_base=knowledge_base,
                    metadata_condition=metadata_condition,  # type: ignore[arg-type]
                    retrieval_mode=retrieval_mode_field(retrieval_mode, "retrieval_mode"),
                    semantic_weight=(None if semantic_weight is None
                                     else fraction_field(semantic_weight, "semantic_weight")),
                    top_k_max=_top_k_max(top_k_max))
        base = self.store.find(knowledge_base)
        if base is None:
            if self.get(knowledge_base) is not None:
                raise InvalidFieldError(
                    "knowledge_base", f"{knowledge_base!r} is a view; a view reads a "
                    "knowledge base (give it the filter of both)")
            raise KnowledgeBaseNotFound.missing(knowledge_base)
        if view.retrieval_mode not in (None, "keyword") and base.manifest.embedding is None:
            raise InvalidFieldError(
                "retrieval_mode", f"knowledge base {knowledge_base!r} was built for keyword "
                f"search only; a {view.retrieval_mode} view needs it rebuilt with an "
                "embedding model")
        if not self.records.add_record(KIND, name, view.model_dump(mode="json")):
            raise AlreadyExistsError(
                f"a view named {name!r} exists: delete it first, or choose another name")
        # Checked once the view is recorded, so a base made meanwhile is seen too (an
        # upload creating a base checks views again just before it publishes).
        if self.store.find(name) is not None:
            self.records.remove_record(KIND, name)
            raise AlreadyExistsError(
                f"a knowledge base is named {name!r}; a view needs a knowledge id of its own")
        return view

    def delete(self, name: str) -> None:
        if not self.records.remove_record(KIND, name):
            raise KnowledgeBaseNotFound(f"no view is named {shown(name)}")

    def check_writable(self, knowledge_id: str) -> None:
        """Refuse a write to a view's knowledge id (documents go to its knowledge base);
        checked before a new base could take a view's name."""
        view = self.get(knowledge_id)
        if view is not None:
            # Not naming the base: a key limited to the view must not learn it.
            raise ReadOnlyViewError(
                f"{knowledge_id!r} is a view, and views are read-only: add or delete "
                "documents in the knowledge base it reads (GET /views names it)")


def _check_known_fields(raw: object) -> None:
    """A view's filter is kept and reused for every query: refuse a misspelt field
    ("logical_operater") that Dify's lenient format would silently ignore."""
    if not isinstance(raw, dict):
        return  # parse_metadata_condition says what is wrong with it
    extra = sorted(set(raw) - {"logical_operator", "conditions"})
    if extra:
        raise InvalidFilterError(f"metadata_condition.{extra[0]}: is not a known field; "
                                 "expected logical_operator, conditions")
    conditions = raw.get("conditions")
    for index, condition in enumerate(conditions if isinstance(conditions, list) else []):
        if not isinstance(condition, dict):
            continue  # parse_metadata_condition says what is wrong with it
        extra = sorted(set(condition) - {"name", "comparison_operator", "value"})
        if extra:
            raise InvalidFilterError(
                f"metadata_condition.conditions[{index}].{extra[0]}: is not a known field; "
                "expected name, comparison_operator, value")


def _top_k_max(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise InvalidFieldError("top_k_max",
                                f"must be an integer from 1 to {MAX_TOP_K} or null; got "
                                f"{shown(value)}")
    return value
