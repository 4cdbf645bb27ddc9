"""What a hostile or broken client sends to POST /retrieval: always a 4xx naming the problem.

Driven in-process through ``KnowledgeAPI.handle`` with raw bodies (the same object both
doors call), and through the plugin SDK's executor for the bytes the daemon relays.
"""

from __future__ import annotations

# This module drives the Dify SDK in this process: import it first, as main.py does,
# since it gevent-patches threading and sockets on import (see conftest).
import dify_plugin  # noqa: F401  isort: skip

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, dify_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug import Request
from werkzeug.test import EnvironBuilder

from llamaindex_kb import load_settings
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.service import api_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def api(demo_data_dir: Path) -> KnowledgeAPI:
    return api_for(load_settings(
        {"api_key": API_KEY, "data_dir": demo_data_dir, "demo": True}, environ={}))


def send(api: KnowledgeAPI, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/retrieval", chunked: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    if chunked:
        builder = EnvironBuilder(path=path, method="POST", headers=headers,
                                 input_stream=io.BytesIO(body))
        environ = builder.get_environ()
        environ.pop("CONTENT_LENGTH", None)
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
        environ["wsgi.input_terminated"] = True
    else:
        environ = EnvironBuilder(path=path, method="POST", headers=headers,
                                 data=body).get_environ()
    response = api.handle(Request(environ))
    return response.status_code, json.loads(response.get_data())


def retrieval(**fields: Any) -> bytes:
    payload = {"knowledge_id": "demo", "query": "dify",
               "retrieval_setting": {"top_k": 2, "score_threshold": 0.0}, **fields}
    return dify_body(payload)


@pytest.mark.parametrize(("body", "code", "words"), [
    (b'{"knowledge_id": "demo", "query": "\xff\xfe"}', 3001, "not valid UTF-8"),
    (b'{"knowledge_id": "demo", "query": "\xed\xa0\x80"}', 3001, "not valid UTF-8"),
    (b'{"knowledge_id": "demo", "query": "\\ud800"}', 3002, "lone surrogate"),
    (b'{"knowledge_id": "demo\\udfff", "query": "x"}', 3002, "knowledge_id"),
    (b'{"knowledge_id": "demo", "query": "x", "retrieval_setting": {"top_k": NaN}}', 3001,
     "NaN is not a JSON number"),
    (b'{"knowledge_id": "demo", "query": "x", "retrieval_setting": {"score_threshold": '
     b'-Infinity}}', 3001, "-Infinity"),
    (b'{"knowledge_id": "demo", "query": "x", "retrieval_setting": {"top_k": 1'
     + b"0" * 5000 + b"}}", 3001, "digits"),
    (b'{"knowledge_id": "demo", "query": "x", "retrieval_setting": {"top_k": 1'
     + b"0" * 4000 + b"}}", 3002, "(4001 digits)"),
    # 1e400 parses to infinity, which no JSON answer could carry back: refused as such,
    # also where the value would be ignored (an `empty` condition's).
    (b'{"knowledge_id": "demo", "query": "x", "metadata_condition": {"conditions": '
     b'[{"name": "n", "comparison_operator": ">", "value": 1e400}]}}', 3001, "1e400 is out of"),
    (b'{"knowledge_id": "demo", "query": "x", "metadata_condition": {"conditions": '
     b'[{"name": "n", "comparison_operator": "empty", "value": -1e999}]}}', 3001,
     "out of range"),
    (b'{"knowledge_id": "demo", "query": "x", "metadata_condition": {"conditions": '
     b'[{"name": "n", "comparison_operator": ">", "value": 1' + b"0" * 4000 + b"}]}}",
     3003, "conditions[0]"),
    (b"[" * 100_000 + b"]" * 100_000, 3001, "nests deeper"),
    (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 3001, "nests deeper"),
    (b'{"knowledge_id": "demo", "query": "x", "metadata_condition": {"conditions": [{"name": '
     b'"n", "comparison_operator": "in", "value": [[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]}]}}',
     3001, "nests deeper"),
    (b'{"knowledge_id": "demo", "query": "x"', 3001, "not valid JSON"),
    (b'"demo"', 3001, "must be a JSON object, got string"),
    (b"null", 3001, "got null"),
    (b'{"knowledge_id": "de\\u0000mo", "query": "x"}', 3002, "NUL"),
    (b'{"knowledge_id": "demo", "query": "x", "metadata_condition": {"conditions": '
     b'[{"name": "a\\u0000", "comparison_operator": "is", "value": "x"}]}}', 3002, "NUL"),
    (b'{"knowledge_id": "' + b"k" * 201 + b'", "query": "x"}', 3002, "200 printable"),
    (b'{"knowledge_id": "demo", "query": "x", "retrieval_setting": []}', 3002,
     "retrieval_setting: must be an object, got array"),
])
def test_malformed_bodies_answer_400_naming_the_problem(api, body, code, words):
    status, answer = send(api, body)
    assert status == 400, answer
    assert answer["error_code"] == code
    assert words in answer["error_msg"]


def test_a_body_over_the_limit_is_refused_by_its_length_before_it_is_read(api):
    class Untouchable(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            raise AssertionError("the body was read")

    environ = EnvironBuilder(path="/retrieval", method="POST", headers=AUTH).get_environ()
    environ["wsgi.input"] = Untouchable()
    environ["CONTENT_LENGTH"] = str(60 * 1024 * 1024)
    response = api.handle(Request(environ))
    answer = json.loads(response.get_data())
    assert response.status_code == 413
    assert answer["error_code"] == 3006
    assert "62,914,560 bytes" in answer["error_msg"]
    assert "LLAMAINDEX_KB_MAX_BODY_BYTES" in answer["error_msg"]


def test_a_chunked_body_over_the_limit_is_refused_after_one_byte_past_it(api):
    status, answer = send(api, b" " * (2 * 1024 * 1024), chunked=True)
    assert (status, answer["error_code"]) == (413, 3006)
    assert "more than 1,048,576 bytes" in answer["error_msg"]


def test_a_chunked_body_within_the_limit_is_answered(api):
    status, answer = send(api, retrieval(), chunked=True)
    assert status == 200
    assert answer["records"]


def test_a_long_query_is_refused_quickly_with_the_setting_that_raises_the_limit(api):
    started = time.perf_counter()
    status, answer = send(api, retrieval(query="知识库" * 40_000))
    assert time.perf_counter() - started < 1.0
    assert (status, answer["error_code"]) == (413, 3006)
    assert "120,000 characters" in answer["error_msg"]
    assert "LLAMAINDEX_KB_MAX_QUERY_CHARS" in answer["error_msg"]


def test_the_limits_follow_the_settings(demo_data_dir):
    api = api_for(load_settings({"api_key": API_KEY, "data_dir": demo_data_dir, "demo": True,
                                 "max_query_chars": 5, "max_conditions": 1}, environ={}))
    assert send(api, retrieval(query="dify"))[0] == 200
    assert send(api, retrieval(query="dify dify"))[0] == 413
    two = {"conditions": [{"name": "a", "comparison_operator": "is", "value": "x"}] * 2}
    status, answer = send(api, retrieval(metadata_condition=two))
    assert (status, answer["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_CONDITIONS" in answer["error_msg"]


def test_too_many_listed_values_are_refused(api):
    condition = {"conditions": [{"name": "a", "comparison_operator": "in",
                                 "value": ["x"] * 1001}]}
    status, answer = send(api, retrieval(metadata_condition=condition))
    assert (status, answer["error_code"]) == (413, 3006)
    assert "conditions[0].value" in answer["error_msg"]


def test_nul_characters_in_the_query_are_dropped(api):
    status, answer = send(api, retrieval(query="di\x00fy"))
    assert status == 200
    assert answer["records"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_the_content_type_does_not_change_the_answer(api, content_type):
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    status, answer = send(api, retrieval(), headers=headers)
    assert status == 200
    assert answer["records"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(["knowledge_id", "query", "retrieval_setting", "metadata_condition",
                          "top_k", "score_threshold", "conditions", "logical_operator"])
_condition = st.fixed_dictionaries({}, optional={
    "name": _json | st.sampled_from(["file_type", ["file_type"], "", "x"]),
    "comparison_operator": _json | st.sampled_from(
        ["is", "in", "contains", "empty", ">", "before", "≠", "not in", "start with"]),
    "value": _json | st.sampled_from(["md", ["md", None], "2024-01-01", 3, "1,2"]),
})
_shaped = st.fixed_dictionaries({}, optional={
    "knowledge_id": _json | st.just("demo"),
    "query": _json | st.text(max_size=40),
    "retrieval_setting": _json | st.fixed_dictionaries({}, optional={
        "top_k": _json, "score_threshold": _json}),
    "metadata_condition": _json | st.fixed_dictionaries({}, optional={
        "logical_operator": _json | st.sampled_from(["and", "or"]),
        "conditions": _json | st.lists(_condition, max_size=3)}),
})
_body = (
    _shaped.map(lambda payload: json.dumps(payload).encode())
    | st.dictionaries(_field, _json, max_size=4).map(lambda p: json.dumps(p).encode())
    | _json.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body)
def test_no_generated_body_gets_a_server_error(api, body):
    status, answer = send(api, body)
    assert status in {200, 400, 404, 413}, (status, answer)
    if status != 200:
        assert set(answer) == {"error_code", "error_msg"}
        assert answer["error_msg"]
    else:
        assert isinstance(answer["records"], list)


def test_the_daemon_path_answers_a_malformed_body_with_400(transport):
    reply = transport.post("/retrieval", b'{"knowledge_id": "demo", "query": "\\ud800"}',
                           {**AUTH, "Content-Type": "application/json"})
    assert reply.status == 400
    assert reply.json()["error_code"] == 3002


def test_a_json_upload_whose_values_would_fill_memory_is_refused_before_parsing(api):
    junk = b"[" + b"{}," * 3_000_000 + b"{}]"
    body = b'{"knowledge_id": "kb", "title": "t", "text": "x", "junk": ' + junk + b"}"
    started = time.perf_counter()
    status, answer = send(api, body, path="/documents")
    assert time.perf_counter() - started < 2.0
    assert (status, answer["error_code"]) == (413, 3006)
    assert "has up to 6,000,006 JSON values" in answer["error_msg"]
    assert "LLAMAINDEX_KB_MAX_INFLATED_BYTES" in answer["error_msg"]
