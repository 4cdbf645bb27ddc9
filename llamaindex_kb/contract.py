"""Dify's External Knowledge API at the wire: request parsing, response and error bodies.

The published spec is half the contract; the other half is what Dify really sends
(see docs in the README, "How Dify calls you"). Every leniency lives here:

* an empty body (Dify's save-time probe, some versions) is a probe: answer no records;
* ``knowledge_id == ""`` is the other probe variant: answer no records;
* ``retrieval_setting`` or ``top_k`` null → ``DEFAULT_TOP_K``; ``score_threshold`` null → 0;
* ``score_threshold`` may arrive as an int (0 or 1);
* the console retrieval test escapes ``"`` as ``\\"`` inside the query: undone here;
* ``metadata_condition`` absent, null, ``{}`` or with no conditions means "no filter".
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidFieldError, MalformedBodyError
from .filters import MetadataCondition, parse_metadata_condition

DEFAULT_TOP_K = 4
MAX_TOP_K = 1000


class RetrievalRequest(BaseModel):
    """A parsed, validated ``POST /retrieval`` body."""

    model_config = ConfigDict(frozen=True)

    knowledge_id: str
    query: str
    top_k: int = DEFAULT_TOP_K
    score_threshold: float = 0.0
    condition: MetadataCondition | None = None

    @property
    def is_probe(self) -> bool:
        return self.knowledge_id == ""


class Record(BaseModel):
    """One answer record; ``metadata`` is always an object (Dify breaks on null)."""

    content: str
    score: float = Field(ge=0.0, le=1.0)
    title: str
    metadata: dict[str, Any]


class RetrievalResponse(BaseModel):
    records: list[Record]


PROBE = RetrievalRequest(knowledge_id="", query="", top_k=1)


def parse_retrieval_request(body: bytes) -> RetrievalRequest:
    """Parse the raw body Dify sends; raise a 400-class error naming the bad field."""
    if not body.strip():
        return PROBE
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedBodyError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedBodyError("request body must be a JSON object")

    knowledge_id = _string(data, "knowledge_id", required=True)
    query = _string(data, "query", required=False).replace('\\"', '"')
    setting = data.get("retrieval_setting")
    if setting is None:
        setting = {}
    if not isinstance(setting, dict):
        raise InvalidFieldError("retrieval_setting", "must be an object")
    return RetrievalRequest(
        knowledge_id=knowledge_id,
        query=query,
        top_k=_top_k(setting.get("top_k")),
        score_threshold=_score_threshold(setting.get("score_threshold")),
        condition=parse_metadata_condition(data.get("metadata_condition")),
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
        raise InvalidFieldError(field, f"must be between 1 and {MAX_TOP_K}, got {value}")
    return value


def _score_threshold(value: object) -> float:
    field = "retrieval_setting.score_threshold"
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFieldError(field, f"must be a number, got {_json_type(value)}")
    if not 0.0 <= value <= 1.0:
        raise InvalidFieldError(field, f"must be between 0 and 1, got {value}")
    return float(value)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return names.get(type(value), "object")


def error_body(error_code: int, error_msg: str) -> dict[str, Any]:
    return {"error_code": error_code, "error_msg": error_msg}
