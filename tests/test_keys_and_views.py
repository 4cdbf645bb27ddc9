"""Scoped API keys and filtered views, on every store that takes writes (the embedded
store, a real PostgreSQL, Qdrant's local mode), through the HTTP API both doors share
(``KnowledgeAPI.handle``), and across processes: a key made or revoked by the CLI
counts at once in a running server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, PLUGIN_ROOT, Reply, ServerTransport, expect_error, standalone_server
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from llamaindex_kb.config import load_settings
from llamaindex_kb.errors import ReadOnlyViewError
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.ingestion.pipeline import IngestSummary, apply_changes, text_source
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.registry import open_store
from llamaindex_kb.views import View

ADMIN = f"Bearer {API_KEY}"
HANDBOOK = [
    ("Leave", "Employees get 25 days of paid leave each year.", {"team": "hr", "year": 2024}),
    ("Payroll", "Salaries are paid on the last working day of the month.",
     {"team": "hr", "year": 2023}),
    ("Laptops", "Laptops are replaced every three years by the IT desk.",
     {"team": "it", "year": 2024}),
    ("Passwords", "Passwords are rotated every ninety days; the IT desk resets them.",
     {"team": "it", "year": 2022}),
]
HR = {"logical_operator": "and",
      "conditions": [{"name": "team", "comparison_operator": "is", "value": "hr"}]}


class Api:
    """``KnowledgeAPI.handle``, the code both doors run, called with real requests."""

    def __init__(self, store_url: str, data_dir: Path) -> None:
        settings = load_settings({"api_key": API_KEY, "store": store_url,
                                  "data_dir": data_dir}, environ={})
        store = open_store(store_url, settings)
        self.library = Library(settings, store)
        self.api = KnowledgeAPI(settings, self.library, Models(local_embedding()))

    def send(self, method: str, path: str, auth: str | None = ADMIN,
             payload: Any = None) -> Reply:
        headers = {} if auth is None else {"Authorization": auth}
        body = None if payload is None else json.dumps(payload).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        environ = EnvironBuilder(path=path, method=method, data=body, headers=headers)
        response = self.api.handle(Request(environ.get_environ()))
        return Reply(response.status_code, response.get_data(), dict(response.headers))

    def retrieve(self, knowledge_id: str, query: str, auth: str = ADMIN, top_k: int = 4,
                 condition: dict | None = None) -> Reply:
        payload: dict[str, Any] = {"knowledge_id": knowledge_id, "query": query,
                                   "retrieval_setting": {"top_k": top_k,
                                                         "score_threshold": 0.0}}
        if condition is not None:
            payload["metadata_condition"] = condition
        return self.send("POST", "/retrieval", auth, payload)

    def key(self, name: str, **scope: Any) -> str:
        reply = self.send("POST", "/keys", payload={"name": name, **scope})
        assert reply.status == 201, reply.body
        return f"Bearer {reply.json()['key']}"

    def view(self, name: str, knowledge_base: str = "handbook", **settings: Any) -> Reply:
        return self.send("POST", "/views", payload={"name": name,
                                                    "knowledge_base": knowledge_base,
                                                    **settings})


STORES = ["local", "postgresql", "qdrant"]


def api_over(request: pytest.FixtureRequest, tmp_path: Path,
             bases: dict[str, str]) -> Iterator[Api]:
    """An ``Api`` on the store ``request.param`` names, holding the handbook in each of
    ``bases`` (knowledge id → retrieval mode) and nothing else; its keys and views are
    removed afterwards."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    elif request.param == "qdrant":
        url = f"qdrant://{tmp_path / 'qdrant'}"
    else:
        url = f"local://{tmp_path / 'data'}"
    built = Api(url, tmp_path / "data")
    store = built.library.store
    for manifest in store.manifests():  # the session's PostgreSQL is shared: a clean slate
        store.drop(manifest.knowledge_id)
    for kb, mode in bases.items():
        sources = [text_source(title, text, metadata) for title, text, metadata in HANDBOOK]
        apply_changes(store, kb, sources, set(), IngestSummary(knowledge_id=kb),
                      models=Models(local_embedding()), mode=mode)
    yield built
    for kind in ("key", "view"):
        for name in built.library.records.records(kind):
            built.library.records.remove_record(kind, name)
    close = getattr(store, "close", None)
    if close is not None:
        close()


