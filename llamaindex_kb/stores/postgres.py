"""PostgreSQL + pgvector: knowledge bases that several processes share.

Tables (created on first use)::

    llamaindex_kb_bases        one row per knowledge base: manifest, BM25 corpus statistics,
                               the sums of its unit embeddings per script (centred models)
    llamaindex_kb_documents    DocumentInfo per document
    llamaindex_kb_parents      parent chunks (parent-child chunking): returned, never matched
    llamaindex_kb_chunks_<id>  searchable chunks: node JSON, metadata (jsonb), embedding
                               (vector(dim), HNSW cosine index)
    llamaindex_kb_postings_<id>  the keyword index: per term of our analyzer
                               (text.analyzer.tokenize, so Chinese works without a PostgreSQL
                               parser) and per publish ("segment", at most 4096 rows),
                               the rows holding it with their term frequency and length,
                               packed in a bytea
    llamaindex_kb_vocabulary_<id>  per term: how many rows hold it and its frontier, what
                               the absent-term weight needs (see ``_Vocabulary``)
    llamaindex_kb_records      API keys' and views' records (stores/records.py), by kind and name

A chunks table per knowledge base because an HNSW index needs one fixed dimension;
its name comes from the base's serial id, never from the ``knowledge_id``.

Packed postings rather than a row per occurrence: a query reads one value per term
and segment and scores them with numpy; at 100k chunks, fetching tens of thousands of
occurrence rows cost 150-500 ms a query.

A change costs what it changes: it writes its rows, rewrites only the segments that held
removed rows and the vocabulary rows of the terms it touches, and updates the corpus
statistics from the old ones. Only the absent-term weight reads one small row per term.

Scores equal the embedded store's (``scoring.py``): the BM25 of ``text/bm25.py``,
computed from the postings of the query's terms and the corpus statistics kept per
base; the hybrid top-k found exactly by ``exact_topk.rank``. Writers
hold a transaction-scoped advisory lock per knowledge base and publish in one
transaction, so readers (REPEATABLE READ) see a whole change or none of it.

Faults, as Dify sees them: a server that refuses, stays silent or restarts is a 503
(``StoreUnavailableError``) within ``DEADLINE_S``; a pooled connection the server has
ended is dropped before use, so the first request after a restart succeeds. Wrong
credentials, a missing database or pgvector, and an address where something else
answers (told by a probe that sends PostgreSQL's SSLRequest, never a credential) are
a 400 (``ConfigurationError``) saying so. Messages show the URL redacted.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, NamedTuple

import numpy as np
import psycopg
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc
from psycopg import pq, sql
from psycopg.adapt import Dumper
from psycopg.types.json import Json, Jsonb
from pydantic import TypeAdapter

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    KnowledgeBaseNotFound,
    StoreUnavailableError,
    first_line,
)
from llamaindex_kb.lru import LRU
from llamaindex_kb.redaction import redact_text, redact_url, url_secrets
from llamaindex_kb.scoring import CHILDREN_PER_PARENT, SimilarityScale
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    FindingStore,
    KBManifest,
    Published,
    QueryPlan,
    VectorSums,
    check_publishable,
    merged,
    needs_centroid,
    query_embedding,
    query_scale,
    subtracted,
    vector_sums,
    with_centroids,
)
from llamaindex_kb.stores.exact_topk import (
    Candidates,
    KeywordRanking,
    first_lookup,
    first_window,
    retrieve,
)
from llamaindex_kb.stores.postgres_prefilter import sql_prefilter
from llamaindex_kb.stores.records import Record
from llamaindex_kb.text.analyzer import ANALYZER_VERSION, tokenize
from llamaindex_kb.text.bm25 import (
    Postings,
    TermWeights,
    idf,
    median_best_weight,
    score_terms,
    term_weights,
    weights,
)

CONNECT_TIMEOUT_S = 2  # libpq's minimum
DEADLINE_S = 4.0  # connecting, retries included; and every reader statement
POOL_SIZE = 8
# Per process. At 100k chunks a query's terms hold ~750 KB of postings; kept weighed,
# the common terms of later queries need neither the read nor the arithmetic.
TERM_CACHE_BYTES = 64 * 2**20
STALE_AFTER_S = 5.0  # a pooled connection idle longer is tested before use
_LOCK_CLASS = "llamaindex_kb"
# 1: a row per occurrence (llamaindex_kb_terms_<id>); 2: packed postings, statistics
# recomputed from every posting at each publish (read as 3 is, upgraded by its next
# publish); 3: with the vocabulary table and the vector sums.
_KEYWORD_FORMAT = 3
_READABLE_FORMATS = (2, 3)
_POSTING = np.dtype([("row", "<i8"), ("tf", "<i4"), ("length", "<i4")])
# Postings a segment holds at most (64 KB): what a removed row costs to rewrite. A query
# joins a common term's segments; at 100k chunks the commonest has 13.
_SEGMENT_POSTINGS = 4096
# A frontier point: a term frequency, a row length and how many of the term's rows have
# exactly both.
_POINT = np.dtype([("tf", "<i4"), ("length", "<i4"), ("count", "<i4")])
# Cosine similarity from pgvector's distance; Candidates puts it on the score scale.
_SIMILARITY = sql.SQL("(1 - distance)::float8")

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS llamaindex_kb_bases (
    id bigserial PRIMARY KEY,
    knowledge_id text NOT NULL UNIQUE,
    manifest jsonb NOT NULL,
    analyzer_version int NOT NULL,
    chunk_count bigint NOT NULL DEFAULT 0,
    total_length bigint NOT NULL DEFAULT 0,
    absent_term_weight double precision NOT NULL DEFAULT 0,
    next_row bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS llamaindex_kb_documents (
    base bigint NOT NULL REFERENCES llamaindex_kb_bases ON DELETE CASCADE,
    document_id text NOT NULL,
    info jsonb NOT NULL,
    PRIMARY KEY (base, document_id)
);
CREATE TABLE IF NOT EXISTS llamaindex_kb_parents (
    base bigint NOT NULL REFERENCES llamaindex_kb_bases ON DELETE CASCADE,
    node_id text NOT NULL,
    document_id text NOT NULL,
    node json NOT NULL,
    PRIMARY KEY (base, node_id)
);
CREATE INDEX IF NOT EXISTS llamaindex_kb_parents_document
    ON llamaindex_kb_parents (base, document_id);
ALTER TABLE llamaindex_kb_bases ADD COLUMN IF NOT EXISTS keyword_format int NOT NULL DEFAULT 1;
ALTER TABLE llamaindex_kb_bases ADD COLUMN IF NOT EXISTS vector_sums jsonb;
ALTER TABLE llamaindex_kb_bases ADD COLUMN IF NOT EXISTS readable_sum double precision
    NOT NULL DEFAULT 0;
ALTER TABLE llamaindex_kb_bases ADD COLUMN IF NOT EXISTS readable_known bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS llamaindex_kb_records (
    kind text NOT NULL,
    name text NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (kind, name)
);
"""


@dataclass(frozen=True)
class _Base:
    """A knowledge base's row, read in the transaction that uses it."""

    id: int
    manifest: KBManifest
    chunk_count: int
    total_length: int
    absent_term_weight: float
    keyword_format: int
    # The row's xmin: every publish updates the row in the transaction that changes the
    # base, so (id, version) names one state of its content.
    version: int

    @property
    def chunks(self) -> sql.Identifier:
        return sql.Identifier(f"llamaindex_kb_chunks_{self.id}")

    @property
    def postings(self) -> sql.Identifier:
        return sql.Identifier(f"llamaindex_kb_postings_{self.id}")

    @property
    def vocabulary(self) -> sql.Identifier:
        return sql.Identifier(f"llamaindex_kb_vocabulary_{self.id}")


