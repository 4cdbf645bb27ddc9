"""One knowledge base version, opened read-only: the indices a query runs on.

Row ``i`` means the same chunk in every index (vectors, keyword, metadata table,
node ids), so a filter mask and both score vectors combine with plain numpy.

Scores are absolute, in [0, 1], comparable across queries:

* vector: cosine similarity of query and chunk embeddings, negatives clipped to 0;
* keyword: BM25 divided by the query's attainable maximum (``keyword.py``);
* hybrid: ``w · vector + (1 − w) · keyword`` with ``w`` the semantic weight
  (Dify's "weight settings", default 0.7 / 0.3).

A chunk with score 0 (no relation at all) is never returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.storage.docstore.keyval_docstore import KVDocumentStore
from llama_index.core.storage.docstore.utils import json_to_doc
from pydantic import BaseModel, ConfigDict, Field

from .embeddings import EmbeddingSpec
from .errors import (
    OUT_OF_RESOURCES_MESSAGE,
    ConfigurationError,
    EmbeddingMismatchError,
    InvalidFieldError,
    KBError,
    KnowledgeBaseDamaged,
    KnowledgeBaseNotFound,
    StoreUnavailableError,
    out_of_resources,
)
from .filters import MetadataCondition, MetadataTable
from .keyword import KeywordIndex
from .kvstore import SQLiteKVStore
from .layout import MANIFEST_FILE, hold_version, read_array
from .vector_store import NumpyVectorStore, top_rows

# A score of 0 means "no relation": such chunks are never returned.
TINY_SCORE = float(np.finfo(np.float32).tiny)

RetrievalMode = Literal["vector", "keyword", "hybrid"]

DOCSTORE_FILE = "docstore.sqlite"
KEYWORD_DIR = "keyword"
VECTOR_DIR = "vectors"
METADATA_FILE = "metadata.json"
NODE_IDS_FILE = "node_ids.npy"
DOCUMENTS_FILE = "documents.json"
DOCUMENT_IDS_FILE = "document_ids.npy"
FORMAT_VERSION = 2


class KBManifest(BaseModel):
    """How a knowledge base version was built; written once, next to its indices."""

    model_config = ConfigDict(frozen=True)

    format: int = FORMAT_VERSION
    knowledge_id: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    embedding: EmbeddingSpec | None = None
    retrieval_mode: RetrievalMode = "hybrid"
    semantic_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    chunking: dict[str, Any] = Field(default_factory=dict)
    documents: int = 0
    chunks: int = 0

    def write(self, version_dir: Path) -> None:
        (version_dir / MANIFEST_FILE).write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, version_dir: Path) -> KBManifest:
        return cls.model_validate(json.loads((version_dir / MANIFEST_FILE).read_text()))


class DocumentInfo(BaseModel):
    """What a knowledge base records about one document (listing, re-ingest, delete)."""

    document_id: str
    title: str
    file_name: str | None = None
    file_path: str | None = None
    file_type: str | None = None
    file_size: int | None = None
    last_modified: int | None = None
    content_hash: str = ""
    source_root: str | None = None
    chunks: int = 0
    parent_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


def write_documents(version_dir: Path, documents: dict[str, DocumentInfo]) -> None:
    payload = {doc_id: info.model_dump() for doc_id, info in documents.items()}
    (version_dir / DOCUMENTS_FILE).write_text(json.dumps(payload, ensure_ascii=False))


class QueryPlan(BaseModel):
    """What one retrieval asks of a knowledge base."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    query: str
    top_k: int
    score_threshold: float = 0.0
    condition: MetadataCondition | None = None
    mode: RetrievalMode | None = None
    semantic_weight: float | None = None


