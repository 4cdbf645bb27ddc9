"""Write a complete knowledge base version from nodes, then publish it atomically."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from llama_index.core.schema import BaseNode
from llama_index.core.storage.docstore.keyval_docstore import KVDocumentStore
from llama_index.core.storage.docstore.utils import doc_to_json

from .filters import MetadataTable
from .keyword import KeywordIndex
from .knowledge_base import (
    DOCSTORE_FILE,
    DOCUMENT_IDS_FILE,
    KEYWORD_DIR,
    METADATA_FILE,
    NODE_IDS_FILE,
    VECTOR_DIR,
    DocumentInfo,
    KBManifest,
    write_documents,
)
from .kvstore import SQLiteKVStore
from .layout import KBLayout
from .vector_store import NumpyVectorStore, normalise


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
    removed and the previous version stays live.
    """
    if vectors is not None and vectors.shape[0] != len(nodes):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(nodes)} nodes")
    previous = layout.current_version()
    version = layout.new_version_dir()
    try:
        node_ids = np.array([node.node_id for node in nodes], dtype=str)
        np.save(version / NODE_IDS_FILE, node_ids)
        document_ids = [str(node.metadata.get("document_id", node.node_id)) for node in nodes]
        np.save(version / DOCUMENT_IDS_FILE, np.array(document_ids, dtype=str))
        KeywordIndex.build([node.get_content() for node in nodes]).save(version / KEYWORD_DIR)
        MetadataTable([dict(node.metadata) for node in nodes]).save(version / METADATA_FILE)
        if vectors is not None:
            store = NumpyVectorStore(
                matrix=normalise(vectors.astype(np.float32, copy=False)), ids=node_ids
            )
            store.persist(str(version / VECTOR_DIR))
        _store_nodes(version / DOCSTORE_FILE, [*nodes, *parents])
        write_documents(version, documents)
        manifest.model_copy(
            update={"chunks": len(nodes), "updated_at": time.time()}
        ).write(version)
        layout.publish(version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    layout.remove_stale_versions(keep={version} | ({previous} if previous else set()))
    return version


def _store_nodes(path: Path, nodes: Sequence[BaseNode]) -> None:
    """Write nodes where ``KVDocumentStore.get_nodes`` reads them, in one transaction.

    ``add_documents`` would also maintain ref-doc and hash collections per node
    (a read per node), which versions never use: documents.json records them.
    """
    kv = SQLiteKVStore(path)
    collection = KVDocumentStore(kv)._node_collection
    # In batches, so 100k nodes never exist as JSON all at once.
    for start in range(0, len(nodes), 2000):
        batch = nodes[start : start + 2000]
        kv.put_all([(node.node_id, doc_to_json(node)) for node in batch], collection=collection)
    kv.close()
