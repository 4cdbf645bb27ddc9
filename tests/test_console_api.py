"""What the browser console needs of the API, on every store that takes writes (the
embedded store, a real PostgreSQL, Qdrant's local mode), through ``KnowledgeAPI.handle``:
empty knowledge bases made with their settings (``POST /knowledge-bases``), whole bases
dropped (``DELETE /knowledge-bases/<id>``), and a retrieval test that shows what each
score is made of (``explain``) without changing what Dify receives."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import expect_error
from test_keys_and_views import HANDBOOK, HR, STORES, Api, api_over, titles

from llamaindex_kb.errors import ReadOnlyStoreError
from llamaindex_kb.ingestion.pipeline import (
    create_knowledge_base,
)
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding

PART_KEYS = {"mode", "semantic_weight", "semantic", "keyword", "first_stage", "rerank"}


@pytest.fixture(params=STORES)
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    yield from api_over(request, tmp_path, {"handbook": "hybrid", "words": "keyword"})


def listed(api: Api, knowledge_id: str) -> dict[str, Any] | None:
    entries = api.send("GET", "/knowledge-bases").json()["knowledge_bases"]
    return next((entry for entry in entries if entry["knowledge_id"] == knowledge_id), None)


def explained(api: Api, knowledge_id: str, query: str, **setting: Any) -> list[dict[str, Any]]:
    reply = api.send("POST", "/retrieval", payload={
        "knowledge_id": knowledge_id, "query": query, "explain": True,
        "retrieval_setting": {"top_k": 4, "score_threshold": 0.0, **setting}})
    assert reply.status == 200, reply.body
    records = reply.json()["records"]
    assert records, "the query should find something"
    for record in records:
        assert set(record["score_parts"]) == PART_KEYS, record
    return records


# --- POST /knowledge-bases ------------------------------------------------------------


def test_an_empty_knowledge_base_is_listed_with_its_settings_and_answers_no_records(api):
    reply = api.send("POST", "/knowledge-bases", payload={
        "knowledge_id": "fresh", "retrieval_mode": "vector", "semantic_weight": 0.4,
        "chunking": {"max_tokens": 80, "overlap": 10}})
    assert reply.status == 201, reply.body
    entry = reply.json()
    assert entry == listed(api, "fresh")
    assert entry["kind"] == "knowledge_base" and "centroids" not in entry
    assert entry["retrieval_mode"] == "vector" and entry["semantic_weight"] == 0.4
    assert entry["chunking"]["max_tokens"] == 80 and entry["chunking"]["overlap"] == 10
    assert entry["embedding"]["id"] == local_embedding().spec.id
    assert entry["documents"] == 0 and entry["chunks"] == 0
    retrieved = api.retrieve("fresh", "paid leave")
    assert retrieved.status == 200, retrieved.body
    assert retrieved.json() == {"records": []}
    assert api.send("GET", "/knowledge-bases/fresh/documents").json()["documents"] == []


def test_uploads_into_a_created_base_use_its_recorded_settings(api):
    api.send("POST", "/knowledge-bases", payload={
        "knowledge_id": "fresh", "retrieval_mode": "keyword",
        "chunking": {"mode": "parent_child", "child_max_tokens": 50}})
    text = "\n".join(f"Line {n} says the office opens at {n} o'clock." for n in range(40))
    # The upload asks for hybrid: the base was made keyword-only, and stays so.
    upload = api.send("POST", "/documents", payload={
        "knowledge_id": "fresh", "title": "Hours", "text": text, "mode": "hybrid"})
    assert upload.status == 201, upload.body
    entry = listed(api, "fresh")
    assert entry["retrieval_mode"] == "keyword" and entry["embedding"] is None
    assert entry["chunking"]["mode"] == "parent_child"
    assert entry["chunking"]["child_max_tokens"] == 50
    assert entry["documents"] == 1
    assert titles(api.retrieve("fresh", "office opens")) == ["Hours"]
    # Other chunking than recorded is refused, as for any existing base.
    other = api.send("POST", "/documents", payload={
        "knowledge_id": "fresh", "title": "More", "text": "x", "chunking": {"max_tokens": 90}})
    expect_error(other, 400, 3005, "chunking")


def test_a_created_base_keeps_its_embedding_model_for_uploads_and_queries(api):
    reply = api.send("POST", "/knowledge-bases",
                     payload={"knowledge_id": "fresh", "embedding": "english"})
    assert reply.status == 201, reply.body
    assert reply.json()["embedding"]["id"] == local_embedding().spec.id
    api.send("POST", "/documents", payload={"knowledge_id": "fresh", "title": "Leave",
                                            "text": HANDBOOK[0][1]})
    assert titles(api.retrieve("fresh", "paid leave")) == ["Leave"]


def test_creating_a_base_refuses_what_it_cannot_honour(api):
    def create(auth: str | None = None, **body: Any):
        kwargs = {} if auth is None else {"auth": auth}
        return api.send("POST", "/knowledge-bases", payload=body, **kwargs)

    expect_error(create(knowledge_id="handbook"), 409, 3008, "'handbook'", "exists")
    assert api.view("hr", metadata_condition=HR).status == 201
    expect_error(create(knowledge_id="hr"), 400, 3009, "'hr' is a view")
    expect_error(create(knowledge_id="a/b"), 400, 3002, "knowledge_id")
    expect_error(create(knowledge_id=""), 400, 3002, "knowledge_id")
    expect_error(create(), 400, 3002, "knowledge_id", "required")
    expect_error(create(knowledge_id="x", retrieval_mode="fuzzy"), 400, 3002,
                 "retrieval_mode", "'fuzzy'")
    expect_error(create(knowledge_id="x", semantic_weight=1.5), 400, 3002, "semantic_weight")
    expect_error(create(knowledge_id="x", semantic_weight=True), 400, 3002, "semantic_weight")
    expect_error(create(knowledge_id="x", chunking={"max_tokens": 5}), 400, 3002,
                 "chunking.max_tokens")
    expect_error(create(knowledge_id="x", chunking={"max_tokns": 100}), 400, 3002,
                 "chunking.max_tokns")
    expect_error(create(knowledge_id="x", embedding="french"), 400, 3002, "embedding")
    expect_error(create(knowledge_id="x", embeding="auto"), 400, 3002, "embeding")
    expect_error(create(knowledge_id="x", retrieval_mode="keyword", embedding="english"),
                 400, 3002, "embedding", "keyword-only")
    # Chunks longer than the English model reads would be cut silently.
    expect_error(create(knowledge_id="x", chunking={"max_tokens": 400}), 400, 3005, "254")
    reader = api.key("reader", read_only=True)
    expect_error(create(reader, knowledge_id="x"), 403, 1002, "read-only")
    scoped = api.key("scoped", knowledge_ids=["mine"])
    expect_error(create(scoped, knowledge_id="x"), 404, 2001, "'x'")
    assert create(scoped, knowledge_id="mine").status == 201
    assert {entry["knowledge_id"] for entry in api.send("GET", "/knowledge-bases").json()[
        "knowledge_bases"]} == {"handbook", "words", "hr", "mine"}


def test_server_embedding_needs_a_configured_model(api):
    api.api.models = Models(embed_model=None)  # no workspace or OpenAI-compatible model
    expect_error(api.send("POST", "/knowledge-bases",
                          payload={"knowledge_id": "x", "embedding": "server"}),
                 400, 3002, "embedding", "no embedding model")
    # auto falls back to the bundled model a first upload would get.
    reply = api.send("POST", "/knowledge-bases", payload={"knowledge_id": "x"})
    assert reply.status == 201, reply.body
    assert reply.json()["embedding"]["id"] == local_embedding().spec.id


def test_a_read_only_store_refuses_to_create_a_base():
    class ReadOnlyStore:
        read_only = "LlamaCloud indexes are changed in LlamaCloud"
        access_records = None

    with pytest.raises(ReadOnlyStoreError, match="LlamaCloud") as caught:
        create_knowledge_base(ReadOnlyStore(), "x",  # type: ignore[arg-type]
                              models=Models(local_embedding()))
    assert caught.value.error_code == 3007


# --- DELETE /knowledge-bases/<id> -----------------------------------------------------


def test_dropping_a_base_removes_it_and_its_answers(api):
    reply = api.send("DELETE", "/knowledge-bases/handbook")
    assert reply.status == 200, reply.body
    assert reply.json() == {"dropped": "handbook"}
    assert listed(api, "handbook") is None
    expect_error(api.retrieve("handbook", "paid leave"), 404, 2001, "'handbook'")
    expect_error(api.send("DELETE", "/knowledge-bases/handbook"), 404, 2001, "'handbook'")
    assert titles(api.retrieve("words", "paid leave"))[0] == "Leave"  # the others stay


def test_dropping_is_for_writers_in_scope_and_never_through_a_view(api):
    assert api.view("hr", metadata_condition=HR).status == 201
    expect_error(api.send("DELETE", "/knowledge-bases/hr"), 400, 3009, "DELETE /views/hr")
    assert listed(api, "handbook") is not None
    reader = api.key("reader", read_only=True)
    expect_error(api.send("DELETE", "/knowledge-bases/handbook", reader), 403, 1002,
                 "read-only")
    scoped = api.key("scoped", knowledge_ids=["words"])
    expect_error(api.send("DELETE", "/knowledge-bases/handbook", scoped), 404, 2001)
    assert listed(api, "handbook") is not None
    assert api.send("DELETE", "/knowledge-bases/words", scoped).json() == {"dropped": "words"}
    expect_error(api.send("DELETE", "/knowledge-bases/nowhere"), 404, 2001, "'nowhere'")


# --- explain --------------------------------------------------------------------------


def assert_fused(records: Sequence[dict[str, Any]]) -> None:
    for record in records:
        parts = record["score_parts"]
        weight = parts["semantic_weight"]
        expected = weight * parts["semantic"] + (1 - weight) * parts["keyword"]
        assert record["score"] == pytest.approx(expected, abs=1e-6), record
        assert parts["first_stage"] == record["score"] and parts["rerank"] is None


def test_a_hybrid_score_is_its_weighted_semantic_and_keyword_parts(api):
    records = explained(api, "handbook", "who resets passwords")
    assert records[0]["title"] == "Passwords"
    assert_fused(records)
    assert all(record["score_parts"]["mode"] == "hybrid" for record in records)
    assert any(record["score_parts"]["keyword"] > 0 for record in records)
    assert 0 < records[0]["score_parts"]["semantic_weight"] <= 0.7


def test_explain_holds_with_a_filter_and_an_explicit_weight(api):
    records = explained(api, "handbook", "paid leave days", semantic_weight=0.25)
    assert all(record["score_parts"]["semantic_weight"] == 0.25 for record in records)
    assert_fused(records)
    filtered = api.send("POST", "/retrieval", payload={
        "knowledge_id": "handbook", "query": "paid leave days", "explain": True,
        "metadata_condition": HR}).json()["records"]
    assert {record["title"] for record in filtered} <= {"Leave", "Payroll"}
    assert_fused(filtered)


def test_overrides_change_the_mode_and_its_score(api):
    vector = explained(api, "handbook", "paid leave", retrieval_mode="vector")
    for record in vector:
        parts = record["score_parts"]
        assert parts["mode"] == "vector" and parts["semantic_weight"] == 1.0
        assert record["score"] == pytest.approx(parts["semantic"], abs=1e-6)
    keyword = explained(api, "handbook", "paid leave", retrieval_mode="keyword")
    for record in keyword:
        parts = record["score_parts"]
        assert parts["mode"] == "keyword" and parts["semantic_weight"] == 0.0
        assert record["score"] == pytest.approx(parts["keyword"], abs=1e-6)
    # Without explain, an override changes the scores too.
    hybrid = api.retrieve("handbook", "paid leave").json()["records"]
    plain = api.send("POST", "/retrieval", payload={
        "knowledge_id": "handbook", "query": "paid leave",
        "retrieval_setting": {"retrieval_mode": "keyword"}}).json()["records"]
    assert [r["score"] for r in plain] == pytest.approx([r["score"] for r in keyword])
    assert [r["score"] for r in plain] != pytest.approx([r["score"] for r in hybrid])


def test_a_views_own_mode_wins_over_the_requests(api):
    assert api.view("hr-words", retrieval_mode="keyword").status == 201
    records = explained(api, "hr-words", "paid leave", retrieval_mode="vector")
    assert all(record["score_parts"]["mode"] == "keyword" for record in records)


def test_a_keyword_only_base_has_no_semantic_part(api):
    records = explained(api, "words", "paid leave")
    for record in records:
        parts = record["score_parts"]
        assert parts["semantic"] is None and parts["mode"] == "keyword"
        assert record["score"] == pytest.approx(parts["keyword"], abs=1e-6)
    expect_error(api.send("POST", "/retrieval", payload={
        "knowledge_id": "words", "query": "paid leave",
        "retrieval_setting": {"retrieval_mode": "hybrid"}}),
        400, 3002, "retrieval_setting.retrieval_mode", "keyword search only")


def test_without_explain_records_have_exactly_difys_fields(api):
    reply = api.retrieve("handbook", "paid leave")
    for record in reply.json()["records"]:
        assert set(record) == {"content", "score", "title", "metadata"}
    assert b"score_parts" not in reply.body
    off = api.send("POST", "/retrieval", payload={
        "knowledge_id": "handbook", "query": "paid leave", "explain": False,
        "retrieval_setting": {"top_k": 4, "score_threshold": 0.0}})
    # The same answer (Qdrant's float arithmetic may differ in the last digits).
    first, second = reply.json()["records"], off.json()["records"]
    assert [(r["title"], r["metadata"]) for r in second] == [
        (r["title"], r["metadata"]) for r in first]
    assert [r["score"] for r in second] == pytest.approx([r["score"] for r in first])
    assert b"score_parts" not in off.body


@pytest.mark.parametrize(("setting", "field"), [
    ({"retrieval_mode": "semantic"}, "retrieval_setting.retrieval_mode"),
    ({"retrieval_mode": 3}, "retrieval_setting.retrieval_mode"),
    ({"semantic_weight": 1.01}, "retrieval_setting.semantic_weight"),
    ({"semantic_weight": -0.1}, "retrieval_setting.semantic_weight"),
    ({"semantic_weight": "0.5"}, "retrieval_setting.semantic_weight"),
    ({"semantic_weight": True}, "retrieval_setting.semantic_weight"),
])
def test_bad_overrides_are_refused_naming_the_field(tmp_path, setting, field):
    api = Api(f"local://{tmp_path / 'data'}", tmp_path / "data")
    reply = api.send("POST", "/retrieval", payload={
        "knowledge_id": "handbook", "query": "q", "retrieval_setting": setting})
    expect_error(reply, 400, 3002, field)


def test_explain_must_be_a_boolean(tmp_path):
    api = Api(f"local://{tmp_path / 'data'}", tmp_path / "data")
    expect_error(api.send("POST", "/retrieval", payload={
        "knowledge_id": "handbook", "query": "q", "explain": "yes"}), 400, 3002, "explain")


class ByLength:
    """A reranker that prefers short texts: its order is not the first stage's."""

    def rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        scored = sorted(((i, 1.0 / (1 + len(text) / 100)) for i, text in enumerate(texts)),
                        key=lambda pair: -pair[1])
        return scored[:top_n]


def test_with_a_reranker_the_parts_show_the_score_before_and_after(api):
    api.api.models = Models(local_embedding(), reranker=ByLength())
    records = explained(api, "handbook", "who resets passwords")
    for record in records:
        parts = record["score_parts"]
        assert parts["rerank"] == record["score"]
        weight = parts["semantic_weight"]
        assert parts["first_stage"] == pytest.approx(
            weight * parts["semantic"] + (1 - weight) * parts["keyword"], abs=1e-6)
