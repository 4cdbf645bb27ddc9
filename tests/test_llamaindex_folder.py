"""Indexes a user built with LlamaIndex itself, served through the real standalone server.

Every index here is built in the test with LlamaIndex's own classes (``VectorStoreIndex``,
``StorageContext.persist``) and the bundled local model as its ``embed_model``, the model
the server embeds queries with; then the server must answer as LlamaIndex's own
retriever does, in Dify's shape.

* ``llamaindex:///abs/path``: a folder written by ``storage_context.persist()``.
* ``python://package.module:factory``: whatever the user's factory returns (a retriever,
  an index or a vector store), standalone server and CLI only.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerTransport, dify_body, standalone_server
from llama_index.core import Document, QueryBundle, StorageContext, VectorStoreIndex
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.indices.base import BaseIndex
from llama_index.core.schema import NodeWithScore
from llama_index.vector_stores.qdrant import QdrantVectorStore
from llamaindex_cases import (
    AUTH,
    FAQ,
    HANDBOOK,
    JSON,
    QUERIES,
    assert_handbook_listed,
    assert_writes_refused,
    documents,
    expect_error,
    records,
    retrieval,
)
from qdrant_client import QdrantClient

from llamaindex_kb.config import plugin_settings
from llamaindex_kb.errors import ConfigurationError
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.stores.llamaindex import store as llamaindex_store


def build_folder(folder: Path) -> dict[str, VectorStoreIndex]:
    """Two indexes in one StorageContext, persisted as a LlamaIndex user does."""
    storage = StorageContext.from_defaults()
    indexes = {}
    for index_id, rows in (("handbook", HANDBOOK), ("faq", FAQ)):
        index = VectorStoreIndex.from_documents(documents(rows), storage_context=storage,
                                                embed_model=local_embedding())
        index.set_index_id(index_id)
        indexes[index_id] = index
    storage.persist(persist_dir=str(folder))
    return indexes


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, VectorStoreIndex]]:
    folder = tmp_path_factory.mktemp("storage")
    return folder, build_folder(folder)


@contextlib.contextmanager
def server(data_dir: Path, store: str, **settings: Any) -> Iterator[ServerTransport]:
    with standalone_server(data_dir, store=store, **settings) as url:
        yield ServerTransport(url)


@pytest.fixture(scope="module")
def client(built: tuple[Path, dict[str, VectorStoreIndex]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTransport]:
    with server(tmp_path_factory.mktemp("data"), f"llamaindex://{built[0]}") as transport:
        yield transport


def llamaindex_answer(index: BaseIndex, query: str, top_k: int) -> list[tuple[str, float]]:
    """LlamaIndex's own answer, less what our scale calls no relation (a cosine <= 0)."""
    return [(hit.node.node_id, float(hit.score or 0.0))
            for hit in index.as_retriever(similarity_top_k=top_k).retrieve(query)
            if (hit.score or 0.0) > 0.0]


# --- llamaindex:///abs/path ------------------------------------------------------------


def test_listing_names_every_index_in_the_folder(client: ServerTransport) -> None:
    reply = client.send("GET", "/knowledge-bases", None, AUTH)
    assert reply.status == 200, reply.body
    listed = {kb["knowledge_id"]: kb for kb in reply.json()["knowledge_bases"]}
    assert set(listed) == {"handbook", "faq"}
    assert listed["handbook"]["chunks"] == len(HANDBOOK)
    assert listed["handbook"]["embedding"]["dimension"] == 384


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_vector_retrieval_is_llamaindex_own_retriever_in_dify_shape(
        client: ServerTransport, built: tuple[Path, dict[str, VectorStoreIndex]],
        top_k: int) -> None:
    index = built[1]["handbook"]
    for query in QUERIES:
        expected = llamaindex_answer(index, query, top_k)
        found = records(client, "handbook", query, top_k=top_k)
        assert [r["metadata"]["chunk_id"] for r in found] == [node for node, _ in expected]
        for record, (_, score) in zip(found, expected, strict=True):
            assert record["score"] == pytest.approx(score, abs=1e-6)


