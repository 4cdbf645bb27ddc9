"""Every store keeps keys' and views' records alike (``stores/records.py``), shared by
every process that opens it: the embedded store's folder, a real PostgreSQL, Qdrant's
local mode, and the file kept beside stores that cannot hold them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamaindex_kb.config import load_settings
from llamaindex_kb.errors import KnowledgeBaseDamaged
from llamaindex_kb.stores.records import FileRecords, Records, records_for
from llamaindex_kb.stores.registry import open_store

KINDS = ["local", "postgresql", "qdrant"]


@pytest.fixture(params=KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        # Each test its own database would be slow: names keep tests apart instead.
        return request.getfixturevalue("postgres_url")
    if request.param == "qdrant":
        return f"qdrant://{tmp_path / 'qdrant'}"
    return f"local://{tmp_path / 'data'}"


@pytest.fixture
def records(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Records]:
    settings = load_settings({"store": store_url, "data_dir": tmp_path / "beside"}, environ={})
    store = open_store(store_url, settings)
    found = records_for(store, settings.data_dir)
    yield found
    for kind in ("key", "view"):
        for name in found.records(kind):
            found.remove_record(kind, name)
    close = getattr(store, "close", None)
    if close is not None:
        close()


def test_a_record_is_added_once_and_read_back_as_stored(records):
    record = {"hash": "ab" * 32, "knowledge_ids": ["a", "b"], "read_only": True,
              "created_at": 1.5, "last_used_at": None, "note": "中文"}
    assert records.add_record("key", "app-one", record)
    assert not records.add_record("key", "app-one", {"hash": "other"})
    assert records.records("key") == {"app-one": record}
    assert records.records("view") == {}


def test_an_update_changes_only_its_fields_and_never_brings_back_a_removed_record(records):
    records.add_record("view", "hr", {"knowledge_id": "handbook", "top_k_max": 5})
    assert records.update_record("view", "hr", {"top_k_max": 3})
    assert records.records("view")["hr"] == {"knowledge_id": "handbook", "top_k_max": 3}
    assert records.remove_record("view", "hr")
    assert not records.remove_record("view", "hr")
    assert not records.update_record("view", "hr", {"top_k_max": 9})
    assert records.records("view") == {}


def test_kinds_and_names_are_kept_apart(records):
    records.add_record("key", "same", {"v": 1})
    records.add_record("view", "same", {"v": 2})
    records.add_record("key", "Same", {"v": 3})
    assert records.records("key") == {"same": {"v": 1}, "Same": {"v": 3}}
    assert records.records("view") == {"same": {"v": 2}}


def test_many_records_are_all_listed(records):
    for i in range(300):  # past one page of a scroll
        records.add_record("key", f"k{i:03}", {"i": i})
    listed = records.records("key")
    assert len(listed) == 300 and listed["k299"] == {"i": 299}


def test_stores_without_a_place_for_records_keep_them_in_the_data_dir(tmp_path):
    settings = load_settings({"store": f"llamaindex://{tmp_path / 'index'}",
                              "data_dir": tmp_path / "data"}, environ={})
    (tmp_path / "index").mkdir()
    store = open_store(settings.store, settings)
    found = records_for(store, settings.data_dir)
    assert isinstance(found, FileRecords)
    found.add_record("key", "a", {"x": 1})
    assert FileRecords(tmp_path / "data").records("key") == {"a": {"x": 1}}
    assert (tmp_path / "data" / FileRecords.FILE).stat().st_mode & 0o077 == 0


def test_another_process_sees_a_change_at_once_through_the_file(tmp_path):
    mine = FileRecords(tmp_path)
    mine.add_record("key", "a", {"x": 1})
    assert mine.records("key") == {"a": {"x": 1}}
    script = textwrap.dedent(f"""
        from llamaindex_kb.stores.records import FileRecords
        FileRecords({str(tmp_path)!r}).remove_record("key", "a")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    assert mine.records("key") == {}


def test_a_damaged_records_file_names_itself(tmp_path):
    (tmp_path / FileRecords.FILE).write_text("{not json")
    with pytest.raises(KnowledgeBaseDamaged, match="access.json"):
        FileRecords(tmp_path).records("key")
