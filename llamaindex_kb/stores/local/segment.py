"""A segment: an immutable folder of chunks with every index over them.

A version of a knowledge base is a list of segments, each with the documents removed
from it since it was written (``version.py``). A change writes one small segment (its
own chunks) and a new list; a compaction merges segments into one (``compaction.py``).
Row ``i`` of a segment means the same chunk in every file of it::

    node_ids.npy, document_ids.npy   the chunks' ids and their documents' ids
    postings/                        keyword counts (postings.py)
    vectors/vectors.npy              unit-length embeddings (absent without a model)
    metadata.json                    chunk metadata as columns (MetadataTable)
    docstore.sqlite                  the chunks and their parents, as LlamaIndex nodes
    documents.json                   the documents whose chunks are here
    readable.npy                     each chunk's share of tokens the model read (if known)

Segments are shared by every version that lists them, and once read, by every open
version in the process (``SegmentCache``): a change to a 100k-chunk base reads only
its own small segment.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import cached_property
from pathlib import Path

import numpy as np
from llama_index.core.schema import BaseNode
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc

from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.stores.base import DocumentInfo, VectorSums, vector_sums
from llamaindex_kb.stores.local.docstore import NODE_COLLECTION, SQLiteKVStore
from llamaindex_kb.stores.local.keyword import KeywordIndex
from llamaindex_kb.stores.local.layout import read_array
from llamaindex_kb.stores.local.postings import SegmentPostings
from llamaindex_kb.stores.local.vectors import VectorMatrix, normalise

DOCSTORE_FILE = "docstore.sqlite"
POSTINGS_DIR = "postings"
VECTOR_DIR = "vectors"
METADATA_FILE = "metadata.json"
NODE_IDS_FILE = "node_ids.npy"
DOCUMENTS_FILE = "documents.json"
DOCUMENT_IDS_FILE = "document_ids.npy"
READABLE_FILE = "readable.npy"
# Versions written before segments kept one segment's files in the version folder, with
# BM25 weights (not counts) here: still read, and rewritten as a segment on first change.
LEGACY_KEYWORD_DIR = "keyword"

# Wraps the reading of one named file (the version turns failures into errors naming it).
Reading = Callable[[str], AbstractContextManager[None]]


class Segment:
    """One segment, read into memory (the docstore and documents on demand).

    ``reading(name)`` wraps each file's read: the caller turns failures into errors
    naming the knowledge base and file.
    """

    def __init__(self, folder: Path, reading: Reading, *, legacy: bool = False) -> None:
        """``legacy``: a version written before segments, read from its own folder."""
        self.folder = folder
        self.legacy = legacy
        named = reading

        def reading(name: str) -> AbstractContextManager[None]:
            # A file of a segment is named with its segment: several have one of each.
            return named(name if legacy else f"segment {folder.name}: {name}")

        with reading(DOCSTORE_FILE):
            # The cheap check first: a segment whose docstore is cut short is refused
            # before hundreds of megabytes of arrays are read.
            self.docstore = SQLiteKVStore(folder / DOCSTORE_FILE, read_only=True)
            self.docstore.check()
        with reading(NODE_IDS_FILE):
            self.node_ids: np.ndarray = read_array(folder / NODE_IDS_FILE)
        with reading(DOCUMENT_IDS_FILE):
            self.document_ids: np.ndarray = read_array(folder / DOCUMENT_IDS_FILE)
        self.postings: SegmentPostings | None = None
        self.legacy_keyword: KeywordIndex | None = None
        if self.legacy:
            with reading(LEGACY_KEYWORD_DIR):
                self.legacy_keyword = KeywordIndex.load(folder / LEGACY_KEYWORD_DIR)
        else:
            with reading(POSTINGS_DIR):
                self.postings = SegmentPostings.load(folder / POSTINGS_DIR)
        self.vectors: VectorMatrix | None = None
        if (folder / VECTOR_DIR).is_dir():
            with reading(VECTOR_DIR):
                self.vectors = VectorMatrix.load(folder / VECTOR_DIR, self.node_ids)
        with reading(METADATA_FILE):
            self.metadata = MetadataTable.load(folder / METADATA_FILE)
        self.readable: np.ndarray | None = None
        if (folder / READABLE_FILE).exists():
            with reading(READABLE_FILE):
                self.readable = read_array(folder / READABLE_FILE)
        self._documents_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])

    def row_counts(self) -> dict[str, tuple[int, ...]]:
        """Rows per file, for the caller's check that they agree."""
        counts = {NODE_IDS_FILE: self.node_ids.shape, DOCUMENT_IDS_FILE: self.document_ids.shape,
                  METADATA_FILE: (len(self.metadata),)}
        if self.postings is not None:
            counts[POSTINGS_DIR] = (len(self.postings),)
        if self.legacy_keyword is not None:
            counts[LEGACY_KEYWORD_DIR] = (len(self.legacy_keyword),)
        if self.vectors is not None:
            counts[VECTOR_DIR] = (len(self.vectors),)
        if self.readable is not None:
            counts[READABLE_FILE] = self.readable.shape
        return counts

    def documents(self) -> dict[str, DocumentInfo]:
        """The documents written with this segment; read on first use (queries never
        need them). ``ValueError`` if the file is damaged."""
        with self._documents_lock:
            return self._documents

    @cached_property
    def _documents(self) -> dict[str, DocumentInfo]:
        raw = json.loads((self.folder / DOCUMENTS_FILE).read_text())
        return {k: DocumentInfo.model_validate(v) for k, v in raw.items()}

    @cached_property
    def vector_sums(self) -> VectorSums:
        """Per script, the sums of all its rows' vectors (``stores.base.vector_sums``):
        a version subtracts its removed rows' rather than adding up the rest again."""
        return vector_sums(None if self.vectors is None
                           else self.vectors.rows(np.arange(len(self))))

    @cached_property
    def _rows_by_document(self) -> dict[str, np.ndarray]:
        if not self.document_ids.size:
            return {}
        order = np.argsort(self.document_ids, kind="stable")
        ids = self.document_ids[order]
        starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
        ends = [*starts[1:], ids.size]
        return {str(ids[s]): np.sort(order[s:e]) for s, e in zip(starts, ends, strict=True)}

    def rows_of(self, document_ids: Iterable[str]) -> np.ndarray:
        """The rows of these documents, sorted."""
        found = [self._rows_by_document.get(d) for d in document_ids]
        parts = [rows for rows in found if rows is not None]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def nodes(self, node_ids: Sequence[str]) -> list[BaseNode | None]:
        """The nodes, in order (None where absent); read in batches rather than the
        docstore's one query per id."""
        found: list[BaseNode | None] = []
        batch = 500  # SQLite's bound-parameter limit is far above this; keeps queries short
        for start in range(0, len(node_ids), batch):
            ids = list(node_ids[start : start + batch])
            found += [None if data is None else json_to_doc(data)
                      for data in self.docstore.get_many(ids, NODE_COLLECTION)]
        return found


