"""LlamaIndex knowledge bases behind Dify's External Knowledge API.

The public API, which the plugin endpoints, the standalone server's users and the CLI
may import from here:

* settings: ``Settings``, ``load_settings`` (flags and environment), ``plugin_settings``
  (a Dify endpoint's form);
* the wire contract: ``RetrievalRequest``, ``parse_retrieval_request``, ``Record``;
* errors: ``KBError`` and ``error_status`` (its HTTP status);
* the core: ``Library`` (retrieval over the knowledge bases), ``KnowledgeAPI`` (every
  route), ``ingest_paths`` and its ``IngestSummary``;
* the composition root: ``library_for``, ``api_for``, ``handle_plugin_request``.

Each name is imported from its module on first use (PEP 562), so importing one module,
say ``llamaindex_kb.errors``, does not load the server stack; modules inside the package
import the module that defines a name, never this facade.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_HOMES = {
    "IngestSummary": "llamaindex_kb.ingestion.pipeline",
    "KBError": "llamaindex_kb.errors",
    "KnowledgeAPI": "llamaindex_kb.http.app",
    "Library": "llamaindex_kb.retrieval",
    "Record": "llamaindex_kb.contract",
    "RetrievalRequest": "llamaindex_kb.contract",
    "Settings": "llamaindex_kb.config",
    "api_for": "llamaindex_kb.service",
    "error_status": "llamaindex_kb.errors",
    "handle_plugin_request": "llamaindex_kb.service",
    "ingest_paths": "llamaindex_kb.ingestion.pipeline",
    "library_for": "llamaindex_kb.service",
    "load_settings": "llamaindex_kb.config",
    "parse_retrieval_request": "llamaindex_kb.contract",
    "plugin_settings": "llamaindex_kb.config",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
