"""The models one request uses: an embedding model and, optionally, a reranker.

In plugin mode the workspace's models are reached through the request's own Dify
session, so these are chosen per request (cheaply), not per process.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_index.core.base.embeddings.base import BaseEmbedding

from .rerank import Reranker


@dataclass(frozen=True)
class Models:
    embed_model: BaseEmbedding | None
    reranker: Reranker | None = None