def from_url(url: str, settings: Settings) -> PostgresStore:
    return PostgresStore(url)


class PostgresStore(FindingStore):
    """Knowledge bases in one PostgreSQL database; a small connection pool per process."""

    searches_in_process = False

    def __init__(self, url: str) -> None:
        self._conninfo = url
        # What logs and messages show: the URL without its password.
        self.url = self._shown = redact_url(url)
        self._secrets = url_secrets(url)
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            # Not chained: libpq's message quotes the part it cannot parse, which may be
            # the password, and a logged traceback would show it.
            raise ConfigurationError(
                f"store URL is not a valid PostgreSQL URL ({self._problem(exc)}); expected "
                "postgresql://user:password@host:5432/database"
            ) from None
        self._idle: list[tuple[psycopg.Connection, float]] = []  # with when it went idle
        self._lock = threading.Lock()
        self._schema_ready = False
        # What each base looked like when last read here: ``open`` hands it out without
        # a transaction of its own, because every query reloads it in its snapshot.
        self._seen: dict[str, _Base] = {}
        self._term_weights: LRU[tuple[int, int, str], TermWeights] = LRU(
            TERM_CACHE_BYTES, weigh=lambda held: held.nbytes + 200)
        self.access_records = _PostgresRecords(self)

    # --- connections --------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        # The HNSW settings every first window uses are session defaults, so a query
        # needs no SET statement of its own.
        conn = connect(self._conninfo, self._shown, self._secrets, autocommit=True,
                       options=f"-c statement_timeout={int(DEADLINE_S * 1000)} "
                               f"-c hnsw.iterative_scan=off -c hnsw.ef_search={_SESSION_EF}")
        conn.adapters.register_dumper(_QueryVector, _QueryVectorDumper)
        return conn

    def _problem(self, exc: BaseException) -> str:
        """The first line of a driver's message, without the URL's secrets: libpq quotes
        the parts of a URL it cannot parse, password included."""
        return redact_text(first_line(exc), self._secrets)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[psycopg.Cursor]:
        """A cursor in one transaction: readers see one snapshot, writers commit at once."""
        self._ensure_schema()
        conn = self._checkout()
        try:
            with _translated_errors(self._shown, self._secrets):
                if write:
                    with conn.transaction(), conn.cursor() as cur:
                        # Writers wait for each other (like flock) and may copy many rows.
                        cur.execute("SET LOCAL statement_timeout = 0")
                        yield cur
                else:
                    with conn.pipeline(), conn.cursor() as cur:
                        yield from _reading(cur)
        finally:
            # Reused only when the transaction ended cleanly (committed or rolled back).
            idle = psycopg.pq.TransactionStatus.IDLE
            if not conn.closed and conn.info.transaction_status == idle:
                with self._lock:
                    if len(self._idle) < POOL_SIZE:
                        self._idle.append((conn, time.monotonic()))
                        conn = None
            if conn is not None:
                conn.close()

    def _checkout(self) -> psycopg.Connection:
        """A pooled connection that still works, else a new one.

        A connection idle for a while may have been closed by the server (a restart,
        an idle timeout, an administrator): it is tested first, so the request after
        a database restart succeeds instead of answering 503. One the server has
        already written to is dropped at once, however recently it was used.
        """
        while True:
            with self._lock:
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._connect()
            if conn.closed or _spoken_to(conn):
                conn.close()
                continue
            if time.monotonic() - since < STALE_AFTER_S:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.close()

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        conn = self._connect()
        try:
            with (_translated_errors(self._shown, self._secrets), conn.transaction(),
                  conn.cursor() as cur):
                # Concurrent CREATE ... IF NOT EXISTS can still collide: serialise them.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_LOCK_CLASS])
                cur.execute(_SCHEMA)
        finally:
            conn.close()
        self._schema_ready = True

    # --- KnowledgeStore -----------------------------------------------------------

    def find(self, knowledge_id: str) -> PostgresKnowledgeBase | None:
        with self._transaction() as cur:
            base = self._reload(cur, knowledge_id)
        return None if base is None else PostgresKnowledgeBase(self, knowledge_id, base)

    def open(self, knowledge_id: str) -> PostgresKnowledgeBase:
        """The base as last seen, else as found; a query or listing made with it checks
        in its own snapshot that the base still exists (and is the same one)."""
        base = self._seen.get(knowledge_id)
        if base is None:
            return super().open(knowledge_id)
        return PostgresKnowledgeBase(self, knowledge_id, base)

    def _reload(self, cur: psycopg.Cursor, knowledge_id: str) -> _Base | None:
        base = _load_base(cur, knowledge_id)
        if base is None:
            self._seen.pop(knowledge_id, None)
        else:
            self._seen[knowledge_id] = base
        return base

    def manifests(self) -> list[KBManifest]:
        with self._transaction() as cur:
            cur.execute("SELECT manifest FROM llamaindex_kb_bases")
            found = [KBManifest.model_validate(row[0]) for row in cur.fetchall()]
        # Sorted here: the database's collation may order ids differently from Python.
        return sorted(found, key=lambda manifest: manifest.knowledge_id)

    def publish(self, knowledge_id: str, change: Change) -> Published:
        with self._transaction(write=True) as cur:
            _lock_base(cur, knowledge_id)
            base = _load_base(cur, knowledge_id, any_format=change.replace)
            if base is not None and change.replace:
                _drop_base(cur, base)
                base = None
            check_publishable(base.manifest if base is not None else None, change)
            created = base is None
            if base is None:
                base = _create_base(cur, knowledge_id, change.manifest)
            elif base.keyword_format != _KEYWORD_FORMAT:
                _upgrade(cur, base)
            centred = needs_centroid(change.manifest)
            replaced = sorted(set(change.documents) | change.removed)
            cur.execute("SELECT count(*) FROM llamaindex_kb_documents WHERE base = %s "
                        "AND document_id = ANY(%s)", [base.id, sorted(change.removed)])
            removed = int(cur.fetchone()[0])
            # Read before the change: None when not kept yet (a base made by format 2).
            kept = _kept_vector_sums(cur, base) if centred else None
            vocabulary = _Vocabulary(cur, base)
            cur.execute("SELECT readable_sum, readable_known FROM llamaindex_kb_bases "
                        "WHERE id = %s", [base.id])
            readable_sum, readable_known = cur.fetchone()
            gone = _remove_documents(cur, base, replaced, vocabulary, centred)
            added, added_length = _add_chunks(cur, base, change.chunks, change.vectors,
                                              change.readable, vocabulary)
            vocabulary.write()
            if created and change.manifest.embedding is not None:
                _create_vector_index(cur, base)
            _add_parents_and_documents(cur, base, change.parents, change.documents)
            chunk_count = base.chunk_count - gone.chunks + added
            total_length = base.total_length - gone.length + added_length
            # Every publish recorded the exact count in the manifest, under this lock.
            documents = ((0 if created else base.manifest.documents or 0) - gone.documents
                         + len(change.documents))
            sums: VectorSums = {}
            if centred:
                left = None if kept is None else subtracted(kept, gone.vector_sums)
                sums = (_all_vector_sums(cur, base) if left is None
                        else merged(left, vector_sums(change.vectors)))
            # Each chunk's readable share is kept: the manifest gets the mean of the chunks
            # left once every one's is known (rows of older versions have none).
            readable_sum += (0.0 if change.readable is None else float(change.readable.sum())
                             ) - gone.readable_sum
            readable_known += (0 if change.readable is None else added) - gone.readable_known
            update = {"documents": documents, "chunks": chunk_count, "updated_at": time.time()}
            if chunk_count and readable_known == chunk_count:
                # Rounded: sums of the same shares in other orders differ in the last bits.
                update["readable_share"] = round(readable_sum / chunk_count, 9)
            manifest = with_centroids(change.manifest.model_copy(update=update), sums)
            cur.execute(
                "UPDATE llamaindex_kb_bases SET manifest = %s, chunk_count = %s, "
                "total_length = %s, absent_term_weight = %s, vector_sums = %s, "
                "readable_sum = %s, readable_known = %s WHERE id = %s",
                [Jsonb(manifest.model_dump(mode="json")), chunk_count, total_length,
                 _absent_term_weight(cur, base, chunk_count, total_length),
                 Jsonb(_sums_json(sums)) if centred else None,
                 readable_sum if readable_known else 0.0, readable_known, base.id],
            )
        self._seen.pop(knowledge_id, None)
        return Published(documents=documents, chunks=chunk_count, removed=removed)

    def drop(self, knowledge_id: str) -> None:
        with self._transaction(write=True) as cur:
            _lock_base(cur, knowledge_id)
            base = _load_base(cur, knowledge_id, any_format=True)
            if base is None:
                raise KnowledgeBaseNotFound.missing(knowledge_id)
            _drop_base(cur, base)
        self._seen.pop(knowledge_id, None)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


