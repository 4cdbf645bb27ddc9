"""The embedded (local) store under faults, as a user meets them.

Publishes while a query runs (in this process and another), files of a knowledge base
truncated or garbled (open or not), a disk that fills up mid-publish (a real 1 MiB
tmpfs), and knowledge ids that must never share a folder. Files are damaged for real;
where a crash would be possible (a truncated file under a running search), the store
runs in a child process, so a SIGBUS fails the test instead of killing pytest.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, PLUGIN_ROOT, ServerTransport, dify_body, standalone_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaindex_kb import load_settings
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.errors import KBError, error_status
from llamaindex_kb.ids import validate_knowledge_id
from llamaindex_kb.ingestion.pipeline import IngestSummary, apply_changes, text_source
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.base import Change, QueryPlan
from llamaindex_kb.stores.local.layout import KBLayout, kb_dir_name
from llamaindex_kb.stores.local.store import LocalStore
from llamaindex_kb.stores.local.version import KnowledgeBase

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
HELIUM = {"alpha": "Alpha particles are helium nuclei.", "beta": "Beta decay emits electrons."}


def publish(store: LocalStore, kb: str, docs: dict[str, str], embed: Any = None) -> None:
    sources = [text_source(doc_id, text, {}, doc_id) for doc_id, text in docs.items()]
    apply_changes(store, kb, sources, set(), IngestSummary(knowledge_id=kb), models=Models(embed),
                  mode="hybrid" if embed is not None else "keyword")


def republish(store: LocalStore, kb: str) -> None:
    """A writer whose caller holds no version: the same documents, published anew."""
    store.publish(kb, Change(manifest=store.open(kb).manifest))


def chunk_ids(kb: KnowledgeBase, query: str) -> list[str]:
    return [hit.node.node_id for hit in kb.retrieve(QueryPlan(query=query, top_k=5), None)]


def in_new_thread(work: Any) -> Any:
    """``work()`` in a thread of its own: it opens its own SQLite connection, as each
    request thread of the server does."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except Exception as exc:  # noqa: BLE001  re-raised in the caller's thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def versions(data_dir: Path, kb: str) -> list[str]:
    return sorted(p.name for p in KBLayout(data_dir, kb).root.glob("v*"))


def answer(library: Library, kb: str, query: str = "helium nuclei") -> tuple[int, int, Any]:
    """(status, error_code, record ids or error_msg), as the API would answer."""
    request = RetrievalRequest(knowledge_id=kb, query=query, top_k=3)
    try:
        records = library.retrieve(request, Models(embed_model=local_embedding()))
    except Exception as exc:  # noqa: BLE001  what the API maps, mapped the same way
        return error_status(exc)
    return 200, 0, [r.metadata["chunk_id"] for r in records]


def child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=PLUGIN_ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


# --- a query is never broken by publishes that happen while it runs -----------------


