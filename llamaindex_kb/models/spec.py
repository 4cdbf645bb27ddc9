"""Which embedding built an index, and the base of our blocking embeddings."""

from __future__ import annotations

import asyncio

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import BaseModel, ConfigDict, Field, computed_field


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


def readable_share(embed_model: BaseEmbedding | None, text: str) -> float:
    """The share of ``text`` ``embed_model`` can read; a model that cannot say (any other
    LlamaIndex embedding) is taken to read all of it."""
    return embed_model.readable_share(text) if isinstance(embed_model, BlockingEmbedding) else 1.0