class _PostgresRecords:
    """API keys' and views' records in ``llamaindex_kb_records``: every process using the
    database sees a change at its commit. Each operation is one statement, so concurrent
    processes need no lock: the primary key refuses a second add, and an update of a row
    another process deleted matches nothing."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def records(self, kind: str) -> dict[str, Record]:
        with self._store._transaction() as cur:
            cur.execute("SELECT name, record FROM llamaindex_kb_records WHERE kind = %s",
                        [kind])
            return dict(cur.fetchall())

    def add_record(self, kind: str, name: str, record: Record) -> bool:
        with self._store._transaction(write=True) as cur:
            cur.execute("INSERT INTO llamaindex_kb_records (kind, name, record) "
                        "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                        [kind, name, Jsonb(record)])
            return cur.rowcount == 1

    def update_record(self, kind: str, name: str, changes: Record) -> bool:
        with self._store._transaction(write=True) as cur:
            # jsonb || merges top-level fields in the row itself, not a copy read earlier.
            cur.execute("UPDATE llamaindex_kb_records SET record = record || %s::jsonb "
                        "WHERE kind = %s AND name = %s", [Jsonb(changes), kind, name])
            return cur.rowcount == 1

    def remove_record(self, kind: str, name: str) -> bool:
        with self._store._transaction(write=True) as cur:
            cur.execute("DELETE FROM llamaindex_kb_records WHERE kind = %s AND name = %s",
                        [kind, name])
            return cur.rowcount == 1


_DOCUMENTS = TypeAdapter(dict[str, DocumentInfo])


class PostgresKnowledgeBase:
    """A handle on one knowledge base; every query reads one consistent snapshot."""

    def __init__(self, store: PostgresStore, knowledge_id: str, base: _Base) -> None:
        self._store = store
        self.knowledge_id = knowledge_id
        self._base = base

    @property
    def manifest(self) -> KBManifest:
        return self._base.manifest

    @cached_property
    def documents(self) -> dict[str, DocumentInfo]:
        with self._store._transaction() as cur:
            base = self._current(cur)
            # One JSON object, validated by pydantic in one call: record by record, with
            # psycopg's json.loads, 20k documents took 0.4 s, this 0.15 s.
            cur.execute("SELECT '{' || string_agg(to_json(document_id)::text || ':' || "
                        "info::text, ',') || '}' FROM llamaindex_kb_documents "
                        "WHERE base = %s", [base.id])
            return _DOCUMENTS.validate_json(cur.fetchone()[0] or "{}")

    def document(self, document_id: str) -> DocumentInfo | None:
        with self._store._transaction() as cur:
            base = self._current(cur)
            cur.execute("SELECT info FROM llamaindex_kb_documents WHERE base = %s "
                        "AND document_id = %s", [base.id, document_id])
            row = cur.fetchone()
        return None if row is None else DocumentInfo.model_validate(row[0])

    def __len__(self) -> int:
        return self._base.chunk_count

    def _current(self, cur: psycopg.Cursor) -> _Base:
        """The base as this transaction sees it: the handle may be older."""
        base = self._store._reload(cur, self.knowledge_id)
        if base is None:
            raise KnowledgeBaseNotFound.missing(self.knowledge_id)
        return base

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]:
        if not plan.query.strip():
            return []
        # Embedded first, alone: on two cores, reading the keyword side meanwhile slowed
        # the model by more than the read took, and no snapshot is held while a remote
        # embedding model answers.
        weight, vector = query_embedding(plan, self.manifest, embed_model)
        with self._store._transaction() as cur:
            base = self._current(cur)
            if base.id != self._base.id or base.manifest.embedding != self.manifest.embedding:
                # Rebuilt since this handle was made: the query may need another embedding.
                return PostgresKnowledgeBase(self._store, self.knowledge_id, base).retrieve(
                    plan, embed_model)
            if base.chunk_count == 0:
                return []
            search = _Search(cur, base, plan, _QueryVector(vector) if vector is not None else None,
                             query_scale(base.manifest, vector))
            parent_child = base.manifest.chunking.get("mode") == "parent_child"
            want = plan.top_k * (CHILDREN_PER_PARENT if parent_child else 1)
            keyword_side = _KeywordSide(self._store._term_weights, cur, base,
                                        tokenize(plan.query) if weight < 1.0 else [])
            # The keyword side is scored while the database walks the HNSW graph.
            with cur.connection.pipeline():
                if weight > 0.0:
                    search.send_window(first_window(want))
                keyword = keyword_side.ranking()
                if weight < 1.0:
                    search.send_lookup(keyword.best(first_lookup(want)))
            return retrieve(search, keyword, weight, plan, parent_child)


class _Search:
    """One query's candidates (exact_topk.CandidateSource) in one read transaction."""

    def __init__(self, cur: psycopg.Cursor, base: _Base, plan: QueryPlan,
                 query_vector: _QueryVector | None, scale: SimilarityScale) -> None:
        self.cur, self.base, self.query_vector, self.scale = cur, base, query_vector, scale
        pushdown = sql_prefilter(plan.predicate) if plan.predicate is not None else None
        self.filtered = pushdown is not None
        self.with_metadata = plan.predicate is not None
        where, self.where_params = pushdown if pushdown is not None else ("TRUE", [])
        self.sql = _search_sql(base.chunks.as_string(), self.with_metadata, where,
                               query_vector is not None)
        # Queries sent ahead (send_window, send_lookup), read when rank asks for them.
        self._window: tuple[int, psycopg.Cursor] | None = None
        self._lookup: psycopg.Cursor | None = None
        self._sent: set[int] = set()  # the rows send_lookup asked for...
        self._ahead = Candidates.of([], self.with_metadata)  # ...and the answer
        self._iterating = False  # hnsw.iterative_scan is on in this transaction

    def send_window(self, n: int) -> None:
        """Send the query of ``nearest(n)`` now (in pipeline mode: without waiting)."""
        self._window = (n, self._send_nearest(self.cur.connection.cursor(), n,
                                              self._first_scan(n)))

    def send_lookup(self, rows: Sequence[int]) -> None:
        """Send the query of ``lookup(rows)`` now (in pipeline mode: without waiting)."""
        self._sent = set(rows)
        self._lookup = self._send_lookup(self.cur.connection.cursor(), rows)

    def nearest(self, n: int) -> Candidates:
        assert self.query_vector is not None, "a vector window needs a query vector"
        scan = self._first_scan(n)
        if self._window is not None and self._window[0] == n:
            found = self._candidates(self._window[1])
            self._window = None
        else:
            found = self._candidates(self._send_nearest(self.cur, n, scan))
        # A short window is the end only when it could not have held more. Otherwise
        # the walk met rows it had to drop (filtered out, or deleted and not yet
        # vacuumed): iterating goes on past them, in exact distance order, up to
        # hnsw.max_scan_tuples rows (20k by default); an ORDER BY the index cannot
        # serve ranks every matching row exactly.
        for fallback in _FALLBACKS[scan]:
            if found.rows.size >= n or (not self.filtered and n >= self.base.chunk_count):
                break
            found = self._candidates(self._send_nearest(self.cur, n, fallback))
        return found

    def _first_scan(self, n: int) -> _Scan:
        """Walk the graph plainly when ef_search rows hold the window and none can drop
        out: an iterative scan returns the same rows, 0.3 ms later at 100k chunks."""
        return "iterate" if self.filtered or _ef_search(n) < n else "walk"

    def _send_nearest(self, cur: psycopg.Cursor, n: int, scan: _Scan) -> psycopg.Cursor:
        # The HNSW scan returns rows in exact distance order, so the last row of a full
        # window bounds every row not yet seen.
        if scan == "iterate" and not self._iterating:
            cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            self._iterating = True
        if (ef := _ef_search(n)) != _SESSION_EF:
            cur.execute(f"SET LOCAL hnsw.ef_search = {ef}")
        if self.filtered:
            # A filtered window walks the graph (its cost bounded by hnsw.max_scan_tuples
            # at any size), unless the planner, guessing the filter rare, prefers to
            # read and sort the whole table. The exact fallback has no other way.
            cur.execute(f"SET LOCAL enable_seqscan = {'on' if scan == 'exact' else 'off'}")
        cur.execute(self.sql.exact_window if scan == "exact" else self.sql.window,
                    [self.query_vector, *self.where_params, n], binary=True)
        return cur

    def lookup(self, rows: Sequence[int]) -> Candidates:
        if self._lookup is not None:
            self._ahead = self._candidates(self._lookup)
            self._lookup = None
        found = [self._ahead.where(np.isin(self._ahead.rows, rows))]
        if rest := [row for row in rows if row not in self._sent]:
            found.append(self._candidates(self._send_lookup(self.cur, rest)))
        return Candidates.joined(found)

    def _candidates(self, cur: psycopg.Cursor) -> Candidates:
        return Candidates.of(cur.fetchall(), self.with_metadata, self.scale)

    def _send_lookup(self, cur: psycopg.Cursor, rows: Sequence[int]) -> psycopg.Cursor:
        cur.execute(self.sql.lookup,
                    [*([self.query_vector] if self.query_vector is not None else []),
                     _array_text(rows), *self.where_params], binary=True)
        return cur

    def nodes(self, rows: Sequence[int]) -> list[BaseNode]:
        self.cur.execute(self.sql.nodes, [_array_text(rows)])
        by_row = {row: json_to_doc(node) for row, node in self.cur.fetchall()}
        return [by_row[row] for row in rows]

    def parents(self, chosen: list[tuple[str, float]]) -> list[NodeWithScore]:
        self.cur.execute("SELECT node_id, node FROM llamaindex_kb_parents WHERE base = %s "
                         "AND node_id = ANY(%s)", [self.base.id, [p for p, _ in chosen]])
        parents = {node_id: json_to_doc(node) for node_id, node in self.cur.fetchall()}
        return [NodeWithScore(node=parents[parent_id], score=score)
                for parent_id, score in chosen if parent_id in parents]


