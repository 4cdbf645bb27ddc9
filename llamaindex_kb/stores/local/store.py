"""The embedded store: a folder of knowledge bases, each a series of versions."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

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
    FindingStore,
    KBManifest,
    Published,
    VectorSums,
    check_publishable,
    merged,
    needs_centroid,
    subtracted,
    vector_sums,
    with_centroids,
)
from llamaindex_kb.stores.local.compaction import merge, plan
from llamaindex_kb.stores.local.corpus import CorpusStats, Part, corpus_stats
from llamaindex_kb.stores.local.layout import (
    MANIFEST_FILE,
    KBLayout,
    VersionGone,
    all_layouts,
    current_version,
)
from llamaindex_kb.stores.local.segment import Segment
from llamaindex_kb.stores.local.version import (
    SEGMENTS,
    KnowledgeBase,
    Listing,
    SegmentEntry,
    read_manifest,
    segment_folder,
)
from llamaindex_kb.stores.local.writer import (
    disk_space,
    new_segment,
    remove_unused,
    write_version,
)
from llamaindex_kb.stores.records import FileRecords

log = logging.getLogger(__name__)


# How much the embedded store keeps open per process: at 384 dimensions a million
# chunks take about 2.3 GB. Past either budget the least recently used base closes and
# is read again when next queried.
MAX_OPEN_BASES = 64
MAX_OPEN_CHUNKS = 1_000_000


class LocalStore(FindingStore):
    """The embedded store: a folder of knowledge bases, each a series of versions."""

    searches_in_process = True
    # Tests that count segments turn merges off, or run them with ``compact``.
    compact_in_background = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = f"local://{Path(data_dir).resolve()}"
        self.access_records = FileRecords(data_dir)
        # One open version per knowledge base, least recently used first. A query holds
        # the one it started with, so a version replaced or evicted here lives (files
        # included) until its last query ends.
        self._open: OrderedDict[str, KnowledgeBase] = OrderedDict()
        self._lock = threading.Lock()
        self._compacting: set[str] = set()

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
                # Opened while the one it replaces is held: the segments both list
                # are read once (SegmentCache), not again from disk.
                cached = self._open_live(layout)
                if cached is None:
                    self._open.pop(knowledge_id, None)
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
        """Write the change's chunks as one new segment, and a version listing it with
        the segments kept (less the documents the change replaces or removes): the
        work is the change's, not the base's. Merges follow in the background."""
        layout = KBLayout(self.data_dir, knowledge_id)
        with disk_space(layout), layout.write_lock():
            other = layout.foreign_owner()
            if other is not None:
                raise InvalidFieldError("knowledge_id", (
                    f"{knowledge_id!r} cannot be stored: its folder {layout.root.name} holds "
                    f"knowledge base {other!r}, made by an earlier version; drop that one "
                    "or choose another id"))
            # What a writer that failed or died left (a full disk's attempts included)
            # goes before this one adds to it.
            remove_unused(layout)
            # The open version, read under the lock: another writer may have published.
            existing = None if change.replace else self.find(knowledge_id)
            check_publishable(existing.manifest if existing is not None else None, change)
            kept: list[tuple[Segment, SegmentEntry]] = []
            removed = 0
            if existing is not None:
                removed = len(change.removed & existing.documents.keys())
                kept = _without(_segments(layout, existing),
                                set(change.documents) | change.removed)
            if change.chunks or change.documents or change.parents:
                kept.append(self._new_segment(layout, change))
            version = self._publish(layout, change.manifest, kept)
            # This process lets go of the version it replaced (queries running on it
            # keep theirs), so it can be removed now rather than by a later writer.
            existing = None
            remove_unused(layout)
        self._compact_soon(knowledge_id)
        return Published(documents=version.manifest.documents, chunks=len(version),
                         removed=removed)

    def _new_segment(self, layout: KBLayout, change: Change) -> tuple[Segment, SegmentEntry]:
        vectors = change.vectors
        embedding = change.manifest.embedding
        if embedding is not None and vectors is None:
            vectors = np.zeros((0, embedding.dimension), dtype=np.float32)
        name = new_segment(layout, change.chunks, vectors, change.documents, change.parents,
                           change.readable)
        return _read(layout, name), SegmentEntry(name=name)

    def _publish(self, layout: KBLayout, manifest: KBManifest,
                 segments: list[tuple[Segment, SegmentEntry]],
                 stats: CorpusStats | None = None, touch: bool = True) -> KnowledgeBase:
        """Make a version of ``segments`` live and open it here (before the version it
        replaces is let go, so the segments both use are never read twice)."""
        parts, offset = [], 0
        sums: VectorSums = {}
        documents = 0
        readable: list[float] | None = []
        for segment, entry in segments:
            rows = segment.rows_of(entry.removed)
            if readable is not None and segment.readable is not None:
                readable.append(float(segment.readable.sum() - segment.readable[rows].sum()))
            elif len(segment) > rows.size:
                readable = None  # some chunks' shares are not known: the running mean stays
            assert segment.postings is not None  # a legacy segment is rewritten first
            parts.append(Part(segment.postings, offset, rows))
            offset += len(segment)
            if needs_centroid(manifest) and segment.vectors is not None:
                removed = vector_sums(segment.vectors.rows(rows))
                live = subtracted(segment.vector_sums, removed)
                if live is None:  # a probe tie placed a row otherwise: add up the rest
                    live = vector_sums(np.delete(
                        segment.vectors.rows(np.arange(len(segment))), rows, axis=0))
                sums = merged(sums, live)
            documents += len(segment.documents().keys() - set(entry.removed))
        stats = stats or corpus_stats(parts)
        update: dict[str, object] = {"documents": documents}
        if readable is not None and stats.chunks:
            # Rounded: sums of the same shares in other groupings differ in the last bits.
            update["readable_share"] = round(sum(readable) / stats.chunks, 9)
        manifest = with_centroids(manifest.model_copy(update=update), sums)
        listing = Listing(segments=[entry for _, entry in segments], chunks=stats.chunks,
                          total_length=stats.total_length,
                          absent_term_weight=stats.absent_term_weight)
        version = write_version(layout, manifest, listing, touch=touch)
        opened = KnowledgeBase(version, layout.knowledge_id)
        with self._lock:
            self._open[layout.knowledge_id] = opened
            self._open.move_to_end(layout.knowledge_id)
            self._evict()
        return opened

    def compact(self, knowledge_id: str) -> bool:
        """Merge the base's segments if it needs it (``compaction.plan``); whether it did.
        Either way, what a writer that died left on disk is removed. Writers wait
        meanwhile; readers never do."""
        layout = KBLayout(self.data_dir, knowledge_id)
        if layout.current_version() is None:
            return False  # dropped (or never made): the lock would make its folder again
        with disk_space(layout), layout.write_lock():
            remove_unused(layout)
            existing = self.find(knowledge_id)
            run = None if existing is None else plan(existing)
            if existing is None or run is None:
                return False
            if existing.listing is None:
                segments = _segments(layout, existing)
            else:
                entry = merge(layout, existing, run)
                every = _segments(layout, existing)
                segments = [*every[: run.start], (_read(layout, entry.name), entry),
                            *every[run.stop :]]
            # The same live rows in the same order: the statistics stand.
            self._publish(layout, existing.manifest, segments,
                          stats=None if existing.listing is None else existing.listing.stats,
                          touch=False)
            existing = None
            remove_unused(layout)
        log.info("merged %d segments of knowledge base %s", run.stop - run.start, knowledge_id)
        return True

    def _compact_soon(self, knowledge_id: str) -> None:
        """Start a merge in the background if the base needs one and none runs here."""
        with self._lock:
            current = self._open.get(knowledge_id)
            if (not self.compact_in_background or current is None or plan(current) is None
                    or knowledge_id in self._compacting):
                return
            self._compacting.add(knowledge_id)
        # Not a daemon: a process that exits (a CLI run) first finishes the merge its
        # changes called for, so a base changed only from the command line is merged
        # too; killed, it leaves the base as it was.
        threading.Thread(target=self._compact_logged, args=(knowledge_id,),
                         name=f"llamaindex_kb-merge-{knowledge_id[:40]}").start()

    def _compact_logged(self, knowledge_id: str) -> None:
        try:
            while self.compact(knowledge_id):
                pass
        except Exception:
            # The base answers as before: a merge only ever replaces a version whole.
            log.exception("merging the segments of knowledge base %s failed", knowledge_id)
        finally:
            with self._lock:
                self._compacting.discard(knowledge_id)

    def drop(self, knowledge_id: str) -> None:
        layout = KBLayout(self.data_dir, knowledge_id)
        if layout.current_version() is None or layout.foreign_owner() is not None:
            raise KnowledgeBaseNotFound.missing(knowledge_id)
        with layout.write_lock():
            layout.drop()
        with self._lock:
            self._open.pop(knowledge_id, None)


def _read(layout: KBLayout, name: str) -> Segment:
    return SEGMENTS.get(segment_folder(layout.root, name),
                        lambda _: contextlib.nullcontext())


def _segments(layout: KBLayout, kb: KnowledgeBase) -> list[tuple[Segment, SegmentEntry]]:
    """The live version's segments, each with its entry; a version written before
    segments is first rewritten as one segment (once: ``compaction.merge``)."""
    if kb.listing is None:
        entry = merge(layout, kb, slice(0, len(kb.segments)))
        return [(_read(layout, entry.name), entry)]
    return list(zip(kb.segments, kb.listing.segments, strict=True))


def _without(segments: list[tuple[Segment, SegmentEntry]], documents: set[str]
             ) -> list[tuple[Segment, SegmentEntry]]:
    """The segments less ``documents``; a segment left with no live row or document
    is no longer listed."""
    kept = []
    for segment, entry in segments:
        gone = set(entry.removed) | (documents & segment.documents().keys())
        if (segment.rows_of(gone).size == len(segment)
                and not segment.documents().keys() - gone):
            continue
        kept.append((segment, SegmentEntry(name=entry.name, removed=sorted(gone))))
    return kept


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
