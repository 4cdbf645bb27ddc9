"""Where knowledge bases live, chosen by a store URL.

* ``local://<data_dir>`` (the default): the embedded store, immutable versions
  under a folder, published by an atomic ``CURRENT`` swap (``layout.py``).
* ``postgresql://…`` / ``postgres://…``: PostgreSQL + pgvector (``pg_store.py``),
  which several plugin processes and CLI runs can share.
* ``qdrant:///path``, ``qdrant://host:6333``, ``http(s)://host:6333``: Qdrant, local
  mode or a server (``qdrant_store.py``).
* ``llamacloud://<api_key>@<host>/?project=…``: LlamaCloud managed indexes, read-only
  (``llamacloud_store.py``).

Every store answers the same contract: the same ``QueryPlan`` gives the same
records with the same absolute scores. A new backend (Qdrant, LlamaCloud) is
one class registered under its URL schemes with ``register``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore

from .builder import disk_space, write_version
from .config import Settings
from .errors import (
    ConfigurationError,
    InvalidFieldError,
    KnowledgeBaseDamaged,
    KnowledgeBaseNotFound,
)
from .knowledge_base import DocumentInfo, KBManifest, KnowledgeBase, QueryPlan
from .layout import MANIFEST_FILE, KBLayout, VersionGone, all_layouts, current_version
from .redaction import redact_url

log = logging.getLogger(__name__)


@runtime_checkable
class KnowledgeBaseHandle(Protocol):
    """One knowledge base opened for reading."""

    @property
    def manifest(self) -> KBManifest: ...

    @property
    def documents(self) -> dict[str, DocumentInfo]: ...

    def __len__(self) -> int: ...

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]: ...


@dataclass(frozen=True)
class Change:
    """One atomic edit of a knowledge base: what ingest, upload and delete produce.

    ``chunks[i]`` has embedding ``vectors[i]`` (None for a keyword-only base).
    ``documents`` are added or replace their namesakes (whose old chunks and parents
    go); ``removed`` documents go too. With ``replace``, everything else goes.
    ``manifest`` describes the base after the change; the store fills in the counts.
    """

    manifest: KBManifest
    chunks: Sequence[BaseNode] = ()
    vectors: np.ndarray | None = None
    documents: dict[str, DocumentInfo] = field(default_factory=dict)
    parents: Sequence[BaseNode] = ()
    removed: frozenset[str] = frozenset()
    replace: bool = False

    def __post_init__(self) -> None:
        if self.vectors is not None and self.vectors.shape[0] != len(self.chunks):
            raise ValueError(f"{self.vectors.shape[0]} vectors for {len(self.chunks)} chunks")


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


StoreFactory = Callable[[str, Settings], KnowledgeStore]
_registry: dict[str, StoreFactory] = {}
_stores: dict[str, KnowledgeStore] = {}
_stores_lock = threading.Lock()


def register(*schemes: str) -> Callable[[StoreFactory], StoreFactory]:
    """Make ``factory(url, settings)`` the store for URLs with these schemes."""

    def add(factory: StoreFactory) -> StoreFactory:
        for scheme in schemes:
            _registry[scheme] = factory
        return factory

    return add


def store_url(settings: Settings) -> str:
    return settings.store or f"local://{settings.data_dir.resolve()}"


def store_for(settings: Settings) -> KnowledgeStore:
    """The store ``settings`` name, one per URL per process (they pool connections)."""
    url = store_url(settings)
    store = _stores.get(url)
    if store is None:
        with _stores_lock:
            store = _stores.get(url)
            if store is None:
                store = open_store(url, settings)
                _stores[url] = store
    return store


def open_store(url: str, settings: Settings) -> KnowledgeStore:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 host
        raise ConfigurationError(
            f"store URL {redact_url(url)!r} cannot be parsed: {exc}") from None
    if scheme in {"postgresql", "postgres"} and scheme not in _registry:
        from . import pg_store  # noqa: F401  (registers itself; psycopg loads only if used)
    if scheme in {"qdrant", "http", "https"} and scheme not in _registry:
        from . import qdrant_store  # noqa: F401  (registers itself; qdrant-client too)
    if scheme == "llamacloud" and scheme not in _registry:
        from . import llamacloud_store  # noqa: F401  (registers itself)
    factory = _registry.get(scheme)
    if factory is None:
        raise ConfigurationError(
            f"store URL scheme {scheme or '(none)'!r} is not supported: use local:///path "
            "or postgresql://user:password@host:5432/database "
            "or llamacloud://<api_key>@api.cloud.llamaindex.ai/?project=<name>"
        )
    return factory(url, settings)


def as_store(where: Path | KnowledgeStore) -> KnowledgeStore:
    """A store from a data directory (the embedded store there) or a store itself."""
    return LocalStore(Path(where)) if isinstance(where, Path | str) else where


@register("local")
def _local(url: str, settings: Settings) -> KnowledgeStore:
    parts = urlsplit(url)
    if parts.netloc not in {"", "localhost"}:
        raise ConfigurationError(
            f"store URL {redact_url(url)!r}: a local store needs an absolute path, e.g. "
            "local:///srv/kb "
            "(three slashes)"
        )
    path = unquote(parts.path)
    return LocalStore(Path(path) if path else settings.data_dir)


class FindingStore(ABC):
    """``open`` for stores that implement ``find``: the knowledge base, or a 404."""

    @abstractmethod
    def find(self, knowledge_id: str) -> KnowledgeBaseHandle | None: ...

    def open(self, knowledge_id: str) -> KnowledgeBaseHandle:
        found = self.find(knowledge_id)
        if found is None:
            raise KnowledgeBaseNotFound.missing(knowledge_id)
        return found


# How much the embedded store keeps open per process: at 384 dimensions a million
# chunks take about 2.3 GB. Past either budget the least recently used base closes and
# is read again when next queried.
MAX_OPEN_BASES = 64
MAX_OPEN_CHUNKS = 1_000_000


class LocalStore(FindingStore):
    """The embedded store: a folder of knowledge bases, each a series of versions."""

    searches_in_process = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = f"local://{Path(data_dir).resolve()}"
        # One open version per knowledge base, least recently used first. A query holds
        # the one it started with, so a version replaced or evicted here lives (files
        # included) until its last query ends.
        self._open: OrderedDict[str, KnowledgeBase] = OrderedDict()
        self._lock = threading.Lock()

    def find(self, knowledge_id: str) -> KnowledgeBase | None:
        # Checking the tiny CURRENT pointer on every call picks up a version another
        # process published, while an unchanged base stays open (in memory).
        layout = KBLayout(self.data_dir, knowledge_id)
        version = layout.current_version()
        cached = self._open.get(knowledge_id)
        if cached is not None and cached.version_dir == version:
            with contextlib.suppress(KeyError):  # evicted meanwhile: still valid to use
                self._open.move_to_end(knowledge_id)
            return cached
        if cached is None and version is None:
            return None
        with self._lock:
            cached = self._open.get(knowledge_id)
            if cached is None or cached.version_dir != version:
                # Released first: a large base need not be in memory twice.
                self._open.pop(knowledge_id, None)
                cached = self._open_live(layout)
                if cached is None:
                    return None
                self._open[knowledge_id] = cached
                log.info("opened knowledge base %s (%d chunks)", knowledge_id, len(cached))
                self._evict()
        return cached

    def _evict(self) -> None:
        """Close the least recently used bases past the budgets (their arrays are in
        memory, and each holds descriptors); the one just opened always stays."""
        chunks = sum(len(kb) for kb in self._open.values())
        while len(self._open) > 1 and (len(self._open) > MAX_OPEN_BASES
                                       or chunks > MAX_OPEN_CHUNKS):
            _, closed = self._open.popitem(last=False)
            chunks -= len(closed)

    @staticmethod
    def _open_live(layout: KBLayout) -> KnowledgeBase | None:
        while True:
            version = layout.current_version()
            if version is None or layout.foreign_owner() is not None:
                return None
            try:
                return KnowledgeBase(version, layout.knowledge_id)
            except VersionGone:
                if layout.current_version() == version:
                    raise KnowledgeBaseDamaged.naming(
                        layout.knowledge_id, f"the live version has no {MANIFEST_FILE}"
                    ) from None
                # A writer published and removed it meanwhile: take the new one.

    def manifests(self) -> list[KBManifest]:
        """Every readable knowledge base's manifest: one whose manifest is damaged is left
        out (and logged), so the others stay listed; opening it names the damage."""
        found = []
        for root in all_layouts(self.data_dir):
            version = current_version(root)
            if version is None:
                continue
            try:
                found.append(KBManifest.read(version))
            except (OSError, ValueError) as exc:
                log.warning("knowledge base folder %s left out of the list: its %s cannot "
                            "be read (%s)", root.name, MANIFEST_FILE, type(exc).__name__)
        return sorted(found, key=lambda manifest: manifest.knowledge_id)

    def publish(self, knowledge_id: str, change: Change) -> Published:
        layout = KBLayout(self.data_dir, knowledge_id)
        with disk_space(layout), layout.write_lock():
            other = layout.foreign_owner()
            if other is not None:
                raise InvalidFieldError("knowledge_id", (
                    f"{knowledge_id!r} cannot be stored: its folder {layout.root.name} holds "
                    f"knowledge base {other!r}, made by an earlier version; drop that one "
                    "or choose another id"))
            # The open version, read under the lock: another writer may have published.
            existing = None if change.replace else self.find(knowledge_id)
            replaced = set(change.documents) | change.removed
            kept_nodes: list[BaseNode] = []
            kept_parents: list[BaseNode] = []
            kept_vectors = None
            documents: dict[str, DocumentInfo] = {}
            removed = 0
            if existing is not None:
                removed = len(change.removed & existing.documents.keys())
                keep_rows = np.flatnonzero(~np.isin(existing.document_ids, list(replaced)))
                kept_nodes = existing.nodes(existing.node_ids[keep_rows].tolist())
                documents = {k: v for k, v in existing.documents.items() if k not in replaced}
                kept_parents = existing.nodes([p for info in documents.values()
                                               for p in info.parent_ids])
                if existing.vectors is not None:
                    kept_vectors = existing.vectors.rows(keep_rows)
            documents.update(change.documents)
            nodes = kept_nodes + list(change.chunks)
            vectors = None
            embedding = change.manifest.embedding
            if embedding is not None:
                parts = [v for v in (kept_vectors, change.vectors) if v is not None and len(v)]
                vectors = (np.vstack(parts) if parts
                           else np.zeros((0, embedding.dimension), dtype=np.float32))
            manifest = change.manifest.model_copy(update={"documents": len(documents)})
            version = write_version(layout, manifest, nodes, vectors, documents,
                                    parents=kept_parents + list(change.parents))
            # This process lets go of the versions it replaced (queries running on
            # them keep theirs), so they can be removed now rather than by a later writer.
            existing = None
            with self._lock:
                if knowledge_id in self._open and self._open[knowledge_id].version_dir != version:
                    del self._open[knowledge_id]
            layout.remove_stale_versions()
        return Published(documents=len(documents), chunks=len(nodes), removed=removed)

    def drop(self, knowledge_id: str) -> None:
        layout = KBLayout(self.data_dir, knowledge_id)
        if layout.current_version() is None or layout.foreign_owner() is not None:
            raise KnowledgeBaseNotFound.missing(knowledge_id)
        with layout.write_lock():
            layout.drop()
        with self._lock:
            self._open.pop(knowledge_id, None)