_Scan = Literal["walk", "iterate", "exact"]
# What a short window tries next, in order.
_FALLBACKS: dict[_Scan, tuple[_Scan, ...]] = {"walk": ("iterate", "exact"),
                                              "iterate": ("exact",), "exact": ()}


class _SearchSQL(NamedTuple):
    window: bytes  # nearest rows, by the HNSW index
    exact_window: bytes  # the same, ranked exactly (an ORDER BY no index serves)
    lookup: bytes  # given rows
    nodes: bytes


@functools.lru_cache(maxsize=256)
def _search_sql(chunks: str, metadata: bool, where: str, vector: bool) -> _SearchSQL:
    """A search's statements, composed once per table, filter shape and mode: composing
    took 0.08 ms a statement, a few percent of a query's time in the store."""
    # Without a condition nobody reads the metadata: parsing it was a third of the time
    # of a hybrid query that looks up hundreds of keyword rows.
    values = {"similarity": _SIMILARITY, "chunks": sql.SQL(chunks), "where": sql.SQL(where),
              "metadata": sql.SQL("metadata" if metadata else "NULL"),
              "distance": sql.SQL("embedding <=> %s::vector" if vector else "1.0")}
    # The subquery names the distance once (the vector is sent once); PostgreSQL pulls
    # it up, so ORDER BY distance still walks the HNSW index.
    window = ("SELECT row, {similarity}, metadata FROM (SELECT row, {distance} AS distance, "
              "{metadata} AS metadata FROM {chunks} WHERE {where}) chunks ORDER BY {order} "
              "LIMIT %s")
    # Rows the condition's exact part rules out are left out: they cannot pass.
    lookup = ("SELECT row, {similarity}, metadata FROM (SELECT row, {distance} AS distance, "
              "{metadata} AS metadata FROM {chunks} WHERE row = ANY(%s::bigint[]) AND "
              "{where}) chosen")
    return _SearchSQL(
        window=sql.SQL(window).format(order=sql.SQL("distance"), **values).as_bytes(),
        exact_window=sql.SQL(window).format(order=sql.SQL("distance + 0"), **values).as_bytes(),
        lookup=sql.SQL(lookup).format(**values).as_bytes(),
        nodes=sql.SQL("SELECT row, node FROM {} WHERE row = ANY(%s::bigint[])").format(
            sql.SQL(chunks)).as_bytes())


def _reading(cur: psycopg.Cursor) -> Iterator[psycopg.Cursor]:
    """A read-only transaction on a connection in pipeline mode, said in statements of
    its own so they share round trips: the BEGIN travels with the first query, the
    COMMIT with the Sync that ends the pipeline."""
    cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield cur
    except BaseException:
        # Skipped if a statement failed: the pipeline is aborted, the connection is left
        # in a failed transaction and is closed rather than pooled.
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


# --- keyword index -------------------------------------------------------------------