def test_records_carry_the_node_text_title_and_metadata(
        client: ServerTransport, built: tuple[Path, dict[str, VectorStoreIndex]]) -> None:
    found = records(client, "handbook", "password rules", top_k=1)
    node = built[1]["handbook"].docstore.get_node(found[0]["metadata"]["chunk_id"])
    assert found[0]["content"] == node.get_content()
    assert found[0]["title"] == "Security"
    assert found[0]["metadata"]["document_id"] == "security" == node.ref_doc_id
    assert found[0]["metadata"]["file_name"] == "security.md"
    faq = records(client, "faq", "guest wifi password", top_k=1)
    assert faq[0]["metadata"]["document_id"] == "faq-wifi"


def dify_selects(metadata: dict[str, Any]) -> bool:
    """The condition of the next test, evaluated by hand as Dify's SQL would: year is
    compared by its numeric form, contains is a case-sensitive substring."""
    return (metadata.get("category") in {"hr", "it"}
            and float(metadata["year"]) > 2020
            and "policy" in metadata.get("tags", "")
            and metadata.get("title") != "Leave policy")


def test_metadata_condition_selects_what_dify_selects(
        client: ServerTransport, built: tuple[Path, dict[str, VectorStoreIndex]]) -> None:
    condition = {"logical_operator": "and", "conditions": [
        {"name": ["category"], "comparison_operator": "in", "value": ["hr", "it"]},
        {"name": ["year"], "comparison_operator": ">", "value": 2020},
        {"name": ["tags"], "comparison_operator": "contains", "value": "policy"},
        {"name": ["title"], "comparison_operator": "is not", "value": "Leave policy"}]}
    index = built[1]["handbook"]
    selected = 0
    for query in QUERIES:
        ranked = llamaindex_answer(index, query, len(HANDBOOK))
        wanted = [node for node, _ in ranked
                  if dify_selects(index.docstore.get_node(node).metadata)]
        selected += len(wanted)
        found = records(client, "handbook", query, top_k=len(HANDBOOK), condition=condition)
        assert [r["metadata"]["chunk_id"] for r in found] == wanted
        # top_k is filled from further down the ranking, not cut before the condition
        one = records(client, "handbook", query, top_k=1, condition=condition)
        assert [r["metadata"]["chunk_id"] for r in one] == wanted[:1]
    assert selected >= len(QUERIES), "the condition must select something to mean anything"
    either = {"logical_operator": "or", "conditions": [
        {"name": "year", "comparison_operator": "<", "value": "2020"},
        {"name": "title", "comparison_operator": "start with", "value": "关键词"}]}
    found = records(client, "handbook", "search", top_k=8, condition=either)
    assert {r["metadata"]["document_id"] for r in found} == {"laptops", "keyword-zh"}


def test_score_threshold_and_top_k(
        client: ServerTransport, built: tuple[Path, dict[str, VectorStoreIndex]]) -> None:
    query = "how many days of paid leave"
    ranked = llamaindex_answer(built[1]["handbook"], query, len(HANDBOOK))
    threshold = (ranked[1][1] + ranked[2][1]) / 2  # between the second and the third
    found = records(client, "handbook", query, top_k=8, threshold=threshold)
    assert [r["metadata"]["chunk_id"] for r in found] == [node for node, _ in ranked[:2]]
    assert all(r["score"] >= threshold for r in found)
    assert len(records(client, "handbook", query, top_k=2)) == 2
    assert records(client, "handbook", query, top_k=8, threshold=1.0) == []


def test_keyword_mode_finds_chinese_text(
        built: tuple[Path, dict[str, VectorStoreIndex]], tmp_path: Path) -> None:
    with server(tmp_path, f"llamaindex://{built[0]}", retrieval_mode="keyword") as api:
        found = records(api, "handbook", "关键词检索", top_k=8)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        # keyword mode scores by the words: every record shares one with the query
        assert {r["metadata"]["document_id"] for r in found} <= {"keyword-zh", "vector-zh"}
        assert all(0.0 < r["score"] <= 1.0 for r in found)
        english = records(api, "handbook", "probation", top_k=8)
        assert [r["metadata"]["document_id"] for r in english] == ["remote"]
        assert records(api, "handbook", "probation", top_k=8, condition={"conditions": [
            {"name": "category", "comparison_operator": "is", "value": "it"}]}) == []


