"""``llamaindex+qdrant://``: collections written by LlamaIndex's ``QdrantVectorStore``.

Store URLs::

    llamaindex+qdrant://host:6333                a Qdrant server over http; a path after
                                                 the port is Qdrant's URL prefix
    llamaindex+qdrant://host:6333?https=true     the same over https (TLS)
    ...?api_key=KEY                              the server's API key (else
                                                 ``LLAMAINDEX_KB_STORE_API_KEY``)
    llamaindex+qdrant:///abs/path                qdrant-client's local mode: the folder given
                                                 to ``QdrantClient(path=...)``

A knowledge base is one collection (``knowledge_id`` = ``collection_name``). A collection
is served when it looks like one ``llama-index-vector-stores-qdrant`` wrote: one dense
vector (unnamed, ``text-dense`` when hybrid was enabled, or the single named one) and
points whose payload holds ``_node_content``, the node as JSON, beside its metadata
copied to the top level (``node_to_metadata_dict``); other collections are not listed
and answer 404.

Vector mode asks ``QdrantVectorStore.query`` itself, on the collection's own client,
exactly as ``index.as_retriever(similarity_top_k=k)`` does: same order, same nodes
(``metadata_dict_to_node`` of the payload). Scores are Qdrant's cosine similarity (the
collections are made with ``Distance.COSINE``), negatives shown as 0 (``scoring.py``).
The part of Dify's condition that LlamaIndex's ``MetadataFilters`` puts to Qdrant with
Dify's meaning (``is`` and ``in`` on plain texts, keys of the node's own metadata) is
pushed down; ``LlamaIndexStore`` re-checks every record. Keyword and hybrid run in
memory over the nodes and vectors read with one scroll (``load``).

Changes: ``version`` is the collection's point count (and vector shape), read with one
cheap request, so nodes the user's code inserts or deletes show up within a second
without a restart. Vector answers always come from Qdrant as it is; what is read into
memory (keyword, hybrid, the document listing) misses a change that replaces nodes one
for one (the count unchanged) until the count next changes.

Local mode: qdrant-client locks the folder to one process at a time. While this server
has it open, the user's LlamaIndex code in another process cannot open it (and the
other way round: it must ``client.close()`` first). To serve a collection that other
code keeps writing, run a Qdrant server.

Faults: a server that refuses connections or stays silent answers 503
(``StoreUnavailableError``) within a few seconds (``TIMEOUT_S``, reads retried for
``RETRY_S`` as for our own Qdrant store); a refused API key is a 400
(``ConfigurationError``); messages never show the key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.vector_stores.types import (
    MetadataFilters,
    VectorStoreQuery,
)
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    KnowledgeBaseNotFound,
)
from llamaindex_kb.redaction import redact_text, redact_url, url_secrets
from llamaindex_kb.stores.llamaindex.filters import exact_metadata_filters
from llamaindex_kb.stores.llamaindex.store import LlamaIndexStore, LoadedIndex
from llamaindex_kb.stores.qdrant import (
    TIMEOUT_S,
    QdrantFailures,
    check_answer,
    open_local,
    retrying_reads,
)

NODE_CONTENT = "_node_content"
# Keys node_to_metadata_dict writes at the payload's top level over the node's own
# metadata: a filter on them would test LlamaIndex's bookkeeping, not the metadata.
_PAYLOAD_KEYS = frozenset({NODE_CONTENT, "_node_type", "document_id", "doc_id", "ref_doc_id"})
_HYBRID_DENSE = "text-dense"  # QdrantVectorStore's dense vector name when hybrid is on
_SCROLL_PAGE = 512
_TRUE = {"1", "true", "yes", "on"}
_QUERY_KEYS = {"api_key", "https"}


def from_url(url: str, settings: Settings) -> LlamaIndexStore:
    key = settings.store_api_key
    return LlamaIndexStore(QdrantCollections.open(
        url, key.get_secret_value() if key is not None else None))


class QdrantCollections:
    """The ``IndexSource`` of one Qdrant (a server or a local folder); thread-safe."""

    def __init__(self, connect: Callable[[], QdrantClient], shown: str, *, local: bool,
                 secrets: tuple[str, ...] = ()) -> None:
        self._connect = connect
        self._client: QdrantClient | None = None
        self.shown = shown
        self.searches_in_process = local
        self._failures = QdrantFailures(shown, secrets)
        # collection -> (dense vector name, dimension, its QdrantVectorStore)
        self._stores: dict[str, tuple[str, int, QdrantVectorStore]] = {}
        self._served: set[str] = set()  # collections whose points proved LlamaIndex's
        self._lock = threading.Lock()
        self._connecting = threading.Lock()

    @classmethod
    def open(cls, url: str, api_key: str | None = None) -> QdrantCollections:
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"store URL {shown!r}: {redact_text(str(exc), url_secrets(url))}") from exc
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigurationError(
                f"store URL {shown!r}: unknown parameter(s) {', '.join(unknown)}; "
                "llamaindex+qdrant:// takes api_key and https")
        api_key = (query.get("api_key") or [None])[0] or api_key
        secrets = (*url_secrets(url), *([api_key] if api_key else []))
        if not parts.netloc:
            return cls._local(unquote(parts.path), shown)
        if not parts.hostname:
            raise ConfigurationError(
                f"store URL {shown!r} names no host: use llamaindex+qdrant://host:6333 or "
                "llamaindex+qdrant:///absolute/path")
        https = (query.get("https") or ["false"])[0].lower() in _TRUE
        prefix = parts.path.strip("/")
        scheme = "https" if https else "http"
        shown = (f"llamaindex+qdrant://{parts.hostname}:{port or 6333}"
                 + (f"/{prefix}" if prefix else "") + ("?https=true" if https else ""))
        try:
            client = QdrantClient(
                url=f"{scheme}://{parts.hostname}", port=port or 6333, api_key=api_key,
                timeout=TIMEOUT_S, prefix=prefix or None, check_compatibility=False,
                # Passed through to the httpx client: an answer no Qdrant gives stops there.
                event_hooks={"response": [check_answer]})
        except ValueError as exc:
            raise ConfigurationError(
                f"store URL {shown!r}: {redact_text(str(exc), secrets)}") from exc
        reads = retrying_reads(client)
        return cls(lambda: reads, shown, local=False, secrets=secrets)

    @classmethod
    def _local(cls, path: str, shown: str) -> QdrantCollections:
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"store URL {shown!r}: local Qdrant needs the absolute folder given to "
                "QdrantClient(path=...), e.g. llamaindex+qdrant:///srv/qdrant (three "
                "slashes), or a server: llamaindex+qdrant://host:6333")
        shown = f"llamaindex+qdrant://{path}"

        def connect() -> QdrantClient:
            if not Path(path).is_dir():
                raise ConfigurationError(
                    f"store {shown}: {path} is not a folder; point it at the folder given "
                    "to QdrantClient(path=...)")
            return open_local(path, shown, (
                "(qdrant-client's local mode opens a folder in one process at a time): "
                "close the QdrantClient of your LlamaIndex code first, or run a Qdrant "
                "server to share the collections"))

        # Opened on first use, so a server starts while the user's code still holds the
        # folder, and answers once it is released.
        return cls(connect, shown, local=True)

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            with self._connecting:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def close(self) -> None:
        """Release the connection (local mode: the folder's lock)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- IndexSource ------------------------------------------------------------------

    def index_ids(self) -> list[str]:
        with self._failures.translated():
            names = [c.name for c in self.client.get_collections().collections]
        return sorted(name for name in names if self.version(name) is not None)

    def version(self, index_id: str) -> Hashable | None:
        with self._failures.translated():
            info = self._info(index_id)
            dense = None if info is None else _dense_vector(info)
            if info is None or dense is None:
                self._served.discard(index_id)
                return None
            count = info.points_count or 0
            if index_id not in self._served:
                if count == 0:
                    # Nothing to tell by: served when it is named as LlamaIndex names it.
                    return (0, *dense) if dense[0] in ("", _HYBRID_DENSE) else None
                if not self._written_by_llamaindex(index_id):
                    return None
                self._served.add(index_id)
        return (count, *dense)

    def load(self, index_id: str) -> LoadedIndex:
        with self._failures.translated():
            store, dense_name, dimension = self._vector_store(index_id)
            nodes: list[BaseNode] = []
            offset = None
            while True:
                points, offset = self.client.scroll(
                    index_id, limit=_SCROLL_PAGE, offset=offset, with_payload=True,
                    with_vectors=[dense_name] if dense_name else True)
                # LlamaIndex's own reading of a point: node from the payload, its vector.
                nodes.extend(store.parse_to_query_result(points).nodes)
                if offset is None:
                    break
        vectors = [node.embedding for node in nodes]
        embeddings = None
        if all(vector is not None for vector in vectors):
            embeddings = np.array(vectors, dtype=np.float64).reshape(len(nodes), dimension)
        for node in nodes:
            node.embedding = None  # held once, in ``embeddings``
        return LoadedIndex(nodes=nodes, embeddings=embeddings, dimension=dimension)

    def vector_search(self, index_id: str, query_vector: np.ndarray, top_k: int,
                      predicate: Predicate | None) -> list[NodeWithScore] | None:
        if self.searches_in_process:
            # Local mode computes the same cosine in this process anyway, normalising every
            # stored vector on every query (24 ms at 10k nodes); NodeIndex holds them
            # normalised (6 ms), and the order and scores are the same.
            return None
        return self.llamaindex_query(index_id, query_vector, top_k, predicate)

    def llamaindex_query(self, index_id: str, query_vector: np.ndarray, top_k: int,
                         predicate: Predicate | None) -> list[NodeWithScore]:
        """QdrantVectorStore's own query, the condition's exact part pushed to Qdrant."""
        query = VectorStoreQuery(
            query_embedding=[float(x) for x in query_vector], similarity_top_k=top_k,
            filters=None if predicate is None else metadata_filters(predicate))
        with self._failures.translated():
            store, _, _ = self._vector_store(index_id)
            result = store.query(query)
        similarities = result.similarities or [None] * len(result.nodes or [])
        return [NodeWithScore(node=node, score=score)
                for node, score in zip(result.nodes or [], similarities, strict=True)]

    # --- plumbing ---------------------------------------------------------------------

    def _info(self, index_id: str) -> models.CollectionInfo | None:
        try:
            return self.client.get_collection(index_id)
        except UnexpectedResponse as exc:
            if exc.status_code == 404:
                return None
            raise
        except ValueError as exc:
            if "not found" in str(exc).lower():  # local mode's missing collection
                return None
            raise

    def _written_by_llamaindex(self, index_id: str) -> bool:
        points, _ = self.client.scroll(index_id, limit=1, with_payload=[NODE_CONTENT],
                                       with_vectors=False)
        return bool(points) and isinstance((points[0].payload or {}).get(NODE_CONTENT), str)

    def _vector_store(self, index_id: str) -> tuple[QdrantVectorStore, str, int]:
        """The collection's ``QdrantVectorStore``, made again if the collection was."""
        info = self._info(index_id)
        dense = None if info is None else _dense_vector(info)
        if dense is None:
            raise KnowledgeBaseNotFound.missing(index_id)
        with self._lock:
            held = self._stores.get(index_id)
            if held is None or held[:2] != dense:
                store = QdrantVectorStore(collection_name=index_id, client=self.client,
                                          dense_vector_name=dense[0] or None)
                held = (*dense, store)
                self._stores[index_id] = held
        return held[2], held[0], held[1]


def metadata_filters(predicate: Predicate) -> MetadataFilters | None:
    """The condition's exact part as LlamaIndex ``MetadataFilters``, which
    ``QdrantVectorStore`` turns into a Qdrant filter on the payload's top level: a
    superset of what Dify matches (a list matches an element in Qdrant), never less.
    LlamaIndex's bookkeeping keys are not the node's metadata; ``None``: nothing to send."""
    return exact_metadata_filters(predicate, key_ok=lambda key: key not in _PAYLOAD_KEYS)[0]


def _dense_vector(info: models.CollectionInfo) -> tuple[str, int] | None:
    """(name, dimension) of the dense vector QdrantVectorStore searches: unnamed, or
    ``text-dense`` (hybrid), or a collection's only named one; None if there is none."""
    vectors = info.config.params.vectors
    if isinstance(vectors, models.VectorParams):
        return "", vectors.size
    if not isinstance(vectors, dict) or not vectors:
        return None
    for name in ("", _HYBRID_DENSE):
        if name in vectors:
            return name, vectors[name].size
    if len(vectors) == 1:
        name, params = next(iter(vectors.items()))
        return name, params.size
    return None