class _KeywordSide:
    """A query's keyword ranking, from its terms' BM25 weights in this state of the base.

    Weights are kept between queries under (base id, version, term): a publish gives
    the base a new version, so a kept weight is never stale, only unused. Postings are
    read at once; weighing them and scoring wait for ``ranking``, which the query calls
    while the database walks the HNSW graph.
    """

    def __init__(self, kept: LRU[tuple[int, int, str], TermWeights], cur: psycopg.Cursor,
                 base: _Base, terms: list[str]) -> None:
        self._kept, self._base, self._terms = kept, base, terms
        self._weights: dict[str, TermWeights] = {}
        missing = []
        for term in sorted(set(terms)):
            held = kept.get((base.id, base.version, term))
            if held is None:
                missing.append(term)
            else:
                self._weights[term] = held
        self._read: dict[str, Postings] = {}
        if missing:
            # Fetched here, not sent ahead in the pipeline: a fetch in pipeline mode
            # waits for every query sent before it, the HNSW window included.
            cur.execute(sql.SQL("SELECT term, postings FROM {} WHERE term = ANY(%s)")
                        .format(base.postings), [missing], binary=True)
            stored = _unpack(cur.fetchall())
            # A term no row holds is kept too (as empty): it costs no read next time.
            self._read = {term: stored.get(term, _NO_POSTINGS) for term in missing}

    def ranking(self) -> KeywordRanking:
        base = self._base
        for term, postings in self._read.items():
            held = term_weights(postings, base.chunk_count, base.total_length)
            self._kept.put((base.id, base.version, term), held)
            self._weights[term] = held
        self._read = {}
        if not self._terms:
            return KeywordRanking.empty()
        return KeywordRanking(*score_terms(self._terms, self._weights, base.absent_term_weight))


def _unpack(stored: Iterable[tuple[str, bytes]]) -> dict[str, Postings]:
    """Each term's segments joined into one Postings."""
    packed: dict[str, list[bytes]] = {}
    for term, blob in stored:
        packed.setdefault(term, []).append(blob)
    return {term: _joined(blobs) for term, blobs in packed.items()}


def _joined(blobs: list[bytes]) -> Postings:
    array = np.frombuffer(b"".join(blobs), dtype=_POSTING)
    return Postings(array["row"], array["tf"], array["length"])


_NO_POSTINGS = _joined([])


def _pack(rows: Sequence[tuple[int, int, int]]) -> bytes:
    return np.asarray(rows, dtype=_POSTING).tobytes()


def _frontier(points: np.ndarray) -> np.ndarray:
    """The points (``_POINT``) no other beats at every average length, identical points
    counted together: a term's best BM25 weight, for any corpus statistics, is at one
    of them, since a higher term frequency and a shorter row each weigh more.

    Ordered by length, then by term frequency descending: a point is kept when its
    frequency beats every shorter (or equally long) row's."""
    if not points.size:
        return points
    ordered = points[np.lexsort((-points["tf"].astype(np.int64), points["length"]))]
    tf, length = ordered["tf"], ordered["length"]
    starts = np.flatnonzero(np.r_[True, (tf[1:] != tf[:-1]) | (length[1:] != length[:-1])])
    distinct = ordered[starts]
    distinct["count"] = np.add.reduceat(ordered["count"], starts)
    best = np.maximum.accumulate(distinct["tf"])
    return distinct[np.r_[True, distinct["tf"][1:] > best[:-1]]]


def _points(tfs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Occurrences as frontier candidates, one each."""
    points = np.ones(len(tfs), _POINT)
    points["tf"], points["length"] = tfs, lengths
    return points


def _postings_frontier(postings: Postings) -> np.ndarray:
    return _frontier(_points(postings.tfs, postings.lengths))


_NO_POINTS = np.zeros(0, _POINT)


class _Vocabulary:
    """The terms a change touches, as the vocabulary table holds them: how many rows
    hold each (its document frequency) and its frontier (``_frontier``).

    Enough for every term's best weight, so the absent-term weight (the median of the
    bests, which move with every change of the corpus statistics) reads one small row
    per term instead of every posting. Removing a row takes it from its terms' counts;
    only a term that loses the last row at one of its frontier points reads its
    postings again. Loaded as touched, written once by ``write``.
    """

    def __init__(self, cur: psycopg.Cursor, base: _Base) -> None:
        self._cur, self._base = cur, base
        self._terms: dict[str, tuple[int, np.ndarray]] = {}
        self._stale: set[str] = set()  # frontiers that lost a point: ``recount``

    def _load(self, terms: Iterable[str]) -> None:
        missing = [term for term in terms if term not in self._terms]
        if not missing:
            return
        self._cur.execute(sql.SQL("SELECT term, df, frontier FROM {} WHERE term = ANY(%s)")
                          .format(self._base.vocabulary), [missing], binary=True)
        found = {term: (df, np.frombuffer(blob, _POINT))
                 for term, df, blob in self._cur.fetchall()}
        for term in missing:
            self._terms[term] = found.get(term, (0, _NO_POINTS))

    def remove(self, occurrences: dict[str, list[tuple[int, int, int]]]) -> None:
        """Take these (row, tf, length) occurrences out, before their postings go."""
        self._load(occurrences)
        for term, held in occurrences.items():
            df, frontier = self._terms[term]
            frontier = frontier.copy()
            for _, tf, length in held:
                frontier["count"][(frontier["tf"] == tf) & (frontier["length"] == length)] -= 1
            if df > len(held) and not frontier["count"].all():
                self._stale.add(term)
            self._terms[term] = (df - len(held), frontier[frontier["count"] > 0])

    def recount(self) -> None:
        """Rebuild the frontiers that lost a point from the postings left (after
        ``remove``'s rows are gone from them, before any new rows come)."""
        if not self._stale:
            return
        self._cur.execute(sql.SQL("SELECT term, postings FROM {} WHERE term = ANY(%s)")
                          .format(self._base.postings), [sorted(self._stale)], binary=True)
        for term, postings in _unpack(self._cur.fetchall()).items():
            self._terms[term] = (postings.rows.size, _postings_frontier(postings))
        self._stale.clear()

    def add(self, occurrences: dict[str, list[tuple[int, int, int]]]) -> None:
        """Count these (row, tf, length) occurrences in."""
        self._load(occurrences)
        for term, held in occurrences.items():
            df, frontier = self._terms[term]
            added = np.asarray(held, dtype=np.int64).reshape(-1, 3)
            self._terms[term] = (df + len(held), _frontier(np.concatenate(
                [frontier, _points(added[:, 1], added[:, 2])])))

    def write(self) -> None:
        if not self._terms:
            return
        self._cur.execute(sql.SQL("DELETE FROM {} WHERE term = ANY(%s)").format(
            self._base.vocabulary), [sorted(self._terms)])
        _copy_vocabulary(self._cur, self._base, (
            (term, df, frontier) for term, (df, frontier) in self._terms.items() if df))


def _copy_vocabulary(cur: psycopg.Cursor, base: _Base,
                     terms: Iterable[tuple[str, int, np.ndarray]]) -> None:
    with cur.copy(sql.SQL("COPY {} (term, df, frontier) FROM STDIN (FORMAT BINARY)")
                  .format(base.vocabulary)) as copy:
        copy.set_types(["text", "int4", "bytea"])
        for term, df, frontier in terms:
            copy.write_row((term, df, frontier.tobytes()))


def _absent_term_weight(cur: psycopg.Cursor, base: _Base, n: int, total_length: int) -> float:
    """text.bm25.best_term_weights over the whole vocabulary, from its frontiers: each
    term's best weight is at a point of its frontier. Aggregated in the database into
    three values, so no row of the vocabulary costs a Python object."""
    if total_length == 0:
        return 0.0
    cur.execute(sql.SQL("SELECT string_agg(int4send(df), ''), "
                        "string_agg(int4send(octet_length(frontier)), ''), "
                        "string_agg(frontier, '') FROM {}").format(base.vocabulary),
                binary=True)
    packed_dfs, packed_sizes, frontiers = cur.fetchone()
    if packed_dfs is None:
        return 0.0
    dfs = np.frombuffer(packed_dfs, ">i4").tolist()
    sizes = np.frombuffer(packed_sizes, ">i4") // _POINT.itemsize  # points per term
    points = np.frombuffer(frontiers, _POINT)
    # idf per distinct document frequency: math.log, as bm25.idf takes it, not np.log.
    idfs = {df: idf(df, n) for df in set(dfs)}
    term_idf = np.repeat(np.array([idfs[df] for df in dfs]), sizes)
    # The same float operations as bm25.weights does term by term, so the same bests.
    held = weights(points["tf"], points["length"], term_idf, total_length / n)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    return median_best_weight(np.maximum.reduceat(held, starts))


# --- writing -----------------------------------------------------------------------


def _lock_base(cur: psycopg.Cursor, knowledge_id: str) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
                [_LOCK_CLASS, knowledge_id])


