"""Knowledge-base maintenance over HTTP, through the plugin executor and the standalone server."""

from __future__ import annotations

# This module drives the Dify SDK in this process: import it first, as main.py does,
# since it gevent-patches threading and sockets on import (see conftest).
import dify_plugin  # noqa: F401  isort: skip

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    API_KEY,
    PluginTransport,
    Reply,
    ServerTransport,
    expect_error,
    standalone_server,
)

from llamaindex_kb.models import multilingual

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(params=["plugin", "server"])
def api(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[PluginTransport | ServerTransport]:
    if request.param == "plugin":
        yield PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path)})
        return
    with standalone_server(tmp_path) as url:
        yield ServerTransport(url)


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[bytes, dict]:
    files = {"file": (file[0], file[1])} if file else None
    request = httpx.Request("POST", "http://x/documents", data=fields, files=files)
    return request.read(), {**AUTH, "Content-Type": request.headers["Content-Type"]}


def upload(api: Any, kb: str, name: str, content: bytes, metadata: dict | None = None) -> Reply:
    fields = {"knowledge_id": kb}
    if metadata is not None:
        fields["metadata"] = json.dumps(metadata)
    body, headers = multipart(fields, (name, content))
    return api.post("/documents", body, headers)


def post_json(api: Any, path: str, payload: dict) -> Reply:
    return api.post(path, json.dumps(payload).encode(),
                    {**AUTH, "Content-Type": "application/json"})


def retrieve(api: Any, kb: str, query: str, condition: dict | None = None) -> list[dict]:
    payload: dict[str, Any] = {"knowledge_id": kb, "query": query,
                               "retrieval_setting": {"top_k": 5, "score_threshold": 0.0}}
    if condition:
        payload["metadata_condition"] = condition
    reply = post_json(api, "/retrieval", payload)
    assert reply.status == 200, reply.body
    return reply.json()["records"]


def test_uploaded_file_with_metadata_is_retrievable_and_filterable(api):
    reply = upload(api, "handbook", "leave.md", b"# Leave\n\nEmployees get 25 days of paid leave.",
                   {"department": "hr", "year": 2024})
    assert reply.status == 201, reply.body
    document = reply.json()["document"]
    assert document["file_name"] == "leave.md" and document["chunks"] >= 1
    found = retrieve(api, "handbook", "paid leave days")
    assert found[0]["metadata"]["document_id"] == document["document_id"]
    assert found[0]["metadata"]["department"] == "hr"
    hr_only = {"conditions": [{"name": "department", "comparison_operator": "is", "value": "it"}]}
    assert retrieve(api, "handbook", "paid leave days", hr_only) == []


def test_posted_text_is_a_document(api):
    reply = post_json(api, "/documents", {"knowledge_id": "notes", "title": "Wi-Fi",
                                          "text": "The guest Wi-Fi password is rotated monthly.",
                                          "metadata": {"team": "it"}})
    assert reply.status == 201, reply.body
    assert retrieve(api, "notes", "guest wifi password")[0]["title"] == "Wi-Fi"


def test_listing_knowledge_bases_and_documents_then_deleting_one(api):
    upload(api, "kb", "b.txt", b"Bananas are yellow.")
    first = upload(api, "kb", "a.txt", b"Apples are red or green.").json()["document"]
    listed = api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
    assert [(kb["knowledge_id"], kb["documents"]) for kb in listed] == [("kb", 2)]
    documents = api.send("GET", "/knowledge-bases/kb/documents", None, AUTH).json()["documents"]
    assert [d["file_name"] for d in documents] == ["a.txt", "b.txt"]  # by path, not by age

    deleted = api.send("DELETE", f"/knowledge-bases/kb/documents/{first['document_id']}",
                       None, AUTH)
    assert deleted.status == 200 and deleted.json()["deleted"] == first["document_id"]
    remaining = retrieve(api, "kb", "apples red green")
    assert [r["metadata"]["file_name"] for r in remaining] == ["b.txt"]
    again = api.send("DELETE", f"/knowledge-bases/kb/documents/{first['document_id']}", None, AUTH)
    assert (again.status, again.json()["error_code"]) == (404, 2002)


def test_reuploading_a_file_replaces_its_chunks(api):
    upload(api, "kb", "code.txt", b"The door code is 1234.")
    upload(api, "kb", "code.txt", b"The door code is 9876.")
    found = retrieve(api, "kb", "door code")
    assert [r["content"] for r in found] == ["The door code is 9876."]