class KnowledgeBase:
    """A read-only view of one version, safe for concurrent queries.

    Its arrays are read into memory, not mapped (``layout.read_array`` says why); only
    the docstore is read per query. It holds its version (``layout.hold_version``)
    until garbage-collected, so publishes meanwhile never remove its files.
    Damaged files answer ``KnowledgeBaseDamaged`` naming the knowledge base and file.
    """

    def __init__(self, version_dir: Path, knowledge_id: str | None = None) -> None:
        """``knowledge_id`` names the base in errors; by default its manifest's, or
        its folder's while the manifest cannot be read."""
        self.version_dir = version_dir
        self.knowledge_id = knowledge_id or version_dir.parent.name
        held = hold_version(version_dir)
        # Closing the descriptor drops the lock: when this object is collected, or at
        # once if it cannot be opened.
        release = weakref.finalize(self, os.close, held.fd)
        try:
            self._load(held.manifest, named=knowledge_id is not None)
        except BaseException:
            release()
            raise

    def _load(self, manifest: bytes, *, named: bool) -> None:
        version_dir = self.version_dir
        with self._reading(MANIFEST_FILE):
            self.manifest = KBManifest.model_validate_json(manifest)
        if not named:
            self.knowledge_id = self.manifest.knowledge_id
        if self.manifest.format != FORMAT_VERSION:
            raise ConfigurationError(
                f"knowledge base {self.manifest.knowledge_id!r} is stored in format "
                f"{self.manifest.format}, this version reads format {FORMAT_VERSION}: "
                "drop it and ingest its documents again"
            )
        # The cheap check first: a base whose docstore is cut short is refused before
        # hundreds of megabytes of arrays are read, on every query that asks for it.
        with self._reading(DOCSTORE_FILE):
            self._kv = SQLiteKVStore(version_dir / DOCSTORE_FILE, read_only=True)
            self._kv.check()
        with self._reading(NODE_IDS_FILE):
            self.node_ids: np.ndarray = read_array(version_dir / NODE_IDS_FILE)
        with self._reading(DOCUMENT_IDS_FILE):
            self.document_ids: np.ndarray = read_array(version_dir / DOCUMENT_IDS_FILE)
        with self._reading(KEYWORD_DIR):
            self.keyword = KeywordIndex.load(version_dir / KEYWORD_DIR)
        with self._reading(VECTOR_DIR):
            self.vectors = (
                NumpyVectorStore.from_persist_dir(version_dir / VECTOR_DIR, ids=self.node_ids)
                if self.manifest.embedding is not None
                else None
            )
        with self._reading(METADATA_FILE):
            self.metadata = MetadataTable.load(version_dir / METADATA_FILE)
        # Written by builder._store_nodes where KVDocumentStore keeps nodes.
        self._collection = KVDocumentStore(self._kv)._node_collection
        self._check_rows()

    def _check_rows(self) -> None:
        """Row i is the same chunk in every index: a file swapped in from another version
        or cut short would otherwise fail a query halfway, or answer wrong chunks."""
        rows = self.manifest.chunks
        counts = {NODE_IDS_FILE: self.node_ids.shape, DOCUMENT_IDS_FILE: self.document_ids.shape,
                  KEYWORD_DIR: (len(self.keyword),), METADATA_FILE: (len(self.metadata),)}
        embedding = self.manifest.embedding
        if self.vectors is not None and embedding is not None:
            counts[VECTOR_DIR] = (len(self.vectors),)
            if rows and self.vectors.dimension != embedding.dimension:
                raise self._damaged(f"{VECTOR_DIR}: {self.vectors.dimension} dimensions, "
                                    f"{MANIFEST_FILE} says {embedding.dimension}")
        for name, shape in counts.items():
            if shape != (rows,):
                raise self._damaged(f"{name}: {shape[0] if shape else 0} rows, "
                                    f"{MANIFEST_FILE} says {rows}")

    def _damaged(self, problem: str) -> KnowledgeBaseDamaged:
        return KnowledgeBaseDamaged.naming(self.knowledge_id, problem)

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        try:
            yield
        except KBError:
            raise
        except _DAMAGE as exc:
            if _out_of_resources(exc):
                # Not the files' fault: telling the operator to rebuild would lose good data.
                raise StoreUnavailableError(
                    f"knowledge base {self.knowledge_id!r} could not be read now: "
                    f"{OUT_OF_RESOURCES_MESSAGE}") from exc
            if not self.version_dir.is_dir():
                # Dropped while a query held it: it is gone, not damaged.
                raise KnowledgeBaseNotFound.missing(self.knowledge_id) from exc
            raise self._damaged(f"{name}: {_reason(exc)}") from exc

    @cached_property
    def documents(self) -> dict[str, DocumentInfo]:
        """Loaded on first use: queries never need it."""
        with self._reading(DOCUMENTS_FILE):
            raw = json.loads((self.version_dir / DOCUMENTS_FILE).read_text())
            return {k: DocumentInfo.model_validate(v) for k, v in raw.items()}

    @property
    def parent_child(self) -> bool:
        return self.manifest.chunking.get("mode") == "parent_child"

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None) -> list[NodeWithScore]:
        mode, weight = effective_mode(plan, self.manifest)
        if len(self) == 0 or not plan.query.strip():
            return []
        scores = self._scores(plan.query, mode, weight, embed_model)
        keep = scores >= max(plan.score_threshold, TINY_SCORE)
        if plan.condition is not None:
            keep &= self.metadata.mask(plan.condition)
        ranked = np.where(keep, scores, -np.inf)
        if self.parent_child:
            return self._parents(ranked, plan.top_k)
        rows = top_rows(ranked, plan.top_k)
        nodes = self.nodes([str(self.node_ids[row]) for row in rows])
        return [
            NodeWithScore(node=node, score=float(scores[row]))
            for row, node in zip(rows, nodes, strict=True)
        ]

    def _parents(self, ranked: np.ndarray, top_k: int) -> list[NodeWithScore]:
        available = int(np.isfinite(ranked).sum())

        def children(want: int) -> list[tuple[int, float]]:
            return [(int(row), float(ranked[row]))
                    for row in top_rows(ranked, min(want, available))]

        def parent_ids(rows: list[int]) -> list[str]:
            return [parent_id(child)
                    for child in self.nodes([str(self.node_ids[row]) for row in rows])]

        chosen = best_parents(children, parent_ids, top_k)
        parents = self.nodes([parent for parent, _ in chosen])
        return [NodeWithScore(node=node, score=score)
                for node, (_, score) in zip(parents, chosen, strict=True)]

    def nodes(self, node_ids: list[str]) -> list[BaseNode]:
        """The nodes, in order; read in one query rather than the docstore's one per id."""
        found = []
        batch = 500  # SQLite's bound-parameter limit is far above this; keeps queries short
        with self._reading(DOCSTORE_FILE):
            for start in range(0, len(node_ids), batch):
                ids = node_ids[start : start + batch]
                for node_id, data in zip(ids, self._kv.get_many(ids, self._collection),
                                         strict=True):
                    if data is None:
                        raise self._damaged(f"{DOCSTORE_FILE} lacks chunk {node_id}")
                    found.append(json_to_doc(data))
        return found

    def _scores(
        self, query: str, mode: RetrievalMode, weight: float, embed_model: BaseEmbedding | None
    ) -> np.ndarray:
        if mode == "keyword" or (mode == "hybrid" and weight == 0.0):
            return self.keyword.scores(query)
        semantic = self._semantic_scores(query, mode, embed_model)
        if mode == "vector" or weight == 1.0:
            return semantic
        # float32 throughout: at 100k rows every full-length temporary costs real time.
        keyword = self.keyword.scores(query).astype(np.float32)
        semantic *= np.float32(weight)
        keyword *= np.float32(1.0 - weight)
        return semantic + keyword

    def _semantic_scores(
        self, query: str, mode: RetrievalMode, embed_model: BaseEmbedding | None
    ) -> np.ndarray:
        check_embedding(self.manifest, mode, embed_model)
        assert self.vectors is not None and embed_model is not None
        embedding = embed_query(embed_model, query)
        return np.clip(self.vectors.similarities(embedding), 0.0, 1.0, dtype=np.float32)


