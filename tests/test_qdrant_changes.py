"""Qdrant: one-document changes as generations of one chunk collection (issue 18).

Every test runs qdrant-client's local mode in a temporary folder; the comparisons are
against a bulk build of the same final content, which must answer identically.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import pytest
from test_store_contract import QUERIES, _build, _corpus, _in_another_process, _retrieve, _same

from llamaindex_kb.config import load_settings
from llamaindex_kb.contract import Record, parse_retrieval_request
from llamaindex_kb.ingestion.chunking import ChunkingConfig
from llamaindex_kb.ingestion.pipeline import delete_document
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores import qdrant as qdrant_store
from llamaindex_kb.stores.base import Change
from llamaindex_kb.stores.qdrant import QdrantStore

KB = "changes"
Corpus = list[tuple[str, str, dict[str, Any]]]


class WriterDiedBeforeItsSwitch(Exception):
    """Raised inside a publish once its points are written, before the pointer moves:
    what the base looks like to the next reader and writer if its writer dies there."""


def _document_id(store: QdrantStore, title: str) -> str:
    return next(doc_id for doc_id, info in store.open(KB).documents.items()
                if info.title == title)


def _answers(store: QdrantStore) -> dict[tuple[str, str], list[Record]]:
    answers = {}
    for mode in ("hybrid", "vector", "keyword"):
        # Hybrid at a set weight: by default it also weighs the share of the chunks the
        # model read, which ingestion estimates (approximately, once documents go).
        library = Library(load_settings({"retrieval_mode": mode, "semantic_weight": 0.7},
                                        environ={}), store=store)
        for query in [*QUERIES, "sourdough"]:
            request = parse_retrieval_request(json.dumps({
                "knowledge_id": KB, "query": query,
                "retrieval_setting": {"top_k": 8, "score_threshold": 0.0}}).encode())
            answers[mode, query] = library.retrieve(
                request, Models(embed_model=local_embedding(), reranker=None))
    return answers


def _assert_same_answers(found: dict[tuple[str, str], list[Record]],
                         expected: dict[tuple[str, str], list[Record]]) -> None:
    for key, records in expected.items():
        _same(found[key], records)
        # Exact corpus statistics: keyword scores agree to the last bit. Cosines agree
        # to float32's: Qdrant computes them over collections laid out differently.
        tolerance = 0.0 if key[0] == "keyword" else 1e-6
        assert all(abs(a.score - b.score) <= tolerance
                   for a, b in zip(found[key], records, strict=True)), key


def _assert_like_a_bulk_build(store: QdrantStore, final: Corpus, tmp_path: Any) -> None:
    """``store``'s base answers as a base built in one publish from ``final`` does."""
    bulk = QdrantStore(f"qdrant://{tmp_path}/bulk")
    _build(bulk, KB, corpus=final)
    changed, built = store.open(KB), bulk.open(KB)
    assert {i.title for i in changed.documents.values()} == {t for t, _, _ in final}
    assert changed.manifest.documents == built.manifest.documents == len(final)
    assert changed.manifest.chunks == built.manifest.chunks
    assert changed.manifest.centroids == built.manifest.centroids
    _assert_same_answers(_answers(store), _answers(bulk))
    bulk.close()


def _points(store: QdrantStore) -> int:
    """How many chunk points the base's collection holds, live or not."""
    collection = store.open(KB)._base.collection
    return store._client.count(collection).count


def test_one_document_at_a_time_answers_like_a_bulk_build_of_the_same_content(tmp_path):
    store = QdrantStore(f"qdrant://{tmp_path}/q")
    corpus = _corpus()[:14]
    final = dict((title, (title, text, meta)) for title, text, meta in corpus[:8])
    _build(store, KB, corpus=corpus[:8])
    for title, text, meta in corpus[8:]:  # adds
        _build(store, KB, corpus=[(title, text, meta)])
        final[title] = (title, text, meta)
    for title, _, meta in corpus[2:5]:  # replacements
        text = f"Entirely new text about sourdough and {title}."
        _build(store, KB, corpus=[(title, text, meta)])
        final[title] = (title, text, meta)
    for title, _, _ in (corpus[0], corpus[9], corpus[3]):  # deletions
        delete_document(store, KB, _document_id(store, title))
        del final[title]
    _assert_like_a_bulk_build(store, list(final.values()), tmp_path)
    store.close()


def test_removed_chunks_are_purged_after_the_grace_period_without_changing_answers(tmp_path):
    store = QdrantStore(f"qdrant://{tmp_path}/q", purge_s=0.0)
    corpus = _corpus()[:6]
    _build(store, KB, corpus=corpus)
    chunks = store.open(KB).manifest.chunks
    title, _, meta = corpus[1]
    _build(store, KB, corpus=[(title, "Sourdough rises slowly.", meta)])
    # The replaced chunks stay for queries that began before the change...
    assert _points(store) == chunks + 1
    delete_document(store, KB, _document_id(store, corpus[2][0]))
    # ...and go with the next change after the grace period (here none).
    assert _points(store) == store.open(KB).manifest.chunks + 1
    _assert_like_a_bulk_build(
        store, [corpus[0], (title, "Sourdough rises slowly.", meta), *corpus[3:]], tmp_path)
    store.close()