def _load_base(cur: psycopg.Cursor, knowledge_id: str, *, any_format: bool = False
               ) -> _Base | None:
    """The base's row; one indexed by another version is refused unless ``any_format``
    (dropping or replacing it is how a user moves on)."""
    cur.execute("SELECT id, manifest, analyzer_version, keyword_format, chunk_count, "
                "total_length, absent_term_weight, xmin::text::bigint FROM llamaindex_kb_bases "
                "WHERE knowledge_id = %s", [knowledge_id])
    row = cur.fetchone()
    if row is None:
        return None
    base_id, manifest, analyzer, keyword_format, chunk_count, total_length, absent, version = row
    if not any_format and (analyzer != ANALYZER_VERSION
                           or keyword_format not in _READABLE_FORMATS):
        raise ConfigurationError(
            f"knowledge base {knowledge_id!r} was indexed by an older version of "
            f"llamaindex_kb (keyword analyzer {analyzer}, index format {keyword_format}; "
            f"this version uses {ANALYZER_VERSION} and {_KEYWORD_FORMAT}): drop it and "
            "ingest its documents again"
        )
    return _Base(base_id, KBManifest.model_validate(manifest), chunk_count, total_length,
                 absent, keyword_format, version)


def _create_base(cur: psycopg.Cursor, knowledge_id: str, manifest: KBManifest) -> _Base:
    cur.execute("INSERT INTO llamaindex_kb_bases (knowledge_id, manifest, analyzer_version, "
                "keyword_format, vector_sums) VALUES (%s, %s, %s, %s, '{}') RETURNING id",
                [knowledge_id, Jsonb(manifest.model_dump(mode="json")), ANALYZER_VERSION,
                 _KEYWORD_FORMAT])
    base = _Base(int(cur.fetchone()[0]), manifest, 0, 0, 0.0, _KEYWORD_FORMAT, 0)
    embedding = sql.SQL("")
    if manifest.embedding is not None:
        embedding = sql.SQL(", embedding vector({}) NOT NULL").format(
            sql.Literal(int(manifest.embedding.dimension)))
    cur.execute(sql.SQL(
        "CREATE TABLE {chunks} (row bigint PRIMARY KEY, node_id text NOT NULL, "
        "document_id text NOT NULL, length int NOT NULL, metadata jsonb NOT NULL, "
        "node json NOT NULL, readable float8{embedding}); "
        "CREATE INDEX ON {chunks} (document_id); "
        "CREATE TABLE {postings} (term text NOT NULL, segment bigint NOT NULL, "
        "postings bytea NOT NULL, PRIMARY KEY (term, segment))").format(
            chunks=base.chunks, postings=base.postings, embedding=embedding))
    _create_vocabulary(cur, base)
    # Postings are packed integers that pglz barely shrinks: stored uncompressed, a
    # query reads them without decompressing.
    cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN postings SET STORAGE EXTERNAL")
                .format(base.postings))
    if manifest.embedding is not None:
        # The vector stays in the row and the node JSON is what TOAST moves out: a
        # hybrid query reads hundreds of similarities by row, and a toasted vector cost
        # five buffer reads each instead of one.
        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN embedding SET STORAGE MAIN")
                    .format(base.chunks))
    return base


def _create_vocabulary(cur: psycopg.Cursor, base: _Base) -> None:
    cur.execute(sql.SQL("CREATE TABLE {} (term text PRIMARY KEY, df int NOT NULL, "
                        "frontier bytea NOT NULL)").format(base.vocabulary))


def _upgrade(cur: psycopg.Cursor, base: _Base) -> None:
    """Give a base of format 2 its vocabulary table, from one pass over its postings
    (what each of its publishes used to read), and leave its vector sums to be added
    up by this publish. Its postings and chunks stay as they are."""
    _create_vocabulary(cur, base)
    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS readable float8").format(
        base.chunks))
    with cur.connection.cursor(name="llamaindex_kb_vocabulary", binary=True) as stored:
        stored.itersize = 2000
        stored.execute(sql.SQL("SELECT term, postings FROM {} ORDER BY term").format(
            base.postings))
        # Listed first: a COPY holds the connection the cursor reads through.
        summaries = list(_summaries(stored))
    _copy_vocabulary(cur, base, summaries)
    cur.execute("UPDATE llamaindex_kb_bases SET keyword_format = %s, vector_sums = NULL "
                "WHERE id = %s", [_KEYWORD_FORMAT, base.id])


def _summaries(stored: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, int, np.ndarray]]:
    """(term, document frequency, frontier) from (term, segment blob) rows ordered by term."""
    term, blobs = None, []
    # A last row of no term ends the last term.
    for next_term, blob in itertools.chain(stored, [(None, b"")]):
        if next_term != term and blobs:
            postings = _joined(blobs)
            yield term, postings.rows.size, _postings_frontier(postings)
            blobs = []
        term = next_term
        blobs.append(blob)


def _create_vector_index(cur: psycopg.Cursor, base: _Base) -> None:
    """Built after a new base's first rows: a bulk HNSW build is far faster than
    inserting 100k rows one by one into an existing index."""
    cur.execute("SET LOCAL maintenance_work_mem = '512MB'")
    cur.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)")
                .format(base.chunks))


def _drop_base(cur: psycopg.Cursor, base: _Base) -> None:
    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}, {}, {}").format(
        base.postings, sql.Identifier(f"llamaindex_kb_terms_{base.id}"), base.chunks,
        base.vocabulary))
    cur.execute("DELETE FROM llamaindex_kb_bases WHERE id = %s", [base.id])


class _Gone(NamedTuple):
    """What a change removed: chunks, their total length, documents, the chunks' vector
    sums (when the base keeps them)."""

    chunks: int
    length: int
    documents: int
    vector_sums: VectorSums
    readable_sum: float
    readable_known: int


