"""Dify's External Knowledge API at the wire: request parsing, response and error bodies.

The published spec is half the contract; the other half is what Dify really sends
(see docs in the README, "How Dify calls you"). Every leniency lives here:

* an empty body (Dify's save-time probe, some versions) is a probe: answer no records;
* ``knowledge_id == ""`` is the other probe variant: answer no records;
* ``retrieval_setting`` or ``top_k`` null → ``DEFAULT_TOP_K``; ``score_threshold`` null → 0;
* ``score_threshold`` may arrive as an int (0 or 1);
* the console retrieval test escapes ``"`` as ``\\"`` inside the query: undone here;
* ``metadata_condition`` absent, null, ``{}`` or with no conditions means "no filter".

Beyond Dify's fields, a retrieval test (the browser console) may send ``explain: true``
and ``retrieval_setting.retrieval_mode`` / ``semantic_weight`` overrides; Dify never
sends them, and without ``explain`` a record has exactly Dify's four fields.

And what a hostile client sends is refused with a 4xx naming the problem, before
any work: a body over ``Limits.body_bytes`` (413, judged by ``Content-Length`` or
by reading one byte past the limit), bytes that are not UTF-8, JSON that is not
strict (``NaN``, ``Infinity``, integers past Python's 4,300 digits, nesting past
``MAX_DEPTH``), lone surrogates or NUL characters in any string, a query over
``Limits.query_chars``, more conditions or listed values than the limits allow.
The body's ``Content-Type`` is not checked: Dify's save-time probe sends none.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from werkzeug import Request

from llamaindex_kb.conditions.model import MetadataCondition, parse_metadata_condition
from llamaindex_kb.config import RETRIEVAL_MODES, RetrievalMode
from llamaindex_kb.errors import InvalidFieldError, MalformedBodyError
from llamaindex_kb.ids import KB_ID_MAX
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, over_limit

DEFAULT_TOP_K = 4
MAX_TOP_K = 1000
# Dify's body is three levels deep; a metadata value list adds one.
MAX_DEPTH = 16


class RetrievalRequest(BaseModel):
    """A parsed, validated ``POST /retrieval`` body."""

    model_config = ConfigDict(frozen=True)

    knowledge_id: str
    query: str
    top_k: int = DEFAULT_TOP_K
    score_threshold: float = 0.0
    condition: MetadataCondition | None = None
    # Not Dify's: a retrieval test's overrides of the server's settings (a view's own
    # still win), and whether records carry their ``score_parts``.
    retrieval_mode: RetrievalMode | None = None
    semantic_weight: float | None = None
    explain: bool = False

    @property
    def is_probe(self) -> bool:
        return self.knowledge_id == ""


class ScoreParts(BaseModel):
    """What a record's score is made of (``explain``); see ``Library.explain``."""

    mode: RetrievalMode
    semantic_weight: float
    semantic: float | None
    keyword: float | None
    first_stage: float
    rerank: float | None


class Record(BaseModel):
    """One answer record; ``metadata`` is always an object (Dify breaks on null).

    ``score_parts`` only with ``explain``: otherwise the key is absent, not null, so what
    Dify receives stays Dify's four fields."""

    content: str
    score: float = Field(ge=0.0, le=1.0)
    title: str
    metadata: dict[str, Any]
    score_parts: ScoreParts | None = None

    @model_serializer(mode="wrap")
    def _without_absent_parts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        if self.score_parts is None:
            dumped.pop("score_parts", None)
        return dumped


class RetrievalResponse(BaseModel):
    records: list[Record]


PROBE = RetrievalRequest(knowledge_id="", query="", top_k=1)


