"""Collections a user wrote with LlamaIndex's ``QdrantVectorStore``, served through the
real standalone server (``llamaindex+qdrant://``).

Every collection is built in the test with LlamaIndex's own classes in qdrant-client's
local mode, with the bundled local model as the index's ``embed_model`` (the model the
server embeds queries with). Local mode locks its folder to one process, and to one
client: the builder records LlamaIndex's own answers, then closes its client before
the server opens the folder. Code that writes while the server runs must do so in the
server's process, through the server's client (or use a Qdrant server); no Qdrant
server runs here, so server mode is tested for its faults only.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ServerTransport, standalone_server
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.embeddings import MockEmbedding
from llama_index.vector_stores.qdrant import QdrantVectorStore
from llamaindex_cases import (
    AUTH,
    FAQ,
    HANDBOOK,
    QUERIES,
    assert_handbook_listed,
    assert_writes_refused,
    documents,
    expect_error,
    records,
    retrieval,
)
from qdrant_client import QdrantClient, models

from llamaindex_kb import load_settings
from llamaindex_kb.conditions.compiled import Predicate, compile_condition
from llamaindex_kb.conditions.model import parse_metadata_condition
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.stores.llamaindex import store as llamaindex_store
from llamaindex_kb.stores.llamaindex.qdrant import QdrantCollections, metadata_filters
from llamaindex_kb.stores.registry import store_for

TOP_KS = [1, 3, len(HANDBOOK)]
CONDITION = {"logical_operator": "and", "conditions": [
    {"name": ["category"], "comparison_operator": "in", "value": ["hr", "it"]},
    {"name": ["year"], "comparison_operator": ">", "value": 2020},
    {"name": ["tags"], "comparison_operator": "contains", "value": "policy"},
    {"name": ["title"], "comparison_operator": "is not", "value": "Leave policy"}]}


def build(client: QdrantClient, collection: str, rows: list[tuple[str, str, dict[str, Any]]],
          embed_model: BaseEmbedding | None = None, **options: Any) -> VectorStoreIndex:
    """A collection as a LlamaIndex user writes one."""
    vector_store = QdrantVectorStore(client=client, collection_name=collection, **options)
    return VectorStoreIndex.from_documents(
        documents(rows), storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=embed_model or local_embedding())


def llamaindex_answer(index: VectorStoreIndex, query: str, top_k: int) -> list[tuple[str, float]]:
    """LlamaIndex's own answer, less what our scale calls no relation (a cosine <= 0)."""
    return [(hit.node.node_id, float(hit.score or 0.0))
            for hit in index.as_retriever(similarity_top_k=top_k).retrieve(query)
            if (hit.score or 0.0) > 0.0]


