"""Exact vector search for the embedded store: one matrix of embeddings.

Why not Chroma (architecture.md's first pick)? Measured on 2 cores: an exact
float32 matrix product over 100k × 384 vectors takes a few milliseconds, so brute
force gives recall 1.0 at the latency of an HNSW index, loads in tens of
milliseconds from one ``.npy`` file, adds nothing to the plugin's install (Chroma adds
~370 MB), and takes an arbitrary row mask, which is how Dify's exact metadata
filters are applied before ranking (no post-filter shortfall).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


class VectorMatrix:
    """A version's chunk embeddings: unit-normalised float32 rows, row i = chunk i;
    cosine similarity with every row by one matrix product."""

    def __init__(self, matrix: np.ndarray) -> None:
        self._matrix = matrix

    @property
    def dimension(self) -> int:
        return int(self._matrix.shape[1]) if self._matrix.size else 0

    def __len__(self) -> int:
        return int(self._matrix.shape[0])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Copies of the given rows' vectors, e.g. to carry them into a new version."""
        return np.asarray(self._matrix[indices], dtype=np.float32)

    def similarities(self, embedding: list[float] | np.ndarray) -> np.ndarray:
        """Cosine similarity of every row with the (normalised) query embedding."""
        query = normalise(np.asarray(embedding, dtype=np.float32)[None, :])[0]
        return self._matrix @ query

    def save(self, directory: Path, ids: np.ndarray) -> None:
        """The matrix, and beside it the row ids (the version's node ids) as every
        version so far has written them; readers take the ids from the version."""
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / VECTORS_FILE, np.ascontiguousarray(self._matrix, dtype=np.float32))
        np.save(directory / IDS_FILE, ids)

    @classmethod
    def load(cls, directory: Path, ids: np.ndarray) -> VectorMatrix:
        """Read into memory, not mapped: see ``layout.read_array``. ``ValueError`` if the
        file is damaged or does not have one row per id of ``ids`` (the version's node ids)."""
        matrix = read_array(directory / VECTORS_FILE)
        if matrix.ndim != 2 or matrix.dtype != np.float32 or ids.shape != matrix.shape[:1]:
            raise ValueError(
                f"{VECTORS_FILE} holds {matrix.dtype} {matrix.shape}, {IDS_FILE} {ids.shape}: "
                "expected float32 rows, one per id"
            )
        return cls(matrix)


def normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)