@pytest.mark.parametrize(
    ("fields", "file", "status", "field"),
    [
        ({}, ("a.txt", b"x"), 400, "knowledge_id"),
        ({"knowledge_id": "kb"}, None, 400, "file"),
        ({"knowledge_id": "kb", "metadata": "{not json"}, ("a.txt", b"text"), 400, "metadata"),
        ({"knowledge_id": "kb", "metadata": "[1]"}, ("a.txt", b"text"), 400, "metadata"),
        ({"knowledge_id": "kb", "metadata": '{"document_id": "x"}'}, ("a.txt", b"text"), 400,
         "metadata.document_id"),
        ({"knowledge_id": "kb"}, ("broken.pdf", b"%PDF-1.4 garbage"), 400, "broken.pdf"),
        ({"knowledge_id": "kb"}, ("tool.exe", b"MZ\x00\x01"), 400, ".exe"),
        ({"knowledge_id": "kb", "chunking": '{"max_tokens": -5}'}, ("a.txt", b"text"), 400,
         "chunking.max_tokens"),
        ({"knowledge_id": "kb", "mode": "semantic"}, ("a.txt", b"text"), 400,
         "mode: must be one of hybrid, vector, keyword, got 'semantic'"),
    ],
    ids=["no-kb", "no-file", "metadata-not-json", "metadata-not-object", "reserved-key",
         "corrupt-pdf", "unsupported-type", "bad-chunking", "unknown-mode"],
)
def test_bad_uploads_are_400_naming_the_problem_and_leave_nothing_behind(
    api, fields, file, status, field
):
    body, headers = multipart(fields, file)
    reply = api.post("/documents", body, headers)
    assert reply.status == status, reply.body
    assert field in reply.json()["error_msg"]
    listed = api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
    assert listed == []


def test_wrong_method_and_unknown_route_are_clear(api):
    wrong = api.send("GET", "/documents", None, AUTH)
    assert wrong.status in (404, 405)  # the plugin SDK routes by method itself: 404
    unknown = api.send("GET", "/knowledge-bases/nope/documents", None, AUTH)
    assert (unknown.status, unknown.json()["error_code"]) == (404, 2001)


def test_maintenance_routes_need_the_key(api):
    reply = api.send("GET", "/knowledge-bases", None, {"Authorization": "Bearer wrong"})
    assert (reply.status, reply.json()["error_code"]) == (403, 1002)


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b'{"knowledge_id": "kb", "title": "t", "text": "x \\ud800"}', 3002, "text"),
        (b'{"knowledge_id": "kb", "title": "t\\u0000", "text": "x"}', 3002, "title"),
        (b'{"knowledge_id": "kb", "title": "t", "text": "x", "document_id": "a/../b"}', 3002,
         "document_id"),
        (b'{"knowledge_id": "kb", "title": "t", "text": "x", "metadata": {"n": NaN}}', 3001,
         "NaN is not a JSON number"),
        (b'{"knowledge_id": "kb", "title": "t", "text": "x", "metadata": {"n": [{"a": 1}]}}',
         3002, "metadata.n"),
        (b'{"knowledge_id": "kb", "title": "t", "text": "x", "metadata": {"n": 1'
         + b"0" * 5000 + b"}}", 3001, "not valid JSON"),
        (b'{"knowledge_id": "kb", "metadata": ' + b"[" * 50_000, 3001, "nests deeper"),
        (b'{"knowledge_id": "kb", "title": "t", "text": "caf\xe9"}', 3001, "not valid UTF-8"),
    ],
    ids=["lone-surrogate", "nul-in-title", "document-id-with-dot-segment", "nan-metadata",
         "nested-metadata", "huge-integer", "deep-nesting", "not-utf8"],
)
def test_bad_posted_text_is_400_naming_the_problem_and_leaves_nothing_behind(
    api, body, code, field
):
    reply = api.post("/documents", body, {**AUTH, "Content-Type": "application/json"})
    assert (reply.status, reply.json()["error_code"]) == (400, code), reply.body
    assert field in reply.json()["error_msg"]
    listed = api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
    assert listed == []


def test_uploaded_file_name_keeps_only_its_last_part(api):
    reply = upload(api, "kb", "C:\\fakepath\\..\\notes.txt", b"Llamas hum.")
    assert reply.status == 201, reply.body
    assert reply.json()["document"]["file_name"] == "notes.txt"
    assert reply.json()["document"]["file_path"] == "upload/notes.txt"


@pytest.mark.skipif(multilingual.unavailable_reason() is not None,
                    reason=f"{multilingual.unavailable_reason()}")
