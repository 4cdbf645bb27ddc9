"""Reranking fused candidates with a cross-encoder model (the Dify workspace's, in plugin mode).

A reranker sees more candidates than the caller asked for, so it can promote a
chunk that the first stage ranked below ``top_k``; its relevance scores (in [0, 1]
for the rerank models Dify offers) replace the first-stage scores, and the
threshold and ``top_k`` apply to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from llama_index.core.schema import NodeWithScore

CANDIDATE_FACTOR = 3
MIN_CANDIDATES = 20


class Reranker(Protocol):
    def rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        """(index into ``texts``, relevance score) pairs, best first, at most ``top_n``."""
        ...


def candidate_count(top_k: int) -> int:
    return max(top_k * CANDIDATE_FACTOR, MIN_CANDIDATES)


def rerank_hits(
    reranker: Reranker, query: str, hits: list[NodeWithScore], top_k: int, threshold: float
) -> list[NodeWithScore]:
    if not hits:
        return []
    ranked = reranker.rerank(query, [hit.node.get_content() for hit in hits], top_k)
    scored = [
        NodeWithScore(node=hits[index].node, score=min(1.0, max(0.0, float(score))))
        for index, score in ranked
    ]
    scored.sort(key=lambda hit: -(hit.score or 0.0))
    return [hit for hit in scored if (hit.score or 0.0) >= threshold and hit.score][:top_k]
