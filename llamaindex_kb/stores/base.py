"""The store contract and the domain types every store shares."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from pydantic import BaseModel, ConfigDict, Field

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.config import RetrievalMode
from llamaindex_kb.errors import (
    EmbeddingMismatchError,
    InvalidFieldError,
    KnowledgeBaseDamaged,
    KnowledgeBaseNotFound,
)
from llamaindex_kb.models.multilingual import SCRIPTS, is_cjk, scale_of
from llamaindex_kb.models.spec import EmbeddingSpec, readable_share
from llamaindex_kb.scoring import COSINE, SimilarityScale, semantic_weight
from llamaindex_kb.stores.records import Records


@runtime_checkable
class KnowledgeBaseHandle(Protocol):
    """One knowledge base opened for reading."""

    @property
    def manifest(self) -> KBManifest: ...

    @property
    def documents(self) -> dict[str, DocumentInfo]: ...

    def document(self, document_id: str) -> DocumentInfo | None:
        """One document's record, read alone where the store can (a delete needs one,
        and listing 20k of them took most of a delete's time)."""
        ...

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]: ...


@dataclass(frozen=True)
class Change:
    """One atomic edit of a knowledge base: what ingest, upload and delete produce.

    ``chunks[i]`` has embedding ``vectors[i]`` (None for a keyword-only base) and
    ``readable[i]``, the share of its tokens the model read (None: not known; a store
    that keeps these gives the manifest their mean over the base's chunks).
    ``documents`` are added or replace their namesakes (whose old chunks and parents
    go); ``removed`` documents go too. With ``replace``, everything else goes.
    ``manifest`` describes the base after the change; the store fills in the counts.
    """

    manifest: KBManifest
    chunks: Sequence[BaseNode] = ()
    vectors: np.ndarray | None = None
    readable: np.ndarray | None = None
    documents: dict[str, DocumentInfo] = field(default_factory=dict)
    parents: Sequence[BaseNode] = ()
    removed: frozenset[str] = frozenset()
    replace: bool = False

    def __post_init__(self) -> None:
        for name, values in (("vectors", self.vectors), ("readable", self.readable)):
            if values is not None and values.shape[0] != len(self.chunks):
                raise ValueError(f"{values.shape[0]} {name} for {len(self.chunks)} chunks")


@dataclass(frozen=True)
class Published:
    """The knowledge base after a change."""

    documents: int
    chunks: int
    removed: int  # how many of ``Change.removed`` were there


class KnowledgeStore(Protocol):
    """Knowledge bases by ``knowledge_id``; safe to share between threads."""

    url: str
    # Whether a query's search runs in this process (the embedded store's numpy scans,
    # Qdrant's local mode) rather than in a server. Only for a server does the local
    # embedding model spin its threads (LocalMiniLMEmbedding.spin_threads): beside an
    # in-process scan, spinning measured no faster.
    searches_in_process: bool
    # None for a store that takes writes. A store whose knowledge bases are changed
    # elsewhere (LlamaCloud) says where: every write is refused with it before any work
    # (ReadOnlyStoreError, 3007).
    read_only: str | None
    # Where the store keeps API keys and views (stores/records.py); None: it cannot, and
    # they are kept in a file in the data directory beside it.
    access_records: Records | None

    def open(self, knowledge_id: str) -> KnowledgeBaseHandle:
        """The live knowledge base; ``KnowledgeBaseNotFound`` if there is none."""
        ...

    def find(self, knowledge_id: str) -> KnowledgeBaseHandle | None: ...

    def manifests(self) -> list[KBManifest]:
        """Every knowledge base's manifest, sorted by ``knowledge_id``."""
        ...

    def publish(self, knowledge_id: str, change: Change) -> Published:
        """Apply ``change`` atomically: readers see all of it or none of it.

        Writers of one knowledge base are serialised (across processes too).
        """
        ...

    def drop(self, knowledge_id: str) -> None:
        """Delete a whole knowledge base; ``KnowledgeBaseNotFound`` if there is none."""
        ...


class FindingStore(ABC):
    """``open`` for stores that implement ``find``: the knowledge base, or a 404."""

    read_only: str | None = None  # the stores built on this one all take writes
    access_records: Records | None = None

    @abstractmethod
    def find(self, knowledge_id: str) -> KnowledgeBaseHandle | None: ...

    def open(self, knowledge_id: str) -> KnowledgeBaseHandle:
        found = self.find(knowledge_id)
        if found is None:
            raise KnowledgeBaseNotFound.missing(knowledge_id)
        return found