def test_a_query_holding_an_old_version_answers_through_publishes_here_and_elsewhere(
    tmp_path,
):
    store = LocalStore(tmp_path)
    publish(store, "k", HELIUM)
    held = store.open("k")
    expected = chunk_ids(held, "helium")
    for i in range(3):
        publish(store, "k", {f"zebra{i}": f"Zebra {i} has stripes."})
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "lion.txt").write_text("Lions roar on the savanna.")
    writer = subprocess.run(
        [sys.executable, "-m", "llamaindex_kb", "ingest", str(folder), "--kb", "k",
         "--data-dir", str(tmp_path), "--mode", "keyword", "--no-progress"],
        cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr

    # A new thread opens a new connection to the old version's docstore: the files
    # it needs are still there.
    assert in_new_thread(lambda: chunk_ids(held, "helium")) == expected
    assert sorted(held.documents) == ["alpha", "beta"]
    live = store.open("k")
    assert len(live.documents) == 6
    assert chunk_ids(live, "lions roar")
    assert not chunk_ids(held, "lions roar")


def test_a_replaced_version_is_released_when_its_last_query_ends_then_removed(tmp_path):
    store = LocalStore(tmp_path)
    publish(store, "k", HELIUM)
    held = store.open("k")
    republish(store, "k")
    republish(store, "k")
    assert held.version_dir.is_dir()
    assert len(versions(tmp_path, "k")) == 2  # the held one and the live one

    released = weakref.ref(held)
    gc.disable()  # released by reference counting alone: nothing keeps it in a cycle
    try:
        del held
        assert released() is None
    finally:
        gc.enable()
    republish(store, "k")
    assert versions(tmp_path, "k") == [KBLayout(tmp_path, "k").current_version().name]


def test_a_base_dropped_elsewhere_is_let_go_by_a_reader_here(tmp_path):
    reader, writer = LocalStore(tmp_path), LocalStore(tmp_path)  # as two processes
    publish(writer, "k", HELIUM)
    released = weakref.ref(reader.open("k"))
    writer.drop("k")
    assert reader.find("k") is None
    assert released() is None


HOLDER = """
import sys, time
from pathlib import Path
from llamaindex_kb.stores.local.store import LocalStore
kb = LocalStore(Path(sys.argv[1])).open("k")
print(kb.version_dir.name, flush=True)
time.sleep(600)
"""


def test_a_version_another_process_reads_stays_until_that_process_is_gone(tmp_path):
    store = LocalStore(tmp_path)
    publish(store, "k", HELIUM)
    reader = child(HOLDER, str(tmp_path))
    try:
        held = reader.stdout.readline().strip() if reader.stdout else ""
        assert held, reader.communicate()[1] if reader.poll() is not None else "no answer"
        republish(store, "k")
        republish(store, "k")
        assert held in versions(tmp_path, "k")
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.communicate()
    # The kernel dropped the dead reader's lock: the next writer removes its version.
    republish(store, "k")
    assert versions(tmp_path, "k") == [KBLayout(tmp_path, "k").current_version().name]


# --- damaged files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with knowledge bases "a" and "b", with vectors; copy, then damage."""
    data = tmp_path_factory.mktemp("two-bases")
    store = LocalStore(data)
    model = local_embedding()
    publish(store, "a", {f"a{i}": f"Note {i}: alpha particles are helium nuclei."
                         for i in range(20)}, embed=model)
    publish(store, "b", {f"b{i}": f"Note {i}: helium balloons float in air."
                         for i in range(20)}, embed=model)
    return data


@pytest.fixture
def data_dir(two_bases: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(two_bases, copy)
    return copy


def live_file(data_dir: Path, kb: str, name: str) -> Path:
    """A file of the live version, or of the one segment it lists."""
    version = KBLayout(data_dir, kb).current_version()
    assert version is not None
    if (version / name).exists():
        return version / name
    (segment,) = json.loads((version / "segments.json").read_text())["segments"]
    return version.parent / "segments" / segment["name"] / name


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 50)


DAMAGES = [
    ("manifest.json", truncate), ("manifest.json", garble),
    ("docstore.sqlite", truncate), ("docstore.sqlite", garble),
    ("node_ids.npy", truncate), ("document_ids.npy", garble),
    ("metadata.json", truncate),
    ("vectors/vectors.npy", truncate), ("vectors/vectors.npy", garble),
    ("segments.json", truncate), ("segments.json", garble),
    ("postings/tfs.npy", truncate), ("postings/rows.npy", garble),
    ("postings/vocab.json", truncate), ("postings/postings.json", garble),
    ("postings/front.npy", truncate), ("postings/row_terms.npy", garble),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGES,
                         ids=[f"{n}-{d.__name__}" for n, d in DAMAGES])
def test_a_damaged_file_answers_an_error_naming_the_base_and_file_while_others_serve(
    data_dir, name, damage
):
    damage(live_file(data_dir, "a", name))
    library = Library(load_settings({"data_dir": data_dir}, environ={}),
                      store=LocalStore(data_dir))
    status, code, message = answer(library, "a")
    assert (status, code) == (500, 5001), message
    assert "knowledge base 'a' is damaged" in message
    assert Path(name).parts[0] in message or Path(name).name in message
    assert "drop it and ingest its documents again" in message
    assert answer(library, "b")[:2] == (200, 0)
    listed = [m.knowledge_id for m in library.manifests()]
    assert listed == (["b"] if name == "manifest.json" else ["a", "b"])


@pytest.mark.parametrize("damage", [truncate, garble])
def test_a_damaged_document_list_is_named_when_listed_or_changed(data_dir, damage):
    damage(live_file(data_dir, "a", "documents.json"))
    library = Library(load_settings({"data_dir": data_dir}, environ={}),
                      store=LocalStore(data_dir))
    assert answer(library, "a")[:2] == (200, 0)  # retrieval never reads it
    with pytest.raises(KBError) as listing:
        library.documents("a")
    assert error_status(listing.value)[:2] == (500, 5001)
    assert "'a'" in listing.value.message and "documents.json" in listing.value.message
    with pytest.raises(KBError) as change:
        publish(library.store, "a", {"new": "New helium note."}, embed=local_embedding())
    assert "documents.json" in change.value.message


def test_over_http_a_damaged_base_is_named_and_the_list_leaves_it_out(data_dir):
    garble(live_file(data_dir, "a", "docstore.sqlite"))
    garble(live_file(data_dir, "b", "manifest.json"))
    with standalone_server(data_dir) as url:
        api = ServerTransport(url)
        reply = api.post("/retrieval", dify_body({"knowledge_id": "a", "query": "helium",
                                                  "retrieval_setting": {"top_k": 2}}), AUTH)
        assert reply.status == 500
        assert reply.json()["error_code"] == 5001
        assert "'a'" in reply.json()["error_msg"]
        assert "docstore.sqlite" in reply.json()["error_msg"]
        listed = api.send("GET", "/knowledge-bases", None, AUTH)
        assert listed.status == 200
        assert [kb["knowledge_id"] for kb in listed.json()["knowledge_bases"]] == ["a"]


SERVING = """
import json, sys, threading
from pathlib import Path
from llamaindex_kb import load_settings
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.errors import error_status
from llamaindex_kb.retrieval import Library
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.stores.local.store import LocalStore

data = Path(sys.argv[1])
models = Models(embed_model=local_embedding())


def serving():
    return Library(load_settings({"data_dir": data}, environ={}), store=LocalStore(data))


def query(kb):
    try:
        records = library.retrieve(RetrievalRequest(knowledge_id=kb, query="helium nuclei",
                                                    top_k=3), models)
        return [200, 0, [r.metadata["chunk_id"] for r in records]]
    except Exception as exc:
        return list(error_status(exc))


library = serving()
print("ready", flush=True)
for line in sys.stdin:
    command, kb = json.loads(line)
    if command == "restart":  # a fresh store, as after a restart of the server
        library = serving()
        print("[]", flush=True)
    else:  # each in a thread of its own, with its own docstore connection, as a server
        answers = []
        thread = threading.Thread(target=lambda: answers.append(query(kb)))
        thread.start()
        thread.join()
        print(json.dumps(answers[0]), flush=True)
"""


def test_truncating_files_of_an_open_base_never_takes_the_process_down(data_dir):
    server = child(SERVING, str(data_dir))

    def ask(command: str, kb: str = "") -> Any:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(json.dumps([command, kb]) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, f"the serving process died (exit {server.wait()}): {server.stderr.read()}"
        return json.loads(line)

    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        before_a, before_b = ask("query", "a"), ask("query", "b")
        assert before_a[0] == before_b[0] == 200 and before_a[2]
        for name in ("vectors/vectors.npy", "postings/tfs.npy",
                     "postings/rows.npy", "node_ids.npy"):
            os.truncate(live_file(data_dir, "a", name), 64)
        # What it had read stays right; the other base is untouched.
        assert ask("query", "a") == before_a
        assert ask("query", "b") == before_b
        os.truncate(live_file(data_dir, "a", "docstore.sqlite"), 4096)
        status, code, message = ask("query", "a")
        assert (status, code) == (500, 5001) and "docstore.sqlite" in message
        assert ask("query", "b") == before_b
        ask("restart")
        status, code, message = ask("query", "a")
        assert (status, code) == (500, 5001) and "knowledge base 'a' is damaged" in message
        assert ask("query", "b") == before_b
    finally:
        server.kill()
        server.communicate()


# --- a full disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), mounted for this test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_answers_507_and_leaves_the_base_as_it_was(small_disk, tmp_path):
    data = small_disk / "data"
    store = LocalStore(data)
    publish(store, "k", HELIUM)
    live = versions(data, "k")
    before = chunk_ids(store.open("k"), "helium")
    big = " ".join(f"word{i} sentence number {i} about nothing." for i in range(60_000))

    with standalone_server(data) as url:
        reply = ServerTransport(url, timeout=60).post("/documents", json.dumps({
            "knowledge_id": "k", "title": "big", "text": big, "mode": "keyword"}).encode(),
            AUTH)
    assert reply.status == 507, reply.body
    assert reply.json()["error_code"] == 5007
    assert str(data) in reply.json()["error_msg"]
    assert "nothing was changed" in reply.json()["error_msg"]
    assert versions(data, "k") == live
    assert sorted(LocalStore(data).open("k").documents) == ["alpha", "beta"]
    assert chunk_ids(LocalStore(data).open("k"), "helium") == before

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.txt").write_text(big)
    cli = subprocess.run(
        [sys.executable, "-m", "llamaindex_kb", "ingest", str(folder), "--kb", "k",
         "--data-dir", str(data), "--mode", "keyword", "--no-progress"],
        cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0
    assert "Traceback" not in cli.stderr
    # Log lines aside, one line says what happened.
    said = [line for line in cli.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and "no space left" in said[0] and str(data) in said[0]
    assert versions(data, "k") == live
    # Space was given back: a small change still lands.
    publish(store, "k", {"gamma": "Gamma rays are photons."})
    assert "gamma" in store.open("k").documents


def fill(disk: Path, leave_kb: int) -> None:
    room = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(room.f_bavail * room.f_frsize - leave_kb * 1024))


@pytest.mark.parametrize("free_kb", [60, 150, 500, 900])
def test_whichever_file_fills_the_disk_the_change_is_refused_whole(small_disk, free_kb):
    # With this much room left, a different writer fails first: the arrays (numpy's
    # errno-less short write), the docstore (SQLite) or a plain write.
    data = small_disk / "data"
    store = LocalStore(data)
    publish(store, "k", HELIUM)
    live = versions(data, "k")
    fill(small_disk, free_kb)
    text = " ".join(f"Sentence {i} repeats the same few words." for i in range(4000))
    with pytest.raises(KBError) as refused:
        publish(store, "k", {"long": text})
    assert error_status(refused.value)[:2] == (507, 5007)
    assert versions(data, "k") == live
    assert sorted(LocalStore(data).open("k").documents) == ["alpha", "beta"]


def test_a_small_change_on_a_nearly_full_disk_lands_whole_or_is_refused_whole(small_disk):
    # Every amount of room a small version can meet, a block at a time: SQLite says
    # "disk I/O error" when its WAL index cannot grow, "disk is full" elsewhere.
    data = small_disk / "data"
    store = LocalStore(data)
    # Merged here, between the measured changes, rather than in the background
    # while the disk is being filled.
    store.compact_in_background = False
    publish(store, "k", HELIUM)
    landed = refused = 0
    for free_kb in range(0, 200, 4):
        fill(small_disk, free_kb)
        try:
            publish(store, "k", {f"g{free_kb}": "Gamma rays are photons."})
        except KBError as exc:
            assert error_status(exc)[:2] == (507, 5007), (free_kb, exc.message)
            assert f"g{free_kb}" not in LocalStore(data).open("k").documents
            refused += 1
        else:
            assert f"g{free_kb}" in LocalStore(data).open("k").documents
            landed += 1
        (small_disk / "filler").unlink()
        # A refused change's traceback holds the version it read until collected.
        gc.collect()
        assert len(versions(data, "k")) <= 2
        store.compact("k")
    assert refused and landed


# --- knowledge ids -------------------------------------------------------------------


# "知识库" is outside the folder-safe alphabet, so it is stored under a hashed name.
HASHED = "kb-975b35f9c2b1148cb867b210"


def test_an_id_spelled_like_a_hashed_folder_never_reaches_another_base(tmp_path):
    store = LocalStore(tmp_path)
    assert kb_dir_name("知识库") == HASHED
    publish(store, "知识库", {"x": "Xenon is a noble gas."})
    publish(store, HASHED, {"y": "Yttrium is a metal."})
    assert sorted(store.open("知识库").documents) == ["x"]
    assert sorted(store.open(HASHED).documents) == ["y"]
    assert sorted(m.knowledge_id for m in store.manifests()) == [HASHED, "知识库"]
    store.drop(HASHED)
    assert sorted(store.open("知识库").documents) == ["x"]
    assert [m.knowledge_id for m in store.manifests()] == ["知识库"]


def test_a_base_made_under_a_hashed_looking_id_before_the_fix_stays_its_own(tmp_path):
    # Before the fix, the id HASHED was its own folder name: the hashed folder of 知识库.
    store = LocalStore(tmp_path)
    publish(store, HASHED, {"y": "Yttrium is a metal."})
    KBLayout(tmp_path, HASHED).root.rename(tmp_path / "kbs" / HASHED)
    store = LocalStore(tmp_path)
    assert sorted(store.open(HASHED).documents) == ["y"]
    assert store.find("知识库") is None
    with pytest.raises(KBError) as refused:
        publish(store, "知识库", {"x": "Xenon is a noble gas."})
    assert error_status(refused.value)[:2] == (400, 3002)
    assert HASHED in refused.value.message
    assert sorted(store.open(HASHED).documents) == ["y"]
    assert [m.knowledge_id for m in store.manifests()] == [HASHED]
    store.drop(HASHED)
    assert store.manifests() == []
    publish(store, "知识库", {"x": "Xenon is a noble gas."})
    assert sorted(store.open("知识库").documents) == ["x"]


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerTransport]:
    with standalone_server(tmp_path_factory.mktemp("empty")) as url:
        yield ServerTransport(url)


@pytest.mark.parametrize("knowledge_id", ["a/b", "/", ".", "..", "", "x" * 201, "tab\there"])
def test_an_id_no_route_could_reach_is_refused_naming_the_rule(empty_server, knowledge_id):
    reply = empty_server.post("/documents", json.dumps({
        "knowledge_id": knowledge_id, "title": "t", "text": "some text",
        "mode": "keyword"}).encode(), AUTH)
    assert reply.status == 400, reply.body
    assert reply.json()["error_code"] == 3002
    assert "knowledge_id" in reply.json()["error_msg"]
    if knowledge_id.strip():
        assert "without '/'" in reply.json()["error_msg"]


def test_a_retrieval_for_an_id_no_folder_can_hold_is_a_404(tmp_path):
    library = Library(load_settings({"data_dir": tmp_path}, environ={}),
                      store=LocalStore(tmp_path))
    for knowledge_id in ["\ud800", "a/../../b", "x" * 5000, "nul\x00"]:
        assert answer(library, knowledge_id)[:2] == (404, 2001)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(knowledge_id=st.one_of(
    st.text(min_size=1, max_size=30),
    st.from_regex(r"kb-[0-9a-f]{24}", fullmatch=True),
    st.sampled_from(["../x", "..", "a/b", "名前", " lead", "CON", "a" * 200])))
def test_every_id_that_can_be_created_can_be_listed_and_dropped(tmp_path_factory, knowledge_id):
    try:
        validate_knowledge_id(knowledge_id)
    except KBError as exc:
        assert "without '/'" in exc.message
        return
    data = tmp_path_factory.mktemp("ids")
    store = LocalStore(data)
    publish(store, knowledge_id, {"d": "Delta is a letter."})
    assert [m.knowledge_id for m in store.manifests()] == [knowledge_id]
    assert sorted(store.open(knowledge_id).documents) == ["d"]
    store.drop(knowledge_id)
    assert store.manifests() == [] and store.find(knowledge_id) is None


def test_each_change_leaves_only_the_live_version_on_disk(tmp_path):
    store = LocalStore(tmp_path)
    for number in range(4):
        publish(store, "garden", {f"doc{number}": f"tulips number {number}"})
        versions = [p for p in KBLayout(tmp_path, "garden").root.iterdir()
                    if p.is_dir() and p.name.startswith("v")]
        assert versions == [KBLayout(tmp_path, "garden").current_version()]


def test_a_base_made_before_the_id_rule_can_still_be_changed(tmp_path):
    store = LocalStore(tmp_path)
    # Written directly, as the CLI allowed before ids with '/' were refused at creation.
    store.publish("team/handbook", Change(
        manifest=store_manifest("team/handbook"), documents={}))
    publish(store, "team/handbook", {"leave": "parental leave is sixteen weeks"})
    assert store.open("team/handbook").documents.keys() == {"leave"}
    with pytest.raises(KBError, match="without '/'"):
        publish(store, "team/other", {"leave": "x"})


def store_manifest(knowledge_id: str) -> Any:
    from llamaindex_kb.stores.base import KBManifest

    return KBManifest(knowledge_id=knowledge_id, retrieval_mode="keyword")


EMFILE_SCRIPT = r"""
import json, os, resource, sys
from pathlib import Path
from llamaindex_kb.errors import error_status
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb import load_settings
from llamaindex_kb.retrieval import Library
from llamaindex_kb.models.base import Models

library = Library(load_settings({"data_dir": sys.argv[1]}, environ={}))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
hog = []
try:
    while True:
        hog.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    library.retrieve(RetrievalRequest(knowledge_id="garden", query="tulips", top_k=3),
                     Models(embed_model=None))
    outcome = "answered"
except Exception as exc:
    outcome = list(error_status(exc))
for fd in hog:
    os.close(fd)
print(json.dumps(outcome))
"""


def test_running_out_of_open_files_is_a_retryable_503_not_damage(tmp_path):
    publish(LocalStore(tmp_path), "garden", {"tulips": "tulips flower in spring"})
    result = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, str(tmp_path)],
                            cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=120)
    status, code, message = json.loads(result.stdout.strip().splitlines()[-1])
    assert (status, code) == (503, 5003), message
    assert "run out of open files" in message and "damaged" not in message
    assert result.returncode == 0, result.stderr


