"""The embedded store: a folder of knowledge bases, each a series of versions."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from llama_index.core.schema import BaseNode

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    InvalidFieldError,
    KnowledgeBaseDamaged,
    KnowledgeBaseNotFound,
)
from llamaindex_kb.redaction import redact_url
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    FindingStore,
    KBManifest,
    Published,
    check_publishable,
    needs_centroid,
    vector_sums,
    with_centroids,
)
from llamaindex_kb.stores.local.layout import (
    MANIFEST_FILE,
    KBLayout,
    VersionGone,
    all_layouts,
    current_version,
)
from llamaindex_kb.stores.local.version import KnowledgeBase, read_manifest
from llamaindex_kb.stores.local.writer import disk_space, write_version

log = logging.getLogger(__name__)


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
                found.append(read_manifest(version))
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
            check_publishable(existing.manifest if existing is not None else None, change)
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
            manifest = with_centroids(
                change.manifest.model_copy(update={"documents": len(documents)}),
                vector_sums(vectors) if needs_centroid(change.manifest) else {})
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


def from_url(url: str, settings: Settings) -> LocalStore:
    parts = urlsplit(url)
    if parts.netloc not in {"", "localhost"}:
        raise ConfigurationError(
            f"store URL {redact_url(url)!r}: a local store needs an absolute path, e.g. "
            "local:///srv/kb "
            "(three slashes)"
        )
    path = unquote(parts.path)
    return LocalStore(Path(path) if path else settings.data_dir)