# The layout of a knowledge base's data this version writes and reads; a base of
# another format is refused with a message saying to rebuild it.
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
    # The share of the chunks' tokens the embedding model reads, recorded at ingestion
    # (a chunk-weighted mean, approximate once documents are deleted); None: not known.
    readable_share: float | None = Field(default=None, ge=0.0, le=1.0)
    # The mean of the chunks' unit embeddings per script ("cjk", "other"), kept by the
    # store as it publishes, for models whose scores count from it (with_centroids): a
    # query's similarity to its script's centroid is its mean similarity to those chunks.
    centroids: dict[str, list[float]] | None = None
    # None: the store cannot count them (LlamaCloud lists an index's files only on
    # request, and never its chunks), which is not the same as none.
    documents: int | None = 0
    chunks: int | None = 0



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
    chunks: int | None = 0  # None: the store does not say (LlamaCloud)
    parent_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


def document_metadata(info: DocumentInfo) -> dict[str, Any]:
    """The metadata every chunk of the document carries (a reader may add its own per
    chunk, such as a page number): the document's own, then its file's fields."""
    metadata = {
        "document_id": info.document_id,
        "title": info.title,
        "file_name": info.file_name,
        "file_path": info.file_path,
        "file_type": info.file_type,
        "file_size": info.file_size,
        "last_modified": info.last_modified,
    }
    return {**info.metadata, **{k: v for k, v in metadata.items() if v is not None}}


class QueryPlan(BaseModel):
    """What one retrieval asks of a knowledge base."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    query: str
    top_k: int
    score_threshold: float = 0.0
    # The request's metadata_condition, compiled once where the plan is made
    # (Library.retrieve), not per store or per candidate row: every store gets it ready
    # to evaluate, and a reranker's wider copy of the plan shares it.
    predicate: Predicate | None = None
    mode: RetrievalMode | None = None
    semantic_weight: float | None = None


def effective_mode(plan: QueryPlan, manifest: KBManifest) -> tuple[RetrievalMode, float]:
    """The retrieval mode and semantic weight a query runs with: the plan's, else as built."""
    mode = plan.mode or manifest.retrieval_mode
    weight = manifest.semantic_weight if plan.semantic_weight is None else plan.semantic_weight
    return mode, weight


def fused_weight(plan: QueryPlan, manifest: KBManifest,
                 embed_model: BaseEmbedding | None) -> float:
    """The semantic weight of the fused score (``scoring.semantic_weight``): vector mode 1,
    keyword mode 0, hybrid the weight times the share of the query ``embed_model`` can
    read and the share of the base's chunks it read, unless the plan sets the weight
    (the server's setting wins)."""
    mode, weight = effective_mode(plan, manifest)
    readable = 1.0
    if mode == "hybrid" and plan.semantic_weight is None:  # only hybrid mixes the two sides
        base_share = 1.0 if manifest.readable_share is None else manifest.readable_share
        readable = readable_share(embed_model, plan.query) * base_share
    return semantic_weight(mode, weight, readable)


def query_scale(manifest: KBManifest,
                query_vector: np.ndarray | Sequence[float] | None) -> SimilarityScale:
    """Where this query's cosine similarities sit on the score scale: the scale of the
    model that built the base, counted from the query's similarity to the base's
    centroid of the base's chunks in the query's own script when it is centred (without
    a query vector there is nothing to place)."""
    if query_vector is None:
        return COSINE
    scale = scale_of(manifest.embedding)
    if not scale.centred:
        return scale
    if not manifest.centroids:
        raise KnowledgeBaseDamaged.naming(
            manifest.knowledge_id, "its manifest lacks the centroid its model's scores count "
            "from; rebuild it")
    query = np.asarray(query_vector, np.float64)
    # The centroid of the query's own script: on a base mixing Chinese and English, the
    # mean over both would sit between them and lift off-topic scores (README, Models).
    own = SCRIPTS[0] if is_cjk(query[None, :])[0] else SCRIPTS[1]
    centroid = manifest.centroids.get(own) or next(iter(manifest.centroids.values()))
    return scale.shifted(float(np.dot(query, np.asarray(centroid, np.float64))))


def needs_centroid(manifest: KBManifest) -> bool:
    """Whether the base's scores count from its centroid (``scoring.SimilarityScale``)."""
    return scale_of(manifest.embedding).centred


VectorSums = dict[str, tuple[np.ndarray, int]]


