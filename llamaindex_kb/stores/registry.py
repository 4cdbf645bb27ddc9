"""Which store a store URL names, and one open store per URL per process.

* ``local://<data_dir>`` (the default): the embedded store (``stores/local/``),
  immutable versions under a folder, published by an atomic ``CURRENT`` swap.
* ``postgresql://…`` / ``postgres://…``: PostgreSQL + pgvector (``stores/postgres.py``),
  which several plugin processes and CLI runs can share.
* ``qdrant:///path``, ``qdrant://host:6333``, ``http(s)://host:6333``: Qdrant, local
  mode or a server (``stores/qdrant.py``).
* ``llamacloud://<api_key>@<host>/?project=…``: LlamaCloud managed indexes, read-only
  (``stores/llamacloud.py``).

Every store answers the same contract (``stores/base.py``): the same ``QueryPlan``
gives the same records with the same absolute scores. The table names each backend's
factory as ``"module:function"`` and imports it only when a URL asks for it, so
psycopg or qdrant-client load only if used, and no backend imports this module back.
A new backend is one line here.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import ConfigurationError
from llamaindex_kb.redaction import redact_url
from llamaindex_kb.stores.base import KnowledgeStore

StoreFactory = Callable[[str, Settings], KnowledgeStore]

FACTORIES: dict[str, str] = {
    "local": "llamaindex_kb.stores.local.store:from_url",
    "postgresql": "llamaindex_kb.stores.postgres:from_url",
    "postgres": "llamaindex_kb.stores.postgres:from_url",
    "qdrant": "llamaindex_kb.stores.qdrant:from_url",
    "http": "llamaindex_kb.stores.qdrant:from_url",
    "https": "llamaindex_kb.stores.qdrant:from_url",
    "llamacloud": "llamaindex_kb.stores.llamacloud:from_url",
    "llamaindex": "llamaindex_kb.stores.llamaindex.persisted:from_url",
    "llamaindex+postgresql": "llamaindex_kb.stores.llamaindex.postgres:from_url",
    "llamaindex+postgres": "llamaindex_kb.stores.llamaindex.postgres:from_url",
    "llamaindex+qdrant": "llamaindex_kb.stores.llamaindex.qdrant:from_url",
    "python": "llamaindex_kb.stores.llamaindex.factory:from_url",
}

_stores: dict[str, KnowledgeStore] = {}
_stores_lock = threading.Lock()


def store_url(settings: Settings) -> str:
    return settings.store or f"local://{settings.data_dir.resolve()}"


def store_for(settings: Settings) -> KnowledgeStore:
    """The store ``settings`` name, one per URL per process (they pool connections)."""
    url = store_url(settings)
    store = _stores.get(url)
    if store is None:
        with _stores_lock:
            store = _stores.get(url)
            if store is None:
                store = open_store(url, settings)
                _stores[url] = store
    return store


def open_store(url: str, settings: Settings) -> KnowledgeStore:
    """A new store for ``url`` (``store_for`` keeps one per URL)."""
    return factory_for(url)(url, settings)


def factory_for(url: str) -> StoreFactory:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 host
        raise ConfigurationError(
            f"store URL {redact_url(url)!r} cannot be parsed: {exc}") from None
    target = FACTORIES.get(scheme)
    if target is None:
        raise ConfigurationError(
            f"store URL scheme {scheme or '(none)'!r} is not supported: use local:///path "
            "or postgresql://user:password@host:5432/database "
            "or llamacloud://<api_key>@api.cloud.llamaindex.ai/?project=<name>"
        )
    module, function = target.split(":")
    factory: StoreFactory = getattr(importlib.import_module(module), function)
    return factory
