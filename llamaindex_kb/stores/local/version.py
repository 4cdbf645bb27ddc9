"""One knowledge base version, opened read-only: the indices a query runs on.

Row ``i`` means the same chunk in every index (vectors, keyword, metadata table,
node ids), so a filter mask and both score vectors combine with plain numpy: every
chunk is scored, by the policy in ``scoring.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import weakref
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.storage.docstore.utils import json_to_doc

from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.errors import (
    OUT_OF_RESOURCES_MESSAGE,
    ConfigurationError,
    KBError,
    KnowledgeBaseDamaged,
    KnowledgeBaseNotFound,
    StoreUnavailableError,
    out_of_resources,
)
from llamaindex_kb.scoring import (
    best_parents,
    clip_similarities,
    fuse,
    lowest_returned,
    parent_id,
)
from llamaindex_kb.stores.base import (
    FORMAT_VERSION,
    DocumentInfo,
    KBManifest,
    QueryPlan,
    RetrievalMode,
    check_embedding,
    effective_mode,
    embed_query,
    fused_weight,
    query_scale,
)
from llamaindex_kb.stores.local.docstore import NODE_COLLECTION, SQLiteKVStore
from llamaindex_kb.stores.local.keyword import KeywordIndex
from llamaindex_kb.stores.local.layout import MANIFEST_FILE, hold_version, read_array
from llamaindex_kb.stores.local.vectors import VectorMatrix, top_rows

DOCSTORE_FILE = "docstore.sqlite"
KEYWORD_DIR = "keyword"
VECTOR_DIR = "vectors"
METADATA_FILE = "metadata.json"
NODE_IDS_FILE = "node_ids.npy"
DOCUMENTS_FILE = "documents.json"
DOCUMENT_IDS_FILE = "document_ids.npy"


def read_manifest(version_dir: Path) -> KBManifest:
    return KBManifest.model_validate(json.loads((version_dir / MANIFEST_FILE).read_text()))


def write_manifest(version_dir: Path, manifest: KBManifest) -> None:
    (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))


def write_documents(version_dir: Path, documents: dict[str, DocumentInfo]) -> None:
    payload = {doc_id: info.model_dump() for doc_id, info in documents.items()}
    (version_dir / DOCUMENTS_FILE).write_text(json.dumps(payload, ensure_ascii=False))


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
                VectorMatrix.load(version_dir / VECTOR_DIR, self.node_ids)
                if self.manifest.embedding is not None
                else None
            )
        with self._reading(METADATA_FILE):
            self.metadata = MetadataTable.load(version_dir / METADATA_FILE)
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
        if len(self) == 0 or not plan.query.strip():
            return []
        mode, _ = effective_mode(plan, self.manifest)
        weight = fused_weight(plan, self.manifest, embed_model)
        scores = self._scores(plan.query, mode, weight, embed_model)
        keep = scores >= lowest_returned(plan.score_threshold)
        if plan.predicate is not None:
            keep &= plan.predicate.mask(self.metadata)
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
                for node_id, data in zip(ids, self._kv.get_many(ids, NODE_COLLECTION),
                                         strict=True):
                    if data is None:
                        raise self._damaged(f"{DOCSTORE_FILE} lacks chunk {node_id}")
                    found.append(json_to_doc(data))
        return found

    def _scores(
        self, query: str, mode: RetrievalMode, weight: float, embed_model: BaseEmbedding | None
    ) -> np.ndarray:
        if weight == 0.0:
            return self.keyword.scores(query)
        semantic = self._semantic_scores(query, mode, embed_model)
        if weight == 1.0:
            return semantic
        return fuse(semantic, self.keyword.scores(query), weight)

    def _semantic_scores(
        self, query: str, mode: RetrievalMode, embed_model: BaseEmbedding | None
    ) -> np.ndarray:
        check_embedding(self.manifest, mode, embed_model)
        assert self.vectors is not None and embed_model is not None
        embedding = embed_query(embed_model, query)
        return clip_similarities(self.vectors.similarities(embedding), np.float32,
                                 query_scale(self.manifest, embedding))


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


