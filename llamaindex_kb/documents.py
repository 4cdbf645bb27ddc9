"""``POST /documents``: a file upload (multipart) or a text (JSON) into a knowledge base.

Large uploads are spooled to a temporary file by werkzeug's form parser rather
than held in memory. Everything is read, chunked and embedded before the
knowledge base is touched, so a bad file is a 400 that leaves nothing behind.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from werkzeug import Request
from werkzeug.exceptions import RequestEntityTooLarge

from .chunking import ChunkingConfig
from .errors import InvalidFieldError, MalformedBodyError, PayloadTooLargeError
from .ingest import (
    IngestSummary,
    Source,
    apply_changes,
    check_user_metadata,
    current_kb,
    text_source,
    upload_source,
)
from .knowledge_base import DocumentInfo
from .layout import validate_knowledge_id
from .models import Models
from .stores import KnowledgeStore

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
# The Dify plugin daemon silently cuts request bodies at 10 MiB.
DAEMON_BODY_LIMIT = 10 * 1024 * 1024


def upload(
    request: Request, store: KnowledgeStore, models: Models
) -> tuple[DocumentInfo, IngestSummary]:
    request.max_content_length = MAX_UPLOAD_BYTES
    try:
        if request.mimetype == "multipart/form-data":
            knowledge_id, source, chunking, mode = _from_form(request)
        elif request.mimetype == "application/json":
            knowledge_id, source, chunking, mode = _from_json(request)
        else:
            raise InvalidFieldError(
                "Content-Type",
                "send multipart/form-data with a 'file' field, or application/json with "
                "'knowledge_id', 'title' and 'text'",
            )
    except RequestEntityTooLarge as exc:
        raise PayloadTooLargeError(
            f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB"
        ) from exc
    summary = apply_changes(
        store, knowledge_id, [source], set(), IngestSummary(knowledge_id=knowledge_id),
        embed_model=models.embed_model if mode != "keyword" else None, mode=mode,
        chunking=chunking,
    )
    kb = current_kb(store, knowledge_id)
    assert kb is not None
    return kb.documents[source.info.document_id], summary


def _from_form(request: Request) -> tuple[str, Source, ChunkingConfig | None, Any]:
    form, files = request.form, request.files
    knowledge_id = _required(form.get("knowledge_id"), "knowledge_id")
    upload_file = files.get("file")
    if upload_file is None or not upload_file.filename:
        if request.content_length and request.content_length >= DAEMON_BODY_LIMIT:
            raise InvalidFieldError(
                "file", "the upload arrived incomplete: the Dify plugin daemon cuts request "
                "bodies at 10 MiB; use the standalone server or the CLI for larger files")
        raise InvalidFieldError("file", "is required (a multipart file field named 'file')")
    metadata = check_user_metadata(_json_field(form.get("metadata"), "metadata"))
    source = upload_source(upload_file.read(), upload_file.filename, metadata)
    return (knowledge_id, source, _chunking(_json_field(form.get("chunking"), "chunking")),
            _mode(form.get("mode")))


def _from_json(request: Request) -> tuple[str, Source, ChunkingConfig | None, Any]:
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBodyError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedBodyError("request body must be a JSON object")
    knowledge_id = _required(body.get("knowledge_id"), "knowledge_id")
    title = _required(body.get("title"), "title")
    text = body.get("text")
    if not isinstance(text, str):
        raise InvalidFieldError("text", "is required and must be a string")
    document_id = body.get("document_id")
    if document_id is not None and (not isinstance(document_id, str) or not document_id):
        raise InvalidFieldError("document_id", "must be a non-empty string")
    source = text_source(title, text, check_user_metadata(body.get("metadata")), document_id)
    return knowledge_id, source, _chunking(body.get("chunking")), _mode(body.get("mode"))


def _required(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidFieldError(field, "is required and must be a non-empty string")
    return validate_knowledge_id(value, field) if field == "knowledge_id" else value


def _json_field(raw: str | None, field: str) -> object:
    if raw is None or raw.strip() == "":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidFieldError(field, f"is not valid JSON: {exc}") from exc


def _chunking(raw: object) -> ChunkingConfig | None:
    if raw is None:
        return None
    try:
        return ChunkingConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["chunking", *(str(part) for part in first["loc"])])
        raise InvalidFieldError(field, first["msg"]) from exc


def _mode(raw: object) -> Any:
    if raw in (None, ""):
        return "hybrid"
    if raw not in ("hybrid", "vector", "keyword"):
        raise InvalidFieldError("mode", f"must be hybrid, vector or keyword, got {raw!r}")
    return raw
