"""``llamaindex:///abs/path``: a folder written by LlamaIndex's ``storage_context.persist()``.

Its ``index_store.json`` names the indexes (``index.set_index_id``, or the generated
id) and which nodes each holds; ``docstore.json`` holds the nodes and
``default__vector_store.json`` (a ``SimpleVectorStore``) their embeddings. Several
indexes may share one folder. The folder is read with LlamaIndex's own storage
classes, then held as arrays (``engine.NodeIndex``): SimpleVectorStore scores node by
node in Python, about a second a query at 100k nodes.

An index changes when the user's code persists again: every file is rewritten, so
the files' sizes and modification times say when to read it anew.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Hashable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from llama_index.core.data_structs.data_structs import IndexDict
from llama_index.core.schema import NodeWithScore
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.core.storage.index_store import SimpleIndexStore
from llama_index.core.vector_stores.simple import (
    DEFAULT_PERSIST_FNAME,
    DEFAULT_VECTOR_STORE,
    NAMESPACE_SEP,
)

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import ConfigurationError, KnowledgeBaseDamaged
from llamaindex_kb.redaction import redact_url
from llamaindex_kb.stores.llamaindex.store import LlamaIndexStore, LoadedIndex

INDEX_STORE_FILE = "index_store.json"
# The default vector store's file, as StorageContext.persist names it.
VECTORS_FILE = f"{DEFAULT_VECTOR_STORE}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}"


class PersistedFolder:
    """The ``IndexSource`` of one persisted folder."""

    searches_in_process = True

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shown = f"llamaindex://{folder}"
        self._ids: tuple[Hashable, frozenset[str]] | None = None

    def _check_folder(self) -> None:
        if not (self.folder / INDEX_STORE_FILE).is_file():
            raise ConfigurationError(
                f"store URL {self.shown!r}: {self.folder} holds no {INDEX_STORE_FILE}; point "
                "it at the folder given to storage_context.persist(persist_dir=...)")

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KnowledgeBaseDamaged(
                f"the LlamaIndex folder {self.folder} cannot be read: {name}: "
                f"{type(exc).__name__}: {exc}") from exc

    def index_ids(self) -> list[str]:
        return sorted(self._vector_indexes(self._stats()))

    def version(self, index_id: str) -> Hashable | None:
        stats = self._stats()
        return stats if index_id in self._vector_indexes(stats) else None

    def _stats(self) -> tuple[tuple[str, int, int], ...]:
        """The folder's files as (name, modification time, size): ``persist`` rewrites them all."""
        stats = tuple(sorted((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                             for path in self.folder.glob("*.json")))
        if not any(name == INDEX_STORE_FILE for name, _, _ in stats):
            self._check_folder()
        return stats

    def _vector_indexes(self, stats: Hashable) -> frozenset[str]:
        """The ids of the folder's vector store indexes, read from the small index store
        only (not the docstore) and again only when the files changed: every request asks."""
        if self._ids is None or self._ids[0] != stats:
            with self._reading(INDEX_STORE_FILE):
                index_store = SimpleIndexStore.from_persist_dir(str(self.folder))
            self._ids = (stats, frozenset(struct.index_id
                                          for struct in index_store.index_structs()
                                          if isinstance(struct, IndexDict)))
        return self._ids[1]

    def load(self, index_id: str) -> LoadedIndex:
        self._check_folder()
        with self._reading(INDEX_STORE_FILE):
            struct = SimpleIndexStore.from_persist_dir(str(self.folder)).get_index_struct(index_id)
        if not isinstance(struct, IndexDict):
            raise KnowledgeBaseDamaged(f"LlamaIndex index {index_id!r} in {self.folder} "
                                       "is not a vector store index")
        node_ids = list(struct.nodes_dict.values())
        with self._reading("docstore.json"):
            nodes = SimpleDocumentStore.from_persist_dir(str(self.folder)).get_nodes(node_ids)
        embeddings = None
        vectors_file = self.folder / VECTORS_FILE
        if vectors_file.is_file():
            # Read as the JSON it is: SimpleVectorStore.from_persist_dir validates it
            # value by value, 19 s at 10k nodes of 384 dimensions against 1 s.
            with self._reading(VECTORS_FILE):
                table = json.loads(vectors_file.read_bytes())["embedding_dict"]
                embeddings = np.array([table[node_id] for node_id in node_ids],
                                      dtype=np.float64)
        dimension = int(embeddings.shape[1]) if embeddings is not None and embeddings.size else None
        return LoadedIndex(nodes=nodes, embeddings=embeddings, dimension=dimension)

    def vector_search(self, index_id: str, query_vector: np.ndarray, top_k: int,
                      predicate: Predicate | None) -> list[NodeWithScore] | None:
        return None  # every node is in memory: NodeIndex scores them all


def from_url(url: str, settings: Settings) -> LlamaIndexStore:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc not in {"", "localhost"} or not path.startswith("/"):
        raise ConfigurationError(
            f"store URL {redact_url(url)!r}: a persisted LlamaIndex folder needs an absolute "
            "path, e.g. llamaindex:///srv/storage (three slashes)")
    return LlamaIndexStore(PersistedFolder(Path(path)))
