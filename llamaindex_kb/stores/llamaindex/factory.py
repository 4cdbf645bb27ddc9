"""``python://package.module:factory``: whatever the user's own LlamaIndex code returns.

For the standalone server and the CLI only: the URL names code this process imports
and runs, so the plugin's settings form refuses it (``config.plugin_settings``).

``factory(knowledge_id)`` is called once per knowledge id (the answer is kept) and
returns one of

* a ``BaseRetriever``: asked as it is. It embeds the query itself; when it has a
  ``similarity_top_k`` (``VectorIndexRetriever`` does), a copy is asked for as many
  as needed, else its own count is all there is;
* a ``BaseIndex``: asked through ``index.as_retriever(similarity_top_k=...)``, with
  the index's own embedding model;
* a vector store: wrapped by ``VectorStoreIndex.from_vector_store`` with the embedding
  model configured here (``models.choose``), so configure the one that built it;
* ``None``: no such knowledge base (404, 2001).

The object keeps answering from the live data it reads, so the user's changes show
up without a restart. There are no nodes to list (``GET /knowledge-bases`` names no
ids, a listing of documents is empty) and no node texts for keyword or hybrid modes:
every query is the user's retrieval, its records re-checked against Dify's condition,
scores clipped to [0, 1], then ``score_threshold`` and ``top_k`` applied.
"""

from __future__ import annotations

import copy
import importlib
import threading
from collections.abc import Callable, Hashable

import numpy as np
from llama_index.core import VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.indices.base import BaseIndex
from llama_index.core.schema import NodeWithScore
from llama_index.core.vector_stores.types import BasePydanticVectorStore

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import ConfigurationError, KBError, KnowledgeBaseNotFound
from llamaindex_kb.models.choose import models_for
from llamaindex_kb.stores.llamaindex.store import LlamaIndexStore, LoadedIndex, OwnRetrieval

SCHEME = "python://"
# version() of a knowledge base the factory made: the object it returned reads live data.
MADE = "made by the factory"
Factory = Callable[[str], object]


class FactoryError(KBError):
    """The user's factory failed: their code, not the request, so a 500 saying so."""


class FactorySource:
    """The ``IndexSource`` of a user's factory."""

    searches_in_process = False  # mostly a database the user's code talks to

    def __init__(self, target: str, factory: Factory,
                 embed_model: Callable[[], BaseEmbedding]) -> None:
        self.shown = SCHEME + target
        self._factory = factory
        self._embed_model = embed_model
        self._made: dict[str, OwnRetrieval] = {}
        self._lock = threading.Lock()

    def index_ids(self) -> list[str]:
        return []  # a factory names no ids: any knowledge_id is asked of it

    def version(self, index_id: str) -> Hashable | None:
        return MADE if self._retrieval(index_id) is not None else None

    def load(self, index_id: str) -> LoadedIndex:
        own = self._retrieval(index_id)
        if own is None:
            raise KnowledgeBaseNotFound.missing(index_id)
        return LoadedIndex(nodes=[], embeddings=None, dimension=None, own=own)

    def vector_search(self, index_id: str, query_vector: np.ndarray, top_k: int,
                      predicate: Predicate | None) -> list[NodeWithScore] | None:
        return None  # every query goes to the factory's own retrieval (LoadedIndex.own)

    def _retrieval(self, index_id: str) -> OwnRetrieval | None:
        own = self._made.get(index_id)
        if own is not None:
            return own
        with self._lock:  # the user's code need not be thread-safe to be called
            own = self._made.get(index_id)
            if own is None:
                own = self._wrap(index_id, self._call(index_id))
                if own is not None:  # None may become a knowledge base later
                    self._made[index_id] = own
        return own

    def _call(self, index_id: str) -> object:
        try:
            return self._factory(index_id)
        except KBError:
            raise
        except Exception as exc:
            raise FactoryError(f"{self.shown}({index_id!r}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _wrap(self, index_id: str, made: object) -> OwnRetrieval | None:
        if made is None:
            return None
        if isinstance(made, BasePydanticVectorStore):
            made = VectorStoreIndex.from_vector_store(made, embed_model=self._embed_model())
        if isinstance(made, BaseIndex):
            index = made
            return OwnRetrieval(search=lambda query, top_k: _ask(
                self.shown, index.as_retriever(similarity_top_k=top_k), query), sized=True)
        if isinstance(made, BaseRetriever):
            return _retriever(self.shown, made)
        raise ConfigurationError(
            f"{self.shown}({index_id!r}) returned a {type(made).__name__}: return a "
            "LlamaIndex retriever (BaseRetriever), index (BaseIndex) or vector store, "
            "or None for an unknown knowledge_id")


def _retriever(shown: str, retriever: BaseRetriever) -> OwnRetrieval:
    if not isinstance(getattr(retriever, "similarity_top_k", None), int):
        return OwnRetrieval(search=lambda query, _top_k: _ask(shown, retriever, query),
                            sized=False)

    def search(query: str, top_k: int) -> list[NodeWithScore]:
        # A copy per query: the user's retriever is shared between requests' threads.
        sized = copy.copy(retriever)
        sized.similarity_top_k = top_k  # type: ignore[attr-defined]
        return _ask(shown, sized, query)

    return OwnRetrieval(search=search, sized=True)


def _ask(shown: str, retriever: BaseRetriever, query: str) -> list[NodeWithScore]:
    try:
        return list(retriever.retrieve(query))
    except KBError:
        raise
    except Exception as exc:
        raise FactoryError(f"the retriever of {shown} failed: "
                           f"{type(exc).__name__}: {exc}") from exc


def from_url(url: str, settings: Settings) -> LlamaIndexStore:
    target = url.split("://", 1)[1] if "://" in url else ""
    module_name, _, function = target.partition(":")
    if not (module_name and all(part.isidentifier() for part in module_name.split("."))
            and function.isidentifier()):
        raise ConfigurationError(
            f"store URL {url!r}: name the factory as python://package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raised
        raise ConfigurationError(
            f"store URL {url!r}: cannot import {module_name!r} "
            f"({type(exc).__name__}: {exc}); is it on PYTHONPATH?") from exc
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ConfigurationError(
            f"store URL {url!r}: {module_name} has no function {function!r}")
    return LlamaIndexStore(FactorySource(target, factory,
                                         lambda: models_for(settings).embedding_for(None)))
