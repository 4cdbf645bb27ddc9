"""The models one request uses: an embedding model and, optionally, a reranker.

In plugin mode the workspace's models are reached through the request's own Dify
session, so these are chosen per request (cheaply), not per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llama_index.core.base.embeddings.base import BaseEmbedding

from llamaindex_kb.config import LocalModel
from llamaindex_kb.models import bundled
from llamaindex_kb.models.spec import EmbeddingSpec


@dataclass(frozen=True)
class Models:
    """``embed_model`` is the configured model (a workspace or OpenAI-compatible one),
    or None: then a bundled one (``models/bundled.py``), ``local_model`` for new
    knowledge bases."""

    embed_model: BaseEmbedding | None
    reranker: Reranker | None = None
    local_model: LocalModel = "auto"
    spin_threads: bool = False

    def embedding_for(self, built_with: EmbeddingSpec | None,
                      texts: Sequence[str] = ()) -> BaseEmbedding:
        """The model that queries or extends a knowledge base built with ``built_with``
        (None: a new one, or one without vectors, of ``texts``): the bundled model that
        built it, else the configured one, else the bundled one its texts call for. A
        mismatch with what built it is the store's to refuse (3004)."""
        return (bundled.built_with(built_with, self.spin_threads) or self.embed_model
                or bundled.for_new(self.local_model, texts, self.spin_threads))


class Reranker(Protocol):
    def rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        """(index into ``texts``, relevance score) pairs, best first, at most ``top_n``."""
        ...
