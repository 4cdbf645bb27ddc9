"""The LlamaCloud store against a local fake of LlamaCloud's HTTP API, through the
real standalone server (``KnowledgeAPI``), as Dify calls it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, ServerTransport, dify_body, standalone_server
from werkzeug import Request, Response
from werkzeug.serving import make_server

from llamaindex_kb.errors import ConfigurationError

LLAMA_KEY = "llx-fake-key"
HANDBOOK_ID = "7f0c5a4e-1b2c-4d3e-8f90-123456789abc"
OTHER_ID = "0a1b2c3d-4e5f-4a7b-8c9d-0e1f2a3b4c5d"


def _node(node_id: str, score: float, category: str, year: int | None, **extra: Any
          ) -> dict[str, Any]:
    info = {"file_id": f"file-{node_id}", "file_name": f"{node_id}.md", "category": category,
            **extra}
    if year is not None:
        info["year"] = year
    return {"node": {"id_": node_id, "text": f"text of {node_id}", "extra_info": info,
                     "class_name": "TextNode"}, "score": score}


NODES = [
    _node("n1", 1.4, "guide", 2023),  # a reranker's score above 1: clipped
    _node("n2", 0.95, "guide", 2019),
    _node("n3", 0.9, "guide", 2018),
    _node("n4", 0.85, "faq", 2024),
    _node("n5", 0.8, "guide", 2017),
    *[_node(f"m{i}", 0.7 - i / 100, "guide", 2010) for i in range(5)],
    _node("n6", 0.5, "guide", 2022),
    _node("n7", 0.2, "guide", 2021),
    _node("n8", -0.3, "faq", 2025),  # below 0: clipped to 0, never returned
]


class FakeLlamaCloud:
    """A fake of the remote LlamaCloud SaaS API, for tests only.

    Modelled on LlamaCloud's documented REST API: ``Authorization: Bearer <key>``,
    ``GET /api/v1/pipelines`` (filtered by ``pipeline_name`` / ``project_name``),
    ``GET /api/v1/pipelines/{id}`` and ``POST /api/v1/pipelines/{id}/retrieve``
    answering ``{"retrieval_nodes": [{"node": {...}, "score": ...}]}``, errors as
    ``{"detail": ...}``. Retrieval applies ``search_filters`` (``==`` and ``in``) and
    ``dense_similarity_top_k``; scores are fixed per node. ``fail_next`` (statuses) and
    ``hang`` script outages of the retrieve call; ``requests`` records what arrived.
    """

    def __init__(self) -> None:
        self.pipelines = [
            {"id": HANDBOOK_ID, "name": "handbook", "project_id": "p1",
             "pipeline_type": "MANAGED", "created_at": "2025-01-02T03:04:05Z"},
            {"id": OTHER_ID, "name": "other", "project_id": "p2", "pipeline_type": "MANAGED"},
        ]
        self.projects = {"p1": "Default", "p2": "Other"}
        self.nodes = {HANDBOOK_ID: NODES, OTHER_ID: []}
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []
        self.hang = threading.Event()
        self.release = threading.Event()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.port = self._server.server_address[1]

    def store_url(self, key: str = LLAMA_KEY, project: str = "Default") -> str:
        return f"llamacloud://{key}@127.0.0.1:{self.port}/?project={project}&insecure=true"

    @Request.application
    def _app(self, request: Request) -> Response:
        body = request.get_json(silent=True)
        self.requests.append({"method": request.method, "path": request.path,
                              "args": dict(request.args), "json": body})
        if request.headers.get("Authorization") != f"Bearer {LLAMA_KEY}":
            return self._json({"detail": "Invalid API Key"}, 401)
        project = request.args.get("project_name")
        visible = [p for p in self.pipelines
                   if project is None or self.projects[p["project_id"]] == project]
        parts = request.path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "pipelines"]:
            return self._json({"detail": "Not Found"}, 404)
        if len(parts) == 3 and request.method == "GET":
            name = request.args.get("pipeline_name")
            return self._json([p for p in visible if name is None or p["name"] == name])
        pipeline = next((p for p in visible if len(parts) > 3 and p["id"] == parts[3]), None)
        if pipeline is None:
            return self._json({"detail": "Pipeline not found"}, 404)
        if len(parts) == 4 and request.method == "GET":
            return self._json(pipeline)
        if parts[4:] == ["retrieve"] and request.method == "POST":
            if self.hang.is_set():
                self.release.wait(10)
            if self.fail_next:
                return self._json({"detail": "try later"}, self.fail_next.pop(0))
            return self._json(self._retrieve(pipeline["id"], body or {}))
        return self._json({"detail": "Method Not Allowed"}, 405)

    def _retrieve(self, pipeline_id: str, body: dict[str, Any]) -> dict[str, Any]:
        found = [n for n in self.nodes[pipeline_id]
                 if _passes(body.get("search_filters"), n["node"]["extra_info"])]
        found.sort(key=lambda n: -n["score"])
        top = found[: body.get("dense_similarity_top_k") or 10]
        return {"pipeline_id": pipeline_id, "retrieval_nodes": top,
                "retrieval_latency": {}, "class_name": "RetrievalResult"}

    @staticmethod
    def _json(payload: Any, status: int = 200) -> Response:
        return Response(json.dumps(payload), status=status, content_type="application/json")

    def retrieve_requests(self) -> list[dict[str, Any]]:
        return [r["json"] for r in self.requests if r["path"].endswith("/retrieve")]

    def __enter__(self) -> FakeLlamaCloud:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


def _passes(search_filters: dict[str, Any] | None, metadata: dict[str, Any]) -> bool:
    if not search_filters:
        return True
    results = []
    for f in search_filters["filters"]:
        value = metadata.get(f["key"])
        if f["operator"] == "==":
            results.append(value == f["value"])
        elif f["operator"] == "in":
            results.append(value in f["value"])
        else:
            raise AssertionError(f"fake does not implement {f['operator']}")
    return all(results) if search_filters.get("condition", "and") == "and" else any(results)


@pytest.fixture
def fake() -> Iterator[FakeLlamaCloud]:
    with FakeLlamaCloud() as running:
        yield running


@contextlib.contextmanager
def server_for(tmp_path: Path, store: str) -> Iterator[ServerTransport]:
    with standalone_server(tmp_path, store=store) as url:
        yield ServerTransport(url)


def ask(client: ServerTransport, knowledge_id: str = "handbook", *, top_k: int = 5,
        threshold: float = 0.0, condition: dict[str, Any] | None = None) -> Any:
    payload: dict[str, Any] = {
        "knowledge_id": knowledge_id, "query": "how do I start",
        "retrieval_setting": {"top_k": top_k, "score_threshold": threshold}}
    if condition is not None:
        payload["metadata_condition"] = condition
    return client.post("/retrieval", dify_body(payload),
                       {"Authorization": f"Bearer {API_KEY}",
                        "Content-Type": "application/json"})


def test_retrieval_applies_top_k_threshold_and_clips_scores(
        fake: FakeLlamaCloud, tmp_path: Path) -> None:
    with server_for(tmp_path, fake.store_url()) as client:
        reply = ask(client, top_k=3)
        assert reply.status == 200, reply.body
        records = reply.json()["records"]
        assert [r["metadata"]["chunk_id"] for r in records] == ["n1", "n2", "n3"]
        assert records[0]["score"] == 1.0  # 1.4 clipped
        assert fake.retrieve_requests()[-1]["dense_similarity_top_k"] == 3

        reply = ask(client, top_k=20, threshold=0.6)
        records = reply.json()["records"]
        scores = [r["score"] for r in records]
        assert len(records) == 10  # everything at or above 0.6, nothing below
        assert scores == sorted(scores, reverse=True)
        assert all(0.6 <= s <= 1.0 for s in scores)
        for record in records:
            assert isinstance(record["metadata"], dict)
            assert record["metadata"]["document_id"] == f"file-{record['metadata']['chunk_id']}"
            assert record["title"].endswith(".md")

        everything = ask(client, top_k=50).json()["records"]
        assert "n8" not in {r["metadata"]["chunk_id"] for r in everything}  # score ≤ 0


def test_filters_are_pushed_down_and_enforced_exactly(
        fake: FakeLlamaCloud, tmp_path: Path) -> None:
    condition = {"logical_operator": "and", "conditions": [
        {"name": "category", "comparison_operator": "is", "value": "guide"},
        {"name": "year", "comparison_operator": ">", "value": 2020}]}
    with server_for(tmp_path, fake.store_url()) as client:
        reply = ask(client, top_k=2, condition=condition)
        assert reply.status == 200, reply.body
        records = reply.json()["records"]
        # The pushable half reached LlamaCloud as search_filters ...
        sent = fake.retrieve_requests()
        assert sent[0]["search_filters"] == {
            "filters": [{"key": "category", "value": "guide", "operator": "=="}],
            "condition": "and"}
        # ... the rest was checked here; the first page (8) left one match, so more
        # were fetched.
        assert [r["dense_similarity_top_k"] for r in sent] == [8, 32]
        assert [r["metadata"]["chunk_id"] for r in records] == ["n1", "n6"]
        assert all(r["metadata"]["category"] == "guide" and r["metadata"]["year"] > 2020
                   for r in records)

        # An `or` with an unpushable branch pushes nothing, and is still exact.
        either = {"logical_operator": "or", "conditions": [
            {"name": "category", "comparison_operator": "is", "value": "faq"},
            {"name": "year", "comparison_operator": "<", "value": 2015}]}
        records = ask(client, top_k=10, condition=either).json()["records"]
        assert "search_filters" not in fake.retrieve_requests()[-1]
        assert {r["metadata"]["chunk_id"] for r in records} == {"n4"} | {
            f"m{i}" for i in range(5)}


def test_knowledge_base_listing_and_pipeline_id(fake: FakeLlamaCloud, tmp_path: Path) -> None:
    with server_for(tmp_path, fake.store_url()) as client:
        listed = client.send("GET", "/knowledge-bases", None,
                             {"Authorization": f"Bearer {API_KEY}"})
        assert [kb["knowledge_id"] for kb in listed.json()["knowledge_bases"]] == ["handbook"]
        reply = ask(client, HANDBOOK_ID, top_k=1)
        assert [r["metadata"]["chunk_id"] for r in reply.json()["records"]] == ["n1"]


def test_wrong_llamacloud_key_is_a_configuration_error(
        fake: FakeLlamaCloud, tmp_path: Path) -> None:
    # 400, not 403: our 403 means "Dify's key to this endpoint is wrong", and Dify
    # shows it as such. LlamaCloud's 401 means the key in the *store URL* is wrong,
    # a settings problem, so ConfigurationError (3005) with the fix. Never 500:
    # Dify retries 5xx and then reports "max retries", hiding the cause.
    with server_for(tmp_path, fake.store_url(key="llx-wrong")) as client:
        reply = ask(client)
        assert reply.status == 400, reply.body
        assert reply.json()["error_code"] == 3005
        assert "API key" in reply.json()["error_msg"]
        assert "llx-wrong" not in reply.json()["error_msg"]


def test_unknown_index_is_404(fake: FakeLlamaCloud, tmp_path: Path) -> None:
    with server_for(tmp_path, fake.store_url()) as client:
        for missing in ("no-such-index", "other", "11111111-2222-4333-8444-555555555555"):
            reply = ask(client, missing)  # "other" lives in another project
            assert (reply.status, reply.json()["error_code"]) == (404, 2001), missing


def test_transient_failures_are_retried(fake: FakeLlamaCloud, tmp_path: Path) -> None:
    fake.fail_next = [503, 503]
    with server_for(tmp_path, fake.store_url()) as client:
        reply = ask(client, top_k=2)
        assert reply.status == 200, reply.body
        assert len(reply.json()["records"]) == 2
        assert len(fake.retrieve_requests()) == 3


def test_hanging_llamacloud_is_503_within_dify_timeout(
        fake: FakeLlamaCloud, tmp_path: Path) -> None:
    with server_for(tmp_path, fake.store_url()) as client:
        ask(client, top_k=1)  # resolves the index name first
        fake.hang.set()
        started = time.monotonic()
        reply = ask(client, top_k=1)
        elapsed = time.monotonic() - started
        assert (reply.status, reply.json()["error_code"]) == (503, 5003)
        assert elapsed < 5.0


def test_publish_and_drop_are_refused(fake: FakeLlamaCloud) -> None:
    from llamaindex_kb.llamacloud_store import LlamaCloudStore
    from llamaindex_kb.stores import Change

    store = LlamaCloudStore(fake.store_url())
    with pytest.raises(ConfigurationError, match="manage LlamaCloud indexes in LlamaCloud"):
        store.publish("handbook", Change(manifest=store.open("handbook").manifest))
    with pytest.raises(ConfigurationError, match="manage LlamaCloud indexes in LlamaCloud"):
        store.drop("handbook")


def test_store_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamaindex_kb.llamacloud_store import LlamaCloudStore

    monkeypatch.delenv("LLAMA_CLOUD_API_KEY", raising=False)
    eu = LlamaCloudStore("llamacloud://?region=eu&api_key=llx-1")
    assert eu.base_url == "https://api.cloud.eu.llamaindex.ai"
    na = LlamaCloudStore("llamacloud://llx-1@api.cloud.llamaindex.ai/?project=Default")
    assert na.base_url == "https://api.cloud.llamaindex.ai"
    assert "llx-1" not in na.url
    with pytest.raises(ConfigurationError, match="no API key"):
        LlamaCloudStore("llamacloud://api.cloud.llamaindex.ai/")
    with pytest.raises(ConfigurationError, match="disagree"):
        LlamaCloudStore("llamacloud://k@api.cloud.llamaindex.ai/?region=eu")
    with pytest.raises(ConfigurationError, match="unknown parameter"):
        LlamaCloudStore("llamacloud://k@/?projet=x")