# What reading a damaged file raises (json, pydantic and numpy errors are ValueErrors).
_DAMAGE = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError,
           sqlite3.DatabaseError)


def _out_of_resources(exc: BaseException) -> bool:
    """A failure of the process, not of the files: no descriptor or memory was left.
    SQLite reports a missing descriptor only as "unable to open database file"."""
    if out_of_resources(exc):
        return True
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
        try:
            os.close(os.dup(0))
        except OSError as probe:
            return out_of_resources(probe)
    return False


def _reason(exc: BaseException) -> str:
    """What went wrong, short, without the absolute paths an OSError carries."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{Path(exc.filename).name}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:200] + "…"


def effective_mode(plan: QueryPlan, manifest: KBManifest) -> tuple[RetrievalMode, float]:
    """The retrieval mode and semantic weight a query runs with: the plan's, else as built."""
    mode = plan.mode or manifest.retrieval_mode
    weight = manifest.semantic_weight if plan.semantic_weight is None else plan.semantic_weight
    return mode, weight


def parent_id(child: BaseNode) -> str:
    """The parent a child chunk stands for (parent-child chunking); itself otherwise."""
    return str(child.metadata.get("parent_id", child.node_id))


# Children asked for per parent wanted, at first: several children may share a parent.
CHILDREN_PER_PARENT = 4


