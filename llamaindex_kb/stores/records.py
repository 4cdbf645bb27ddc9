"""Small named records a store keeps beside its knowledge bases: API keys and views.

Keys and views must be shared by every process using a store (a revoked key stops
working everywhere at once), so they live in the store itself where it can hold them
(``Records``: the embedded store's folder, a PostgreSQL table, Qdrant's meta
collection), and are read anew on every request that needs them. A store that cannot
hold them (LlamaCloud, an index managed by the user's LlamaIndex code) keeps them in a
``FileRecords`` folder beside it: the data directory.

A record is a JSON object under a ``kind`` ("key", "view") and a ``name``. The
operations are the few that keep concurrent processes safe without a read-modify-write
in the caller: ``add_record`` refuses a name that exists, and ``update_record`` never
brings back a record another process removed (a key revoked while in use stays revoked).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from llamaindex_kb.errors import KnowledgeBaseDamaged

Record = dict[str, Any]


@runtime_checkable
class Records(Protocol):
    """Named JSON records by kind, shared by every process using the store."""

    def records(self, kind: str) -> dict[str, Record]:
        """Every record of ``kind`` by name, as stored now."""
        ...

    def add_record(self, kind: str, name: str, record: Record) -> bool:
        """Store a new record; False, changing nothing, if one of that name exists."""
        ...

    def update_record(self, kind: str, name: str, changes: Record) -> bool:
        """Set ``changes``' fields of an existing record; False if there is none (it is
        never created)."""
        ...

    def remove_record(self, kind: str, name: str) -> bool:
        """Delete a record; False if there was none."""
        ...


class FileRecords:
    """Records in one JSON file, changed under an exclusive lock and replaced atomically.

    A read re-parses the file only when it was replaced (its inode, size or time
    changed), so checking a key costs one ``stat``.
    """

    FILE = "access.json"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / self.FILE
        self._lock = threading.Lock()
        self._seen: tuple[tuple[int, int, int], dict[str, dict[str, Record]]] | None = None

    def records(self, kind: str) -> dict[str, Record]:
        return dict(self._read().get(kind, {}))

    def add_record(self, kind: str, name: str, record: Record) -> bool:
        with self._changing() as stored:
            records = stored.setdefault(kind, {})
            if name in records:
                return False
            records[name] = record
            return True

    def update_record(self, kind: str, name: str, changes: Record) -> bool:
        with self._changing() as stored:
            record = stored.get(kind, {}).get(name)
            if record is None:
                return False
            record.update(changes)
            return True

    def remove_record(self, kind: str, name: str) -> bool:
        with self._changing() as stored:
            return stored.get(kind, {}).pop(name, None) is not None

    def _read(self) -> dict[str, dict[str, Record]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        mark = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        seen = self._seen
        if seen is not None and seen[0] == mark:
            return seen[1]
        try:
            stored = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise KnowledgeBaseDamaged(
                f"{self.path} (the API keys and views) is not valid JSON ({exc}): restore "
                "it from a backup, or delete it and create the keys and views again"
            ) from exc
        if not isinstance(stored, dict):
            raise KnowledgeBaseDamaged(
                f"{self.path} (the API keys and views) is not a JSON object: restore it "
                "from a backup, or delete it and create the keys and views again")
        self._seen = (mark, stored)
        return stored

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, dict[str, Record]]]:
        """The stored records to change in place; written back when the block ends
        without an exception (a ``return`` inside it included) having changed them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        with self._lock, open(lock, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                before = self._read()
                stored = json.loads(json.dumps(before))  # a copy to change
                yield stored
                if stored == before:  # a refused add, a missing name: nothing to write
                    return
                temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
                # Owner-only from its first byte (key hashes: like a private key's file).
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(descriptor, "w", encoding="utf-8") as out:
                    json.dump(stored, out, ensure_ascii=False, indent=1, sort_keys=True)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, self.path)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def records_for(store: object, data_dir: Path) -> Records:
    """Where ``store``'s keys and views live: in the store when it can hold them
    (``access_records``), else in a file in ``data_dir`` beside it."""
    found = getattr(store, "access_records", None)
    return found if found is not None else FileRecords(data_dir)
