"""``llamaindex+postgresql://``: tables a user wrote with LlamaIndex's ``PGVectorStore``,
served through the real standalone server.

Every index is built in the test as a LlamaIndex user builds one
(``VectorStoreIndex.from_documents`` over a ``StorageContext`` holding
``PGVectorStore.from_params(..., table_name=...)``), on the real PostgreSQL of
conftest's ``postgres_url``, with the bundled local model as the index's
``embed_model``: the model the server embeds queries with. The server must then answer
as ``index.as_retriever(similarity_top_k=k)`` does, in Dify's shape.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from conftest import ServerTransport, standalone_server
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery
from llama_index.vector_stores.postgres import PGVectorStore
from llamaindex_cases import (
    AUTH,
    assert_handbook_listed,
    assert_writes_refused,
    documents,
    expect_error,
    records,
    retrieval,
)
from llamaindex_cases import HANDBOOK as SHARED_HANDBOOK

from llamaindex_kb.conditions.compiled import compile_condition
from llamaindex_kb.conditions.model import parse_metadata_condition
from llamaindex_kb.config import load_settings
from llamaindex_kb.errors import ConfigurationError, StoreUnavailableError
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.stores.llamaindex import store as llamaindex_store
from llamaindex_kb.stores.llamaindex.postgres import _metadata_filters
from llamaindex_kb.stores.registry import open_store


@pytest.fixture(scope="session")
def database(postgres_url: str) -> str:
    """The session's PostgreSQL (conftest's ``postgres_url``)."""
    return postgres_url


# The shared handbook, and what PostgreSQL's JSONB filters must also handle: a key with
# a colon in its value, and a "year" stored as a number beside the others' strings.
HANDBOOK = [(doc_id, text, {**metadata, "owner": "ops:team"} if doc_id == "security"
             else metadata) for doc_id, text, metadata in SHARED_HANDBOOK] + [
    ("parking", "Parking spaces are assigned by the facilities team on request.",
     {"title": "Parking", "category": "facilities", "year": 2022, "tags": "office"}),
]
FAQ = [
    ("faq-wifi", "The guest Wi-Fi password is printed at the reception desk.",
     {"title": "Guest Wi-Fi", "category": "faq"}),
    ("faq-canteen", "The canteen opens at noon.", {"title": "Canteen", "category": "faq"}),
]
QUERIES = ["how many days of paid leave", "reimbursing travel costs", "working from home",
           "password rules", "new laptop for employees", "向量检索"]


def pg_vector_store(db_url: str, table_name: str, schema: str = "public",
                    embed_dim: int = 384, **options: Any) -> PGVectorStore:
    """What a user writes; the session's server listens on a socket, so the connection
    strings are given whole instead of host and port."""
    rest = db_url.removeprefix("postgresql://")
    return PGVectorStore.from_params(
        connection_string=f"postgresql+psycopg2://{rest}",
        async_connection_string=f"postgresql+asyncpg://{rest}",
        table_name=table_name, schema_name=schema, embed_dim=embed_dim, **options)


def build(db_url: str, table_name: str, rows: list[tuple[str, str, dict[str, Any]]],
          schema: str = "public", **options: Any) -> VectorStoreIndex:
    Settings.llm = None
    storage = StorageContext.from_defaults(
        vector_store=pg_vector_store(db_url, table_name, schema, **options))
    return VectorStoreIndex.from_documents(documents(rows), storage_context=storage,
                                           embed_model=local_embedding())


def served(db_url: str, schema: str | None = None) -> str:
    url = f"llamaindex+{db_url}"
    return url if schema is None else f"{url}&schema={schema}"


@pytest.fixture(scope="module")
def built(database: str) -> dict[str, VectorStoreIndex]:
    indexes = {"handbook": build(database, "handbook", HANDBOOK),
               "faq": build(database, "faq", FAQ, schema="kb")}
    with psycopg.connect(database, autocommit=True) as conn:
        # Tables that are not PGVectorStore's: never listed.
        conn.execute("CREATE TABLE IF NOT EXISTS data_decoy (id bigint, text varchar)")
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id bigint)")
    return indexes


@contextlib.contextmanager
def server(data_dir: Path, store: str, **settings: Any) -> Iterator[ServerTransport]:
    with standalone_server(data_dir, store=store, **settings) as url:
        yield ServerTransport(url)


@pytest.fixture(scope="module")
def client(built: dict[str, VectorStoreIndex], database: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTransport]:
    with server(tmp_path_factory.mktemp("data"), served(database)) as transport:
        yield transport


def chunk_ids(found: list[dict]) -> list[str]:
    return [record["metadata"]["chunk_id"] for record in found]


def llamaindex_answer(index: VectorStoreIndex, query: str, top_k: int
                      ) -> list[tuple[str, float, dict[str, Any]]]:
    return [(hit.node.node_id, float(hit.score or 0.0), hit.node.metadata)
            for hit in index.as_retriever(similarity_top_k=top_k).retrieve(query)]


# --- serving what LlamaIndex wrote --------------------------------------------------


def test_listing_names_the_pgvectorstore_tables_of_the_schema(
        client: ServerTransport, database: str, tmp_path: Path) -> None:
    reply = client.send("GET", "/knowledge-bases", None, AUTH)
    assert reply.status == 200, reply.body
    listed = {kb["knowledge_id"]: kb for kb in reply.json()["knowledge_bases"]}
    assert set(listed) == {"handbook"}  # not data_decoy, notes, nor kb.data_faq
    assert listed["handbook"]["chunks"] == len(HANDBOOK)
    assert listed["handbook"]["documents"] == len(HANDBOOK)
    assert listed["handbook"]["embedding"]["dimension"] == 384
    with server(tmp_path, served(database, schema="kb")) as other:
        kb = other.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
        assert [base["knowledge_id"] for base in kb] == ["faq"]
        assert records(other, "faq", "guest wifi password", top_k=1)[0]["metadata"][
            "document_id"] == "faq-wifi"
        expect_error(retrieval(other, "handbook", "paid leave"), 404, 2001, "handbook")


@pytest.mark.parametrize("top_k", [1, 3, 9])
def test_vector_retrieval_is_llamaindex_own_retriever_in_dify_shape(
        client: ServerTransport, built: dict[str, VectorStoreIndex], top_k: int) -> None:
    for query in QUERIES:
        # A similarity of 0 or less means no relation on our scale: never returned.
        expected = [(node, score) for node, score, _ in
                    llamaindex_answer(built["handbook"], query, top_k) if score > 0]
        found = records(client, "handbook", query, top_k=top_k)
        assert chunk_ids(found) == [node for node, _ in expected]
        for record, (_, score) in zip(found, expected, strict=True):
            assert record["score"] == pytest.approx(score, abs=1e-6)


def test_a_table_with_halfvec_jsonb_and_a_text_search_column_answers_as_llamaindex(
        database: str, tmp_path: Path) -> None:
    index = build(database, "variant", HANDBOOK, schema="variant", use_halfvec=True,
                  use_jsonb=True, hybrid_search=True)
    with server(tmp_path, served(database, schema="variant")) as api:
        listed = api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"]
        assert [(kb["knowledge_id"], kb["chunks"]) for kb in listed] == [
            ("variant", len(HANDBOOK))]
        for query in QUERIES:
            expected = [(node, score) for node, score, _ in
                        llamaindex_answer(index, query, 4) if score > 0]
            found = records(api, "variant", query, top_k=4)
            assert chunk_ids(found) == [node for node, _ in expected]
            assert [r["score"] for r in found] == pytest.approx(
                [score for _, score in expected], abs=1e-6)
    source = open_store(served(database, schema="variant"), load_settings({}, environ={})).source
    assert source.version("variant") is not None
    loaded = source.load("variant")  # halfvec's packed halves, as keyword/hybrid use them
    stored = {node.node_id: node.embedding for node in index.vector_store.get_nodes(
        node_ids=[node.node_id for node in loaded.nodes])}
    assert loaded.embeddings is not None and loaded.dimension == 384
    assert np.allclose(loaded.embeddings,
                       np.array([stored[node.node_id] for node in loaded.nodes]), atol=1e-6)


def test_an_hnsw_table_is_searched_with_the_ef_search_the_user_gave(
        database: str, tmp_path: Path) -> None:
    # ef_search 2: pgvector's HNSW scan finds at most 2 rows, and LlamaIndex returns those.
    hnsw = {"hnsw_m": 16, "hnsw_ef_construction": 64, "hnsw_ef_search": 2}
    index = build(database, "hnsw", HANDBOOK, schema="hnsw", hnsw_kwargs=hnsw)
    query = "how many days of paid leave"
    expected = [node for node, _, _ in llamaindex_answer(index, query, 5)]
    assert len(expected) == 2
    with server(tmp_path / "a", served(database, schema="hnsw") + "&hnsw_ef_search=2") as api:
        assert chunk_ids(records(api, "hnsw", query, top_k=5)) == expected
    with server(tmp_path / "b", served(database, schema="hnsw")) as api:  # pgvector's 40
        assert len(records(api, "hnsw", query, top_k=5)) == 5


def test_a_large_table_answers_as_pgvectorstore_scanning_it_whole(database: str) -> None:
    """Without a vector index, rows held in memory choose the candidates pgvector ranks:
    the answer must still be PGVectorStore's, near ties (clusters of close vectors)
    included, with and without a condition."""
    rng = np.random.default_rng(16)
    centres = rng.standard_normal((40, 384))
    vectors = centres[rng.integers(0, 40, 3000)] + 0.02 * rng.standard_normal((3000, 384))
    vector_store = pg_vector_store(database, "scan", schema="scan")
    vector_store.add([TextNode(text=f"row {i}", metadata={"group": f"g{i % 7}"},
                               embedding=vector.tolist())
                      for i, vector in enumerate(vectors)])
    store = open_store(served(database, schema="scan"), load_settings({}, environ={}))
    assert store.find("scan") is not None  # reads the rows
    condition = compile_condition(parse_metadata_condition({"conditions": [
        {"name": "group", "comparison_operator": "in", "value": ["g1", "g4"]}]}))
    for query in centres[:10] + 0.05 * rng.standard_normal((10, 384)):
        for top_k, predicate in ((1, None), (10, None), (50, None), (10, condition)):
            found = store.source.vector_search("scan", query, top_k, predicate)
            expected = vector_store.query(VectorStoreQuery(
                query_embedding=query.tolist(), similarity_top_k=top_k,
                filters=None if predicate is None else _metadata_filters(predicate)))
            assert [hit.node.node_id for hit in found] == expected.ids
            assert [hit.score for hit in found] == pytest.approx(expected.similarities,
                                                                 abs=1e-12)


def test_records_carry_the_node_text_title_and_metadata(
        client: ServerTransport, built: dict[str, VectorStoreIndex]) -> None:
    found = records(client, "handbook", "password rules", top_k=1)
    node = built["handbook"].vector_store.get_nodes(node_ids=[chunk_ids(found)[0]])[0]
    assert found[0]["content"] == node.get_content() == HANDBOOK[7][1]
    assert found[0]["title"] == "Security"
    assert found[0]["metadata"]["document_id"] == "security" == node.ref_doc_id
    assert found[0]["metadata"]["file_name"] == "security.md"
    assert "_node_content" not in found[0]["metadata"]


def dify_selects(metadata: dict[str, Any]) -> bool:
    """The condition of the next test, evaluated by hand as Dify's SQL would: year is
    compared by its numeric form, contains is a case-sensitive substring."""
    return (metadata.get("category") in {"hr", "it", "facilities"}
            and float(metadata["year"]) > 2020
            and "policy" in str(metadata.get("tags", ""))
            and metadata.get("title") != "Leave policy")


def test_metadata_condition_selects_what_dify_selects(
        client: ServerTransport, built: dict[str, VectorStoreIndex]) -> None:
    # `in` goes to PGVectorStore as a filter; the rest only Dify's semantics express.
    condition = {"logical_operator": "and", "conditions": [
        {"name": ["category"], "comparison_operator": "in",
         "value": ["hr", "it", "facilities"]},
        {"name": ["year"], "comparison_operator": ">", "value": 2020},
        {"name": ["tags"], "comparison_operator": "contains", "value": "policy"},
        {"name": ["title"], "comparison_operator": "is not", "value": "Leave policy"}]}
    selected = 0
    for query in QUERIES:
        ranked = llamaindex_answer(built["handbook"], query, len(HANDBOOK))
        wanted = [node for node, score, metadata in ranked
                  if score > 0 and dify_selects(metadata)]
        selected += len(wanted)
        found = records(client, "handbook", query, top_k=len(HANDBOOK), condition=condition)
        assert chunk_ids(found) == wanted
        # top_k is filled from further down the ranking, not cut before the condition
        assert chunk_ids(records(client, "handbook", query, top_k=1,
                                 condition=condition)) == wanted[:1]
    assert selected >= len(QUERIES), "the condition must select something to mean anything"
    # Numbers and numeric strings alike, as Dify compares them; an `or` of which
    # PGVectorStore can test one side only.
    either = {"logical_operator": "or", "conditions": [
        {"name": "year", "comparison_operator": "=", "value": 2022},
        {"name": "title", "comparison_operator": "is", "value": "VPN"}]}
    found = records(client, "handbook", "office", top_k=9, condition=either)
    assert {r["metadata"]["document_id"] for r in found} == {"remote", "parking", "vpn"}
    # a value holding ":" (a parameter to SQLAlchemy's text()) is tested here only
    owner = {"conditions": [{"name": "owner", "comparison_operator": "is", "value": "ops:team"}]}
    found = records(client, "handbook", "password rules", top_k=3, condition=owner)
    assert [r["metadata"]["document_id"] for r in found] == ["security"]


CONDITIONS = [
    {"conditions": [{"name": "category", "comparison_operator": "is", "value": "it"}]},
    {"logical_operator": "or", "conditions": [
        {"name": "category", "comparison_operator": "is", "value": "hr"},
        {"name": "title", "comparison_operator": "in", "value": ["VPN", "向量检索"]}]},
    {"logical_operator": "and", "conditions": [
        {"name": "category", "comparison_operator": "in", "value": "it, hr"},
        {"name": "year", "comparison_operator": "≥", "value": "2022"}]},
    {"conditions": [{"name": "year", "comparison_operator": "is", "value": "2022"}]},
    {"conditions": [{"name": "title", "comparison_operator": "is", "value": "50% off \\o/"}]},
]


@pytest.mark.parametrize("raw", CONDITIONS)
def test_filters_given_to_pgvectorstore_keep_every_match_and_only_those_when_complete(
        built: dict[str, VectorStoreIndex], raw: dict[str, Any]) -> None:
    predicate = compile_condition(parse_metadata_condition(raw))
    filters = _metadata_filters(predicate)
    store = built["handbook"].vector_store
    query = VectorStoreQuery(query_embedding=local_embedding().get_query_embedding("x"),
                             similarity_top_k=100, filters=filters)
    passed = {node.ref_doc_id: node.metadata for node in store.query(query).nodes}
    matching = {doc_id for doc_id, metadata in passed.items() if predicate.matches(metadata)}
    every = {doc_id for doc_id, _, metadata in HANDBOOK if predicate.matches(metadata)}
    assert matching == every
    if filters is not None and len(filters.filters) == predicate.exact_part.total:
        assert set(passed) == every  # the whole condition was given to PGVectorStore


def test_score_threshold_and_top_k(
        client: ServerTransport, built: dict[str, VectorStoreIndex]) -> None:
    query = "how many days of paid leave"
    ranked = llamaindex_answer(built["handbook"], query, len(HANDBOOK))
    threshold = (ranked[1][1] + ranked[2][1]) / 2  # between the second and the third
    found = records(client, "handbook", query, top_k=9, threshold=threshold)
    assert chunk_ids(found) == [node for node, _, _ in ranked[:2]]
    assert all(r["score"] >= threshold for r in found)
    assert len(records(client, "handbook", query, top_k=2)) == 2
    assert records(client, "handbook", query, top_k=9, threshold=1.0) == []


def test_keyword_and_hybrid_modes_read_the_text_column(
        built: dict[str, VectorStoreIndex], database: str,
        tmp_path: Path) -> None:
    with server(tmp_path / "k", served(database), retrieval_mode="keyword") as api:
        found = records(api, "handbook", "关键词检索", top_k=9)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        assert {r["metadata"]["document_id"] for r in found} <= {"keyword-zh", "vector-zh"}
        assert all(0.0 < r["score"] <= 1.0 for r in found)
        assert [r["metadata"]["document_id"] for r in
                records(api, "handbook", "probation", top_k=9)] == ["remote"]
    with server(tmp_path / "h", served(database), retrieval_mode="hybrid") as api:
        found = records(api, "handbook", "关键词检索", top_k=3)
        assert found[0]["metadata"]["document_id"] == "keyword-zh"
        # The local model reads none of this query: its words decide, and only the two
        # documents holding them are found; a query it reads gets meaning's share too.
        assert len(found) == 2 and all(0.0 < r["score"] <= 1.0 for r in found)
        assert len(records(api, "handbook", "paid leave", top_k=3)) == 3
        assert records(api, "handbook", "paid leave", top_k=1)[0]["metadata"][
            "document_id"] == "leave"


def test_documents_are_listed_from_the_stored_nodes(client: ServerTransport) -> None:
    assert_handbook_listed(client, HANDBOOK)


def test_writes_are_refused_as_read_only(client: ServerTransport) -> None:
    assert_writes_refused(client, "handbook", "leave")
    assert len(records(client, "handbook", "paid leave", top_k=9)) == len(HANDBOOK)


def test_a_model_of_another_dimension_is_refused_naming_both(
        database: str, tmp_path: Path) -> None:
    storage = StorageContext.from_defaults(
        vector_store=pg_vector_store(database, "mock", schema="mock", embed_dim=8))
    VectorStoreIndex.from_documents(documents(FAQ), storage_context=storage,
                                    embed_model=MockEmbedding(embed_dim=8))
    with server(tmp_path, served(database, schema="mock")) as api:
        expect_error(retrieval(api, "mock", "parking"), 400, 3004, "8-dimensional",
                     "384-dimensional")


def test_nodes_the_user_inserts_or_deletes_show_up_without_a_restart(
        database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamaindex_store, "RECHECK_S", 0.0)
    index = build(database, "growing", HANDBOOK[:4], schema="growing")
    with server(tmp_path, served(database, schema="growing")) as api:
        query = "when does the canteen open"
        assert "faq-canteen" not in {r["metadata"]["document_id"] for r in
                                     records(api, "growing", query, top_k=9)}
        index.insert(Document(text=FAQ[1][1], metadata=FAQ[1][2], doc_id=FAQ[1][0]))
        found = records(api, "growing", query, top_k=3)
        assert chunk_ids(found) == [node for node, _, _ in llamaindex_answer(index, query, 3)]
        assert found[0]["metadata"]["document_id"] == "faq-canteen"
        for mode in ("keyword", "hybrid"):  # the in-memory side is read anew as well
            with server(tmp_path / mode, served(database, schema="growing"),
                        retrieval_mode=mode) as other:
                assert records(other, "growing", "canteen noon", top_k=1)[0]["metadata"][
                    "document_id"] == "faq-canteen"
        listed = api.send("GET", "/knowledge-bases/growing/documents", None, AUTH).json()
        assert "faq-canteen" in {doc["document_id"] for doc in listed["documents"]}
        index.delete_ref_doc("faq-canteen")
        assert "faq-canteen" not in {r["metadata"]["document_id"] for r in
                                     records(api, "growing", query, top_k=9)}


# --- faults --------------------------------------------------------------------------

SECRET = "pw-s3cret-9f"


def test_an_unreachable_server_is_a_503_within_seconds(tmp_path: Path) -> None:
    url = f"llamaindex+postgresql://kb:{SECRET}@127.0.0.1:1/kb"
    with server(tmp_path, url) as api:
        started = time.monotonic()
        message = expect_error(retrieval(api, "handbook", "paid leave"), 503, 5003,
                               "unreachable")
        assert time.monotonic() - started < 5.0
    assert SECRET not in message and "***" in message
    with pytest.raises(StoreUnavailableError):
        open_store(url, load_settings({}, environ={})).manifests()


def test_the_first_request_after_the_server_dropped_its_connections_succeeds(
        client: ServerTransport, database: str) -> None:
    assert records(client, "handbook", "paid leave", top_k=2)
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
    assert len(records(client, "handbook", "paid leave", top_k=2)) == 2
    assert client.send("GET", "/knowledge-bases", None, AUTH).status == 200


def test_wrong_credentials_or_database_are_a_configuration_error(
        database: str, tmp_path: Path) -> None:
    rest = database.removeprefix("postgresql://postgres:@")
    for url in (f"llamaindex+postgresql://nobody:{SECRET}@{rest}",
                served(database).replace("/postgres?", "/no_such_database?")):
        with server(tmp_path / str(len(url)), url) as api:
            message = expect_error(retrieval(api, "handbook", "paid leave"), 400, 3005,
                                   "does not exist")
            assert SECRET not in message
            expect_error(api.send("GET", "/knowledge-bases", None, AUTH), 400, 3005)


class _NotPostgres(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_something_else_at_the_address_is_a_configuration_error() -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotPostgres)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"llamaindex+postgresql://kb:{SECRET}@127.0.0.1:{web.server_address[1]}/kb"
        with pytest.raises(ConfigurationError, match="not a PostgreSQL server") as raised:
            open_store(url, load_settings({}, environ={})).manifests()
        assert SECRET not in str(raised.value)
    finally:
        web.shutdown()
        web.server_close()


def test_a_url_that_is_not_a_postgresql_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_store(f"llamaindex+postgresql://kb:{SECRET}@db/kb?no_such_option=1",
                   load_settings({}, environ={}))
    assert SECRET not in str(raised.value)
