"""A SQLite-backed LlamaIndex key-value store, so the docstore need not fit in memory.

LlamaIndex core only ships JSON-file stores that load whole into memory on open
(slow past a few thousand nodes); this keeps the ``KVDocumentStore`` abstraction
while reading only the nodes a query returns.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

from llama_index.core.storage.kvstore.types import DEFAULT_COLLECTION, BaseKVStore

# The collection a version's nodes are in: where LlamaIndex's KVDocumentStore keeps
# nodes by default (namespace "docstore", suffix "/data"), so
# ``KVDocumentStore(SQLiteKVStore(path)).get_node`` reads them too. Part of the format
# of every version on disk, so named here rather than read from KVDocumentStore.
NODE_COLLECTION = "docstore/data"


class SQLiteKVStore(BaseKVStore):
    """One table of (collection, key) → JSON; a connection per thread.

    ``read_only``: the file is a published segment's and never changes again.
    ``unpublished``: the file is a segment's being written, read by no one until it is
    synced and published, and discarded if anything fails: no journal is kept (with
    one, a 100k-chunk segment was written twice, and its commit took seconds).
    """

    def __init__(self, path: Path, *, read_only: bool = False,
                 unpublished: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.unpublished = unpublished
        self._local = threading.local()
        if not read_only:
            with self._connect() as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS kv (collection TEXT NOT NULL, key TEXT NOT NULL,"
                    " value TEXT NOT NULL, PRIMARY KEY (collection, key)) WITHOUT ROWID"
                )

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.read_only:
                # immutable: the file never changes, so SQLite needs no locks and no
                # WAL index (-shm) beside it, which it could not create on a full
                # disk: reads then failed with "disk I/O error".
                conn = sqlite3.connect(
                    f"file:{quote(str(self.path))}?mode=ro&immutable=1", uri=True,
                    check_same_thread=False,
                )
                # Reads, never a mapping (the default of most builds, said here): a
                # mapped file truncated under a read would kill the process (SIGBUS).
                conn.execute("PRAGMA mmap_size=0")
            elif self.unpublished:
                conn = sqlite3.connect(self.path, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=OFF")
                conn.execute("PRAGMA synchronous=OFF")
            else:
                conn = sqlite3.connect(self.path, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def check(self) -> None:
        """``ValueError`` if the file is not a whole SQLite database, by its 100-byte
        header (cheap enough for every open); damage further in surfaces as
        ``sqlite3.DatabaseError`` when a read reaches it."""
        with open(self.path, "rb") as handle:
            header = handle.read(100)
            size = os.fstat(handle.fileno()).st_size
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise ValueError(f"{self.path.name} is not an SQLite database")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        # The page count in the header is valid only while these two counters agree.
        if pages and header[24:28] == header[92:96]:
            expected = pages * page_size
        else:
            expected = size - size % page_size if page_size else -1
        if size != expected or size == 0:
            raise ValueError(f"{self.path.name} is {size} bytes, its header promises {expected}")

    def put(self, key: str, val: dict, collection: str = DEFAULT_COLLECTION) -> None:
        self.put_all([(key, val)], collection=collection)

    async def aput(self, key: str, val: dict, collection: str = DEFAULT_COLLECTION) -> None:
        self.put(key, val, collection)

    def put_all(
        self,
        kv_pairs: list[tuple[str, dict]],
        collection: str = DEFAULT_COLLECTION,
        batch_size: int = 1,
    ) -> None:
        conn = self._connect()
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO kv (collection, key, value) VALUES (?, ?, ?)",
                [(collection, key, json.dumps(val, ensure_ascii=False)) for key, val in kv_pairs],
            )

    async def aput_all(
        self,
        kv_pairs: list[tuple[str, dict]],
        collection: str = DEFAULT_COLLECTION,
        batch_size: int = 1,
    ) -> None:
        self.put_all(kv_pairs, collection, batch_size)

    def get(self, key: str, collection: str = DEFAULT_COLLECTION) -> dict | None:
        row = (
            self._connect()
            .execute("SELECT value FROM kv WHERE collection = ? AND key = ?", (collection, key))
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    async def aget(self, key: str, collection: str = DEFAULT_COLLECTION) -> dict | None:
        return self.get(key, collection)

    def get_many(self, keys: list[str], collection: str = DEFAULT_COLLECTION) -> list[dict | None]:
        """Values for ``keys`` in their order, in one query (a query returns top_k nodes)."""
        if not keys:
            return []
        marks = ",".join("?" * len(keys))
        rows = self._connect().execute(
            f"SELECT key, value FROM kv WHERE collection = ? AND key IN ({marks})",
            (collection, *keys),
        )
        found = dict(rows.fetchall())
        return [json.loads(found[key]) if key in found else None for key in keys]

    def get_all(self, collection: str = DEFAULT_COLLECTION) -> dict[str, dict]:
        rows = self._connect().execute(
            "SELECT key, value FROM kv WHERE collection = ?", (collection,)
        )
        return {key: json.loads(value) for key, value in rows}

    async def aget_all(self, collection: str = DEFAULT_COLLECTION) -> dict[str, dict]:
        return self.get_all(collection)

    def delete(self, key: str, collection: str = DEFAULT_COLLECTION) -> bool:
        conn = self._connect()
        with conn:
            cursor = conn.execute(
                "DELETE FROM kv WHERE collection = ? AND key = ?", (collection, key)
            )
        return cursor.rowcount > 0

    async def adelete(self, key: str, collection: str = DEFAULT_COLLECTION) -> bool:
        return self.delete(key, collection)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