def vector_sums(vectors: np.ndarray | None) -> VectorSums:
    """Per script, the sum of the rows (made unit-length) and how many, for
    ``with_centroids`` (stores that hold all the base's vectors at publish time)."""
    if vectors is None or not len(vectors):
        return {}
    totals = np.zeros((2, vectors.shape[1]))
    counts = np.zeros(2, np.int64)
    # In blocks: a float64 copy of a 100k-chunk base would be 300 MB more per publish.
    for start in range(0, len(vectors), 16_384):
        rows = np.asarray(vectors[start : start + 16_384], np.float32)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        cjk = is_cjk(rows)
        sides = np.stack([cjk, ~cjk]).astype(np.float64)
        totals += sides @ rows
        counts += sides.sum(axis=1).astype(np.int64)
    return {script: (totals[i], int(counts[i])) for i, script in enumerate(SCRIPTS)
            if counts[i]}


def merged(first: VectorSums, second: VectorSums) -> VectorSums:
    """Two sets of per-script sums as one."""
    both = dict(first)
    for script, (total, count) in second.items():
        old_total, old_count = both.get(script, (0.0, 0))
        both[script] = (old_total + total, old_count + count)
    return both


def subtracted(sums: VectorSums, removed: VectorSums) -> VectorSums | None:
    """``sums`` less the removed rows' sums; a script left with no rows goes, so rounding
    left over from adding and subtracting never outlives its rows. None if a script
    lacks rows it lost: a row the probe placed on the other side when it was added (a
    last-bit difference right at the threshold), for the caller to add up again."""
    left = dict(sums)
    for script, (total, count) in removed.items():
        if left.get(script, (None, 0))[1] < count:
            return None
        old_total, old_count = left.pop(script)
        if old_count > count:
            left[script] = (old_total - total, old_count - count)
    return left


def with_centroids(manifest: KBManifest, sums: VectorSums) -> KBManifest:
    """``manifest`` with the centroids of a base whose vectors add up to ``sums``, if its
    scores count from them. Every store calls this as it publishes, under its write
    lock, from the vectors the base then holds: so the centroids stay exact through
    replacements, deletions and concurrent writers."""
    centroids = None
    if needs_centroid(manifest) and sums:
        centroids = {script: [round(float(x), 7) for x in total / count]
                     for script, (total, count) in sums.items() if count}
    return manifest.model_copy(update={"centroids": centroids})


def check_publishable(existing: KBManifest | None, change: Change) -> None:
    """Refuse, under the store's write lock, a change embedded by another model than the
    base's: two first uploads to a new base may each have picked a model (``auto``
    picks by language), and vectors of two models must never share a base (3004)."""
    if existing is None or change.replace or not change.chunks:
        return
    if existing.embedding != change.manifest.embedding:
        raise EmbeddingMismatchError(
            f"knowledge base {existing.knowledge_id!r} was built with embedding "
            f"{existing.embedding.id if existing.embedding else 'none'} while these "
            f"documents were embedded with "
            f"{change.manifest.embedding.id if change.manifest.embedding else 'none'} "
            "(another upload created it meanwhile): send them again")


def query_embedding(plan: QueryPlan, manifest: KBManifest,
                    embed_model: BaseEmbedding | None) -> tuple[float, np.ndarray | None]:
    """For stores that search elsewhere: the semantic weight of the fused score (vector
    mode 1, keyword mode 0) and the query's embedding, when that weight needs one."""
    mode, _ = effective_mode(plan, manifest)
    weight = fused_weight(plan, manifest, embed_model)
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
    if manifest.embedding is None:
        raise InvalidFieldError(
            "retrieval_mode",
            f"knowledge base {manifest.knowledge_id!r} was built for keyword search "
            f"only; {mode} retrieval needs it rebuilt with an embedding model",
        )
    check_same_embedding(manifest, embed_model)


def check_same_embedding(manifest: KBManifest, embed_model: BaseEmbedding | None
                         ) -> BaseEmbedding:
    """``embed_model``, if it is the model that built the base; else
    ``EmbeddingMismatchError`` (3004). The one rule for queries and for ingestion:
    vectors of different models are never compared, nor mixed in one base."""
    built_with = manifest.embedding
    spec = getattr(embed_model, "spec", None)
    if embed_model is None or spec is None or built_with is None or spec.id != built_with.id:
        raise EmbeddingMismatchError(
            f"knowledge base {manifest.knowledge_id!r} was built with embedding "
            f"{built_with.id if built_with else 'none'}, but this server is configured with "
            f"{spec.id if spec is not None else 'none'}: configure the same embedding model "
            "or rebuild the knowledge base"
        )
    return embed_model
