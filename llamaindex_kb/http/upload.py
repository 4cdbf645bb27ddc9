"""``POST /documents``: a file upload (multipart) or a text (JSON) into a knowledge base.

Large uploads are spooled to a temporary file by werkzeug's form parser and copied
from there a piece at a time, never held whole in memory. Everything is read,
chunked and embedded before the knowledge base is touched, so a bad file is a 400
(or a 413 over a limit, ``limits.py``) that leaves nothing behind.

That work takes the CPU for seconds to minutes, so it is bounded twice: uploads take
turns (``UPLOAD_SLOTS`` at a time; one that cannot start within ``SLOT_WAIT_SECONDS``
answers 429 with ``retry_after``), and one whose client has gone stops at the next
checkpoint with nothing written (waitress's ``waitress.client_disconnected``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator

from pydantic import ValidationError
from werkzeug import Request
from werkzeug.exceptions import RequestEntityTooLarge

from llamaindex_kb.config import RetrievalMode
from llamaindex_kb.contract import check_storable, parse_json_object, retrieval_mode_field
from llamaindex_kb.errors import InvalidFieldError, MalformedBodyError, ServerBusyError, shown
from llamaindex_kb.ids import validate_knowledge_id
from llamaindex_kb.ingestion.chunking import ChunkingConfig
from llamaindex_kb.ingestion.pipeline import (
    Cancelled,
    IngestSummary,
    Source,
    apply_changes,
    check_user_metadata,
    check_writable,
    checkpoint_for,
    text_source,
    upload_source,
)
from llamaindex_kb.ingestion.readers import JSON_VALUE_COST, Checkpoint, format_bytes, upload_name
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, MiB, too_large
from llamaindex_kb.models.base import Models
from llamaindex_kb.stores.base import DocumentInfo, KnowledgeStore

# The Dify plugin daemon silently cuts request bodies at 10 MiB.
DAEMON_BODY_LIMIT = 10 * MiB
# One upload's embedding keeps both cores of the 2-core target busy; a second at the
# same time would only halve the speed of both and leave retrieval less CPU.
UPLOAD_SLOTS = 1
SLOT_WAIT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 30
# Room for the multipart framing and the small fields around a file of upload_bytes.
_FORM_OVERHEAD = 1 * MiB
DOCUMENT_ID_MAX = 200
DOCUMENT_ID_RULE = (
    f"1 to {DOCUMENT_ID_MAX} printable characters; '/' may separate parts, but no part may "
    "be empty, '.' or '..' (URL paths collapse those, so the id could not be deleted)"
)

_slots = threading.BoundedSemaphore(UPLOAD_SLOTS)


def upload(
    request: Request, store: KnowledgeStore, models: Models, limits: Limits = DEFAULT_LIMITS,
    cancelled: Cancelled | None = None, allowed: Callable[[str], None] | None = None,
) -> tuple[DocumentInfo, IngestSummary]:
    """Add the document ``request`` carries; ``cancelled`` (by default waitress's
    client-disconnected flag, if the server provides it) stops the work unwritten;
    ``allowed`` refuses a knowledge id the caller may not write to."""
    if cancelled is None:
        cancelled = request.environ.get("waitress.client_disconnected")
    checkpoint = checkpoint_for(cancelled)
    request.max_content_length = limits.upload_bytes + _FORM_OVERHEAD
    try:
        if request.mimetype == "multipart/form-data":
            knowledge_id, read, chunking, mode = _from_form(request, limits)
        elif request.mimetype == "application/json":
            knowledge_id, read, chunking, mode = _from_json(request, limits)
        else:
            raise InvalidFieldError(
                "Content-Type",
                "send multipart/form-data with a 'file' field, or application/json with "
                "'knowledge_id', 'title' and 'text'",
            )
    except RequestEntityTooLarge as exc:
        raise _too_large(request, limits) from exc
    if allowed is not None:
        allowed(knowledge_id)
    check_writable(store, knowledge_id)
    with _slot():
        if checkpoint is not None:
            checkpoint()
        source = read(checkpoint)
        summary = apply_changes(
            store, knowledge_id, [source], set(), IngestSummary(knowledge_id=knowledge_id),
            models=models, mode=mode,
            chunking=chunking, limits=limits, checkpoint=checkpoint,
        )
    # From the source, not the store: opening the knowledge base only to answer would
    # load its indices into this process for nothing.
    return source.info.model_copy(update={"chunks": summary.chunks}), summary


@contextlib.contextmanager
def _slot() -> Iterator[None]:
    if not _slots.acquire(timeout=SLOT_WAIT_SECONDS):
        raise ServerBusyError(
            f"the server is busy with {UPLOAD_SLOTS} other upload(s); try again in "
            f"{RETRY_AFTER_SECONDS} s", retry_after=RETRY_AFTER_SECONDS)
    try:
        yield
    finally:
        _slots.release()


def _too_large(request: Request, limits: Limits) -> Exception:
    if request.content_length is None or request.content_length > request.max_content_length:
        return too_large("request body:", f"is larger than {format_bytes(limits.upload_bytes)} "
                          f"and {format_bytes(_FORM_OVERHEAD)} for the fields around a file",
                          "upload_bytes")
    return InvalidFieldError(
        "form", f"a field other than 'file' is larger than "
        f"{format_bytes(request.max_form_memory_size or 0)}, or there are more than "
        f"{request.max_form_parts or 0:,} fields")


# What a request asks for: the knowledge base, how to read its source (done later,
# when the upload has its turn), the chunking and the retrieval mode.
Parsed = tuple[str, Callable[[Checkpoint | None], Source], ChunkingConfig | None,
               RetrievalMode]


def _from_form(request: Request, limits: Limits) -> Parsed:
    form, files = request.form, request.files
    if not form and not files and request.content_length:
        raise MalformedBodyError(
            "the multipart/form-data body has no parts: check its boundary parameter and "
            "that it starts with one")
    knowledge_id = _knowledge_id(form.get("knowledge_id"))
    upload_file = files.get("file")
    if upload_file is None or not upload_file.filename:
        if request.content_length and request.content_length >= DAEMON_BODY_LIMIT:
            raise InvalidFieldError(
                "file", "the upload arrived incomplete: the Dify plugin daemon cuts request "
                "bodies at 10 MiB; use the standalone server or the CLI for larger files")
        raise InvalidFieldError("file", "is required (a multipart file field named 'file')")
    name = upload_name(upload_file.filename)
    if name and not name.isprintable():
        raise InvalidFieldError("file", f"the file name {name!r} must be printable characters")
    metadata = check_user_metadata(_json_field(form.get("metadata"), "metadata"))

    def read(checkpoint: Checkpoint | None) -> Source:
        return upload_source(upload_file.stream, upload_file.filename or "", metadata,
                             limits=limits, checkpoint=checkpoint)

    chunking = _json_field(form.get("chunking"), "chunking")
    check_storable(chunking, "chunking")  # a JSON body's fields are checked as it is parsed
    return knowledge_id, read, parse_chunking(chunking), _mode(form.get("mode"))


def _from_json(request: Request, limits: Limits) -> Parsed:
    raw = request.get_data(cache=False)
    # Counted before parsing: parsed JSON takes many times its text in memory.
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values * JSON_VALUE_COST > limits.inflated_bytes:
        raise too_large("the request body", f"has up to {values:,} JSON values, which would "
                        f"take more than {format_bytes(limits.inflated_bytes)} once parsed",
                        "inflated_bytes")
    # Strict as for /retrieval; NULs in the text are dropped by chunking.
    body = parse_json_object(raw, nul_allowed=frozenset({"text"}))
    knowledge_id = _knowledge_id(body.get("knowledge_id"))
    title = _required(body.get("title"), "title")
    text = body.get("text")
    if not isinstance(text, str):
        raise InvalidFieldError("text", "is required and must be a string")
    document_id = body.get("document_id")
    if document_id is not None:
        _check_document_id(document_id)
    metadata = check_user_metadata(body.get("metadata"))

    def read(_: Checkpoint | None) -> Source:
        return text_source(title, text, metadata, document_id, limits)

    return knowledge_id, read, parse_chunking(body.get("chunking")), _mode(body.get("mode"))


def _knowledge_id(value: object) -> str:
    return validate_knowledge_id(_required(value, "knowledge_id"))


def _required(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidFieldError(field, "is required and must be a non-empty string")
    return value


def _check_document_id(value: object) -> None:
    """Every id a document is created under can be listed and deleted: the DELETE route
    takes the rest of its URL path, which clients and the router normalise."""
    if (not isinstance(value, str) or not value or len(value) > DOCUMENT_ID_MAX
            or not value.isprintable()
            or any(part in {"", ".", ".."} for part in value.split("/"))):
        raise InvalidFieldError("document_id", f"must be {DOCUMENT_ID_RULE}; got {shown(value)}")


def _json_field(raw: str | None, field: str) -> object:
    if raw is None or raw.strip() == "":
        return None
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidFieldError(field, "is nested too deeply") from None
    except ValueError as exc:  # not JSON, or an integer of thousands of digits
        raise InvalidFieldError(field, f"is not valid JSON: {exc}") from exc


def parse_chunking(raw: object) -> ChunkingConfig | None:
    """The ``chunking`` field (upload, ``POST /knowledge-bases``), or a 400 naming the
    first bad part."""
    if raw is None:
        return None
    try:
        return ChunkingConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["chunking", *(str(part) for part in first["loc"])])
        raise InvalidFieldError(field, first["msg"]) from exc


def _mode(raw: object) -> RetrievalMode:
    """A new base's mode; a form sends an empty field for "not given"."""
    return retrieval_mode_field(None if raw == "" else raw, "mode") or "hybrid"