def test_hybrid_mode_ranks_by_meaning_and_words(
        built: tuple[Path, dict[str, VectorStoreIndex]], tmp_path: Path) -> None:
    with server(tmp_path, f"llamaindex://{built[0]}", retrieval_mode="hybrid") as api:
        found = records(api, "handbook", "关键词检索", top_k=3)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        # The local model reads none of this query: its words decide, and only the two
        # documents holding them are found; a query it reads gets meaning's share too.
        assert len(found) == 2 and all(0.0 < r["score"] <= 1.0 for r in found)
        assert len(records(api, "handbook", "paid leave", top_k=3)) == 3
        assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
        leave = records(api, "handbook", "paid leave", top_k=1)
        assert leave[0]["metadata"]["document_id"] == "leave"


def test_a_model_of_another_dimension_is_refused_naming_both(tmp_path: Path) -> None:
    folder = tmp_path / "storage"
    storage = StorageContext.from_defaults()
    index = VectorStoreIndex.from_documents(documents(FAQ), storage_context=storage,
                                            embed_model=MockEmbedding(embed_dim=8))
    index.set_index_id("mock")
    storage.persist(persist_dir=str(folder))
    with server(tmp_path / "data", f"llamaindex://{folder}") as api:
        expect_error(retrieval(api, "mock", "parking"), 400, 3004, "8-dimensional",
                     "384-dimensional")


def test_writes_are_refused_as_read_only(client: ServerTransport) -> None:
    assert_writes_refused(client, "handbook", "leave")
    assert len(records(client, "handbook", "paid leave", top_k=8)) == len(HANDBOOK)


def test_documents_are_listed_from_the_docstore(client: ServerTransport) -> None:
    assert_handbook_listed(client)
    faq = client.send("GET", "/knowledge-bases/faq/documents", None, AUTH).json()
    assert {doc["document_id"] for doc in faq["documents"]} == {"faq-wifi", "faq-parking"}


def test_nodes_the_user_inserts_show_up_without_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamaindex_store, "RECHECK_S", 0.0)
    folder = tmp_path / "storage"
    indexes = build_folder(folder)
    with server(tmp_path / "data", f"llamaindex://{folder}") as api:
        query = "where do visitors find the canteen menu"
        assert "canteen" not in {r["metadata"]["document_id"] for r in
                                 records(api, "handbook", query, top_k=8)}
        index = indexes["handbook"]
        index.insert(Document(text="The canteen menu for visitors hangs next to the lifts.",
                              metadata={"title": "Canteen", "category": "facilities"},
                              doc_id="canteen"))
        time.sleep(0.01)  # a new modification time even on coarse clocks
        index.storage_context.persist(persist_dir=str(folder))
        found = records(api, "handbook", query, top_k=3)
        assert [r["metadata"]["chunk_id"] for r in found] == \
            [node for node, _ in llamaindex_answer(index, query, 3)]
        assert found[0]["metadata"]["document_id"] == "canteen"
        listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
        assert "canteen" in {doc["document_id"] for doc in listed["documents"]}


def test_an_unknown_index_is_404(client: ServerTransport) -> None:
    expect_error(retrieval(client, "nope", "paid leave"), 404, 2001, "nope")
    expect_error(client.send("GET", "/knowledge-bases/nope/documents", None, AUTH), 404, 2001)


def test_a_folder_without_an_index_store_is_a_configuration_error(tmp_path: Path) -> None:
    folder = tmp_path / "not-an-index"
    folder.mkdir()
    (folder / "docstore.json").write_text("{}")
    with server(tmp_path / "data", f"llamaindex://{folder}") as api:
        expect_error(retrieval(api, "handbook", "paid leave"), 400, 3005, "index_store.json")
        expect_error(api.send("GET", "/knowledge-bases", None, AUTH), 400, 3005,
                     "index_store.json")


# --- python://package.module:factory ---------------------------------------------------

# What the user's factory (below) returns per knowledge_id; filled by the fixture.
MADE_BY_THE_USER: dict[str, object] = {}
FACTORY_CALLS: list[str] = []
FACTORY_URL = "python://test_llamaindex_folder:made_by_the_user"


def made_by_the_user(knowledge_id: str) -> object:
    """The user's own factory, as python://test_llamaindex_folder:made_by_the_user names it."""
    FACTORY_CALLS.append(knowledge_id)
    made = MADE_BY_THE_USER.get(knowledge_id)
    if isinstance(made, Exception):
        raise made
    return made


class FixedRetriever(BaseRetriever):
    """A user's own retriever with no top_k to set: it answers what it answers, scores
    on its own scale (over 1, negative)."""

    def __init__(self, hits: list[NodeWithScore]) -> None:
        super().__init__()
        self.hits = hits

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return list(self.hits)


