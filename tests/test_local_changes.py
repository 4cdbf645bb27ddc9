"""Small changes to the embedded store cost the change, and answer as a bulk build would.

A change writes a segment of its own chunks and a version listing the segments kept,
less the documents it removes; merges fold segments together in the background.
These tests hold that to what a user sees: the same records and scores as one bulk
build of the same documents, through merges, crashes (kill -9) and concurrent readers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import PLUGIN_ROOT

from llamaindex_kb.errors import KnowledgeBaseDamaged, error_status
from llamaindex_kb.ingestion.pipeline import IngestSummary, apply_changes, text_source
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.stores.base import QueryPlan
from llamaindex_kb.stores.local import compaction
from llamaindex_kb.stores.local.layout import KBLayout
from llamaindex_kb.stores.local.store import LocalStore

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = ("helium nucleus decay photon energy electron orbit spin quark field wave mass "
         "charge proton neutron isotope fusion fission plasma laser tea kettle leaf steam "
         "oolong matcha garden tulip soil rain").split()
QUERIES = ["helium decay", "tea leaf steam", "proton neutron isotope mass", "tulip rain soil",
           "fusion plasma energy", "unknownword helium"]
MODES = ["keyword", "vector", "hybrid"]


def text_of(seed: int) -> str:
    rng = random.Random(seed)
    return ". ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                     for _ in range(rng.randint(1, 4))) + "."


def change(store: LocalStore, kb: str, docs: dict[str, str], removed: set[str] = frozenset(),
           *, keyword_only: bool = False) -> None:
    sources = [text_source(doc_id, text, {"n": len(text)}, doc_id) for doc_id, text in docs.items()]
    apply_changes(store, kb, sources, set(removed), IngestSummary(knowledge_id=kb),
                  models=Models(None if keyword_only else local_embedding()),
                  mode="keyword" if keyword_only else "hybrid")


class Answers(list):
    """Every query's records in every mode: (chunk id, text, score).

    Equal when the records are, keyword scores exactly, and vector and hybrid ones to
    float32's last bits: the matrix product's rounding depends on where a row sits in
    its matrix (BLAS works on blocks of rows), and a segment's rows sit elsewhere than
    a bulk build's."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list) or len(other) != len(self):
            return False
        for mine, theirs, mode in zip(self, other, self.modes, strict=True):
            exact = mode == "keyword"
            if [r[:2] for r in mine] != [r[:2] for r in theirs] or any(
                    (a[2] != b[2]) if exact else abs(a[2] - b[2]) > 1e-6
                    for a, b in zip(mine, theirs, strict=True)):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]
    modes: list[str]


def answers(store: LocalStore, kb: str, modes: Sequence[str] = MODES) -> Answers:
    base, model = store.open(kb), local_embedding() if modes != ["keyword"] else None
    found = Answers([(hit.node.node_id, hit.node.get_content(), hit.score)
                     for hit in base.retrieve(QueryPlan(query=query, top_k=8, mode=mode), model)]
                    for query in QUERIES for mode in modes)
    found.modes = [mode for _ in QUERIES for mode in modes]
    return found


def segments_on_disk(data: Path, kb: str) -> set[str]:
    return {p.name for p in (KBLayout(data, kb).root / "segments").iterdir()}


def listed_segments(data: Path, kb: str) -> set[str]:
    version = KBLayout(data, kb).current_version()
    assert version is not None
    return {s["name"] for s in json.loads((version / "segments.json").read_text())["segments"]}


def small_changes(store: LocalStore, kb: str, steps: int, seed: int = 0) -> dict[str, str]:
    """Adds, replacements and deletions one document at a time; the documents left."""
    rng = random.Random(seed)
    docs: dict[str, str] = {}
    for step in range(steps):
        roll = rng.random()
        if docs and roll < 0.2:
            gone = rng.choice(sorted(docs))
            change(store, kb, {}, {gone})
            del docs[gone]
        elif docs and roll < 0.4:
            doc_id = rng.choice(sorted(docs))
            docs[doc_id] = text_of(1000 + step)
            change(store, kb, {doc_id: docs[doc_id]})
        else:
            doc_id = f"doc{step}"
            docs[doc_id] = text_of(step)
            change(store, kb, {doc_id: docs[doc_id]})
    return docs


