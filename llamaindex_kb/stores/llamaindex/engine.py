"""One LlamaIndex index read into memory and scored by our policy (``scoring.py``).

The nodes of an index a user built with LlamaIndex, their embeddings (when the
source has them), a metadata table for Dify's conditions and, built on first use, a
keyword index over the node texts: keyword and hybrid retrieval work on any index
whose texts can be read, and vector retrieval on a persisted folder scores every node
exactly as LlamaIndex's ``SimpleVectorStore`` does (cosine in float64), only by one
matrix product instead of a Python loop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.scoring import clip_similarities, fuse, lowest_returned
from llamaindex_kb.stores.local.keyword import KeywordIndex
from llamaindex_kb.stores.local.vectors import top_rows


class NodeIndex:
    """Row ``i`` is ``nodes[i]`` everywhere; immutable, so queries need no lock."""

    def __init__(self, nodes: Sequence[BaseNode], embeddings: np.ndarray | None) -> None:
        if embeddings is not None and embeddings.shape[0] != len(nodes):
            raise ValueError(f"{embeddings.shape[0]} embeddings for {len(nodes)} nodes")
        self.nodes = list(nodes)
        self._unit = None if embeddings is None else _unit_rows(embeddings)
        self._keyword_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def dimension(self) -> int | None:
        return None if self._unit is None else int(self._unit.shape[1])

    @cached_property
    def metadata(self) -> MetadataTable:
        return MetadataTable([record_metadata(node) for node in self.nodes])

    @property
    def keyword(self) -> KeywordIndex:
        """Built on the first keyword or hybrid query: a vector-only user never pays."""
        with self._keyword_lock:
            return self._keyword

    @cached_property
    def _keyword(self) -> KeywordIndex:
        return KeywordIndex.build([node.get_content(MetadataMode.NONE) for node in self.nodes])

    def similarities(self, query_vector: np.ndarray) -> np.ndarray:
        """Cosine similarity of every node with the query, as LlamaIndex computes it."""
        assert self._unit is not None, "similarities need the nodes' embeddings"
        query = np.asarray(query_vector, dtype=np.float64)
        norm = float(np.linalg.norm(query))
        return self._unit @ (query / norm) if norm else np.zeros(len(self.nodes))

    def retrieve(self, query: str, query_vector: np.ndarray | None, weight: float,
                 top_k: int, threshold: float, predicate: Predicate | None
                 ) -> list[NodeWithScore]:
        """The best ``top_k`` nodes by ``weight · cosine + (1 − weight) · keyword``."""
        if not self.nodes or top_k <= 0:
            return []
        scores = self._scores(query, query_vector, weight)
        keep = scores >= lowest_returned(threshold)
        if predicate is not None:
            keep &= predicate.mask(self.metadata)
        rows = top_rows(np.where(keep, scores, -np.inf), top_k)
        return [NodeWithScore(node=self.nodes[row], score=float(scores[row])) for row in rows]

    def _scores(self, query: str, query_vector: np.ndarray | None, weight: float) -> np.ndarray:
        if weight == 0.0:
            return self.keyword.scores(query).astype(np.float64)
        assert query_vector is not None, "a semantic weight needs the query's embedding"
        semantic = clip_similarities(self.similarities(query_vector))
        if weight == 1.0:
            return semantic
        return fuse(semantic, self.keyword.scores(query), weight)


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    rows = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)


def document_id_of(node: BaseNode) -> str:
    """The document a node came from, as a record's ``metadata.document_id`` names it."""
    return str(node.metadata.get("document_id") or node.ref_doc_id or node.node_id)


def record_metadata(node: BaseNode) -> dict[str, Any]:
    """The metadata Dify's condition is checked against: the record's, ``document_id``
    included (``retrieval.to_record`` adds it the same way)."""
    return {**node.metadata, "document_id": document_id_of(node)}
