"""Indexes a user built with LlamaIndex itself, served read-only as knowledge bases.

Every kind of index (a persisted folder, LlamaIndex's PostgreSQL or Qdrant tables, a
user's own factory) is an ``IndexSource``: it lists its indexes, says cheaply whether
one changed, reads one's nodes, and may run LlamaIndex's own vector query. This module
does the rest the same way for all of them: one open index per id, reread when the
user's code changed it; the query embedded by the configured model and its dimension
checked; Dify's condition re-checked on every record; scores on our scale
(``scoring.py``: a cosine similarity, negatives as 0).

Vector is the default mode. Keyword and hybrid run in memory (``engine.NodeIndex``)
over the node texts, built on first use and kept until the index changes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.errors import (
    ConfigurationError,
    EmbeddingMismatchError,
    InvalidFieldError,
    ReadOnlyStoreError,
)
from llamaindex_kb.models.spec import EmbeddingSpec
from llamaindex_kb.scoring import clip, lowest_returned
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    FindingStore,
    KBManifest,
    Published,
    QueryPlan,
    effective_mode,
    embed_query,
    fused_weight,
)
from llamaindex_kb.stores.llamaindex.engine import NodeIndex, document_id_of, record_metadata

# How often a served index is asked whether the user's code changed it: a request
# within this many seconds of the last check uses what is open.
RECHECK_S = 1.0
# Candidates asked of LlamaIndex's own vector query per record wanted, when a
# condition may reject some; grown by this factor until filled or exhausted.
FETCH_FACTOR = 4
READ_ONLY = ("this index is managed by your own LlamaIndex code: add, replace or delete "
             "its nodes there (they show up here without a restart)")


@dataclass(frozen=True)
class OwnRetrieval:
    """An index searched only its own way (a user's retriever, ``factory.py``): no nodes
    to list or to score here. ``search(query, top_k)`` answers best first; ``sized``
    says whether it honours ``top_k``, so that asking for more may give more."""

    search: Callable[[str, int], list[NodeWithScore]]
    sized: bool


@dataclass(frozen=True)
class LoadedIndex:
    """One index as read: its nodes, and row ``i``'s embedding when the source has them
    at hand (a persisted folder always does; a database only when asked to keep them).
    An index with ``own`` retrieval has no nodes: every query goes to ``own``."""

    nodes: list[BaseNode]
    embeddings: np.ndarray | None
    dimension: int | None  # the index's vector dimension, when known
    own: OwnRetrieval | None = None


class IndexSource(Protocol):
    """Where a user's LlamaIndex indexes are."""

    shown: str  # the store URL without secrets, for messages and listings
    searches_in_process: bool

    def index_ids(self) -> list[str]: ...

    def version(self, index_id: str) -> Hashable | None:
        """A cheap token that changes whenever the index does; None if there is none."""
        ...

    def load(self, index_id: str) -> LoadedIndex: ...

    def vector_search(self, index_id: str, query_vector: np.ndarray, top_k: int,
                      predicate: Predicate | None) -> list[NodeWithScore] | None:
        """LlamaIndex's own vector query, best first with its similarity scores, the
        exactly expressible part of ``predicate`` pushed down (the rest is re-checked
        here); None when the source scores in memory instead (``NodeIndex``)."""
        ...


class LlamaIndexKnowledgeBase:
    """One index of a source, as read at one version."""

    def __init__(self, source: IndexSource, index_id: str, loaded: LoadedIndex) -> None:
        self.source = source
        self.knowledge_id = index_id
        self.index = NodeIndex(loaded.nodes, loaded.embeddings)
        self.dimension = loaded.dimension or self.index.dimension
        self.own = loaded.own

    def document(self, document_id: str) -> DocumentInfo | None:
        return self.documents.get(document_id)

    @cached_property
    def documents(self) -> dict[str, DocumentInfo]:
        """The index's source documents (each node's ``ref_doc_id``), in order of first node."""
        chunks: Counter[str] = Counter()
        first: dict[str, BaseNode] = {}
        for node in self.index.nodes:
            document_id = document_id_of(node)
            chunks[document_id] += 1
            first.setdefault(document_id, node)
        return {doc_id: _document_info(doc_id, node, chunks[doc_id])
                for doc_id, node in first.items()}

    @cached_property
    def manifest(self) -> KBManifest:
        embedding = (None if self.dimension is None else
                     EmbeddingSpec(kind="llamaindex", model="index", dimension=self.dimension))
        if self.own is not None:  # a retriever cannot count what it searches
            return KBManifest(knowledge_id=self.knowledge_id, embedding=embedding,
                              retrieval_mode="vector", documents=None, chunks=None)
        return KBManifest(knowledge_id=self.knowledge_id, embedding=embedding,
                          retrieval_mode="vector", documents=len(self.documents),
                          chunks=len(self.index))

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]:
        if not plan.query.strip() or plan.top_k <= 0:
            return []
        if self.own is not None:
            return self._own_search(plan, self.own)
        weight = fused_weight(plan, self.manifest, embed_model)
        query_vector = None if weight == 0.0 else self._embed(plan.query, embed_model)
        if weight == 1.0 and query_vector is not None:
            vector = query_vector
            found = self.source.vector_search(self.knowledge_id, vector,
                                              plan.top_k, plan.predicate)
            if found is not None:
                return self._rechecked(plan, found, lambda want: self.source.vector_search(
                    self.knowledge_id, vector, want, plan.predicate) or [])
        if weight > 0.0 and self.index.dimension is None:
            raise InvalidFieldError("retrieval_mode", (
                f"knowledge base {self.knowledge_id!r} has no embeddings this server can "
                "read, so it can be searched by keyword only: use retrieval mode 'keyword'"))
        return self.index.retrieve(plan.query, query_vector, weight, plan.top_k,
                                   plan.score_threshold, plan.predicate)

    def _own_search(self, plan: QueryPlan, own: OwnRetrieval) -> list[NodeWithScore]:
        """The user's retriever, which embeds the query itself: vector mode only, since
        keyword and hybrid need node texts this index does not give."""
        mode, _ = effective_mode(plan, self.manifest)
        if mode != "vector":
            raise ConfigurationError(
                f"knowledge base {self.knowledge_id!r} is searched by your own LlamaIndex "
                f"code only ({self.source.shown}), which gives no node texts for retrieval "
                f"mode {mode!r}: use retrieval mode 'vector'")
        found = own.search(plan.query, plan.top_k)
        return self._rechecked(plan, found, (lambda want: own.search(plan.query, want))
                               if own.sized else None)

    def _rechecked(self, plan: QueryPlan, found: list[NodeWithScore],
                   fetch: Callable[[int], list[NodeWithScore]] | None) -> list[NodeWithScore]:
        """LlamaIndex's answer, re-checked: asked for more (``fetch``, when the search
        honours a bigger ``top_k``) while Dify's condition rejected some and the index
        had more to give."""
        want = plan.top_k
        floor = lowest_returned(plan.score_threshold)
        while True:
            passing = [NodeWithScore(node=hit.node, score=clip(hit.score)) for hit in found
                       if plan.predicate is None
                       or plan.predicate.matches(record_metadata(hit.node))]
            passing = [hit for hit in passing if (hit.score or 0.0) >= floor]
            exhausted = fetch is None or len(found) < want
            # Scores only fall down the list: once one is under the floor, none after passes.
            below = bool(found) and clip(found[-1].score) < floor
            if len(passing) >= plan.top_k or exhausted or below:
                return passing[: plan.top_k]
            want *= FETCH_FACTOR
            found = fetch(want)

    def _embed(self, query: str, embed_model: BaseEmbedding | None) -> np.ndarray:
        if embed_model is None:
            raise EmbeddingMismatchError(
                f"knowledge base {self.knowledge_id!r} is searched by vector, but no "
                "embedding model is configured: configure the model that built the index")
        vector = np.asarray(embed_query(embed_model, query), dtype=np.float64)
        if self.dimension is not None and vector.shape[-1] != self.dimension:
            spec = getattr(embed_model, "spec", None)
            using = f" ({spec.id})" if spec is not None else ""
            raise EmbeddingMismatchError(
                f"knowledge base {self.knowledge_id!r} holds {self.dimension}-dimensional "
                f"vectors, but the configured embedding model{using} makes "
                f"{vector.shape[-1]}-dimensional ones: configure the model that built the index")
        return vector