def bulk(tmp_path: Path, docs: dict[str, str]) -> LocalStore:
    store = LocalStore(tmp_path / "bulk")
    change(store, "kb", docs)
    return store


def test_many_small_changes_answer_as_one_bulk_build_before_and_after_merging(tmp_path):
    store = LocalStore(tmp_path / "small")
    store.compact_in_background = False
    docs = small_changes(store, "kb", 40)
    assert len(store.open("kb").segments) > compaction.MAX_SEGMENTS
    expected = answers(bulk(tmp_path, docs), "kb")
    assert any(expected)
    assert answers(store, "kb") == expected
    assert sorted(store.open("kb").documents) == sorted(docs)
    while store.compact("kb"):
        pass
    assert len(store.open("kb").segments) <= compaction.MAX_SEGMENTS
    assert answers(store, "kb") == expected
    assert answers(LocalStore(tmp_path / "small"), "kb") == expected  # read afresh


def test_background_merges_keep_the_segments_few_and_the_answers_the_same(tmp_path):
    store = LocalStore(tmp_path / "small")
    docs = small_changes(store, "kb", 60, seed=1)
    for _ in range(200):  # the last merge may still run
        if len(store.open("kb").segments) <= compaction.MAX_SEGMENTS:
            break
        time.sleep(0.05)
    assert len(store.open("kb").segments) <= compaction.MAX_SEGMENTS
    assert answers(store, "kb") == answers(bulk(tmp_path, docs), "kb")
    # Once merges are done, the next change leaves only the segments its version lists.
    store.compact_in_background = False
    while store.compact("kb"):  # waits for a merge running in the background
        pass
    change(store, "kb", {"last": text_of(999)})
    assert segments_on_disk(tmp_path / "small", "kb") == listed_segments(tmp_path / "small", "kb")


def test_deleting_documents_leaves_the_statistics_of_the_rest(tmp_path):
    # Deleting rows changes every term's weight (chunk count, average length, document
    # frequency) and the scale (each term's best weight): all from the rows left.
    store = LocalStore(tmp_path / "small")
    store.compact_in_background = False
    docs = {f"d{i}": text_of(i) for i in range(30)}
    change(store, "kb", docs)
    for gone in ("d3", "d4", "d17", "d29"):
        change(store, "kb", {}, {gone})
        del docs[gone]
    assert answers(store, "kb") == answers(bulk(tmp_path, docs), "kb")


def test_the_share_of_text_the_model_reads_is_that_of_the_chunks_left(tmp_path):
    # Hybrid scores weigh the vector side by how much of the base the model reads: a
    # running mean would keep counting deleted chunks.
    store = LocalStore(tmp_path / "small")
    store.compact_in_background = False
    docs = {f"d{i}": text_of(i) for i in range(12)}
    docs |= {f"z{i}": f"氦核 衰变 {text_of(100 + i)} 光子 ㄅㄆㄇ" for i in range(6)}
    change(store, "kb", docs)
    for gone in ("z0", "z1", "d2", "z4"):
        change(store, "kb", {}, {gone})
        del docs[gone]
    change(store, "kb", {"z1": "绿茶 " + text_of(300)})
    docs["z1"] = "绿茶 " + text_of(300)
    expected = bulk(tmp_path, docs)
    assert store.open("kb").manifest.readable_share == expected.open("kb").manifest.readable_share
    assert expected.open("kb").manifest.readable_share < 1.0
    assert answers(store, "kb") == answers(expected, "kb")
    store.compact_in_background = True
    change(store, "kb", {}, {"z5"})  # past the share of removed rows that calls a merge
    del docs["z5"]
    expected = bulk(tmp_path / "again", docs)
    while store.compact("kb"):
        pass
    assert answers(store, "kb") == answers(expected, "kb")