def test_an_upload_that_fills_the_temporary_disk_answers_507(small_disk, tmp_path, monkeypatch):
    import io
    import tempfile

    from werkzeug import Request
    from werkzeug.test import EnvironBuilder

    from llamaindex_kb.service import api_for

    api = api_for(load_settings({"api_key": API_KEY, "data_dir": tmp_path / "data"},
                                environ={}))
    environ = EnvironBuilder(
        path="/documents", method="POST", headers={"Authorization": f"Bearer {API_KEY}"},
        data={"knowledge_id": "k", "mode": "keyword",
              "file": (io.BytesIO(b"tulips bloom. " * 200_000), "big.txt")},
    ).get_environ()
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # uploads spool here
    response = api.handle(Request(environ))
    answer = json.loads(response.get_data())
    assert (response.status_code, answer["error_code"]) == (507, 5007)
    assert "no space is left" in answer["error_msg"]
    assert LocalStore(tmp_path / "data").manifests() == []


def test_the_store_keeps_a_bounded_number_of_bases_open_and_reopens_the_others(
        tmp_path, monkeypatch):
    from llamaindex_kb.stores.local import store as stores

    monkeypatch.setattr(stores, "MAX_OPEN_BASES", 3)
    store = LocalStore(tmp_path)
    for number in range(5):
        publish(store, f"kb{number}", {"tulips": f"tulips number {number}"})
    for number in range(5):
        store.open(f"kb{number}")
    assert list(store._open) == ["kb2", "kb3", "kb4"]
    first = store.open("kb0")  # read again from disk, and it answers
    assert chunk_ids(first, "tulips")
    assert list(store._open) == ["kb3", "kb4", "kb0"]