@pytest.fixture(scope="module")
def made(built: tuple[Path, dict[str, VectorStoreIndex]]) -> Iterator[dict[str, Any]]:
    handbook = built[1]["handbook"]
    client = QdrantClient(location=":memory:")
    qdrant = QdrantVectorStore(client=client, collection_name="handbook")
    in_qdrant = VectorStoreIndex.from_documents(
        documents(HANDBOOK), storage_context=StorageContext.from_defaults(vector_store=qdrant),
        embed_model=local_embedding())
    nodes = [handbook.docstore.get_node(node_id)
             for node_id in handbook.index_struct.nodes_dict.values()]
    by_doc = {node.ref_doc_id: node for node in nodes}
    fixed = [NodeWithScore(node=by_doc["vpn"], score=3.5),
             NodeWithScore(node=by_doc["remote"], score=0.4),
             NodeWithScore(node=by_doc["leave"], score=0.2),
             NodeWithScore(node=by_doc["laptops"], score=-1.0)]
    MADE_BY_THE_USER.update({
        "index": handbook,
        "retriever": handbook.as_retriever(similarity_top_k=2),
        "qdrant": qdrant,
        "fixed": FixedRetriever(fixed),
        "broken": RuntimeError("the database is down"),
        "wrong": "a string",
    })
    yield {"handbook": handbook, "qdrant": in_qdrant}
    MADE_BY_THE_USER.clear()


@pytest.fixture(scope="module")
def factory_client(made: dict[str, Any],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTransport]:
    with server(tmp_path_factory.mktemp("data"), FACTORY_URL) as transport:
        yield transport


@pytest.mark.parametrize("knowledge_id", ["index", "retriever", "qdrant"])
def test_a_factory_index_retriever_or_vector_store_answers_as_llamaindex(
        factory_client: ServerTransport, made: dict[str, Any], knowledge_id: str) -> None:
    reference = made["qdrant"] if knowledge_id == "qdrant" else made["handbook"]
    for top_k in (1, 3, 6):
        for query in QUERIES:
            expected = llamaindex_answer(reference, query, top_k)
            found = records(factory_client, knowledge_id, query, top_k=top_k)
            assert [r["metadata"]["chunk_id"] for r in found] == [n for n, _ in expected]
            for record, (_, score) in zip(found, expected, strict=True):
                assert record["score"] == pytest.approx(score, abs=1e-6)


@pytest.mark.parametrize("knowledge_id", ["index", "retriever", "qdrant"])
def test_a_factory_answer_is_rechecked_and_asked_for_more(
        factory_client: ServerTransport, made: dict[str, Any], knowledge_id: str) -> None:
    reference = made["qdrant"] if knowledge_id == "qdrant" else made["handbook"]
    condition = {"logical_operator": "and", "conditions": [
        {"name": ["category"], "comparison_operator": "in", "value": ["hr", "it"]},
        {"name": ["year"], "comparison_operator": ">", "value": 2020},
        {"name": ["tags"], "comparison_operator": "contains", "value": "policy"},
        {"name": ["title"], "comparison_operator": "is not", "value": "Leave policy"}]}
    query = "how many days of paid leave"
    ranked = llamaindex_answer(reference, query, len(HANDBOOK))
    wanted = [node for node, _ in ranked if dify_selects(_metadata(reference, node))]
    assert wanted and wanted[0] != ranked[0][0], "the first pick must be rejected"
    # the retriever was made with similarity_top_k=2: a copy is asked for more
    found = records(factory_client, knowledge_id, query, top_k=1, condition=condition)
    assert [r["metadata"]["chunk_id"] for r in found] == wanted[:1]
    threshold = (ranked[0][1] + ranked[1][1]) / 2
    above = records(factory_client, knowledge_id, query, top_k=5, threshold=threshold)
    assert [r["metadata"]["chunk_id"] for r in above] == [ranked[0][0]]


def _metadata(index: VectorStoreIndex, node_id: str) -> dict[str, Any]:
    [hit] = [hit for hit in index.as_retriever(similarity_top_k=len(HANDBOOK)).retrieve("x")
             if hit.node.node_id == node_id]
    return hit.node.metadata