def test_a_base_written_before_segments_answers_as_before_and_is_rewritten_on_its_first_change(
        tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "legacy-base", data)
    store = LocalStore(data)
    store.compact_in_background = False
    legacy = [[(h.node.node_id, h.score) for h in store.open("legacy").retrieve(
        QueryPlan(query=q, top_k=3, mode=m), local_embedding())]
        for q in ("helium nuclei", "tea") for m in MODES]
    assert store.open("legacy").listing is None
    assert store.compact("legacy")
    assert store.open("legacy").listing is not None
    after = [[(h.node.node_id, h.score) for h in store.open("legacy").retrieve(
        QueryPlan(query=q, top_k=3, mode=m), local_embedding())]
        for q in ("helium nuclei", "tea") for m in MODES]
    assert after == legacy and legacy[0]
    change(store, "legacy", {"delta": "Delta rays are electrons knocked out by radiation."})
    assert sorted(store.open("legacy").documents) == ["alpha", "beta", "delta", "gamma", "tea"]
    assert [p.name for p in KBLayout(data, "legacy").root.glob("v*")] == [
        KBLayout(data, "legacy").current_version().name]


def test_a_document_without_chunks_can_be_replaced_and_deleted(tmp_path):
    # A text of only control characters is a document that yields no chunk.
    store = LocalStore(tmp_path / "data")
    store.compact_in_background = False
    change(store, "kb", {"d0": text_of(0)})
    change(store, "kb", {"blank": "\x00"})
    assert "blank" in store.open("kb").documents
    change(store, "kb", {"blank": "helium tea kettle"})
    assert answers(store, "kb", ["keyword"])[0][0][1] == "helium tea kettle"
    change(store, "kb", {}, {"blank"})
    assert sorted(store.open("kb").documents) == ["d0"]


def test_a_damaged_base_written_before_segments_is_named_when_first_changed(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "legacy-base", data)
    version = KBLayout(data, "legacy").current_version()
    with contextlib.closing(sqlite3.connect(version / "docstore.sqlite")) as conn, conn:
        conn.execute("DELETE FROM kv WHERE key = (SELECT min(key) FROM kv)")
    with pytest.raises(KnowledgeBaseDamaged) as damaged:
        change(LocalStore(data), "legacy", {"delta": "Delta rays are electrons."})
    assert error_status(damaged.value)[:2] == (500, 5001)
    assert "'legacy' is damaged" in damaged.value.message
    assert "docstore.sqlite" in damaged.value.message
    assert sorted(LocalStore(data).open("legacy").documents) == ["alpha", "beta", "gamma", "tea"]
    assert not (KBLayout(data, "legacy").root / "segments").exists() or not any(
        (KBLayout(data, "legacy").root / "segments").iterdir())


# --- crashes and concurrent readers ---------------------------------------------------

WRITER = """
import random, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_local_changes import change, text_of
from llamaindex_kb.stores.local.store import LocalStore
store = LocalStore(Path(sys.argv[1]))
store.compact_in_background = False
print("ready", flush=True)
step = 0
while True:
    step += 1
    change(store, "kb", {"moving": text_of(10_000 + step)}, {"moving"} if step % 3 == 0 else set())
"""

MERGER = """
import sys
from pathlib import Path
from llamaindex_kb.stores.local.store import LocalStore
store = LocalStore(Path(sys.argv[1]))
print("ready", flush=True)
print(store.compact("kb"), flush=True)
"""


def killed_after(script: str, data: Path, seconds: float) -> None:
    child = subprocess.Popen([sys.executable, "-c", script, str(data)], cwd=PLUGIN_ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", (
            child.stderr.read() if child.stderr else "")
        time.sleep(seconds)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_kill_9_during_small_changes_leaves_the_base_before_or_after_and_the_next_writer_cleans_up(
        tmp_path):
    data = tmp_path / "data"
    store = LocalStore(data)
    store.compact_in_background = False
    docs = {f"d{i}": text_of(i) for i in range(20)}
    change(store, "kb", docs)
    steady = answers(bulk(tmp_path, docs), "kb")
    for seconds in (0.05, 0.2, 0.35, 0.5, 0.8):
        killed_after(WRITER, data, seconds)
        reader = LocalStore(data)
        found = reader.open("kb").documents
        assert set(found) - {"moving"} == set(docs)
        # Whatever state it was left in, it answers as a bulk build of that state.
        current = dict(docs)
        if "moving" in found:
            current["moving"] = " ".join(_texts_of(reader, "kb", "moving"))
        assert answers(reader, "kb") == (steady if "moving" not in found
                                         else answers(bulk(tmp_path / str(seconds), current),
                                                      "kb"))
    reader = None  # a version read here keeps its segments; let go of it
    gc.collect()
    change(store, "kb", {}, {"moving"} & set(store.open("kb").documents))
    assert segments_on_disk(data, "kb") == listed_segments(data, "kb")
    assert answers(store, "kb") == steady


