"""LlamaIndex knowledge bases behind Dify's External Knowledge API.

The public API: the plugin endpoints, the standalone server and the CLI import
only these names.
"""

from llamaindex_kb.config import Settings, load_settings, plugin_settings
from llamaindex_kb.contract import Record, RetrievalRequest, parse_retrieval_request
from llamaindex_kb.errors import KBError, error_status
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.ingestion.pipeline import IngestSummary, ingest_paths
from llamaindex_kb.retrieval import Library
from llamaindex_kb.service import api_for, handle_plugin_request, library_for

__all__ = [
    "IngestSummary",
    "KBError",
    "KnowledgeAPI",
    "Library",
    "Record",
    "RetrievalRequest",
    "Settings",
    "api_for",
    "error_status",
    "handle_plugin_request",
    "ingest_paths",
    "library_for",
    "load_settings",
    "parse_retrieval_request",
    "plugin_settings",
]

__version__ = "0.1.0"