class LlamaIndexStore(FindingStore):
    """A read-only store over one ``IndexSource``; safe to share between threads."""

    read_only = READ_ONLY

    def __init__(self, source: IndexSource) -> None:
        self.source = source
        self.url = source.shown
        self.searches_in_process = source.searches_in_process
        # index id -> (version token, when last checked, open knowledge base)
        self._open: dict[str, tuple[Hashable, float, LlamaIndexKnowledgeBase]] = {}
        self._lock = threading.Lock()

    def find(self, knowledge_id: str) -> LlamaIndexKnowledgeBase | None:
        cached = self._open.get(knowledge_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < RECHECK_S:
            return cached[2]
        version = self.source.version(knowledge_id)
        if version is None:
            self._open.pop(knowledge_id, None)
            return None
        if cached is not None and cached[0] == version:
            self._open[knowledge_id] = (version, now, cached[2])
            return cached[2]
        with self._lock:  # one reader loads a changed index; the others wait for it
            cached = self._open.get(knowledge_id)
            if cached is None or cached[0] != version:
                base = LlamaIndexKnowledgeBase(self.source, knowledge_id,
                                               self.source.load(knowledge_id))
                cached = (version, time.monotonic(), base)
                self._open[knowledge_id] = cached
        return cached[2]

    def manifests(self) -> list[KBManifest]:
        found = (self.find(index_id) for index_id in self.source.index_ids())
        return sorted((base.manifest for base in found if base is not None),
                      key=lambda manifest: manifest.knowledge_id)

    def publish(self, knowledge_id: str, change: Change) -> Published:
        raise ReadOnlyStoreError.refusing(knowledge_id, READ_ONLY)

    def drop(self, knowledge_id: str) -> None:
        raise ReadOnlyStoreError.refusing(knowledge_id, READ_ONLY)


def _document_info(document_id: str, node: BaseNode, chunks: int) -> DocumentInfo:
    metadata = node.metadata
    title = metadata.get("title") or metadata.get("file_name") or document_id
    return DocumentInfo(document_id=document_id, title=str(title),
                        file_name=_text(metadata.get("file_name")),
                        file_path=_text(metadata.get("file_path")),
                        file_type=_text(metadata.get("file_type")), chunks=chunks)


def _text(value: object) -> str | None:
    return None if value is None else str(value)
