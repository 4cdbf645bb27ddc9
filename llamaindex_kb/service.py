"""Wiring: settings → embedding model → library → API, cached per process.

The plugin daemon creates a new Endpoint object for every request, so everything
expensive (the embedding runtime, opened knowledge bases) is cached here, keyed by
the settings that shape it. The API object itself is cheap and built per call, so
two endpoints with different keys never share one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from werkzeug import Request, Response

from llamaindex_kb.config import Settings, plugin_settings
from llamaindex_kb.errors import KBError
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.ingestion.pipeline import file_source, ingest_paths, scan
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding, models_for
from llamaindex_kb.models.local import LocalMiniLMEmbedding
from llamaindex_kb.redaction import redact_url
from llamaindex_kb.retrieval import DEMO_KB, DEMO_SOURCE, Library
from llamaindex_kb.stores.base import KnowledgeStore
from llamaindex_kb.stores.registry import store_url

log = logging.getLogger(__name__)

_libraries: dict[tuple[object, ...], Library] = {}
_demo_ready: set[str] = set()
_lock = threading.Lock()


def local_embedding_for(store: KnowledgeStore) -> LocalMiniLMEmbedding:
    """The local model, its threads tuned to where ``store`` searches."""
    return local_embedding(spin_threads=not store.searches_in_process)


def library_for(settings: Settings) -> Library:
    url = store_url(settings)
    key = (url, settings.retrieval_mode, settings.semantic_weight)
    library = _libraries.get(key)
    if library is None or (settings.demo and url not in _demo_ready):
        with _lock:
            library = _libraries.get(key)
            if library is None:
                library = Library(settings)
                _libraries[key] = library
            # Per store, not per library: an endpoint without the demo may have opened
            # this store first.
            if settings.demo and url not in _demo_ready:
                ensure_demo(library.store, Models(local_embedding_for(library.store)))
                _demo_ready.add(url)
    return library


def api_for(settings: Settings, session: object | None = None) -> KnowledgeAPI:
    library = library_for(settings)
    models = models_for(settings, session, spin_threads=not library.store.searches_in_process)
    return KnowledgeAPI(settings, library, models)


def ensure_demo(store: KnowledgeStore, models: Models) -> None:
    """(Re)build the bundled demo knowledge base when it is missing or out of date.

    Up to date means it holds exactly the bundled files (ids and content hashes),
    which every store can answer, so no marker is kept beside it.
    """
    files, _ = scan([DEMO_SOURCE])
    wanted = {info.document_id: info.content_hash
              for info in (file_source(*found).info for found in files)}
    existing = store.find(DEMO_KB)
    if existing is not None:
        if {k: v.content_hash for k, v in existing.documents.items()} == wanted:
            return
        store.drop(DEMO_KB)
    log.info("building the demo knowledge base in %s", redact_url(store.url))
    ingest_paths(store, DEMO_KB, [DEMO_SOURCE], models=models)


def handle_plugin_request(
    request: Request, form: Mapping[str, Any], session: object | None = None
) -> Response:
    """The whole plugin endpoint: settings form → API → response, errors included."""
    try:
        api = api_for(plugin_settings(form), session)
    except KBError as exc:
        return KnowledgeAPI.error_response(exc)
    except Exception as exc:
        # The SDK would answer a bare 404 with the message as text; the API's handler,
        # which logs and answers everything else, never ran.
        log.exception("unexpected failure setting up the endpoint")
        return KnowledgeAPI.error_response(exc)
    return api.handle(request)
