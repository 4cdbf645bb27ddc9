"""Which embedding built an index, and the base of our blocking embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import BaseModel, ConfigDict, Field, computed_field

from llamaindex_kb.lru import LRU


class EmbeddingSpec(BaseModel):
    """Which embedding produced a set of vectors; stored with a knowledge base.

    Two specs with the same ``id`` produce comparable vectors. ``id`` is part of
    ``model_dump()`` so a manifest can store and compare it as a plain string.
    """

    model_config = ConfigDict(frozen=True)

    # No ":" in kind, so "kind:model:dimension" parses unambiguously even for
    # model names that contain colons (Ollama's "nomic-embed-text:latest").
    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description='e.g. "local", "openai", "dify"')
    model: str = Field(min_length=1)
    dimension: int = Field(gt=0)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def id(self) -> str:
        return f"{self.kind}:{self.model}:{self.dimension}"


class BlockingEmbedding(BaseEmbedding):
    """An embedding whose work blocks (a model run, a network call, a daemon round trip).

    The async methods run the sync ones in a worker thread, which keeps an event loop
    responsive: onnxruntime and sockets release the GIL while they wait.
    """

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    def readable_share(self, text: str) -> float:
        """The share of ``text`` this model can read, in [0, 1]: all of it, unless the
        model knows better (a vocabulary that reads other scripts as unknown tokens)."""
        return 1.0


# Dify sends one question to every selected knowledge base and retries slow answers,
# so the same query text arrives several times within seconds. By (model, query).
QUERY_VECTORS: LRU[tuple[str, str], np.ndarray] = LRU(1024)


class InProcessEmbedding(BlockingEmbedding):
    """A bundled model that runs in this process: ``_embed`` turns texts into unit-length
    float32 rows; queries are embedded one at a time and cached (``query_vector``)."""

    def _embed(self, texts: Sequence[str], *, queries: bool = False) -> np.ndarray:
        raise NotImplementedError

    def query_vector(self, query: str) -> np.ndarray:
        """``get_query_embedding`` as a read-only float32 array, skipping LlamaIndex's
        per-call instrumentation (spans, events, callbacks nobody here listens to):
        0.4 ms of a query whose embedding is cached, and a tenth of its store time."""
        key = (self.model_name, query)
        vector = QUERY_VECTORS.get(key)
        if vector is None:
            # Alone: MiniLM's int8 query path quantizes each call's activations as a
            # whole, so a batch neighbour would move the vector (to a cosine of ~0.98).
            vector = self._embed([query], queries=True)[0]
            vector.setflags(write=False)
            QUERY_VECTORS.put(key, vector)
        return vector

    def _get_query_embedding(self, query: str) -> Embedding:
        return self.query_vector(query).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts).tolist()


def readable_share(embed_model: BaseEmbedding | None, text: str) -> float:
    """The share of ``text`` ``embed_model`` can read; a model that cannot say (any other
    LlamaIndex embedding) is taken to read all of it."""
    return embed_model.readable_share(text) if isinstance(embed_model, BlockingEmbedding) else 1.0
