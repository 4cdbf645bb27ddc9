"""The HTTP surface, shared by the Dify plugin endpoints and the standalone server.

``KnowledgeAPI.handle`` takes a werkzeug ``Request`` and returns a ``Response``; the
plugin's endpoint classes and the standalone WSGI server are both one-line callers,
so the two doors can never answer differently.

Knowledge bases are made by their first upload, or empty with their settings
(``POST /knowledge-bases``), and dropped whole (``DELETE /knowledge-bases/<id>``) by the
admin key or a read-write key whose scope names them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from werkzeug import Request, Response
from werkzeug import exceptions as werkzeug_exceptions
from werkzeug.routing import Map, Rule

from llamaindex_kb.config import Settings
from llamaindex_kb.contract import (
    RetrievalResponse,
    error_body,
    fraction_field,
    parse_json_object,
    parse_retrieval_request,
    read_body,
    retrieval_mode_field,
)
from llamaindex_kb.errors import (
    InvalidFieldError,
    KBError,
    MethodNotAllowed,
    RouteNotFound,
    ServerBusyError,
    error_status,
    shown,
)
from llamaindex_kb.http import upload
from llamaindex_kb.http.console import console_file
from llamaindex_kb.ingestion.pipeline import (
    EMBEDDING_CHOICES,
    create_knowledge_base,
    delete_document,
    drop_knowledge_base,
)
from llamaindex_kb.keys import Caller, KeyRing, check_name
from llamaindex_kb.models.base import Models
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.base import KBManifest
from llamaindex_kb.views import View

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


def view_entry(view: View) -> dict[str, object]:
    """A view as ``GET /knowledge-bases`` and ``/views`` list it."""
    return {"knowledge_id": view.name, "kind": "view", **view.model_dump(exclude={"name"})}


def manifest_entry(manifest: KBManifest) -> dict[str, object]:
    """A knowledge base as ``GET /knowledge-bases`` lists it."""
    # Centroids are hundreds of numbers of scoring bookkeeping, nothing a reader needs.
    return {"kind": "knowledge_base",
            **manifest.model_dump(mode="json", exclude={"centroids"})}


def one_of(body: dict[str, object], field: str, choices: tuple[str, ...], default: str) -> Any:
    """``body[field]``, one of ``choices``, else ``default`` when absent or null."""
    value = body.get(field)
    if value is None:
        return default
    if value not in choices:
        raise InvalidFieldError(field, f"must be one of {', '.join(choices)}; got {shown(value)}")
    return str(value)


def known(body: dict[str, object], fields: set[str]) -> None:
    """Refuse a field we do not know: a typo ("read_ony") must not pass silently."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidFieldError(
            unknown[0], f"is not a known field; expected {', '.join(sorted(fields))}")


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
        self.keys = KeyRing(library.records, settings.api_key)
        self._routes = Map(
            [
                Rule("/retrieval", methods=["POST"], endpoint=self._retrieval),
                Rule("/documents", methods=["POST"], endpoint=self._upload),
                Rule("/knowledge-bases", methods=["GET"], endpoint=self._knowledge_bases),
                Rule("/knowledge-bases", methods=["POST"], endpoint=self._create_knowledge_base),
                Rule("/knowledge-bases/<knowledge_id>", methods=["DELETE"],
                     endpoint=self._drop_knowledge_base),
                Rule("/knowledge-bases/<knowledge_id>/documents", methods=["GET"],
                     endpoint=self._documents),
                Rule("/knowledge-bases/<knowledge_id>/documents/<path:document_id>",
                     methods=["DELETE"], endpoint=self._delete_document),
                Rule("/keys", methods=["GET"], endpoint=self._keys),
                Rule("/keys", methods=["POST"], endpoint=self._create_key),
                Rule("/keys/<name>", methods=["DELETE"], endpoint=self._revoke_key),
                Rule("/views", methods=["GET"], endpoint=self._views),
                Rule("/views", methods=["POST"], endpoint=self._create_view),
                Rule("/views/<name>", methods=["DELETE"], endpoint=self._delete_view),
                Rule("/me", methods=["GET"], endpoint=self._me),
                Rule("/console", methods=["GET"], endpoint=console_file),
                Rule("/console/<asset>", methods=["GET"], endpoint=console_file),
            ],
            strict_slashes=False,
            merge_slashes=False,
        )

    def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        path = route_path(request.path)
        try:
            handler, values = self._route(request.method, path)
            if handler is console_file:  # files without data: a browser loads them keyless
                response = handler(request, **values)
            else:
                caller = self.keys.authenticate(request.headers.get("Authorization"))
                response = handler(request, caller, **values)
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

    def _retrieval(self, request: Request, caller: Caller) -> Response:
        limits = self.settings.limits
        parsed = parse_retrieval_request(read_body(request, limits), limits)
        if parsed.is_probe:
            return json_response(RetrievalResponse(records=[]).model_dump())
        caller.check_visible(parsed.knowledge_id)
        records = self.library.retrieve(parsed, self.models)
        return json_response(RetrievalResponse(records=records).model_dump())

    def _upload(self, request: Request, caller: Caller) -> Response:
        caller.check_writer()
        info, summary = upload.upload(request, self.library.store, self.models,
                                      self.settings.limits, allowed=caller.check_visible)
        return json_response({"knowledge_id": summary.knowledge_id,
                              "document": info.model_dump(exclude={"parent_ids", "source_root"}),
                              "total_documents": summary.total_documents,
                              "total_chunks": summary.total_chunks}, status=201)

    def _knowledge_bases(self, request: Request, caller: Caller) -> Response:
        listed: list[dict[str, object]] = [
            manifest_entry(manifest)
            for manifest in self.library.manifests() if caller.may_see(manifest.knowledge_id)]
        listed += [view_entry(view) if caller.admin
                   # A named key is not told the base behind a view, nor its filter.
                   else {"knowledge_id": view.name, "kind": "view"}
                   for view in self.library.views.list() if caller.may_see(view.name)]
        return json_response({"knowledge_bases": listed})

    def _me(self, request: Request, caller: Caller) -> Response:
        """What the key may do, for a client (the console) to offer only that."""
        return json_response({
            "admin": caller.admin, "name": caller.name, "read_only": caller.read_only,
            "knowledge_ids": None if caller.knowledge_ids is None
            else sorted(caller.knowledge_ids)})

    def _create_knowledge_base(self, request: Request, caller: Caller) -> Response:
        caller.check_writer()  # before the body: the same answer whatever it names
        body = parse_json_object(read_body(request, self.settings.limits))
        known(body, {"knowledge_id", "retrieval_mode", "semantic_weight", "chunking",
                     "embedding"})
        knowledge_id = body.get("knowledge_id")
        if not isinstance(knowledge_id, str):
            raise InvalidFieldError("knowledge_id",
                                    f"is required and must be a string; got {shown(knowledge_id)}")
        caller.check_visible(knowledge_id)
        # Only what was given: the defaults are create_knowledge_base's.
        given: dict[str, Any] = {}
        if mode := retrieval_mode_field(body.get("retrieval_mode"), "retrieval_mode"):
            given["mode"] = mode
        if body.get("semantic_weight") is not None:
            given["semantic_weight"] = fraction_field(body["semantic_weight"], "semantic_weight")
        manifest = create_knowledge_base(
            self.library.store, knowledge_id, models=self.models, **given,
            chunking=upload.parse_chunking(body.get("chunking")),
            embedding=one_of(body, "embedding", EMBEDDING_CHOICES, "auto"))
        return json_response(manifest_entry(manifest), status=201)

    def _drop_knowledge_base(self, request: Request, caller: Caller,
                             knowledge_id: str) -> Response:
        caller.check_write(knowledge_id)
        drop_knowledge_base(self.library.store, knowledge_id)
        return json_response({"dropped": knowledge_id})

    def _documents(self, request: Request, caller: Caller, knowledge_id: str) -> Response:
        caller.check_visible(knowledge_id)
        return json_response({"knowledge_id": knowledge_id, "documents": [
            info.model_dump(exclude={"parent_ids", "source_root"})
            for info in self.library.documents(knowledge_id)]})

    def _delete_document(self, request: Request, caller: Caller, knowledge_id: str,
                         document_id: str) -> Response:
        caller.check_write(knowledge_id)
        info = delete_document(self.library.store, knowledge_id, document_id)
        return json_response({"knowledge_id": knowledge_id, "deleted": info.document_id,
                              "chunks": info.chunks})

    # --- keys and views: the admin key's ---------------------------------------------

    def _keys(self, request: Request, caller: Caller) -> Response:
        caller.check_admin()
        return json_response({"keys": [
            info.model_dump() for info in self.keys.list(self.library.knowledge_ids())]})

    def _create_key(self, request: Request, caller: Caller) -> Response:
        caller.check_admin()
        body = parse_json_object(read_body(request, self.settings.limits))
        known(body, {"name", "knowledge_ids", "read_only"})
        scope = body.get("knowledge_ids")
        if scope is not None and (not isinstance(scope, list)
                                  or not all(isinstance(k, str) for k in scope)):
            raise InvalidFieldError(
                "knowledge_ids", f"must be an array of knowledge ids or null; got {shown(scope)}")
        read_only = body.get("read_only", False)
        if not isinstance(read_only, bool):
            raise InvalidFieldError("read_only", f"must be true or false; got {shown(read_only)}")
        info, secret = self.keys.create(check_name(body.get("name"), "name"), scope, read_only)
        # The one time the secret is shown: it is kept only as a hash.
        return json_response({**info.model_dump(), "key": secret}, status=201)

    def _revoke_key(self, request: Request, caller: Caller, name: str) -> Response:
        caller.check_admin()
        self.keys.revoke(name)
        return json_response({"revoked": name})

    def _views(self, request: Request, caller: Caller) -> Response:
        caller.check_admin()
        return json_response({"views": [view_entry(view) for view in self.library.views.list()]})

    def _create_view(self, request: Request, caller: Caller) -> Response:
        caller.check_admin()
        body = parse_json_object(read_body(request, self.settings.limits))
        known(body, {"name", "knowledge_base", "metadata_condition", "retrieval_mode",
                     "semantic_weight", "top_k_max"})
        for field in ("name", "knowledge_base"):
            if not isinstance(body.get(field), str):
                raise InvalidFieldError(field, f"must be a string; got {shown(body.get(field))}")
        view = self.library.views.create(
            body["name"], body["knowledge_base"],
            metadata_condition=body.get("metadata_condition"),
            retrieval_mode=body.get("retrieval_mode"),
            semantic_weight=body.get("semantic_weight"), top_k_max=body.get("top_k_max"))
        return json_response(view_entry(view), status=201)

    def _delete_view(self, request: Request, caller: Caller, name: str) -> Response:
        caller.check_admin()
        self.library.views.delete(name)
        return json_response({"deleted": name})

    @staticmethod
    def error_response(exc: BaseException) -> Response:
        status, code, message = error_status(exc)
        response = json_response(error_body(code, message), status=status)
        if isinstance(exc, ServerBusyError):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