def best_parents(ranked: Callable[[int], list[tuple[int, float]]],
                 parent_ids: Callable[[list[int]], list[str]], top_k: int
                 ) -> list[tuple[str, float]]:
    """Parent-child chunking: children are matched, each parent returned once with its
    best child's score. Several children may share a parent, so children are asked for
    in growing batches until ``top_k`` parents are found or no more children pass."""
    want = top_k * CHILDREN_PER_PARENT
    while True:
        children = ranked(want)
        best: dict[str, float] = {}
        for parent, (_, score) in zip(parent_ids([row for row, _ in children]), children,
                                      strict=True):
            best.setdefault(parent, score)
        if len(best) >= top_k or len(children) < want:
            return list(best.items())[:top_k]
        want *= 4


def fused_weight(plan: QueryPlan, manifest: KBManifest) -> float:
    """The semantic weight of the fused score: vector mode 1, keyword mode 0."""
    mode, weight = effective_mode(plan, manifest)
    return {"vector": 1.0, "keyword": 0.0}.get(mode, weight)


def query_embedding(plan: QueryPlan, manifest: KBManifest,
                    embed_model: BaseEmbedding | None) -> tuple[float, np.ndarray | None]:
    """For stores that search elsewhere: the semantic weight of the fused score (vector
    mode 1, keyword mode 0) and the query's embedding, when that weight needs one."""
    mode, _ = effective_mode(plan, manifest)
    weight = fused_weight(plan, manifest)
    if weight == 0.0:
        return weight, None
    check_embedding(manifest, mode, embed_model)
    assert embed_model is not None
    return weight, np.asarray(embed_query(embed_model, plan.query), dtype=np.float64)


def embed_query(embed_model: BaseEmbedding, query: str) -> np.ndarray | list[float]:
    """The query's embedding, by the model's fast path when it has one."""
    fast = getattr(embed_model, "query_vector", None)
    return fast(query) if fast is not None else embed_model.get_query_embedding(query)


def check_embedding(manifest: KBManifest, mode: RetrievalMode,
                    embed_model: BaseEmbedding | None) -> None:
    """Refuse semantic search on a keyword-only base or with another embedding model.

    Every store calls this before embedding a query, so all give the same errors.
    """
    built_with = manifest.embedding
    if built_with is None:
        raise InvalidFieldError(
            "retrieval_mode",
            f"knowledge base {manifest.knowledge_id!r} was built for keyword search "
            f"only; {mode} retrieval needs it rebuilt with an embedding model",
        )
    spec = getattr(embed_model, "spec", None)
    if embed_model is None or spec is None or spec.id != built_with.id:
        using = spec.id if spec is not None else "none"
        raise EmbeddingMismatchError(
            f"knowledge base {manifest.knowledge_id!r} was built with embedding "
            f"{built_with.id}, but this server is configured with {using}: configure "
            "the same embedding model or rebuild the knowledge base"
        )
