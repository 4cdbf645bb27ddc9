"""Settings -> the embedding model and reranker one request uses."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding

from llamaindex_kb.config import Settings
from llamaindex_kb.models import bundled, openai
from llamaindex_kb.models.base import Models, Reranker
from llamaindex_kb.models.local import LocalMiniLMEmbedding


def local_embedding(spin_threads: bool = False) -> LocalMiniLMEmbedding:
    """The bundled English model (MiniLM)."""
    return bundled.english(spin_threads)


def models_for(settings: Settings, session: Any | None = None,
               spin_threads: bool = False) -> Models:
    """The embedding model (and reranker) for one request.

    ``session`` is the Dify plugin session of the request, if any; ``spin_threads``
    tunes the local model's threads (``LocalMiniLMEmbedding``). Precedence: the
    workspace embedding model chosen in the plugin form, then an OpenAI-compatible
    server (``embedding_base_url``), then a bundled model (``models/bundled.py``:
    ``Models.embedding_for`` picks it per knowledge base).
    """
    embed_model: BaseEmbedding | None = None
    reranker: Reranker | None = None
    if session is not None:
        # Imported here: dify_plugin gevent-patches the process on import, which the
        # standalone server must never get.
        from llamaindex_kb.models import dify

        embed_model = dify.workspace_embedding(settings, session)
        reranker = dify.workspace_reranker(settings, session)
    if embed_model is None:
        embed_model = openai.embedding_for(settings)
    return Models(embed_model=embed_model, reranker=reranker,
                  local_model=settings.local_model, spin_threads=spin_threads)
