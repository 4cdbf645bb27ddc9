"""Write a complete knowledge base version from nodes, then publish it atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from llama_index.core.schema import BaseNode
from llama_index.core.storage.docstore.utils import doc_to_json

from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.errors import DISK_FULL_ERRNOS, DiskFullError
from llamaindex_kb.stores.base import DocumentInfo, KBManifest
from llamaindex_kb.stores.local.docstore import NODE_COLLECTION, SQLiteKVStore
from llamaindex_kb.stores.local.keyword import KeywordIndex
from llamaindex_kb.stores.local.layout import KBLayout
from llamaindex_kb.stores.local.vectors import VectorMatrix, normalise
from llamaindex_kb.stores.local.version import (
    DOCSTORE_FILE,
    DOCUMENT_IDS_FILE,
    KEYWORD_DIR,
    METADATA_FILE,
    NODE_IDS_FILE,
    VECTOR_DIR,
    write_documents,
    write_manifest,
)


def write_version(
    layout: KBLayout,
    manifest: KBManifest,
    nodes: Sequence[BaseNode],
    vectors: np.ndarray | None,
    documents: dict[str, DocumentInfo],
    parents: Sequence[BaseNode] = (),
) -> Path:
    """Build every index for ``nodes`` (row i = nodes[i] = vectors[i]) and make it live.

    ``parents`` (parent-child chunking) go to the docstore only: they are returned,
    never matched.

    Call with ``layout.write_lock()`` held. On any failure the half-built folder is
    removed and the previous version stays live. Versions left behind are removed by
    the caller (``layout.remove_stale_versions``) once it no longer reads them itself.
    """
    if vectors is not None and vectors.shape[0] != len(nodes):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(nodes)} nodes")
    version = layout.new_version_dir()
    try:
        node_ids = np.array([node.node_id for node in nodes], dtype=str)
        np.save(version / NODE_IDS_FILE, node_ids)
        document_ids = [str(node.metadata.get("document_id", node.node_id)) for node in nodes]
        np.save(version / DOCUMENT_IDS_FILE, np.array(document_ids, dtype=str))
        KeywordIndex.build([node.get_content() for node in nodes]).save(version / KEYWORD_DIR)
        MetadataTable([dict(node.metadata) for node in nodes]).save(version / METADATA_FILE)
        if vectors is not None:
            VectorMatrix(normalise(vectors.astype(np.float32, copy=False))).save(
                version / VECTOR_DIR, node_ids)
        _store_nodes(version / DOCSTORE_FILE, [*nodes, *parents])
        write_documents(version, documents)
        write_manifest(version, manifest.model_copy(
            update={"chunks": len(nodes), "updated_at": time.time()}))
        layout.publish(version)
    except BaseException as exc:
        # Asked before the cleanup frees the space the failed write filled.
        full = isinstance(exc, Exception) and disk_full(exc, version)
        # Only the final fsync of the folder follows the switch: if that failed, the
        # version is live and must stay.
        if layout.current_version() != version:
            shutil.rmtree(version, ignore_errors=True)
        if full:
            raise _disk_full_error(layout) from exc
        raise
    return version


def _store_nodes(path: Path, nodes: Sequence[BaseNode]) -> None:
    """Write nodes where ``KVDocumentStore.get_nodes`` reads them, in one transaction.

    ``add_documents`` would also maintain ref-doc and hash collections per node
    (a read per node), which versions never use: documents.json records them.
    """
    kv = SQLiteKVStore(path)
    try:
        # In batches, so 100k nodes never exist as JSON all at once.
        for start in range(0, len(nodes), 2000):
            batch = nodes[start : start + 2000]
            kv.put_all([(node.node_id, doc_to_json(node)) for node in batch],
                       collection=NODE_COLLECTION)
    finally:
        kv.close()




def disk_full(exc: Exception, folder: Path) -> bool:
    """Whether ``exc``, raised writing in ``folder``, means the disk or quota is full.

    Some writers do not say so: numpy reports a short write ("N requested and M
    written") with no errno, SQLite a "disk I/O error" when its WAL index cannot grow.
    For those a small write beside them asks the file system.
    """
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return exc.errno in DISK_FULL_ERRNOS
    elif isinstance(exc, sqlite3.OperationalError):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code != sqlite3.SQLITE_IOERR:
            return code == sqlite3.SQLITE_FULL
    else:
        return False
    probe = folder / ".space-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(1 << 20))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as probed:
        return probed.errno in DISK_FULL_ERRNOS
    finally:
        probe.unlink(missing_ok=True)
    return False


def _disk_full_error(layout: KBLayout) -> DiskFullError:
    return DiskFullError(
        f"no space left on the disk holding the data directory {layout.root.parent.parent} "
        f"while writing knowledge base {layout.knowledge_id!r}; nothing was changed: free "
        "some space (or raise the quota) and try again"
    )


@contextlib.contextmanager
def disk_space(layout: KBLayout) -> Iterator[None]:
    """A full disk or quota while writing ``layout`` (outside ``write_version``, which
    says so itself) becomes ``DiskFullError`` naming the data directory."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        if not disk_full(exc, layout.root):
            raise
        raise _disk_full_error(layout) from exc
