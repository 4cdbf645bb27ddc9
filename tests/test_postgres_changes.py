"""PostgreSQL: a base changed one document at a time is the base built at once.

A change updates the corpus statistics, the per-term vocabulary (document frequency
and frontier) and the vector sums from what it adds and removes; these tests hold them
to a full rebuild of the same content, on the session's real PostgreSQL.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from conftest import PLUGIN_ROOT
from llama_index.core.schema import TextNode

from llamaindex_kb.config import load_settings
from llamaindex_kb.models import multilingual
from llamaindex_kb.stores import postgres
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    KBManifest,
    QueryPlan,
    vector_sums,
)
from llamaindex_kb.stores.postgres import PostgresStore
from llamaindex_kb.stores.registry import open_store
from llamaindex_kb.text.analyzer import tokenize
from llamaindex_kb.text.bm25 import Postings, best_term_weights

WORDS = ["river", "stone", "bread", "oven", "yeast", "flour", "salt", "water", "crust",
         "knead", "proof", "bake", "sourdough", "starter", "rye", "wheat", "honey", "seed"]
QUERIES = ["river stone", "sourdough starter rye", "bread oven crust", "salt",
           "honey seed wheat flour", "zebra", "water water yeast"]
# A base whose scores count from its centroid: the store keeps its vector sums.
SPEC = multilingual.SPEC


def _chunk_texts(seed: int) -> list[str]:
    """One to three chunks of 2-30 words from a small vocabulary: terms recur with many
    term frequencies and row lengths, so frontiers have several points."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[: rng.randint(3, len(WORDS))])
                     for _ in range(rng.randint(2, 30))) for _ in range(rng.randint(1, 3))]


def _vector(text: str) -> np.ndarray:
    """The same chunk text always gets the same embedding, in either base."""
    return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(
        SPEC.dimension).astype(np.float32)


def _change(documents: dict[str, list[str]], removed: frozenset[str] = frozenset(), *,
            replace: bool = False, knowledge_id: str) -> Change:
    chunks = [TextNode(id_=f"{doc_id}/{i}", text=text, metadata={"document_id": doc_id})
              for doc_id, texts in documents.items() for i, text in enumerate(texts)]
    return Change(
        manifest=KBManifest(knowledge_id=knowledge_id, embedding=SPEC),
        chunks=chunks,
        vectors=np.array([_vector(chunk.text) for chunk in chunks], np.float32).reshape(
            len(chunks), SPEC.dimension),
        documents={doc_id: DocumentInfo(document_id=doc_id, title=doc_id, chunks=len(texts))
                   for doc_id, texts in documents.items()},
        removed=removed, replace=replace)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    opened = open_store(postgres_url, load_settings({}, environ={}))
    assert isinstance(opened, PostgresStore)
    for knowledge_id in ("small-steps", "at-once"):
        if opened.find(knowledge_id) is not None:
            opened.drop(knowledge_id)
    yield opened
    for knowledge_id in ("small-steps", "at-once"):
        if opened.find(knowledge_id) is not None:
            opened.drop(knowledge_id)
    opened.close()


def _keyword_hits(store: PostgresStore, knowledge_id: str) -> list[list[tuple[str, float]]]:
    base = store.open(knowledge_id)
    return [[(hit.node.get_content(), hit.score) for hit in base.retrieve(
        QueryPlan(query=query, top_k=50, mode="keyword"), None)] for query in QUERIES]


def _base_row(conn: psycopg.Connection, knowledge_id: str) -> tuple[int, int, int, float, int]:
    row = conn.execute("SELECT id, chunk_count, total_length, absent_term_weight, "
                       "keyword_format FROM llamaindex_kb_bases WHERE knowledge_id = %s",
                       [knowledge_id]).fetchone()
    assert row is not None
    return row


def _postings(conn: psycopg.Connection, base_id: int) -> dict[str, np.ndarray]:
    """Every term's postings (row, tf, length), as stored."""
    dtype = np.dtype([("row", "<i8"), ("tf", "<i4"), ("length", "<i4")])
    found: dict[str, list[np.ndarray]] = {}
    for term, blob in conn.execute(f"SELECT term, postings FROM llamaindex_kb_postings_{base_id}",
                                   binary=True):
        found.setdefault(term, []).append(np.frombuffer(blob, dtype))
    return {term: np.concatenate(parts) for term, parts in found.items()}