def _remove_documents(cur: psycopg.Cursor, base: _Base, document_ids: list[str],
                      vocabulary: _Vocabulary, centred: bool) -> _Gone:
    """Delete the documents' chunks, postings, parents and records."""
    embedding = sql.SQL(", vector_send(embedding)" if centred else "")
    cur.execute(sql.SQL("DELETE FROM {} WHERE document_id = ANY(%s) RETURNING row, length, "
                        "node, readable{}").format(base.chunks, embedding), [document_ids],
                binary=True)
    gone = cur.fetchall()
    if gone:
        # The analyzer is deterministic (and versioned), so a chunk's text tells which
        # terms' postings hold it, and how often.
        occurrences: dict[str, list[tuple[int, int, int]]] = {}
        for row, length, node, *_ in gone:
            for term, tf in Counter(tokenize(json_to_doc(node).get_content())).items():
                occurrences.setdefault(term, []).append((row, tf, length))
        vocabulary.remove(occurrences)
        _rewrite_postings(cur, base, occurrences)
        vocabulary.recount()
    cur.execute("DELETE FROM llamaindex_kb_parents WHERE base = %s AND document_id = ANY(%s)",
                [base.id, document_ids])
    cur.execute("DELETE FROM llamaindex_kb_documents WHERE base = %s AND document_id = ANY(%s)",
                [base.id, document_ids])
    documents = cur.rowcount
    shares = [share for _, _, _, share, *_ in gone if share is not None]
    return _Gone(len(gone), sum(length for _, length, *_ in gone), documents,
                 vector_sums(_vectors([blob for *_, blob in gone])) if centred else {},
                 float(sum(shares)), len(shares))


def _rewrite_postings(cur: psycopg.Cursor, base: _Base,
                      occurrences: dict[str, list[tuple[int, int, int]]]) -> None:
    """Take the removed rows out of the segments holding them; empty segments go.

    A segment is named by its first row, and holds rows up to the next segment's name
    (a publish adds consecutive rows, in segments of consecutive rows): the segment of
    a term holding a row is the term's last segment named at or before it. Only those
    are read and rewritten, however many rows the term holds."""
    terms = [term for term, held in occurrences.items() for _ in held]
    rows = [row for held in occurrences.values() for row, _, _ in held]
    cur.execute(sql.SQL(
        "SELECT term, segment, postings FROM {postings} WHERE (term, segment) IN ("
        "SELECT removed.term, (SELECT max(segment) FROM {postings} holding "
        "WHERE holding.term = removed.term AND holding.segment <= removed.row) "
        "FROM unnest(%s::text[], %s::bigint[]) AS removed (term, row))").format(
            postings=base.postings), [terms, rows], binary=True)
    updates, emptied = [], []
    for term, segment, blob in cur.fetchall():
        postings = np.frombuffer(blob, dtype=_POSTING)
        kept = postings[~np.isin(postings["row"], [row for row, _, _ in occurrences[term]])]
        if kept.size:
            updates.append((kept.tobytes(), term, segment))
        else:
            emptied.append((term, segment))
    if updates:
        cur.executemany(sql.SQL("UPDATE {} SET postings = %s WHERE term = %s AND segment = %s")
                        .format(base.postings), updates)
    if emptied:
        cur.executemany(sql.SQL("DELETE FROM {} WHERE term = %s AND segment = %s")
                        .format(base.postings), emptied)


def _vectors(blobs: Sequence[bytes]) -> np.ndarray | None:
    """Embeddings from pgvector's binary form (``vector_send``): a 2-byte dimension, 2
    unused bytes, then big-endian float32 values."""
    if not blobs:
        return None
    dimension = struct.unpack(">H", blobs[0][:2])[0]
    packed = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
    return packed[:, 4:].copy().view(">f4").astype(np.float32).reshape(-1, dimension)


def _kept_vector_sums(cur: psycopg.Cursor, base: _Base) -> VectorSums | None:
    """The sums of the base's unit embeddings per script as the last publish left them;
    None if it did not keep them (a base made by an older version)."""
    cur.execute("SELECT vector_sums FROM llamaindex_kb_bases WHERE id = %s", [base.id])
    kept = cur.fetchone()[0]
    if kept is None:
        return None
    return {script: (np.asarray(total, np.float64), int(count))
            for script, (total, count) in kept.items()}


def _sums_json(sums: VectorSums) -> dict[str, Any]:
    # float64 values survive jsonb's numeric and back exactly (repr round-trips).
    return {script: [total.tolist(), count] for script, (total, count) in sums.items()}


def _all_vector_sums(cur: psycopg.Cursor, base: _Base) -> VectorSums:
    """``stores.base.vector_sums`` over every row, read in blocks: for a base whose
    publishes did not keep them yet."""
    totals: VectorSums = {}
    with cur.connection.cursor(name="llamaindex_kb_vectors", binary=True) as rows:
        rows.itersize = 8192
        rows.execute(sql.SQL("SELECT vector_send(embedding) FROM {}").format(base.chunks))
        while block := rows.fetchmany(8192):
            totals = merged(totals, vector_sums(_vectors([blob for blob, in block])))
    return totals


def _add_chunks(cur: psycopg.Cursor, base: _Base, chunks: Sequence[BaseNode],
                vectors: np.ndarray | None, readable: np.ndarray | None,
                vocabulary: _Vocabulary) -> tuple[int, int]:
    """Insert chunks (COPY) and one postings segment, counted into the vocabulary; how
    many, and their total length."""
    if not chunks:
        return 0, 0
    cur.execute("UPDATE llamaindex_kb_bases SET next_row = next_row + %s WHERE id = %s "
                "RETURNING next_row - %s", [len(chunks), base.id, len(chunks)])
    first = int(cur.fetchone()[0])
    columns = ["row", "node_id", "document_id", "length", "metadata", "node", "readable"]
    if vectors is not None:
        columns.append("embedding")
    total = 0
    postings: dict[str, list[tuple[int, int, int]]] = {}
    copy_chunks = sql.SQL("COPY {} ({}) FROM STDIN").format(
        base.chunks, sql.SQL(", ").join(map(sql.Identifier, columns)))
    with cur.copy(copy_chunks) as copy:
        for offset, node in enumerate(chunks):
            row = first + offset
            terms = Counter(tokenize(node.get_content()))
            length = sum(terms.values())
            total += length
            for term, tf in terms.items():
                postings.setdefault(term, []).append((row, tf, length))
            values = [row, node.node_id, str(node.metadata.get("document_id", node.node_id)),
                      length, Jsonb(dict(node.metadata)), Json(doc_to_json(node)),
                      None if readable is None else float(readable[offset])]
            if vectors is not None:
                values.append(_vector_text(vectors[offset]))
            copy.write_row(values)
    # A segment is named by its first row: unique, and never reused. A common term's
    # postings are cut into several, so that removing a row rewrites one of them.
    copy_postings = sql.SQL("COPY {} (term, segment, postings) FROM STDIN (FORMAT BINARY)"
                            ).format(base.postings)
    with cur.copy(copy_postings) as copy:
        copy.set_types(["text", "int8", "bytea"])
        for term, occurrences in postings.items():
            for start in range(0, len(occurrences), _SEGMENT_POSTINGS):
                segment = occurrences[start:start + _SEGMENT_POSTINGS]
                copy.write_row((term, segment[0][0], _pack(segment)))
    vocabulary.add(postings)
    return len(chunks), total


def _add_parents_and_documents(cur: psycopg.Cursor, base: _Base, parents: Sequence[BaseNode],
                               documents: dict[str, DocumentInfo]) -> None:
    if parents:
        cur.executemany(
            "INSERT INTO llamaindex_kb_parents (base, node_id, document_id, node) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (base, node_id) DO UPDATE "
            "SET document_id = EXCLUDED.document_id, node = EXCLUDED.node",
            [(base.id, node.node_id, str(node.metadata.get("document_id", node.ref_doc_id)),
              Json(doc_to_json(node))) for node in parents])
    if documents:
        cur.executemany(
            "INSERT INTO llamaindex_kb_documents (base, document_id, info) VALUES (%s, %s, %s)",
            [(base.id, doc_id, Jsonb(info.model_dump(mode="json")))
             for doc_id, info in documents.items()])