@pytest.fixture(params=STORES)
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    yield from api_over(request, tmp_path, {"handbook": "hybrid", "other": "hybrid"})


def titles(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [record["title"] for record in reply.json()["records"]]


def test_a_read_only_key_retrieves_and_lists_but_every_write_is_refused(api):
    reader = api.key("chatbot", read_only=True)
    assert "Leave" in titles(api.retrieve("handbook", "paid leave", reader))
    listed = api.send("GET", "/knowledge-bases", reader).json()["knowledge_bases"]
    assert {entry["knowledge_id"] for entry in listed} == {"handbook", "other"}
    assert api.send("GET", "/knowledge-bases/handbook/documents", reader).status == 200
    upload = api.send("POST", "/documents", reader,
                      {"knowledge_id": "handbook", "title": "x", "text": "y"})
    expect_error(upload, 403, 1002, "chatbot", "read-only")
    # The same answer whether or not the base exists: a write reveals nothing.
    assert api.send("POST", "/documents", reader,
                    {"knowledge_id": "nowhere", "title": "x", "text": "y"}).body == upload.body
    document = api.send("GET", "/knowledge-bases/handbook/documents").json()["documents"][0]
    expect_error(api.send("DELETE", f"/knowledge-bases/handbook/documents/"
                          f"{document['document_id']}", reader), 403, 1002, "read-only")
    for method, path in (("GET", "/keys"), ("POST", "/keys"), ("DELETE", "/keys/chatbot"),
                         ("GET", "/views"), ("POST", "/views"), ("DELETE", "/views/v")):
        expect_error(api.send(method, path, reader, {} if method == "POST" else None),
                     403, 1002, "admin key")
    assert len(api.send("GET", "/knowledge-bases/handbook/documents").json()["documents"]) == 4


def test_a_key_limited_to_one_base_finds_every_other_missing_exactly_like_a_missing_one(api):
    scoped = api.key("hr-app", knowledge_ids=["handbook"])
    assert titles(api.retrieve("handbook", "paid leave", scoped))
    hidden = api.retrieve("other", "paid leave", scoped)
    missing = api.retrieve("other-missing", "paid leave")
    expect_error(hidden, 404, 2001, "'other'")
    assert hidden.body == missing.body.replace(b"other-missing", b"other")
    listed = api.send("GET", "/knowledge-bases", scoped).json()["knowledge_bases"]
    assert [entry["knowledge_id"] for entry in listed] == ["handbook"]
    expect_error(api.send("GET", "/knowledge-bases/other/documents", scoped), 404, 2001)
    # It writes where it may, and creating a base elsewhere answers as a missing one.
    added = api.send("POST", "/documents", scoped,
                     {"knowledge_id": "handbook", "title": "Travel",
                      "text": "Travel is booked through the HR portal.", "metadata": {}})
    assert added.status == 201, added.body
    expect_error(api.send("POST", "/documents", scoped,
                          {"knowledge_id": "brand-new", "title": "x", "text": "y"}),
                 404, 2001, "'brand-new'")
    assert api.library.store.find("brand-new") is None


def test_keys_are_listed_with_scope_and_last_use_and_stored_only_as_a_hash(api):
    secret = api.key("reports", knowledge_ids=["handbook", "hr-view"], read_only=True)
    api.key("unused")
    titles(api.retrieve("handbook", "leave", secret))
    listed = api.send("GET", "/keys").json()["keys"]
    assert [key["name"] for key in listed] == ["reports", "unused"]
    reports, unused = listed
    assert reports["knowledge_ids"] == ["handbook", "hr-view"] and reports["read_only"]
    assert reports["missing"] == ["hr-view"]  # no such base or view (yet): said, not hidden
    api.view("hr-view", metadata_condition=HR)
    assert api.send("GET", "/keys").json()["keys"][0]["missing"] == []
    assert reports["last_used_at"] >= reports["created_at"] and unused["last_used_at"] is None
    assert unused["knowledge_ids"] is None and not unused["read_only"]
    token = secret.removeprefix("Bearer ")
    stored = json.dumps(api.library.records.records("key"))
    assert token not in stored and token not in json.dumps(listed)
    assert "hash" not in listed[0]
    expect_error(api.send("POST", "/keys", payload={"name": "reports"}), 409, 3008, "exists")


def test_a_revoked_key_stops_at_once_and_the_admin_key_still_works(api):
    secret = api.key("temp")
    assert api.retrieve("handbook", "leave", secret).status == 200
    assert api.send("DELETE", "/keys/temp").json() == {"revoked": "temp"}
    expect_error(api.retrieve("handbook", "leave", secret), 403, 1002, "does not match")
    expect_error(api.send("DELETE", "/keys/temp"), 404, 2005, "'temp'")
    assert api.retrieve("handbook", "leave").status == 200


@pytest.mark.parametrize(("payload", "status", "code", "words"), [
    ({"name": "has space"}, 400, 3002, ("name", "letters, digits")),
    ({"name": "x" * 65}, 400, 3002, ("name",)),
    ({"name": "ok", "read_only": "yes"}, 400, 3002, ("read_only",)),
    ({"name": "ok", "knowledge_ids": "handbook"}, 400, 3002, ("knowledge_ids", "array")),
    ({"name": "ok", "knowledge_ids": []}, 400, 3002, ("knowledge_ids", "empty")),
    ({"name": "ok", "read_ony": True}, 400, 3002, ("read_ony", "not a known field")),
])
def test_a_bad_key_request_names_its_field(api, payload, status, code, words):
    expect_error(api.send("POST", "/keys", payload=payload), status, code, *words)
    assert api.send("GET", "/keys").json() == {"keys": []}


def test_a_view_answers_through_its_filter_and_the_requests_own(api):
    created = api.view("hr", metadata_condition=HR)
    assert created.status == 201, created.body
    assert created.json()["kind"] == "view" and created.json()["knowledge_base"] == "handbook"
    assert set(titles(api.retrieve("hr", "days paid rotated replaced", top_k=10))) == {
        "Leave", "Payroll"}
    since_2024 = {"conditions": [{"name": "year", "comparison_operator": "≥", "value": 2024}]}
    assert titles(api.retrieve("hr", "days paid rotated replaced", top_k=10,
                               condition=since_2024)) == ["Leave"]
    # An `or` of the request's cannot widen the view.
    anything = {"logical_operator": "or", "conditions": [
        {"name": "team", "comparison_operator": "is", "value": "it"},
        {"name": "year", "comparison_operator": "≥", "value": 2000}]}
    assert set(titles(api.retrieve("hr", "days paid rotated replaced", top_k=10,
                                   condition=anything))) == {"Leave", "Payroll"}
    documents = api.send("GET", "/knowledge-bases/hr/documents").json()["documents"]
    assert sorted(d["title"] for d in documents) == ["Leave", "Payroll"]


def test_a_views_settings_override_the_bases_and_cap_top_k(api):
    assert api.view("it-keyword", metadata_condition={"conditions": [
        {"name": "team", "comparison_operator": "is", "value": "it"}]},
        retrieval_mode="keyword", top_k_max=1).status == 201
    through_view = api.retrieve("it-keyword", "IT desk laptops", top_k=10).json()["records"]
    assert len(through_view) == 1
    it_only = {"conditions": [{"name": "team", "comparison_operator": "is", "value": "it"}]}

    def on_the_base(**setting: Any) -> list[dict[str, Any]]:
        reply = api.send("POST", "/retrieval", payload={
            "knowledge_id": "handbook", "query": "IT desk laptops", "metadata_condition": it_only,
            "retrieval_setting": {"top_k": 1, **setting}})
        assert reply.status == 200, reply.body
        return reply.json()["records"]

    expected = on_the_base(retrieval_mode="keyword")  # the same query, filtered, in keyword
    assert through_view[0]["score"] == pytest.approx(expected[0]["score"])
    assert through_view[0]["title"] == expected[0]["title"]
    # Hybrid, as the base was built, scores otherwise: the view's mode counted.
    assert on_the_base()[0]["score"] != pytest.approx(expected[0]["score"])


def test_views_are_listed_beside_knowledge_bases_and_a_key_may_be_limited_to_one(api):
    api.view("hr", metadata_condition=HR, top_k_max=2)
    listed = api.send("GET", "/knowledge-bases").json()["knowledge_bases"]
    kinds = {entry["knowledge_id"]: entry["kind"] for entry in listed}
    assert kinds == {"handbook": "knowledge_base", "other": "knowledge_base", "hr": "view"}
    view = next(entry for entry in listed if entry["knowledge_id"] == "hr")
    assert view["metadata_condition"] == HR and view["top_k_max"] == 2
    assert [v["knowledge_id"] for v in api.send("GET", "/views").json()["views"]] == ["hr"]
    app = api.key("hr-bot", knowledge_ids=["hr"], read_only=True)
    assert set(titles(api.retrieve("hr", "paid", app, top_k=10))) <= {"Leave", "Payroll"}
    expect_error(api.retrieve("handbook", "paid", app), 404, 2001)
    only = api.send("GET", "/knowledge-bases", app).json()["knowledge_bases"]
    assert [entry["knowledge_id"] for entry in only] == ["hr"]


def test_writes_through_a_view_are_refused_naming_its_base(api):
    api.view("hr", metadata_condition=HR)
    reply = api.send("POST", "/documents", payload={"knowledge_id": "hr", "title": "x",
                                                    "text": "y"})
    expect_error(reply, 400, 3009, "'hr' is a view", "read-only")
    assert api.library.store.find("hr") is None
    document = api.send("GET", "/knowledge-bases/hr/documents").json()["documents"][0]
    expect_error(api.send("DELETE", f"/knowledge-bases/hr/documents/{document['document_id']}"),
                 400, 3009, "read-only")


@pytest.mark.parametrize(("settings", "status", "code", "words"), [
    ({"knowledge_base": "missing"}, 404, 2001, ("'missing'",)),
    ({"metadata_condition": {"conditions": [{"name": "team", "comparison_operator": "like",
                                             "value": "hr"}]}}, 400, 3003,
     ("conditions[0].comparison_operator", "like")),
    ({"metadata_condition": {"conditions": [{"name": "year", "comparison_operator": ">",
                                             "value": "soon"}]}}, 400, 3003, ("needs a number",)),
    ({"metadata_condition": {"conditions": [{"name": "team", "comparison_operator": "is"}]}},
     400, 3003, ("no condition has a value",)),
    ({"metadata_condition": "team = hr"}, 400, 3003, ("expected an object",)),
    ({"retrieval_mode": "semantic"}, 400, 3002, ("retrieval_mode",)),
    ({"semantic_weight": 1.5}, 400, 3002, ("semantic_weight",)),
    ({"top_k_max": 0}, 400, 3002, ("top_k_max",)),
    ({"name": "handbook"}, 409, 3008, ("knowledge base is named 'handbook'",)),
    ({"name": "a/b"}, 400, 3002, ("name",)),
    ({"filter": HR}, 400, 3002, ("filter", "not a known field")),
    ({"metadata_condition": {**HR, "logical_operater": "or"}}, 400, 3003,
     ("metadata_condition.logical_operater", "not a known field")),
    ({"metadata_condition": {"conditions": [{**HR["conditions"][0], "values": ["x"]}]}}, 400,
     3003, ("conditions[0].values",)),
])
def test_a_view_that_could_not_answer_is_refused_when_made(api, settings, status, code, words):
    payload = {"name": "v", "knowledge_base": "handbook", **settings}
    expect_error(api.send("POST", "/views", payload=payload), status, code, *words)
    assert api.send("GET", "/views").json() == {"views": []}


def test_a_view_made_while_a_new_base_embeds_keeps_its_name(api):
    store = api.library.store

    def make_the_view_meanwhile() -> None:  # called as the upload reads and embeds
        api.library.records.add_record("view", "late", View(
            name="late", knowledge_base="handbook").model_dump(mode="json"))

    with pytest.raises(ReadOnlyViewError, match="'late' is a view"):
        apply_changes(store, "late", [text_source("x", "Some text.", {})], set(),
                      IngestSummary(knowledge_id="late"), models=Models(local_embedding()),
                      checkpoint=make_the_view_meanwhile)
    assert store.find("late") is None
    assert titles(api.retrieve("late", "leave"))  # the view answers


def test_a_view_reads_a_knowledge_base_not_another_view(api):
    api.view("hr", metadata_condition=HR)
    expect_error(api.view("hr-2024", "hr"), 400, 3002, "knowledge_base", "'hr' is a view")


def test_a_guess_that_is_not_a_keys_shape_costs_no_read_of_the_keys(api, monkeypatch):
    secret = api.key("real")
    reads = []
    records = api.api.keys.records
    monkeypatch.setattr(records, "records", lambda kind: reads.append(kind) or {})
    for guess in ("Bearer lkb_guess", "Bearer nope", "Bearer " + "lkb_" + "x" * 44):
        expect_error(api.retrieve("handbook", "leave", guess), 403, 1002)
    assert reads == []
    expect_error(api.retrieve("handbook", "leave", secret), 403, 1002)  # the stubbed read
    assert reads == ["key"]


def test_a_view_whose_base_was_dropped_answers_as_missing_and_can_be_deleted(api):
    api.view("of-other", "other")
    expect_error(api.view("of-other", "other"), 409, 3008, "exists")
    api.library.store.drop("other")
    expect_error(api.retrieve("of-other", "leave"), 404, 2001, "'of-other'", "any more")
    assert api.send("DELETE", "/views/of-other").json() == {"deleted": "of-other"}
    expect_error(api.send("DELETE", "/views/of-other"), 404, 2001, "no view")
    expect_error(api.retrieve("of-other", "leave"), 404, 2001)


# --- across processes ----------------------------------------------------------------


def cli(*args: str, data_dir: Path, store: str | None = None) -> subprocess.CompletedProcess:
    flags = ["--data-dir", str(data_dir)] + (["--store", store] if store else [])
    return subprocess.run([sys.executable, "-m", "llamaindex_kb", *args, *flags],
                          cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(data_dir)})