def test_a_retriever_without_top_k_is_clipped_filtered_and_cut(
        factory_client: ServerTransport) -> None:
    found = records(factory_client, "fixed", "anything", top_k=3)
    assert [(r["metadata"]["document_id"], r["score"]) for r in found] == \
        [("vpn", 1.0), ("remote", 0.4), ("leave", 0.2)]
    assert [r["metadata"]["document_id"] for r in
            records(factory_client, "fixed", "anything", top_k=5, threshold=0.3)] == \
        ["vpn", "remote"]
    hr = {"conditions": [{"name": "category", "comparison_operator": "is", "value": "hr"}]}
    assert [r["metadata"]["document_id"] for r in
            records(factory_client, "fixed", "anything", top_k=1, condition=hr)] == ["remote"]


def test_a_factory_lists_nothing_it_cannot_know(factory_client: ServerTransport) -> None:
    listed = factory_client.send("GET", "/knowledge-bases", None, AUTH)
    assert listed.status == 200 and listed.json()["knowledge_bases"] == []
    documents_reply = factory_client.send("GET", "/knowledge-bases/index/documents", None, AUTH)
    assert documents_reply.status == 200 and documents_reply.json()["documents"] == []


def test_factory_errors(factory_client: ServerTransport) -> None:
    expect_error(retrieval(factory_client, "unknown", "paid leave"), 404, 2001, "unknown")
    expect_error(retrieval(factory_client, "wrong", "paid leave"), 400, 3005, "str",
                 "BaseRetriever")
    expect_error(retrieval(factory_client, "broken", "paid leave"), 500, 5000,
                 "the database is down")
    posted = factory_client.post("/documents", json.dumps(
        {"knowledge_id": "index", "title": "t", "text": "A new note."}).encode(), JSON)
    expect_error(posted, 400, 3007, "your own LlamaIndex code")


def test_keyword_mode_is_refused_for_a_factory(made: dict[str, Any], tmp_path: Path) -> None:
    with server(tmp_path, FACTORY_URL, retrieval_mode="hybrid") as api:
        expect_error(retrieval(api, "index", "paid leave"), 400, 3005, "'hybrid'",
                     "retrieval mode 'vector'")


def test_the_cli_serves_a_factory(made: dict[str, Any], capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    from llamaindex_kb.cli import main

    assert main(["list", "--store", FACTORY_URL]) == 0
    assert capsys.readouterr().out == ""
    assert main(["list", "--store", "python://no_such_module_here:factory"]) != 0
    assert "no_such_module_here" in capsys.readouterr().err


def test_the_plugin_form_refuses_python_urls() -> None:
    calls = len(FACTORY_CALLS)
    for form in ({"api_key": "k", "store_url": FACTORY_URL},
                 {"api_key": "k", "store": "PYTHON://os:system"}):
        with pytest.raises(ConfigurationError, match="standalone server and the CLI only") as err:
            plugin_settings(form, environ={})
        assert (err.value.status, err.value.error_code) == (400, 3005)
    assert len(FACTORY_CALLS) == calls
    assert plugin_settings({"api_key": "k", "store_url": "llamaindex:///srv/storage"},
                           environ={}).store == "llamaindex:///srv/storage"


def test_a_condition_on_document_id_selects_that_documents_records(
        client: ServerTransport) -> None:
    # document_id is not in a LlamaIndex node's own metadata, but it is in every record's:
    # Dify's condition is checked against what the record shows.
    wanted = HANDBOOK[1][0]
    found = records(client, "handbook", "paid leave", top_k=8, condition={
        "logical_operator": "and",
        "conditions": [{"name": "document_id", "comparison_operator": "is", "value": wanted}]})
    assert found and {r["metadata"]["document_id"] for r in found} == {wanted}


def test_a_retrieval_test_explains_scores_on_an_index_built_with_llamaindex(
        client: ServerTransport) -> None:
    reply = client.post("/retrieval", dify_body({
        "knowledge_id": "handbook", "query": "paid leave", "explain": True,
        "retrieval_setting": {"top_k": 3, "retrieval_mode": "hybrid", "semantic_weight": 0.6}}),
        JSON)
    assert reply.status == 200, reply.body
    found = reply.json()["records"]
    assert found
    for record in found:
        parts = record["score_parts"]
        assert parts["mode"] == "hybrid" and parts["semantic_weight"] == 0.6
        assert record["score"] == pytest.approx(
            0.6 * parts["semantic"] + 0.4 * parts["keyword"], abs=1e-6)
    assert "score_parts" not in records(client, "handbook", "paid leave", top_k=3)[0]