# --- helpers -----------------------------------------------------------------------


def _ef_search(window: int) -> int:
    """hnsw.ef_search for a window of ``window`` rows, within pgvector's range."""
    return min(1000, max(40, window))


# Each connection's hnsw.ef_search: what the first window of a top-10 query needs.
_SESSION_EF = _ef_search(first_window(10))


def _array_text(rows: Sequence[int]) -> str:
    """An int array literal: psycopg checks every element of a list it adapts, a
    quarter of the time of a 200-row look-up (0.52 ms against 0.38)."""
    return "{" + ",".join(map(str, rows)) + "}"


class _QueryVector:
    """A query vector, sent in pgvector's binary format: as text (17 digits a float)
    it took 0.4 ms to format, a few percent of a query."""

    def __init__(self, vector: np.ndarray) -> None:
        self.payload = struct.pack(">HH", vector.size, 0) + vector.astype(">f4").tobytes()


class _QueryVectorDumper(Dumper):
    format = pq.Format.BINARY
    oid = 0  # unknown: the statement's ``::vector`` cast gives the parameter its type

    def dump(self, obj: _QueryVector) -> bytes:
        return obj.payload


def _vector_text(vector: np.ndarray) -> str:
    return "[" + ",".join(map(repr, np.asarray(vector, dtype=np.float32).tolist())) + "]"


def _is_configuration_problem(exc: psycopg.OperationalError, message: str) -> bool:
    # 28: invalid authorisation (password, role, pg_hba); 3D: no such database.
    if (exc.sqlstate or "")[:2] in {"28", "3D"}:
        return True
    lowered = message.lower()
    return any(hint in lowered for hint in (
        "password authentication failed", "does not exist", "no pg_hba.conf entry",
        "invalid", "no password supplied")) or _unresolved(message)


def _unresolved(message: str) -> bool:
    """Whether the host name did not resolve (libpq's words, then psycopg's)."""
    return "could not translate host name" in message or "failed to resolve host" in message


@contextlib.contextmanager
def _translated_errors(shown: str, secrets: Sequence[str]) -> Iterator[None]:
    def problem(exc: BaseException) -> str:
        return redact_text(first_line(exc), secrets)

    try:
        yield
    except psycopg.errors.QueryCanceled as exc:
        raise StoreUnavailableError(
            f"store {shown} did not answer within {DEADLINE_S:g} s; try again") from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigurationError(
            f"store {shown}: {problem(exc)}; the user needs to create tables (and the "
            "vector extension, or an administrator runs CREATE EXTENSION vector once)"
        ) from exc
    except (psycopg.errors.FeatureNotSupported, psycopg.errors.UndefinedFile) as exc:
        # PostgreSQL 15+ reports a missing extension as the first, older ones the second.
        hint = ("; install pgvector >= 0.8 on the server (e.g. the pgvector/pgvector "
                "Docker image)" if 'extension "vector"' in str(exc)
                or isinstance(exc, psycopg.errors.UndefinedFile) else "")
        raise ConfigurationError(f"store {shown}: {problem(exc)}{hint}") from exc
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(
            f"store {shown}: connection lost ({problem(exc)}); try again") from exc


def _spoken_to(conn: psycopg.Connection) -> bool:
    """Whether the server wrote to an idle connection: it does so only to end it (a
    restart's "terminating connection", an idle timeout), or it closed the socket."""
    # poll, not select: select() fails for descriptors past 1024, which a server with
    # many connections reaches, and would then close every pooled connection.
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


# PostgreSQL's SSLRequest: every PostgreSQL answers it with one byte, "S" or "N" (or
# "E" before the negotiation existed), before any authentication.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
PROBE_S = 0.4  # per step of the probe: connect, then each wait for an answer


def connect(conninfo: str, shown: str, secrets: tuple[str, ...],
            **options: Any) -> psycopg.Connection:
    """A new connection (``options`` for ``psycopg.connect``), retried while
    ``DEADLINE_S`` allows. Failures answer as ours, never chained (libpq may quote the
    password): something else answering at the address, or wrong credentials or
    database, is a ``ConfigurationError``; a server that stays away is a
    ``StoreUnavailableError``."""
    deadline = time.monotonic() + DEADLINE_S
    probed = False
    while True:
        try:
            return psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S, **options)
        except psycopg.OperationalError as exc:
            problem = redact_text(first_line(exc), secrets)
            if exc.sqlstate is None and not probed and not _unresolved(problem):
                # No PostgreSQL error: whatever answers there may be something else.
                probed = True
                answered = _answering_instead(conninfo)
                if answered is not None:
                    raise ConfigurationError(
                        f"store URL {shown} answered {answered}, which is not a "
                        "PostgreSQL server: check the host and port") from None
            if _is_configuration_problem(exc, problem):
                raise ConfigurationError(
                    f"store {shown}: {problem}; check the user, password, host and "
                    "database in the store URL") from None
            if time.monotonic() + CONNECT_TIMEOUT_S + 0.25 > deadline:
                raise StoreUnavailableError(
                    f"store {shown} is unreachable ({problem}); is PostgreSQL "
                    "running and reachable from here?") from None
            time.sleep(0.25)


def _answering_instead(conninfo: str) -> str | None:
    """What answers at the URL's one TCP address if it is not PostgreSQL, else None
    (PostgreSQL, nothing, or a socket or several hosts, which are not probed)."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = str(params.get("hostaddr") or params.get("host") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or 5432)
    if not host or host.startswith("/") or "," in host + port or not port.isdigit():
        return None
    return _foreign_answer(host, int(port))

def _foreign_answer(host: str, port: int) -> str | None:
    """What a server that is not PostgreSQL answers at host:port, else None.

    The probe sends PostgreSQL's SSLRequest, then, to a server still silent (an HTTP
    server waits for the end of the request line), the rest of an HTTP request line,
    so that one answers with its status. It sends no user name or password.
    """
    try:
        with socket.create_connection((host, port), timeout=PROBE_S) as sock:
            sock.sendall(_SSL_REQUEST)
            answer = _receive(sock)
            if not answer:
                sock.sendall(b" / HTTP/1.0\r\n\r\n")
                answer = _receive(sock)
    except OSError:
        return None
    if not answer or _from_postgres(answer):
        return None
    head, _, rest = answer.partition(b"\r\n")
    if not head.startswith(b"HTTP/"):
        return f"{answer[:40]!r}"
    status = head.split(b" ")[1].decode("ascii", "replace") if b" " in head else "?"
    kind = next((line.split(b":", 1)[1].split(b";")[0].strip().decode("ascii", "replace")
                 for line in rest.split(b"\r\n")
                 if line.lower().startswith(b"content-type:")), "no content type")
    return f"HTTP {status} ({kind})"


def _from_postgres(answer: bytes) -> bool:
    # Exactly one byte: an SSH server's greeting starts with "S" too.
    return answer in (b"S", b"N") or answer.startswith(b"E")


def _receive(sock: socket.socket) -> bytes:
    """What arrives within the socket's timeout, up to the end of an HTTP head."""
    received = b""
    try:
        while True:
            more = sock.recv(4096)
            received += more
            # PostgreSQL's answer waits for a reply of ours: take it as it is.
            if (not more or _from_postgres(received) or b"\r\n\r\n" in received
                    or len(received) >= 4096):
                return received
    except (TimeoutError, ConnectionResetError):  # what came before still tells
        return received
