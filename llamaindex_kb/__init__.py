"""LlamaIndex knowledge bases behind Dify's External Knowledge API.

The public API: the plugin endpoints, the standalone server and the CLI import
only these names.
"""

from .api import KnowledgeAPI
from .config import Settings, load_settings, plugin_settings
from .contract import Record, RetrievalRequest, parse_retrieval_request
from .errors import KBError, error_status
from .ingest import IngestSummary, ingest_paths
from .library import Library
from .service import api_for, handle_plugin_request, library_for

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
