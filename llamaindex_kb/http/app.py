"""The HTTP surface, shared by the Dify plugin endpoints and the standalone server.

``KnowledgeAPI.handle`` takes a werkzeug ``Request`` and returns a ``Response``; the
plugin's endpoint classes and the standalone WSGI server are both one-line callers,
so the two doors can never answer differently.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable

from werkzeug import Request, Response
from werkzeug import exceptions as werkzeug_exceptions
from werkzeug.routing import Map, Rule

from llamaindex_kb.config import Settings
from llamaindex_kb.contract import RetrievalResponse, error_body, parse_retrieval_request, read_body
from llamaindex_kb.errors import (
    KBError,
    MethodNotAllowed,
    MissingAuthError,
    RouteNotFound,
    ServerBusyError,
    WrongKeyError,
    error_status,
)
from llamaindex_kb.http import upload
from llamaindex_kb.ingestion.pipeline import delete_document
from llamaindex_kb.models.base import Models
from llamaindex_kb.retrieval import Library

log = logging.getLogger(__name__)

Handler = Callable[..., Response]

_SLASHES = re.compile(r"/{2,}")


def route_path(path: str) -> str:
    """Normalise what Dify's unnormalised ``f"{endpoint}/retrieval"`` produces.

    ``https://host/e/x/`` gives ``//retrieval``; a pasted ``.../retrieval`` gives
    ``/retrieval/retrieval``. Both must reach the retrieval route, never a redirect
    (Dify turns a redirected POST into a GET).
    """
    path = _SLASHES.sub("/", "/" + path).rstrip("/") or "/"
    if path == "/retrieval/retrieval":
        return "/retrieval"
    return path


def json_response(payload: object, status: int = 200) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False),
        status=status,
        content_type="application/json; charset=utf-8",
    )


class KnowledgeAPI:
    """Authenticates, routes and renders; the knowledge work happens in ``Library``."""

    def __init__(self, settings: Settings, library: Library, models: Models) -> None:
        self.settings = settings
        self.library = library
        self.models = models
        self._routes = Map(
            [
                Rule("/retrieval", methods=["POST"], endpoint=self._retrieval),
                Rule("/documents", methods=["POST"], endpoint=self._upload),
                Rule("/knowledge-bases", methods=["GET"], endpoint=self._knowledge_bases),
                Rule("/knowledge-bases/<knowledge_id>/documents", methods=["GET"],
                     endpoint=self._documents),
                Rule("/knowledge-bases/<knowledge_id>/documents/<path:document_id>",
                     methods=["DELETE"], endpoint=self._delete_document),
            ],
            strict_slashes=False,
            merge_slashes=False,
        )

    def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        path = route_path(request.path)
        try:
            handler, values = self._route(request.method, path)
            self.authenticate(request.headers.get("Authorization"))
            response = handler(request, **values)
        except KBError as exc:
            if exc.status >= 500:  # ours, not the client's: the operator must see it
                log.error("%s %r failed: %s", request.method, path[:200], exc.message)
            response = self.error_response(exc)
        except Exception as exc:  # the one place an unexpected failure becomes a 500
            log.exception("unexpected failure on %s %s", request.method, path)
            response = self.error_response(exc)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # Lets the benchmark (and browsers' dev tools) see server-side time apart from transport.
        response.headers["Server-Timing"] = f"app;dur={elapsed_ms:.2f}"
        # The standalone server writes the access log; this line is for debugging the plugin
        # door. %r keeps a client's newlines and escapes out of the log as characters.
        log.debug("%s %r -> %d in %.1f ms", request.method, path[:200], response.status_code,
                  elapsed_ms)
        return response

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        shown_path = path if len(path) <= 200 else path[:199] + "…"
        try:
            return self._routes.bind("localhost").match(path, method=method)
        except werkzeug_exceptions.MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or []))
            raise MethodNotAllowed(
                f"{method} is not allowed on {shown_path}; use {allowed}") from exc
        except werkzeug_exceptions.HTTPException as exc:
            raise RouteNotFound(
                f"no route {shown_path}; the External Knowledge API is POST /retrieval"
            ) from exc

    def authenticate(self, header: str | None) -> None:
        """403 for anything but the configured key (never 401: Dify would save a wrong key)."""
        expected = self.settings.api_key
        if expected is None:
            raise WrongKeyError("no API key is configured on the server; set one first")
        if not header or not header.startswith("Bearer "):
            raise MissingAuthError(
                "missing or malformed Authorization header; expected 'Bearer <api key>'"
            )
        token = header[len("Bearer ") :].strip()
        key = expected.get_secret_value().encode()
        # A key typed into Dify as "Bearer xyz" arrives as "Bearer Bearer xyz".
        candidates = [token]
        if token.startswith("Bearer "):
            candidates.append(token[len("Bearer ") :].strip())
        matched = False
        for candidate in candidates:
            matched |= hmac.compare_digest(candidate.encode(), key)
        if not matched:
            raise WrongKeyError("the API key does not match the one configured for this endpoint")

    def _retrieval(self, request: Request) -> Response:
        limits = self.settings.limits
        parsed = parse_retrieval_request(read_body(request, limits), limits)
        if parsed.is_probe:
            return json_response(RetrievalResponse(records=[]).model_dump())
        records = self.library.retrieve(parsed, self.models)
        return json_response(RetrievalResponse(records=records).model_dump())

    def _upload(self, request: Request) -> Response:
        info, summary = upload.upload(request, self.library.store, self.models,
                                         self.settings.limits)
        return json_response({"knowledge_id": summary.knowledge_id,
                              "document": info.model_dump(exclude={"parent_ids", "source_root"}),
                              "total_documents": summary.total_documents,
                              "total_chunks": summary.total_chunks}, status=201)

    def _knowledge_bases(self, request: Request) -> Response:
        return json_response({"knowledge_bases": [
            # Centroids are hundreds of numbers of scoring bookkeeping, nothing a reader needs.
            manifest.model_dump(mode="json", exclude={"centroids"})
            for manifest in self.library.manifests()]})

    def _documents(self, request: Request, knowledge_id: str) -> Response:
        return json_response({"knowledge_id": knowledge_id, "documents": [
            info.model_dump(exclude={"parent_ids", "source_root"})
            for info in self.library.documents(knowledge_id)]})

    def _delete_document(self, request: Request, knowledge_id: str, document_id: str) -> Response:
        info = delete_document(self.library.store, knowledge_id, document_id)
        return json_response({"knowledge_id": knowledge_id, "deleted": info.document_id,
                              "chunks": info.chunks})

    @staticmethod
    def error_response(exc: BaseException) -> Response:
        status, code, message = error_status(exc)
        response = json_response(error_body(code, message), status=status)
        if isinstance(exc, ServerBusyError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