class Built:
    """A local-mode folder and LlamaIndex's answers, recorded before its client closed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        client = QdrantClient(path=str(folder))
        index = build(client, "handbook", HANDBOOK)
        build(client, "faq", FAQ)
        # A collection LlamaIndex did not write: not a knowledge base here.
        client.create_collection("other", vectors_config=models.VectorParams(
            size=4, distance=models.Distance.COSINE))
        client.upsert("other", [models.PointStruct(id=1, vector=[1.0, 0, 0, 0],
                                                   payload={"text": "not a node"})])
        self.answers = {(query, k): llamaindex_answer(index, query, k)
                        for query in QUERIES for k in TOP_KS}
        self.metadata = {node_id: index.vector_store.get_nodes([node_id])[0].metadata
                         for query in QUERIES for node_id, _ in self.answers[query, TOP_KS[-1]]}
        client.close()  # releases the folder's lock for the server


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("qdrant"))


@contextlib.contextmanager
def server(data_dir: Path, store: str, **settings: Any) -> Iterator[ServerTransport]:
    with standalone_server(data_dir, store=store, **settings) as url:
        yield ServerTransport(url)


@pytest.fixture(scope="module")
def api(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTransport]:
    with server(tmp_path_factory.mktemp("data"), f"llamaindex+qdrant://{built.folder}") as api:
        yield api


def chunk_ids(found: list[dict]) -> list[str]:
    return [r["metadata"]["chunk_id"] for r in found]


# --- local mode, through the server --------------------------------------------------


def test_listing_names_the_collections_llamaindex_wrote(api: ServerTransport) -> None:
    reply = api.send("GET", "/knowledge-bases", None, AUTH)
    assert reply.status == 200, reply.body
    listed = {kb["knowledge_id"]: kb for kb in reply.json()["knowledge_bases"]}
    assert set(listed) == {"handbook", "faq"}
    assert listed["handbook"]["chunks"] == len(HANDBOOK)
    assert listed["handbook"]["embedding"]["dimension"] == 384
    expect_error(retrieval(api, "other", "node"), 404, 2001, "other")


@pytest.mark.parametrize("top_k", TOP_KS)
def test_vector_retrieval_is_llamaindex_own_retriever_in_dify_shape(
        api: ServerTransport, built: Built, top_k: int) -> None:
    for query in QUERIES:
        expected = built.answers[query, top_k]
        found = records(api, "handbook", query, top_k=top_k)
        assert chunk_ids(found) == [node for node, _ in expected]
        for record, (_, score) in zip(found, expected, strict=True):
            assert record["score"] == pytest.approx(score, abs=1e-6)


def test_records_carry_the_node_text_title_and_metadata(api: ServerTransport) -> None:
    found = records(api, "handbook", "password rules", top_k=1)
    assert found[0]["content"] == HANDBOOK[-1][1]
    assert found[0]["title"] == "Security"
    assert found[0]["metadata"]["document_id"] == "security"
    assert found[0]["metadata"]["file_name"] == "security.md"
    assert "_node_content" not in found[0]["metadata"]
    faq = records(api, "faq", "guest wifi password", top_k=1)
    assert faq[0]["metadata"]["document_id"] == "faq-wifi"


def dify_selects(metadata: dict[str, Any]) -> bool:
    """CONDITION evaluated by hand as Dify's SQL would: year is compared by its numeric
    form, contains is a case-sensitive substring."""
    return (metadata.get("category") in {"hr", "it"}
            and float(metadata["year"]) > 2020
            and "policy" in metadata.get("tags", "")
            and metadata.get("title") != "Leave policy")


def test_metadata_condition_selects_what_dify_selects(api: ServerTransport, built: Built) -> None:
    selected = 0
    for query in QUERIES:
        ranked = built.answers[query, TOP_KS[-1]]
        wanted = [node for node, _ in ranked if dify_selects(built.metadata[node])]
        selected += len(wanted)
        found = records(api, "handbook", query, top_k=len(HANDBOOK), condition=CONDITION)
        assert chunk_ids(found) == wanted
        # top_k is filled from further down the ranking, not cut before the condition
        one = records(api, "handbook", query, top_k=1, condition=CONDITION)
        assert chunk_ids(one) == wanted[:1]
    assert selected >= len(QUERIES), "the condition must select something to mean anything"
    # Neither check has a MetadataFilters form with Dify's meaning: all re-checked here.
    either = {"logical_operator": "or", "conditions": [
        {"name": "year", "comparison_operator": "<", "value": "2020"},
        {"name": "title", "comparison_operator": "start with", "value": "关键词"}]}
    found = records(api, "handbook", "search", top_k=8, condition=either)
    assert {r["metadata"]["document_id"] for r in found} == {"laptops", "keyword-zh"}


def test_only_what_qdrant_tests_as_dify_does_is_pushed_down() -> None:
    pushed = metadata_filters(compile_condition_from(CONDITION))
    assert pushed is not None
    assert [(f.key, f.operator.value, f.value) for f in pushed.filters] == \
        [("category", "in", ["hr", "it"])]
    # LlamaIndex's bookkeeping keys at the payload's top level are not the metadata
    assert metadata_filters(compile_condition_from({"conditions": [
        {"name": "doc_id", "comparison_operator": "is", "value": "leave"}]})) is None
    # an `or` with a branch Qdrant can't test could match anything: nothing pushed
    assert metadata_filters(compile_condition_from({"logical_operator": "or", "conditions": [
        {"name": "category", "comparison_operator": "is", "value": "hr"},
        {"name": "year", "comparison_operator": ">", "value": 2020}]})) is None


def test_the_pushed_part_is_filtered_by_qdrant_itself(api: ServerTransport, built: Built) -> None:
    # The server's own source (one store per URL per process), asked directly: what
    # comes back from Qdrant is already filtered, before any re-check.
    served = store_for(load_settings({"store": f"llamaindex+qdrant://{built.folder}"},
                                     environ={}))
    vector = np.asarray(local_embedding().get_query_embedding("office policy"))
    hits = served.source.llamaindex_query("handbook", vector, len(HANDBOOK),
                                          compile_condition_from(CONDITION))
    assert {hit.node.ref_doc_id for hit in hits} == \
        {doc_id for doc_id, _, metadata in HANDBOOK if metadata["category"] in {"hr", "it"}}
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def compile_condition_from(condition: dict[str, Any]) -> Predicate:
    return compile_condition(parse_metadata_condition(condition))


def test_score_threshold_and_top_k(api: ServerTransport, built: Built) -> None:
    query = "how many days of paid leave"
    ranked = built.answers[query, TOP_KS[-1]]
    threshold = (ranked[1][1] + ranked[2][1]) / 2  # between the second and the third
    found = records(api, "handbook", query, top_k=8, threshold=threshold)
    assert chunk_ids(found) == [node for node, _ in ranked[:2]]
    assert all(r["score"] >= threshold for r in found)
    assert len(records(api, "handbook", query, top_k=2)) == 2
    assert records(api, "handbook", query, top_k=8, threshold=1.0) == []


def test_keyword_mode_finds_chinese_text_from_the_payload(built: Built, tmp_path: Path) -> None:
    # Another server of the same process shares the store, and so the folder's client.
    with server(tmp_path, f"llamaindex+qdrant://{built.folder}", retrieval_mode="keyword") as k:
        found = records(k, "handbook", "关键词检索", top_k=8)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        assert {r["metadata"]["document_id"] for r in found} <= {"keyword-zh", "vector-zh"}
        assert all(0.0 < r["score"] <= 1.0 for r in found)
        english = records(k, "handbook", "probation", top_k=8)
        assert [r["metadata"]["document_id"] for r in english] == ["remote"]
        assert records(k, "handbook", "probation", top_k=8, condition={"conditions": [
            {"name": "category", "comparison_operator": "is", "value": "it"}]}) == []


def test_hybrid_mode_uses_the_vectors_read_from_qdrant(built: Built, tmp_path: Path) -> None:
    with server(tmp_path, f"llamaindex+qdrant://{built.folder}", retrieval_mode="hybrid") as h:
        found = records(h, "handbook", "关键词检索", top_k=3)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        # The local model reads none of this query: its words decide, and only the two
        # documents holding them are found; a query it reads gets meaning's share too.
        assert len(found) == 2 and all(0.0 < r["score"] <= 1.0 for r in found)
        assert len(records(h, "handbook", "paid leave", top_k=3)) == 3
        leave = records(h, "handbook", "paid leave", top_k=1)
        assert leave[0]["metadata"]["document_id"] == "leave"


def test_writes_are_refused_as_read_only(api: ServerTransport) -> None:
    assert_writes_refused(api, "handbook", "leave")
    assert len(records(api, "handbook", "paid leave", top_k=8)) == len(HANDBOOK)


def test_documents_are_listed_from_the_payloads(api: ServerTransport) -> None:
    assert_handbook_listed(api)


def test_a_model_of_another_dimension_is_refused_naming_both(tmp_path: Path) -> None:
    client = QdrantClient(path=str(tmp_path / "q"))
    build(client, "mock", FAQ, embed_model=MockEmbedding(embed_dim=8))
    client.close()
    with server(tmp_path / "data", f"llamaindex+qdrant://{tmp_path / 'q'}") as api:
        expect_error(retrieval(api, "mock", "parking"), 400, 3004, "8-dimensional",
                     "384-dimensional")


def test_a_hybrid_collection_is_searched_on_its_dense_vector(tmp_path: Path) -> None:
    # Hybrid writes a named "text-dense" vector beside a sparse one; LlamaIndex's default
    # (dense) query searches the former. Sparse functions given, so no fastembed model.
    def sparse(texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        return [[len(text) % 97] for text in texts], [[1.0] for _ in texts]

    client = QdrantClient(path=str(tmp_path / "q"))
    index = build(client, "hybrid", HANDBOOK, enable_hybrid=True, sparse_doc_fn=sparse,
                  sparse_query_fn=sparse)
    assert "text-dense" in client.get_collection("hybrid").config.params.vectors
    expected = [node for node, _ in llamaindex_answer(index, "password rules", 3)]
    client.close()
    with server(tmp_path / "data", f"llamaindex+qdrant://{tmp_path / 'q'}") as api:
        assert chunk_ids(records(api, "hybrid", "password rules", top_k=3)) == expected


def test_nodes_inserted_later_show_up_without_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamaindex_store, "RECHECK_S", 0.0)
    folder = tmp_path / "q"
    client = QdrantClient(path=str(folder))
    build(client, "handbook", HANDBOOK)
    client.close()
    url = f"llamaindex+qdrant://{folder}"
    with server(tmp_path / "data", url, retrieval_mode="hybrid") as api:
        query = "where do visitors find the canteen menu"
        assert "canteen" not in {r["metadata"]["document_id"] for r in
                                 records(api, "handbook", query, top_k=8)}
        # Local mode: the user's code runs in the server's process, on its client.
        served = store_for(load_settings({"store": url}, environ={}))
        vector_store = QdrantVectorStore(client=served.source.client,
                                         collection_name="handbook")
        index = VectorStoreIndex.from_vector_store(vector_store, embed_model=local_embedding())
        index.insert(Document(text="The canteen menu for visitors hangs next to the lifts.",
                              metadata={"title": "Canteen", "category": "facilities"},
                              doc_id="canteen"))
        found = records(api, "handbook", query, top_k=3)  # hybrid: the in-memory copy
        assert found[0]["metadata"]["document_id"] == "canteen"
        listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
        assert "canteen" in {doc["document_id"] for doc in listed["documents"]}
    with server(tmp_path / "data2", url) as api:
        found = records(api, "handbook", query, top_k=3)
        assert chunk_ids(found) == [node for node, _ in llamaindex_answer(index, query, 3)]


def test_a_folder_held_by_another_client_is_a_clear_error_until_released(tmp_path: Path) -> None:
    folder = tmp_path / "q"
    holder = QdrantClient(path=str(folder))
    build(holder, "handbook", FAQ)
    with server(tmp_path / "data", f"llamaindex+qdrant://{folder}") as api:
        expect_error(api.send("GET", "/knowledge-bases", None, AUTH), 400, 3005,
                     "in use by another process", "close the QdrantClient")
        holder.close()
        reply = api.send("GET", "/knowledge-bases", None, AUTH)
        assert reply.status == 200, reply.body
        assert [kb["knowledge_id"] for kb in reply.json()["knowledge_bases"]] == ["handbook"]


# --- server mode: faults ------------------------------------------------------------


def test_an_unreachable_server_is_503_within_seconds(tmp_path: Path) -> None:
    with server(tmp_path, "llamaindex+qdrant://127.0.0.1:1") as api:
        started = time.monotonic()
        expect_error(retrieval(api, "handbook", "paid leave"), 503, 5003, "unreachable")
        assert time.monotonic() - started < 5.0


class _RefusingQdrant(http.server.BaseHTTPRequestHandler):
    """Answers every request as Qdrant does a wrong API key."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"status": {"error": "Invalid api-key"}, "time": 0.0}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_a_refused_api_key_is_400_without_the_key(tmp_path: Path) -> None:
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingQdrant)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    secret = "sekret-qdrant-key-8d41"
    try:
        url = f"llamaindex+qdrant://127.0.0.1:{fake.server_address[1]}?api_key={secret}"
        with server(tmp_path, url) as api:
            for reply in (retrieval(api, "handbook", "paid leave"),
                          api.send("GET", "/knowledge-bases", None, AUTH)):
                message = expect_error(reply, 400, 3005, "refused the API key")
                assert secret not in message and secret.encode() not in reply.body
    finally:
        fake.shutdown()
        fake.server_close()


def test_store_urls_are_checked_and_shown_without_their_key() -> None:
    source = QdrantCollections.open("llamaindex+qdrant://db.example:6334/q?api_key=k-123&https=1")
    assert source.shown == "llamaindex+qdrant://db.example:6334/q?https=true"
    assert not source.searches_in_process
    with pytest.raises(Exception, match="unknown parameter"):
        QdrantCollections.open("llamaindex+qdrant://db.example:6333?apikey=k-123")
    with pytest.raises(Exception, match="absolute folder"):
        QdrantCollections.open("llamaindex+qdrant:///")