def test_a_chinese_upload_gets_the_multilingual_model_and_answers_an_english_question(api):
    texts = {"长城": "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。",
             "蛋白质": "成年人每天每公斤体重大约需要零点八克蛋白质，鸡蛋和豆腐都是好的来源。"}
    for title, text in texts.items():
        reply = post_json(api, "/documents", {"knowledge_id": "zh", "title": title, "text": text})
        assert reply.status == 201, reply.body
    bases = api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
    assert next(b for b in bases if b["knowledge_id"] == "zh")["embedding"]["model"] == (
        multilingual.MODEL_NAME)
    found = retrieve(api, "zh", "How long is the Great Wall?")
    assert found[0]["title"] == "长城"


def test_one_read_only_key_and_one_view_per_app(api):
    """The README's recipe, through the plugin's real request path and the server."""
    for name, team in (("leave.md", "hr"), ("vpn.md", "it")):
        reply = upload(api, "handbook", name, f"# {name}\n\nPolicy text for {name}.".encode(),
                       {"department": team})
        assert reply.status == 201, reply.body
    view = post_json(api, "/views", {
        "name": "handbook-hr", "knowledge_base": "handbook", "top_k_max": 5,
        "metadata_condition": {"conditions": [
            {"name": "department", "comparison_operator": "is", "value": "hr"}]}})
    assert view.status == 201, view.body
    key = post_json(api, "/keys", {"name": "hr-assistant", "knowledge_ids": ["handbook-hr"],
                                   "read_only": True})
    assert key.status == 201, key.body
    app = {"Authorization": f"Bearer {key.json()['key']}", "Content-Type": "application/json"}
    asked = {"knowledge_id": "handbook-hr", "query": "policy text",
             "retrieval_setting": {"top_k": 10, "score_threshold": 0.0}}
    found = api.post("/retrieval", json.dumps(asked).encode(), app)
    assert found.status == 200, found.body
    assert [r["metadata"]["file_name"] for r in found.json()["records"]] == ["leave.md"]
    hidden = api.post("/retrieval", json.dumps({**asked, "knowledge_id": "handbook"}).encode(),
                      app)
    expect_error(hidden, 404, 2001)
    body, headers = multipart({"knowledge_id": "handbook-hr"}, ("x.md", b"# x"))
    expect_error(api.post("/documents", body, {**headers, **app}), 403, 1002, "read-only")
    listed = api.send("GET", "/keys", None, AUTH).json()["keys"]
    assert [k["name"] for k in listed] == ["hr-assistant"] and listed[0]["last_used_at"]
    assert api.send("DELETE", "/keys/hr-assistant", None, AUTH).status == 200
    expect_error(api.post("/retrieval", json.dumps(asked).encode(), app), 403, 1002)


def header(reply: Reply, name: str) -> str | None:
    return next((v for k, v in reply.headers.items() if k.lower() == name.lower()), None)


def test_the_console_is_served_without_a_key_under_a_strict_policy_and_without_cors(api):
    assert upload(api, "private-kb", "a.md", b"# Secret plans\n\nNothing here.").status == 201
    page = api.send("GET", "/console", None, {})
    assert page.status == 200 and header(page, "Content-Type").startswith("text/html")
    assert b'name="api_key"' in page.body and b"private-kb" not in page.body
    policy = header(page, "Content-Security-Policy")
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    script = api.send("GET", "/console/console.js", None, {})
    assert script.status == 200 and "javascript" in header(script, "Content-Type")
    # Only the console's own files: (through the plugin, the SDK answers a path it does
    # not route with its own 404 text)
    traversal = api.send("GET", "/console/../manifest.yaml", None, {})
    assert traversal.status == 404 and b"author" not in traversal.body
    expect_error(api.send("GET", "/console/index.html", None, {}), 404, 2003)
    # Another site's page gets no CORS permission to read any answer.
    listed = api.send("GET", "/knowledge-bases", None,
                      {**AUTH, "Origin": "https://elsewhere.example"})
    assert listed.status == 200 and header(listed, "Access-Control-Allow-Origin") is None
    preflight = api.send("OPTIONS", "/retrieval", None,
                         {"Origin": "https://elsewhere.example",
                          "Access-Control-Request-Method": "POST"})
    assert header(preflight, "Access-Control-Allow-Origin") is None
    me = api.send("GET", "/me", None, AUTH).json()
    assert me == {"admin": True, "name": None, "read_only": False, "knowledge_ids": None}