def _texts_of(store: LocalStore, kb: str, document_id: str) -> list[str]:
    """The live chunks' texts of one document."""
    base = store.open(kb)
    rows = [int(offset + row) for segment, offset, removed in zip(
                base.segments, base.offsets, base.removed_rows, strict=False)
            for row in segment.rows_of([document_id]) if row not in set(removed.tolist())]
    return [node.get_content() for node in base.chunks(rows)]


def many_segments(data: Path, documents: int = 400, *, keyword_only: bool = False
                  ) -> LocalStore:
    store = LocalStore(data)
    store.compact_in_background = False
    change(store, "kb", {f"d{i}": text_of(i) for i in range(documents)},
           keyword_only=keyword_only)
    for i in range(12):
        change(store, "kb", {f"e{i}": text_of(documents + i)}, {f"d{i * 7}"},
               keyword_only=keyword_only)
    assert compaction.plan(store.open("kb")) is not None
    return store


def test_kill_9_during_a_merge_leaves_the_base_answering_the_same_and_a_later_merge_completes(
        tmp_path):
    # Keyword only, and large enough that a merge takes a while to be killed during.
    built = tmp_path / "built"
    expected = answers(many_segments(built, 8_000, keyword_only=True), "kb", ["keyword"])
    gc.collect()  # no version stays held here: only the children's are at stake
    timing = tmp_path / "timing"
    shutil.copytree(built, timing)
    started = time.perf_counter()
    assert LocalStore(timing).compact("kb")
    merging = time.perf_counter() - started
    outcomes = set()
    for share in (0.0, 0.2, 0.4, 0.6, 0.8, 1.5):
        data = tmp_path / f"killed-{share}"
        shutil.copytree(built, data)
        before = listed_segments(data, "kb")
        killed_after(MERGER, data, share * merging)
        reader = LocalStore(data)
        assert answers(reader, "kb", ["keyword"]) == expected
        listed = listed_segments(data, "kb")
        outcomes.add("merged" if listed != before
                     else "mid-merge" if segments_on_disk(data, "kb") != listed else "not begun")
        reader = None
        gc.collect()
        while LocalStore(data).compact("kb"):
            pass
        assert answers(LocalStore(data), "kb", ["keyword"]) == expected
        assert segments_on_disk(data, "kb") == listed_segments(data, "kb")
    assert "mid-merge" in outcomes, (outcomes, merging)


def test_readers_querying_through_a_merge_see_no_error_and_the_same_answers(tmp_path):
    data = tmp_path / "data"
    store = many_segments(data)
    expected = answers(store, "kb")
    other_process = subprocess.Popen(
        [sys.executable, "-c", READER, str(data), json.dumps(expected)], cwd=PLUGIN_ROOT,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert other_process.stdout is not None and other_process.stdout.readline() == "ready\n"
    failures: list[str] = []
    stop = threading.Event()

    def read() -> None:
        reader = LocalStore(data)
        while not stop.is_set():
            try:
                if answers(reader, "kb") != expected:
                    failures.append("different answers")
            except Exception as exc:  # noqa: BLE001  collected and reported below
                failures.append(repr(exc))
            # Once dify_plugin is imported (by other tests in the run), threads are gevent
            # greenlets: without a pause this loop would never let the merge run.
            time.sleep(0.001)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert store.compact("kb")
    time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    other_process.stdin = None
    other_process.send_signal(signal.SIGTERM)
    out, err = other_process.communicate(timeout=30)
    assert failures == []
    assert "mismatch" not in out and "Traceback" not in err, (out, err)
    assert int(out.split()[-1]) > 0  # the other process answered throughout


READER = """
import json, signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_local_changes import answers
from llamaindex_kb.stores.local.store import LocalStore
expected = json.loads(sys.argv[2])
store = LocalStore(Path(sys.argv[1]))
done = 0
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while running:
    got = json.loads(json.dumps(answers(store, "kb")))
    if answers(store, "kb") != [[tuple(r) for r in q] for q in expected]:
        print("mismatch", flush=True)
    done += 1
print(done, flush=True)
"""