@pytest.mark.parametrize("kind", ["local", "postgresql"])
def test_a_key_made_and_revoked_by_the_cli_counts_at_once_in_a_running_server(
        kind, tmp_path, request):
    store = request.getfixturevalue("postgres_url") if kind == "postgresql" else None
    made = cli("keys", "create", "cli-app", "--read-only", "--kb", "demo", data_dir=tmp_path,
               store=store)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("lkb_") and secret not in made.stderr
    settings = {"demo": True} if store is None else {"demo": True, "store": store}
    with standalone_server(tmp_path, **settings) as url:
        server = ServerTransport(url, timeout=60)
        auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        body = json.dumps({"knowledge_id": "demo", "query": "refund policy"}).encode()
        assert server.post("/retrieval", body, auth).status == 200
        listed = cli("keys", "list", data_dir=tmp_path, store=store)
        assert "cli-app\tread-only: demo\tcreated " in listed.stdout
        assert secret not in listed.stdout and "never" not in listed.stdout
        assert cli("keys", "revoke", "cli-app", data_dir=tmp_path, store=store).returncode == 0
        expect_error(server.post("/retrieval", body, auth), 403, 1002)
    for name in ("cli-app",):  # the session's PostgreSQL is shared
        assert cli("keys", "revoke", name, data_dir=tmp_path, store=store).returncode == 2


def test_cli_views_are_checked_like_the_apis(tmp_path):
    bad = cli("views", "create", "v", "--kb", "nowhere", data_dir=tmp_path)
    assert bad.returncode == 2 and "knowledge base 'nowhere' does not exist" in bad.stderr
    invalid = cli("views", "create", "v", "--kb", "x", "--filter", "[1]", data_dir=tmp_path)
    assert invalid.returncode == 2 and "metadata_condition: expected an object" in invalid.stderr

