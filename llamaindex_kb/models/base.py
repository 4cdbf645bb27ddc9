"""The models one request uses: an embedding model and, optionally, a reranker.

In plugin mode the workspace's models are reached through the request's own Dify
session, so these are chosen per request (cheaply), not per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llama_index.core.base.embeddings.base import BaseEmbedding


@dataclass(frozen=True)
class Models:
    embed_model: BaseEmbedding | None
    reranker: Reranker | None = None


class Reranker(Protocol):
    def rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        """(index into ``texts``, relevance score) pairs, best first, at most ``top_n``."""
        ...
