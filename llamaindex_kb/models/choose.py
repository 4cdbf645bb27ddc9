"""Settings -> the embedding model and reranker one request uses."""

from __future__ import annotations

import functools
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding

from llamaindex_kb.config import Settings
from llamaindex_kb.models import openai as openai_compat
from llamaindex_kb.models.base import Models, Reranker
from llamaindex_kb.models.local import LocalMiniLMEmbedding
from llamaindex_kb.stores.base import KnowledgeStore


@functools.cache
def local_embedding(spin_threads: bool = False) -> LocalMiniLMEmbedding:
    return LocalMiniLMEmbedding(spin_threads=spin_threads)


def local_embedding_for(store: KnowledgeStore) -> LocalMiniLMEmbedding:
    """The local model, its threads tuned to where ``store`` searches."""
    return local_embedding(spin_threads=not store.searches_in_process)


def models_for(settings: Settings, session: Any | None = None,
               store: KnowledgeStore | None = None) -> Models:
    """The embedding model (and reranker) for one request.

    ``session`` is the Dify plugin session of the request, if any; ``store`` the store
    it searches, if known. Precedence: the workspace embedding model chosen in the
    plugin form, then an OpenAI-compatible server (``embedding_base_url``), then the
    bundled local model.
    """
    embed_model: BaseEmbedding | None = None
    reranker: Reranker | None = None
    if session is not None:
        # Imported here: dify_plugin gevent-patches the process on import, which the
        # standalone server must never get.
        from llamaindex_kb.models import dify as dify_models

        embed_model = dify_models.workspace_embedding(settings, session)
        reranker = dify_models.workspace_reranker(settings, session)
    if embed_model is None:
        embed_model = openai_compat.embedding_for(settings)
    if embed_model is None:
        embed_model = local_embedding() if store is None else local_embedding_for(store)
    return Models(embed_model=embed_model, reranker=reranker)
