"""An exact vector store for the embedded default.

Why not Chroma (architecture.md's first pick)? Measured on 2 cores: an exact
float32 matrix product over 100k × 384 vectors takes a few milliseconds, so brute
force gives recall 1.0 at the latency of an HNSW index, loads in tens of
milliseconds from one ``.npy`` file, adds nothing to the plugin's install (Chroma adds
~370 MB), and takes an arbitrary row mask, which is how Dify's exact metadata
filters are applied before ranking (no post-filter shortfall).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    VectorStoreQuery,
    VectorStoreQueryResult,
)

from llamaindex_kb.stores.local.layout import read_array

VECTORS_FILE = "vectors.npy"
IDS_FILE = "vector_ids.npy"


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores, best first, ties broken by row order."""
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        # Every row tied with the k-th score stays a candidate, so the row-order
        # tie-break below decides, not the partition's arbitrary choice.
        candidates = np.flatnonzero(scores >= kth)
    else:
        candidates = np.arange(n)
    candidates = candidates[np.isfinite(scores[candidates])]
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order][:k]


class NumpyVectorStore(BasePydanticVectorStore):
    """Unit-normalised embeddings in one matrix; cosine similarity by matrix product."""

    stores_text: bool = False
    flat_metadata: bool = False

    _matrix: np.ndarray = PrivateAttr()
    _ids: np.ndarray = PrivateAttr()

    def __init__(self, matrix: np.ndarray | None = None, ids: np.ndarray | None = None) -> None:
        super().__init__()
        self._matrix = np.zeros((0, 0), dtype=np.float32) if matrix is None else matrix
        self._ids = np.array([], dtype=str) if ids is None else ids

    @property
    def client(self) -> Any:
        return None

    @property
    def dimension(self) -> int:
        return int(self._matrix.shape[1]) if self._matrix.size else 0

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def add(self, nodes: list[BaseNode], **kwargs: Any) -> list[str]:
        if not nodes:
            return []
        rows = normalise(np.asarray([node.get_embedding() for node in nodes], dtype=np.float32))
        ids = np.array([node.node_id for node in nodes])
        self._matrix = rows if len(self) == 0 else np.vstack([self._matrix, rows])
        self._ids = np.concatenate([self._ids, ids])
        return ids.tolist()

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        raise NotImplementedError(
            "rows are addressed by position: rebuild the knowledge base version instead"
        )

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Copies of the given rows' vectors, e.g. to carry them into a new version."""
        return np.asarray(self._matrix[indices], dtype=np.float32)

    def similarities(self, embedding: list[float] | np.ndarray) -> np.ndarray:
        """Cosine similarity of every row with the (normalised) query embedding."""
        query = normalise(np.asarray(embedding, dtype=np.float32)[None, :])[0]
        return self._matrix @ query

    def query(
        self, query: VectorStoreQuery, allowed: np.ndarray | None = None, **kwargs: Any
    ) -> VectorStoreQueryResult:
        if query.filters is not None:
            raise ValueError("pass Dify metadata filters as an `allowed` row mask")
        if query.query_embedding is None or len(self) == 0:
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        scores = self.similarities(query.query_embedding)
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        rows = top_rows(scores, query.similarity_top_k)
        return VectorStoreQueryResult(
            similarities=scores[rows].tolist(), ids=self._ids[rows].tolist()
        )

    def persist(self, persist_path: str, fs: Any = None) -> None:
        directory = Path(persist_path)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / VECTORS_FILE, np.ascontiguousarray(self._matrix, dtype=np.float32))
        np.save(directory / IDS_FILE, self._ids)

    @classmethod
    def from_persist_dir(cls, directory: Path, ids: np.ndarray | None = None
                         ) -> NumpyVectorStore:
        """Read into memory, not mapped: see ``layout.read_array``. ``ValueError`` if the
        files are damaged or do not fit together. ``ids``: the row ids, when the caller
        holds them already (a knowledge base's node ids), so they are not read twice."""
        matrix = read_array(directory / VECTORS_FILE)
        if ids is None:
            ids = read_array(directory / IDS_FILE)
        if matrix.ndim != 2 or matrix.dtype != np.float32 or ids.shape != matrix.shape[:1]:
            raise ValueError(
                f"{VECTORS_FILE} holds {matrix.dtype} {matrix.shape}, {IDS_FILE} {ids.shape}: "
                "expected float32 rows, one per id"
            )
        return cls(matrix=matrix, ids=ids)


def normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)