def _assert_rebuilt_statistics(conn: psycopg.Connection, knowledge_id: str) -> None:
    """The kept statistics equal those recomputed from every posting: the absent-term
    weight as text.bm25 defines it, each term's document frequency and frontier (the
    (tf, length) points no other row beats in both, with how many rows have each)."""
    base_id, chunk_count, total_length, absent, keyword_format = _base_row(conn, knowledge_id)
    assert keyword_format == 3
    postings = _postings(conn, base_id)
    assert absent == best_term_weights(
        [Postings(p["row"], p["tf"], p["length"]) for p in postings.values()],
        chunk_count, total_length)
    expected = {}
    for term, held in postings.items():
        points = Counter(zip(held["tf"].tolist(), held["length"].tolist(), strict=True))
        expected[term] = (held.size, sorted(
            (tf, length, count) for (tf, length), count in points.items()
            if not any(other != (tf, length) and other[0] >= tf and other[1] <= length
                       for other in points)))
    point = np.dtype([("tf", "<i4"), ("length", "<i4"), ("count", "<i4")])
    kept = {term: (df, sorted(np.frombuffer(frontier, point).tolist()))
            for term, df, frontier in conn.execute(
                f"SELECT term, df, frontier FROM llamaindex_kb_vocabulary_{base_id}",
                binary=True)}
    assert kept == expected


def _assert_same_base(store: PostgresStore, conn: psycopg.Connection) -> None:
    stepped, whole = _base_row(conn, "small-steps"), _base_row(conn, "at-once")
    assert stepped[1:] == whole[1:]  # chunk count, total length, absent weight, format
    assert _keyword_hits(store, "small-steps") == _keyword_hits(store, "at-once")
    manifests = [store.open(knowledge_id).manifest for knowledge_id in ("small-steps", "at-once")]
    assert [(m.documents, m.chunks) for m in manifests] == [
        (manifests[1].documents, manifests[1].chunks)] * 2
    assert manifests[0].centroids is not None and manifests[1].centroids is not None
    assert manifests[0].centroids.keys() == manifests[1].centroids.keys()
    for script, centroid in manifests[1].centroids.items():
        assert np.allclose(manifests[0].centroids[script], centroid, atol=1e-6)
    for knowledge_id in ("small-steps", "at-once"):
        _assert_rebuilt_statistics(conn, knowledge_id)