class SegmentCache:
    """Segments read in this process, by folder, while any open version uses them."""

    def __init__(self) -> None:
        self._read: weakref.WeakValueDictionary[Path, Segment] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, folder: Path, reading: Reading, *, legacy: bool = False) -> Segment:
        with self._lock:
            found = self._read.get(folder)
        if found is not None:
            return found
        segment = Segment(folder, reading, legacy=legacy)
        with self._lock:
            return self._read.setdefault(folder, segment)


def write_segment(folder: Path, nodes: Sequence[BaseNode], vectors: np.ndarray | None,
                  documents: dict[str, DocumentInfo], parents: Sequence[BaseNode] = (),
                  readable: np.ndarray | None = None) -> None:
    """Every file of a segment for ``nodes`` in the empty ``folder``: row i is nodes[i],
    vectors[i] and readable[i]. ``parents`` (parent-child chunking) go to the docstore
    only: they are returned, never matched."""
    if vectors is not None and vectors.shape[0] != len(nodes):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(nodes)} nodes")
    node_ids = np.array([node.node_id for node in nodes], dtype=str)
    np.save(folder / NODE_IDS_FILE, node_ids)
    document_ids = [str(node.metadata.get("document_id", node.node_id)) for node in nodes]
    np.save(folder / DOCUMENT_IDS_FILE, np.array(document_ids, dtype=str))
    SegmentPostings.build([node.get_content() for node in nodes]).save(folder / POSTINGS_DIR)
    if readable is not None:
        np.save(folder / READABLE_FILE, np.asarray(readable, np.float64))
    MetadataTable([dict(node.metadata) for node in nodes]).save(folder / METADATA_FILE)
    if vectors is not None:
        VectorMatrix(normalise(vectors.astype(np.float32, copy=False))).save(
            folder / VECTOR_DIR, node_ids)
    store_nodes(folder / DOCSTORE_FILE, [*nodes, *parents])
    write_documents(folder, documents)


def write_documents(folder: Path, documents: dict[str, DocumentInfo]) -> None:
    payload = {doc_id: info.model_dump() for doc_id, info in documents.items()}
    (folder / DOCUMENTS_FILE).write_text(json.dumps(payload, ensure_ascii=False))


def store_nodes(path: Path, nodes: Sequence[BaseNode]) -> None:
    """Write nodes where ``KVDocumentStore.get_nodes`` reads them, in one transaction.

    ``add_documents`` would also maintain ref-doc and hash collections per node
    (a read per node), which segments never use: documents.json records them.
    """
    kv = SQLiteKVStore(path, unpublished=True)
    try:
        # In batches, so 100k nodes never exist as JSON all at once.
        for start in range(0, len(nodes), 2000):
            batch = nodes[start : start + 2000]
            kv.put_all([(node.node_id, doc_to_json(node)) for node in batch],
                       collection=NODE_COLLECTION)
    finally:
        kv.close()