@pytest.mark.parametrize("purge_s", [60.0, 0.0])
def test_a_query_during_publishes_sees_one_whole_generation(tmp_path, purge_s):
    store = QdrantStore(f"qdrant://{tmp_path}/q", purge_s=purge_s)
    corpus = _corpus()[:6]
    _build(store, KB, corpus=corpus)
    # One document rewritten again and again, in several chunks that name its version.
    paragraphs = 6

    def version(n: int) -> Corpus:
        text = "\n\n".join(f"Tickmark version{n} paragraph {k}. " + "filler words " * 60
                           for k in range(paragraphs))
        return [("Ticking", text, {"category": "guide"})]

    _build(store, KB, corpus=version(0))
    seen: list[set[str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                records = _retrieve(store, "tickmark", top_k=50, mode="keyword",
                                    knowledge_id=KB)
                seen.append({word for r in records for word in r.content.split()
                             if word.startswith("version")})
                titles = {i.title for i in store.open(KB).documents.values()}
                assert titles == {"Ticking", *(t for t, _, _ in corpus)}
                # Lets the writer in where threads are gevent's greenlets (a whole test
                # run imports dify_plugin, which patches them): local mode never blocks.
                time.sleep(0.001)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(1, 7):
        _build(store, KB, corpus=version(n))
        time.sleep(0.05)  # under gevent the reader runs only when the writer yields
    done.set()
    reader.join()
    assert not errors
    assert len(seen) > 3
    # Every answer held the chunks of exactly one version, never a mix or none.
    assert all(len(versions) == 1 for versions in seen), seen
    numbers = [int(next(iter(v)).removeprefix("version").rstrip(".")) for v in seen]
    assert numbers == sorted(numbers)
    store.close()


def test_a_writer_that_dies_before_its_switch_leaves_the_base_as_before(tmp_path, monkeypatch):
    store = QdrantStore(f"qdrant://{tmp_path}/q", purge_s=0.0)
    corpus = _corpus()[:6]
    _build(store, KB, corpus=corpus[:4])
    before = _answers(store)

    def die(terms: Any) -> float:
        raise WriterDiedBeforeItsSwitch()

    monkeypatch.setattr(qdrant_store, "_absent_term_weight", die)
    title, _, meta = corpus[0]
    with pytest.raises(WriterDiedBeforeItsSwitch):  # a replacement and an addition
        _build(store, KB, corpus=[(title, "Sourdough replaces it.", meta), corpus[4]])
    with pytest.raises(WriterDiedBeforeItsSwitch):
        delete_document(store, KB, _document_id(store, corpus[1][0]))
    _assert_same_answers(_answers(store), before)
    assert {i.title for i in store.open(KB).documents.values()} == {
        t for t, _, _ in corpus[:4]}
    monkeypatch.undo()
    _build(store, KB, corpus=[corpus[5]])  # the next writer undoes the dead one's points
    assert _points(store) == store.open(KB).manifest.chunks
    _assert_like_a_bulk_build(store, [*corpus[:4], corpus[5]], tmp_path)
    store.close()


def test_a_writer_killed_mid_publish_leaves_the_base_as_before(tmp_path):
    url = f"qdrant://{tmp_path}/q"
    store = QdrantStore(url, purge_s=0.0)
    corpus = _corpus()[:6]
    _build(store, KB, corpus=corpus[:4])
    before = _answers(store)
    store.close()  # local mode: one process at a time holds the folder
    title, _, meta = corpus[0]
    writer = _in_another_process(f"""
import time
from llamaindex_kb.stores import qdrant
from test_store_contract import _build
store = qdrant.QdrantStore({url!r}, lease_s=1.0)

def written(terms):
    print("ready", flush=True)  # every point written, the pointer not yet switched
    time.sleep(600)

qdrant._absent_term_weight = written
_build(store, {KB!r}, corpus=[({title!r}, "Sourdough replaces it.", {meta!r}),
                               {corpus[4]!r}])
""".replace("from test_store_contract", "import sys; sys.path.insert(0, 'tests')\n"
            "from test_store_contract"))
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    store = QdrantStore(url, purge_s=0.0, wait_s=60)
    _assert_same_answers(_answers(store), before)
    started = time.monotonic()
    _build(store, KB, corpus=[corpus[5]])  # after the dead writer's lease lapses
    assert time.monotonic() - started < 30
    assert _points(store) == store.open(KB).manifest.chunks
    _assert_like_a_bulk_build(store, [*corpus[:4], corpus[5]], tmp_path)
    store.close()


def test_a_parent_child_query_overlapping_a_full_rebuild_answers_the_rebuilt_base(
        tmp_path, monkeypatch):
    # The rebuild retires the collection the query was reading; its parents' lookup
    # then finds nothing and raises nothing: only the moved pointer says to read again.
    store = QdrantStore(f"qdrant://{tmp_path}/q")
    parent_child = ChunkingConfig(mode="parent_child", child_max_tokens=50)
    corpus = _corpus()[:6]
    _build(store, KB, chunking=parent_child, corpus=corpus)
    before = _retrieve(store, "sourdough bread", top_k=5, mode="hybrid", knowledge_id=KB)
    assert before
    looked_up = qdrant_store._Search.parents
    rebuilt: list[bool] = []

    def parents(search: Any, chosen: Any) -> Any:
        if not rebuilt:
            rebuilt.append(True)
            base = store.open(KB)
            store.publish(KB, Change(manifest=base.manifest, replace=True))
            _build(store, KB, chunking=parent_child, corpus=corpus)
        return looked_up(search, chosen)

    monkeypatch.setattr(qdrant_store._Search, "parents", parents)
    during = _retrieve(store, "sourdough bread", top_k=5, mode="hybrid", knowledge_id=KB)
    assert rebuilt
    _same(during, before)
