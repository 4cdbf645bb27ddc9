"""One knowledge base version, opened read-only: the indices a query runs on.

A version is a list of segments (``segment.py``), each less the documents removed from
it since, listed in ``segments.json`` with the keyword statistics of the live rows.
Versions written before segments hold one segment's files themselves. The version's
rows are its segments' rows in order, so a filter mask and both score vectors combine
with plain numpy: every chunk is scored, by the policy in ``scoring.py``, and removed
rows are masked out.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import weakref
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from pydantic import BaseModel, Field

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
from llamaindex_kb.stores.local.corpus import CorpusKeyword, CorpusStats, Part
from llamaindex_kb.stores.local.layout import MANIFEST_FILE, SEGMENTS_DIR, hold_version
from llamaindex_kb.stores.local.segment import (
    DOCSTORE_FILE,
    DOCUMENTS_FILE,
    SegmentCache,
)
from llamaindex_kb.stores.local.vectors import top_rows

SEGMENTS_FILE = "segments.json"


class SegmentEntry(BaseModel):
    """One segment of a version: its folder (under the base's ``segments/``) and the
    documents removed from it since it was written."""

    name: str
    removed: list[str] = Field(default_factory=list)


class Listing(BaseModel):
    """``segments.json``: what a version is made of."""

    segments: list[SegmentEntry]
    chunks: int
    total_length: int
    absent_term_weight: float

    @property
    def stats(self) -> CorpusStats:
        return CorpusStats(self.chunks, self.total_length, self.absent_term_weight)


def read_manifest(version_dir: Path) -> KBManifest:
    return KBManifest.model_validate(json.loads((version_dir / MANIFEST_FILE).read_text()))


def write_manifest(version_dir: Path, manifest: KBManifest) -> None:
    (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))


def write_listing(version_dir: Path, listing: Listing) -> None:
    (version_dir / SEGMENTS_FILE).write_text(listing.model_dump_json())


def segment_folder(kb_root: Path, name: str) -> Path:
    return kb_root / SEGMENTS_DIR / name


# One cache for the process: a segment is immutable, so every store object reading
# the same folder may share what was read of it.
SEGMENTS = SegmentCache()


class KnowledgeBase:
    """A read-only view of one version, safe for concurrent queries.

    Its arrays are read into memory, not mapped (``layout.read_array`` says why); only
    the docstore is read per query. It holds its version (``layout.hold_version``)
    until garbage-collected, so publishes meanwhile never remove its files (nor the
    segments it lists). Damaged files answer ``KnowledgeBaseDamaged`` naming the
    knowledge base and file.
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
        with self.reading(MANIFEST_FILE):
            self.manifest = KBManifest.model_validate_json(manifest)
        if not named:
            self.knowledge_id = self.manifest.knowledge_id
        if self.manifest.format != FORMAT_VERSION:
            raise ConfigurationError(
                f"knowledge base {self.manifest.knowledge_id!r} is stored in format "
                f"{self.manifest.format}, this version reads format {FORMAT_VERSION}: "
                "drop it and ingest its documents again"
            )
        self.listing: Listing | None = None
        if (self.version_dir / SEGMENTS_FILE).exists():
            with self.reading(SEGMENTS_FILE):
                self.listing = Listing.model_validate_json(
                    (self.version_dir / SEGMENTS_FILE).read_bytes())
            root = self.version_dir.parent
            folders = [segment_folder(root, e.name) for e in self.listing.segments]
            removed = [e.removed for e in self.listing.segments]
        else:
            folders, removed = [self.version_dir], [[]]
        self.segments = [SEGMENTS.get(folder, self.reading, legacy=self.listing is None)
                         for folder in folders]
        with self.reading(SEGMENTS_FILE):
            self.removed_rows = [segment.rows_of(gone)
                                 for segment, gone in zip(self.segments, removed, strict=True)]
        self.removed_documents = [frozenset(gone) for gone in removed]
        sizes = [len(segment) for segment in self.segments]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.rows = int(self.offsets[-1])
        self.live: np.ndarray | None = None
        if any(rows.size for rows in self.removed_rows):
            self.live = np.ones(self.rows, dtype=bool)
            for offset, rows in zip(self.offsets, self.removed_rows, strict=False):
                self.live[rows + offset] = False
        self._check_rows()
        if self.listing is None:
            legacy = self.segments[0].legacy_keyword
            assert legacy is not None
            self.keyword: CorpusKeyword | KeywordScorer = legacy
        else:
            parts = []
            for segment, offset, rows in zip(self.segments, self.offsets, self.removed_rows,
                                             strict=False):
                assert segment.postings is not None  # read, or the segment was refused
                parts.append(Part(segment.postings, int(offset), rows))
            self.keyword = CorpusKeyword(parts, self.listing.stats, self.rows,
                                         str(self.version_dir))

    def _check_rows(self) -> None:
        """Row i is the same chunk in every index: a file swapped in from another version
        or cut short would otherwise fail a query halfway, or answer wrong chunks."""
        embedding = self.manifest.embedding
        for segment in self.segments:
            rows = len(segment)
            if embedding is not None and segment.vectors is None:
                raise self._damaged(f"segment {segment.folder.name} has no vectors")
            if (segment.vectors is not None and embedding is not None and rows
                    and segment.vectors.dimension != embedding.dimension):
                raise self._damaged(f"vectors: {segment.vectors.dimension} dimensions, "
                                    f"{MANIFEST_FILE} says {embedding.dimension}")
            for name, shape in segment.row_counts().items():
                if shape != (rows,):
                    raise self._damaged(f"{name}: {shape[0] if shape else 0} rows, "
                                        f"{segment.folder.name} has {rows}")
        live = self.rows - sum(rows.size for rows in self.removed_rows)
        if live != self.manifest.chunks:
            raise self._damaged(f"{live} chunks, {MANIFEST_FILE} says {self.manifest.chunks}")

    def _damaged(self, problem: str) -> KnowledgeBaseDamaged:
        return KnowledgeBaseDamaged.naming(self.knowledge_id, problem)

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[None]:
        """Failures reading the file ``name`` become errors naming it and the base."""
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
        found: dict[str, DocumentInfo] = {}
        with self.reading(DOCUMENTS_FILE):
            for segment, gone in zip(self.segments, self.removed_documents, strict=True):
                found.update((k, v) for k, v in segment.documents().items() if k not in gone)
        return found

    def document(self, document_id: str) -> DocumentInfo | None:
        return self.documents.get(document_id)

    @property
    def parent_child(self) -> bool:
        return self.manifest.chunking.get("mode") == "parent_child"

    def __len__(self) -> int:
        """Live chunks."""
        return self.manifest.chunks

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None) -> list[NodeWithScore]:
        if len(self) == 0 or not plan.query.strip():
            return []
        mode, _ = effective_mode(plan, self.manifest)
        weight = fused_weight(plan, self.manifest, embed_model)
        scores = self._scores(plan.query, mode, weight, embed_model)
        keep = scores >= lowest_returned(plan.score_threshold)
        if self.live is not None:
            keep &= self.live
        if plan.predicate is not None:
            keep &= np.concatenate([plan.predicate.mask(segment.metadata)
                                    for segment in self.segments])
        ranked = np.where(keep, scores, -np.inf)
        if self.parent_child:
            return self._parents(ranked, plan.top_k)
        rows = top_rows(ranked, plan.top_k)
        return [NodeWithScore(node=node, score=float(scores[row]))
                for row, node in zip(rows, self.chunks(rows), strict=True)]

    def _parents(self, ranked: np.ndarray, top_k: int) -> list[NodeWithScore]:
        available = int(np.isfinite(ranked).sum())
        # A parent is in the segment of its children.
        home: dict[str, int] = {}

        def children(want: int) -> list[tuple[int, float]]:
            return [(int(row), float(ranked[row]))
                    for row in top_rows(ranked, min(want, available))]

        def parent_ids(rows: list[int]) -> list[str]:
            found = []
            for row, child in zip(rows, self.chunks(rows), strict=True):
                found.append(parent_id(child))
                home.setdefault(found[-1], self._segment_of(row))
            return found

        chosen = best_parents(children, parent_ids, top_k)
        return [NodeWithScore(node=self._node(home[parent], parent), score=score)
                for parent, score in chosen]

    def _segment_of(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right")) - 1

    def chunks(self, rows: Sequence[int] | np.ndarray) -> list[BaseNode]:
        """The chunks at these rows, in order; one docstore query per segment."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        found: list[BaseNode | None] = [None] * rows.size
        for index in np.unique(which):
            segment, at = self.segments[index], np.flatnonzero(which == index)
            ids = segment.node_ids[rows[at] - self.offsets[index]].tolist()
            with self.reading(DOCSTORE_FILE):
                nodes = segment.nodes(ids)
            for position, node_id, node in zip(at, ids, nodes, strict=True):
                if node is None:
                    raise self._damaged(f"{DOCSTORE_FILE} lacks chunk {node_id}")
                found[position] = node
        return found  # type: ignore[return-value]

    def _node(self, index: int, node_id: str) -> BaseNode:
        with self.reading(DOCSTORE_FILE):
            (node,) = self.segments[index].nodes([node_id])
        if node is None:
            raise self._damaged(f"{DOCSTORE_FILE} lacks chunk {node_id}")
        return node

    def vectors(self) -> np.ndarray:
        """Every live chunk's unit-length embedding, in row order."""
        parts = []
        for segment, removed in zip(self.segments, self.removed_rows, strict=True):
            if segment.vectors is not None:
                parts.append(np.delete(segment.vectors.rows(np.arange(len(segment))), removed,
                                       axis=0))
        dimension = self.manifest.embedding.dimension if self.manifest.embedding else 0
        return np.vstack(parts) if parts else np.zeros((0, dimension), np.float32)

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
        assert embed_model is not None
        embedding = embed_query(embed_model, query)
        similarities = np.concatenate([segment.vectors.similarities(embedding)
                                       for segment in self.segments
                                       if segment.vectors is not None])
        return clip_similarities(similarities, np.float32, query_scale(self.manifest, embedding))


class KeywordScorer(Protocol):
    def scores(self, query: str) -> np.ndarray: ...


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


