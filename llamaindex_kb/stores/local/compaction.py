"""Merging a version's segments into one: when, and how.

Every change adds a segment or removes documents from one, and every query pays a
little per segment and per removed row. When a version has more than
``MAX_SEGMENTS`` segments, or more than ``MAX_REMOVED_SHARE`` of its rows are removed,
a run of its segments is merged into one segment of their live rows, in row order: the
version it makes answers every query exactly as before (same rows in the same order,
same statistics). Merging copies arrays, counts and stored nodes; nothing is
tokenized or embedded again, except a version written before segments, whose keyword
weights hold no counts (its chunks are tokenized once).

A merge is published like any change (``writer.write_version``): readers are never
blocked and a crash leaves the version before or after it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.errors import KnowledgeBaseDamaged
from llamaindex_kb.stores.base import DocumentInfo
from llamaindex_kb.stores.local.docstore import NODE_COLLECTION, SQLiteKVStore
from llamaindex_kb.stores.local.layout import KBLayout, sync
from llamaindex_kb.stores.local.postings import SegmentPostings
from llamaindex_kb.stores.local.segment import (
    DOCSTORE_FILE,
    DOCUMENT_IDS_FILE,
    DOCUMENTS_FILE,
    METADATA_FILE,
    NODE_IDS_FILE,
    POSTINGS_DIR,
    READABLE_FILE,
    VECTOR_DIR,
    Segment,
    write_documents,
)
from llamaindex_kb.stores.local.vectors import VectorMatrix
from llamaindex_kb.stores.local.version import KnowledgeBase, SegmentEntry
from llamaindex_kb.stores.local.writer import cleaned_on_failure

MAX_SEGMENTS = 8
MAX_REMOVED_SHARE = 0.2


def plan(kb: KnowledgeBase) -> slice | None:
    """The run of ``kb``'s segments to merge, if it needs a merge.

    The first segment is usually the large one: while it holds more than twice the
    live rows of the others, only the others are merged, so a stream of small changes
    costs small merges."""
    count = len(kb.segments)
    if kb.listing is None:
        return slice(0, count)  # written before segments: rewritten as one
    removed = sum(rows.size for rows in kb.removed_rows)
    if count and removed > MAX_REMOVED_SHARE * kb.rows:
        return slice(0, count)
    if count > MAX_SEGMENTS:
        first = len(kb.segments[0]) - kb.removed_rows[0].size
        return slice(1, count) if first > 2 * (len(kb) - first) else slice(0, count)
    return None


def merge(layout: KBLayout, kb: KnowledgeBase, run: slice) -> SegmentEntry:
    """Write one segment of the live rows of ``kb.segments[run]``, in order.

    Call with ``layout.write_lock()`` held; ``kb`` is the live version."""
    segments = kb.segments[run]
    kept = [np.setdiff1d(np.arange(len(segment)), removed)
            for segment, removed in zip(segments, kb.removed_rows[run], strict=True)]
    documents: dict[str, DocumentInfo] = {}
    with kb.reading(DOCUMENTS_FILE):
        for segment, gone in zip(segments, kb.removed_documents[run], strict=True):
            documents.update((k, v) for k, v in segment.documents().items() if k not in gone)
    folder = layout.new_segment_dir()
    folder.mkdir()  # outside the cleanup: a name in use is never removed
    with cleaned_on_failure(layout, folder):
        node_ids = np.concatenate([s.node_ids[rows] for s, rows in zip(segments, kept,
                                                                      strict=True)])
        np.save(folder / NODE_IDS_FILE, node_ids)
        np.save(folder / DOCUMENT_IDS_FILE, np.concatenate(
            [s.document_ids[rows] for s, rows in zip(segments, kept, strict=True)]))
        _merged_postings(kb, segments, kept).save(folder / POSTINGS_DIR)
        _merged_metadata(segments, kept).save(folder / METADATA_FILE)
        readable = [kb.manifest.readable_share if s.readable is None and s.legacy else s.readable
                    for s in segments]
        if all(r is not None for r in readable):
            # A base written before segments kept only the mean: each chunk gets it.
            np.save(folder / READABLE_FILE, np.concatenate([
                np.full(rows.size, r) if isinstance(r, float) else r[rows]
                for r, rows in zip(readable, kept, strict=True)]).astype(np.float64))
        if kb.manifest.embedding is not None:
            VectorMatrix(np.vstack([s.vectors.rows(rows) for s, rows in zip(
                segments, kept, strict=True) if s.vectors is not None])).save(
                    folder / VECTOR_DIR, node_ids)
        parents = [p for info in documents.values() for p in info.parent_ids]
        missing = _copy_nodes(folder / DOCSTORE_FILE, segments, [*node_ids.tolist(), *parents])
        if missing:
            raise KnowledgeBaseDamaged.naming(
                kb.knowledge_id, f"{DOCSTORE_FILE} lacks {missing} of the chunks it lists")
        write_documents(folder, documents)
        sync(folder)
    return SegmentEntry(name=folder.name)


def _merged_postings(kb: KnowledgeBase, segments: list[Segment], kept: list[np.ndarray]
                     ) -> SegmentPostings:
    """The live rows' postings, renumbered, from the segments' counts."""
    vocab: dict[str, int] = {}
    terms, rows, tfs, lengths = [], [], [], []
    offset = 0
    for segment, keep in zip(segments, kept, strict=True):
        postings = segment.postings
        if postings is None:  # written before segments: tokenized once
            with kb.reading(DOCSTORE_FILE):
                nodes = segment.nodes(segment.node_ids[keep].tolist())
            if any(node is None for node in nodes):
                raise KnowledgeBaseDamaged.naming(
                    kb.knowledge_id, f"{DOCSTORE_FILE} lacks chunks of its node_ids")
            postings = SegmentPostings.build([node.get_content() for node in nodes if node])
            keep = np.arange(len(nodes))
        renumbered = np.full(len(postings), -1, np.int64)
        renumbered[keep] = np.arange(keep.size) + offset
        columns = np.empty(len(postings.vocab), np.int64)  # this segment's term -> merged
        for term, column in postings.vocab.items():
            columns[column] = vocab.setdefault(term, len(vocab))
        occurrence_terms = np.repeat(np.arange(columns.size), np.diff(postings.indptr))
        live = renumbered[postings.rows] >= 0
        terms.append(columns[occurrence_terms[live]])
        rows.append(renumbered[postings.rows[live]])
        tfs.append(postings.tfs[live])
        lengths.append(postings.lengths[keep])
        offset += keep.size
    all_terms = np.concatenate(terms) if terms else np.zeros(0, np.int64)
    all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    all_tfs = np.concatenate(tfs) if tfs else np.zeros(0, np.int32)
    # Terms only removed rows held leave the vocabulary, as a rebuild would have it.
    used = np.bincount(all_terms, minlength=len(vocab)) > 0
    new_column = np.cumsum(used) - 1
    vocab = {term: int(new_column[column]) for term, column in vocab.items() if used[column]}
    all_terms = new_column[all_terms]
    # Each segment's part is in (term, row) order and the segments' rows ascend, so a
    # stable sort by term alone puts the whole in (term, row) order.
    order = np.argsort(all_terms, kind="stable")
    return SegmentPostings.from_occurrences(
        vocab, all_terms[order], all_rows[order], all_tfs[order],
        np.concatenate(lengths) if lengths else np.zeros(0, np.int64))


def _merged_metadata(segments: list[Segment], kept: list[np.ndarray]) -> MetadataTable:
    columns: dict[str, list[Any]] = {}
    total = 0
    for segment, keep in zip(segments, kept, strict=True):
        _, found = segment.metadata.to_columns()
        for key, values in found.items():
            column = columns.setdefault(key, [None] * total)
            column += [values[row] for row in keep.tolist()]
        total += keep.size
        for column in columns.values():
            column += [None] * (total - len(column))
    # A key only removed rows had is gone, as a rebuild would have it.
    return MetadataTable.from_columns(total, {
        key: values for key, values in columns.items() if any(v is not None for v in values)})


def _copy_nodes(path: Path, segments: list[Segment], node_ids: list[str]) -> int:
    """Copy these nodes' stored JSON from the segments' docstores, in SQL: nothing is
    parsed. A node kept in two segments (a document replaced within the run) is
    taken from the later one, whose chunk or parent it is. How many were not found."""
    SQLiteKVStore(path, unpublished=True).close()  # creates the table
    with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}", uri=True)) as conn:
        # Unpublished until synced: no journal (SQLiteKVStore's ``unpublished``).
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TEMP TABLE wanted (key TEXT PRIMARY KEY)")
        conn.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((k,) for k in node_ids))
        for index, segment in enumerate(segments):
            # Read as the published, immutable file it is: no -wal or -shm is made beside it.
            source = f"file:{quote(str(segment.folder / DOCSTORE_FILE))}?mode=ro&immutable=1"
            conn.execute(f"ATTACH DATABASE ? AS s{index}", (source,))
            conn.execute(
                f"INSERT OR REPLACE INTO kv SELECT collection, key, value FROM s{index}.kv "
                "WHERE collection = ? AND key IN (SELECT key FROM wanted)", (NODE_COLLECTION,))
            conn.commit()
            conn.execute(f"DETACH DATABASE s{index}")
        conn.commit()
        (copied,) = conn.execute("SELECT count(*) FROM kv").fetchone()
        (wanted,) = conn.execute("SELECT count(*) FROM wanted").fetchone()
    return int(wanted - copied)