def read_body(request: Request, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The request body, refused with 413 before it is read when it is over the limit."""
    limit = limits.body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise over_limit("the request body", length, "body_bytes", limit)
    # A chunked body has no length: read one byte past the limit to know.
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise over_limit("the request body", None, "body_bytes", limit)
    return body


def parse_json_object(body: bytes, nul_allowed: frozenset[str] = frozenset()
                      ) -> dict[str, Any]:
    """A strict JSON object from raw bytes, or a 400 saying what is wrong with it.

    ``nul_allowed``: top-level fields whose strings may hold NUL (their caller drops it).
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedBodyError(
            f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset "
            f"{exc.start}") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise MalformedBodyError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise MalformedBodyError(
            f"request body nests deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # int() past sys.get_int_max_str_digits(), or a constant
        raise MalformedBodyError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedBodyError(
            f"request body must be a JSON object, got {_json_type(data)}")
    check_storable(data, nul_allowed=nul_allowed)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number; ``1e999`` would become infinity, which no JSON answer can carry
    back, so it is refused like the literal ``Infinity``."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def check_storable(value: object, place: str = "", nul_allowed: frozenset[str] = frozenset()
                   ) -> None:
    """Refuse nesting past MAX_DEPTH, and strings no store can hold (``text_problem``)
    anywhere in ``value``, keys included, naming the place. ``nul_allowed``: places whose
    strings may hold NUL (their caller drops it)."""
    todo: list[tuple[object, str, int]] = [(value, place, 0)]
    while todo:
        item, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise MalformedBodyError(f"request body nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            problem = text_problem(item, allow_nul=where in nul_allowed)
            if problem:
                raise InvalidFieldError(where or "request body", problem)
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key, allow_nul=False)
                if problem:
                    raise InvalidFieldError(f"{where or 'request body'} key", problem)
                todo.append((child, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(item, list):
            todo.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))


def text_problem(text: str, *, allow_nul: bool = False) -> str | None:
    """Why no store can keep ``text``, or None: UTF-8 cannot encode a lone surrogate
    (which JSON's "\\ud800" can spell), and PostgreSQL refuses NUL."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"contains a lone surrogate (\\u{ord(text[exc.start]):04x}): not valid "
                    "Unicode text")
    if not allow_nul and "\x00" in text:
        return "must not contain NUL characters (\\u0000)"
    return None


def parse_retrieval_request(body: bytes, limits: Limits = DEFAULT_LIMITS) -> RetrievalRequest:
    """Parse the raw body Dify sends; raise a 4xx-class error naming the bad field."""
    if not body.strip():
        return PROBE
    data = parse_json_object(body, nul_allowed=frozenset({"query"}))  # its NULs are dropped
    knowledge_id = _string(data, "knowledge_id", required=True)
    if len(knowledge_id) > KB_ID_MAX or not knowledge_id.isprintable():
        raise InvalidFieldError(
            "knowledge_id", f"must be at most {KB_ID_MAX} printable characters")
    query = _string(data, "query", required=False).replace('\\"', '"').replace("\x00", "")
    if len(query) > limits.query_chars:
        raise over_limit("query", len(query), "query_chars", limits.query_chars, "characters")
    setting = data.get("retrieval_setting")
    if setting is None:
        setting = {}
    if not isinstance(setting, dict):
        raise InvalidFieldError(
            "retrieval_setting", f"must be an object, got {_json_type(setting)}")
    explain = data.get("explain", False)
    if explain is None:
        explain = False
    if not isinstance(explain, bool):
        raise InvalidFieldError("explain", f"must be true or false, got {_json_type(explain)}")
    return RetrievalRequest(
        knowledge_id=knowledge_id,
        query=query,
        top_k=_top_k(setting.get("top_k")),
        score_threshold=_score_threshold(setting.get("score_threshold")),
        condition=parse_metadata_condition(data.get("metadata_condition"), limits),
        retrieval_mode=_retrieval_mode(setting.get("retrieval_mode")),
        semantic_weight=_semantic_weight(setting.get("semantic_weight")),
        explain=explain,
    )


def _string(data: dict[str, Any], field: str, *, required: bool) -> str:
    if field not in data and required:
        raise InvalidFieldError(field, "is required")
    value = data.get(field)
    if value is None:
        if required:
            raise InvalidFieldError(field, "must be a string, got null")
        return ""
    if not isinstance(value, str):
        raise InvalidFieldError(field, f"must be a string, got {_json_type(value)}")
    return value


def _top_k(value: object) -> int:
    field = "retrieval_setting.top_k"
    if value is None:
        return DEFAULT_TOP_K
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFieldError(field, f"must be an integer, got {_json_type(value)}")
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidFieldError(field, f"must be between 1 and {MAX_TOP_K}, got {_short(value)}")
    return value


def _score_threshold(value: object) -> float:
    return 0.0 if value is None else fraction_field(value, "retrieval_setting.score_threshold")


def _retrieval_mode(value: object) -> RetrievalMode | None:
    return retrieval_mode_field(value, "retrieval_setting.retrieval_mode")


def retrieval_mode_field(value: object, field: str) -> RetrievalMode | None:
    """One of the retrieval modes, or None for null; else a 400 naming ``field``. The
    one rule for every body that names a mode (retrieval, views, new bases, uploads)."""
    if value is None:
        return None
    for mode in RETRIEVAL_MODES:
        if value == mode:
            return mode
    shown_value = repr(value)[:40] if isinstance(value, str) else _json_type(value)
    raise InvalidFieldError(
        field, f"must be one of {', '.join(RETRIEVAL_MODES)}, got {shown_value}")


def _semantic_weight(value: object) -> float | None:
    return None if value is None else fraction_field(value, "retrieval_setting.semantic_weight")


def fraction_field(value: object, field: str) -> float:
    """A JSON number from 0 to 1 (a threshold, a weight), or a 400 naming ``field``: the
    one rule for every body that carries one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFieldError(field, f"must be a number, got {_json_type(value)}")
    if not 0.0 <= value <= 1.0:
        raise InvalidFieldError(field, f"must be between 0 and 1, got {_short(value)}")
    return float(value)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             type(None): "null"}
    return names.get(type(value), "object")


def _short(number: float) -> str:
    """A number for a message: a client's 4,000-digit integer is not echoed whole."""
    text = repr(number) if isinstance(number, float) else str(number)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def error_body(error_code: int, error_msg: str) -> dict[str, Any]:
    return {"error_code": error_code, "error_msg": error_msg}