def test_one_document_at_a_time_scores_exactly_as_one_bulk_build(store, postgres_url):
    content: dict[str, list[str]] = {}
    for n in range(14):
        content[f"doc-{n}"] = _chunk_texts(n)
        store.publish("small-steps", _change({f"doc-{n}": content[f"doc-{n}"]},
                                             knowledge_id="small-steps"))
    for n in (2, 5, 9):  # replaced by new text
        content[f"doc-{n}"] = _chunk_texts(100 + n)
        store.publish("small-steps", _change({f"doc-{n}": content[f"doc-{n}"]},
                                             knowledge_id="small-steps"))
    for n in (0, 7, 12):
        del content[f"doc-{n}"]
        store.publish("small-steps", _change({}, frozenset({f"doc-{n}"}),
                                             knowledge_id="small-steps"))
    store.publish("at-once", _change(content, replace=True, knowledge_id="at-once"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        _assert_same_base(store, conn)
        # The sums kept through every change are those of the vectors left.
        base_id = _base_row(conn, "small-steps")[0]
        kept = conn.execute("SELECT vector_sums FROM llamaindex_kb_bases WHERE id = %s",
                            [base_id]).fetchone()[0]
        texts = [text for texts in content.values() for text in texts]
        expected = vector_sums(np.array([_vector(text) for text in texts]))
        assert kept.keys() == expected.keys()
        for script, (total, count) in expected.items():
            assert kept[script][1] == count
            assert np.allclose(kept[script][0], total, rtol=0, atol=1e-9)


def test_the_vocabulary_follows_deletes_of_the_rows_at_a_terms_frontier(store, postgres_url):
    # "yeast" five times in a six-term row is its best point, held by two documents;
    # shorter and longer rows hold it less often.
    best = "yeast yeast yeast yeast yeast flour"
    documents = {"best-a": [best], "best-b": [best], "short": ["yeast salt"],
                 "long": ["yeast " * 3 + "water " * 20], "other": ["river stone bread"]}
    store.publish("small-steps", _change(documents, knowledge_id="small-steps"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        _assert_rebuilt_statistics(conn, "small-steps")
        for gone in ("best-a", "best-b", "short", "long"):  # the frontier loses its points
            store.publish("small-steps", _change({}, frozenset({gone}),
                                                 knowledge_id="small-steps"))
            _assert_rebuilt_statistics(conn, "small-steps")
        assert not _postings(conn, _base_row(conn, "small-steps")[0]).get(
            tokenize("yeast")[0], np.zeros(0)).size


def test_a_base_of_the_previous_format_is_upgraded_by_its_next_change(store, postgres_url):
    content = {f"doc-{n}": _chunk_texts(n) for n in range(8)}
    store.publish("small-steps", _change(content, knowledge_id="small-steps"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # What the previous version left: no vocabulary, no vector sums, format 2.
        base_id = _base_row(conn, "small-steps")[0]
        conn.execute(f"DROP TABLE llamaindex_kb_vocabulary_{base_id}")
        conn.execute("UPDATE llamaindex_kb_bases SET keyword_format = 2, vector_sums = NULL "
                     "WHERE id = %s", [base_id])
        fresh = open_store(postgres_url, load_settings({}, environ={}))
        assert isinstance(fresh, PostgresStore)
        before = _keyword_hits(fresh, "small-steps")  # read as it is
        assert any(before)
        content["doc-20"] = _chunk_texts(20)
        del content["doc-3"]
        fresh.publish("small-steps", _change({"doc-20": content["doc-20"]},
                                             frozenset({"doc-3"}), knowledge_id="small-steps"))
        fresh.close()
        store.publish("at-once", _change(content, replace=True, knowledge_id="at-once"))
        _assert_same_base(store, conn)


def test_deletes_from_a_bulk_build_rewrite_only_the_segments_holding_their_rows(
        store, postgres_url, monkeypatch):
    # Segments of three postings: every common term spans several, and a removed row
    # must be found in the one holding it.
    monkeypatch.setattr(postgres, "_SEGMENT_POSTINGS", 3)
    content = {f"doc-{n}": _chunk_texts(n) for n in range(12)}
    store.publish("small-steps", _change(content, knowledge_id="small-steps"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        base_id = _base_row(conn, "small-steps")[0]
        segments = conn.execute(f"SELECT max(n) FROM (SELECT count(*) AS n FROM "
                                f"llamaindex_kb_postings_{base_id} GROUP BY term) s"
                                ).fetchone()[0]
        assert segments > 3
        for n in (1, 4, 10):
            del content[f"doc-{n}"]
            store.publish("small-steps", _change({}, frozenset({f"doc-{n}"}),
                                                 knowledge_id="small-steps"))
        store.publish("at-once", _change(content, replace=True, knowledge_id="at-once"))
        _assert_same_base(store, conn)


WRITER = """
import sys
sys.path.insert(0, "tests")
from test_postgres_changes import _change, _chunk_texts
from llamaindex_kb.config import load_settings
from llamaindex_kb.stores.registry import open_store
store = open_store(sys.argv[1], load_settings({}, environ={}))
print("ready", flush=True)
step = 0
while True:
    step += 1
    store.publish("small-steps", _change({"moving": _chunk_texts(1000 + step)},
                                         frozenset({"doc-3"}) if step % 4 == 0 else frozenset(),
                                         knowledge_id="small-steps"))
"""


def test_a_writer_killed_mid_change_leaves_the_base_whole_and_exact(store, postgres_url):
    content = {f"doc-{n}": _chunk_texts(n) for n in range(10)}
    store.publish("small-steps", _change(content, knowledge_id="small-steps"))
    for seconds in (0.1, 0.3, 0.6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, postgres_url], cwd=PLUGIN_ROOT,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n", (
                writer.stderr.read() if writer.stderr else "")
            time.sleep(seconds)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        # Whatever the last committed change was, the base is that change whole, and its
        # kept statistics are those of its postings.
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            _assert_rebuilt_statistics(conn, "small-steps")
        documents = store.open("small-steps").documents
        assert set(documents) - {"moving", "doc-3"} == set(content) - {"doc-3"}
    store.publish("small-steps", _change({"doc-3": content["doc-3"]}, frozenset({"moving"}),
                                         knowledge_id="small-steps"))
    store.publish("at-once", _change(content, replace=True, knowledge_id="at-once"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        _assert_same_base(store, conn)
