"""``llamaindex+postgresql://user:pw@host:5432/db[?schema=name]``: PGVectorStore tables.

A user's ``PGVectorStore.from_params(..., table_name="handbook", schema_name=...)``
writes the table ``<schema>.data_handbook`` (columns ``id``, ``text``, ``metadata_``,
``node_id``, ``embedding``, and ``text_search_tsv`` with ``hybrid_search``); the
knowledge base ``handbook`` is that table. Every table named ``data_*`` in the schema
(``?schema=``, default ``public``) with those columns is listed. Other parameters of
the URL go to libpq as in a ``postgresql://`` URL; ``?hnsw_ef_search=N`` gives the
value the user's own ``hnsw_kwargs`` set, for a table with an HNSW index.

Vector retrieval answers what ``index.as_retriever(similarity_top_k=k)`` answers: the
records, their order and their score, which is PGVectorStore's (and so ours)
``1 - cosine distance`` (pgvector's ``<=>``): the cosine similarity, negatives shown as
0. On a table with an HNSW or IVFFlat index, PGVectorStore's own query runs (one
``PGVectorStore`` per table, all sharing this store's connection pool), the part of
Dify's condition that ``MetadataFilters`` expresses exactly pushed down
(``_metadata_filters``). Without one, LlamaIndex's query scans and ranks every row
(10 ms at 5k rows of 384 dimensions, growing with the table): the rows held in memory
choose the few that can be in its top k, and pgvector ranks those with the same
expression (``_ranked_by_pgvector``). Every record is re-checked by the caller.

Keyword and hybrid retrieval, the choice above, and the listing of documents work on
the table read whole into memory (``load``): the nodes, rebuilt from ``metadata_`` as
LlamaIndex rebuilds them, and their embeddings (hybrid needs every node's cosine).
That costs about ``12 · dimension`` bytes per node for the vectors (float64 for
scoring, float32 for choosing; 10k nodes of 1536 dimensions: ~185 MB) plus the nodes
themselves, paid when a table is first listed or searched and again after it changes.
Whether it changed is asked at most once a second, by ``count(*)`` and ``max(id)``:
LlamaIndex only inserts (``id`` grows) and deletes; an ``UPDATE`` made by hand that
keeps both is not seen.

Faults are those of the ``postgresql://`` store: unreachable is a 503 within
``DEADLINE_S``; wrong credentials, a missing database or something other than
PostgreSQL at the address is a 400 saying so. Messages show the URL redacted.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import psycopg
import sqlalchemy
from llama_index.core.schema import BaseNode, NodeWithScore, TextNode
from llama_index.core.vector_stores.types import (
    MetadataFilters,
    VectorStoreQuery,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node
from llama_index.vector_stores.postgres import PGVectorStore
from psycopg import sql
from sqlalchemy.ext.asyncio import create_async_engine

from llamaindex_kb.conditions.compiled import Predicate
from llamaindex_kb.conditions.table import MetadataTable
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    KBError,
    KnowledgeBaseDamaged,
    StoreUnavailableError,
    first_line,
)
from llamaindex_kb.redaction import redact_text, redact_url, url_secrets
from llamaindex_kb.stores.llamaindex.filters import exact_metadata_filters
from llamaindex_kb.stores.llamaindex.store import LlamaIndexStore, LoadedIndex

# The same connection policy as our own PostgreSQL store, and its probe telling a
# server that is not PostgreSQL.
from llamaindex_kb.stores.postgres import (
    DEADLINE_S,
    connect,
)

TABLE_PREFIX = "data_"  # PGVectorStore's table is data_<table_name>
COLUMNS = ("id", "text", "metadata_", "node_id", "embedding")
POOL_SIZE = 8
LOAD_TIMEOUT_S = 120  # reading a whole table may take longer than a query
# Keys LlamaIndex writes into metadata_ beside the node's own metadata (overwriting a
# node's own "document_id"): a filter on them would not test what the record shows.
_WRITTEN_BY_LLAMAINDEX = frozenset({"_node_content", "_node_type", "document_id", "doc_id",
                                    "ref_doc_id"})

_TABLES_SQL = """
SELECT c.relname, c.oid::bigint, t.typname, e.atttypmod,
       EXISTS (SELECT 1 FROM pg_attribute s WHERE s.attrelid = c.oid
               AND s.attname = 'text_search_tsv' AND NOT s.attisdropped),
       m.atttypid = 'jsonb'::regtype,
       EXISTS (SELECT 1 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_am am ON am.oid = ic.relam
               WHERE i.indrelid = c.oid AND am.amname IN ('hnsw', 'ivfflat'))
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute e ON e.attrelid = c.oid AND e.attname = 'embedding' AND NOT e.attisdropped
JOIN pg_type t ON t.oid = e.atttypid
JOIN pg_attribute m ON m.attrelid = c.oid AND m.attname = 'metadata_' AND NOT m.attisdropped
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
  AND left(c.relname, length(%(prefix)s)) = %(prefix)s
  AND (%(table)s::text IS NULL OR c.relname = %(table)s)
  AND t.typname IN ('vector', 'halfvec')
  AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped
       AND a.attname = ANY(%(columns)s)) = %(count)s
"""


@dataclass(frozen=True)
class _Table:
    """What the catalog says of one PGVectorStore table; a new one when it is recreated."""

    name: str
    oid: int
    halfvec: bool
    dimension: int | None  # None for a vector column declared without one
    hybrid: bool  # has text_search_tsv (PGVectorStore's hybrid_search)
    jsonb: bool  # metadata_ is jsonb (use_jsonb)
    approximate: bool  # an HNSW or IVFFlat index may answer LlamaIndex's query


@dataclass
class _Rows:
    """A table as last loaded: what chooses the rows pgvector then ranks."""

    ids: np.ndarray  # the id column; row i is nodes[i]
    nodes: list[BaseNode]
    unit: np.ndarray  # float32 embeddings scaled to length 1 (zero rows stay zero)

    @cached_property
    def metadata(self) -> MetadataTable:
        return MetadataTable([node.metadata for node in self.nodes])


class PGVectorTables:
    """The ``IndexSource`` of one PostgreSQL schema's PGVectorStore tables."""

    searches_in_process = False

    def __init__(self, conninfo: str, schema: str, shown: str, secrets: tuple[str, ...],
                 hnsw_ef_search: int | None) -> None:
        self._conninfo = conninfo
        self.schema = schema
        self.shown = shown
        self._secrets = secrets
        self._hnsw_ef_search = hnsw_ef_search
        self._engine = sqlalchemy.create_engine(
            "postgresql+psycopg://", creator=self._connect, pool_size=POOL_SIZE,
            max_overflow=0, pool_pre_ping=True)
        self._tables: dict[str, _Table] = {}  # index id -> the table as last described
        self._vector_stores: dict[_Table, PGVectorStore] = {}
        self._rows: dict[str, _Rows] = {}  # index id -> the table as last loaded
        self._lock = threading.Lock()

    # --- connections ------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        """A new connection for the pool; errors made ours here, since the pool hands
        them on as they are."""
        # Client-side binding, as psycopg2 under the user's PGVectorStore does: it sends
        # "SET hnsw.ef_search = :n" with a parameter.
        return connect(self._conninfo, self.shown, self._secrets,
                       options=f"-c statement_timeout={int(DEADLINE_S * 1000)}",
                       cursor_factory=psycopg.ClientCursor)

    def _problem(self, exc: BaseException) -> str:
        """A driver's first line without the URL's secrets (libpq may quote them)."""
        return redact_text(first_line(exc), self._secrets)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The database's errors as ours, raised through SQLAlchemy (PGVectorStore's
        queries) or by psycopg itself (ours); not chained: a message may hold a secret."""
        try:
            yield
        except KBError:
            raise
        except sqlalchemy.exc.DBAPIError as exc:
            cause = exc.orig if isinstance(exc.orig, psycopg.Error) else exc
            raise self._ours(cause, lost=exc.connection_invalidated) from None
        except psycopg.Error as exc:
            raise self._ours(exc, lost=False) from None

    def _ours(self, cause: BaseException, *, lost: bool) -> KBError:
        problem = self._problem(cause)
        if isinstance(cause, psycopg.errors.InsufficientPrivilege):
            return ConfigurationError(f"store {self.shown}: {problem}; the user needs SELECT "
                                      "on the PGVectorStore tables")
        if isinstance(cause, psycopg.errors.QueryCanceled):
            return StoreUnavailableError(
                f"store {self.shown} did not answer in time ({problem}); try again")
        if lost or isinstance(cause, psycopg.OperationalError):
            return StoreUnavailableError(
                f"store {self.shown}: connection lost ({problem}); try again")
        return KnowledgeBaseDamaged(
            f"store {self.shown}: reading a PGVectorStore table failed ({problem})")

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor]:
        """A cursor on a pooled connection, in one transaction rolled back at the end."""
        with self._translated():
            conn = self._engine.raw_connection()
            try:
                # A server-side binding cursor: binary results need one.
                with psycopg.Cursor(conn.dbapi_connection) as cur:  # type: ignore[arg-type]
                    yield cur
            finally:
                conn.close()  # back to the pool, rolled back

    # --- IndexSource -------------------------------------------------------------

    def _describe(self, cur: psycopg.Cursor, table: str | None) -> list[_Table]:
        cur.execute(_TABLES_SQL, {"schema": self.schema, "prefix": TABLE_PREFIX,
                                  "table": table, "columns": list(COLUMNS),
                                  "count": len(COLUMNS)})
        return [_Table(name=name, oid=oid, halfvec=typname == "halfvec",
                       dimension=typmod if typmod > 0 else None, hybrid=hybrid, jsonb=jsonb,
                       approximate=approximate)
                for name, oid, typname, typmod, hybrid, jsonb, approximate in cur.fetchall()]

    def index_ids(self) -> list[str]:
        with self._cursor() as cur:
            tables = self._describe(cur, None)
        return sorted(table.name.removeprefix(TABLE_PREFIX) for table in tables)

    def version(self, index_id: str) -> Hashable | None:
        with self._cursor() as cur:
            found = self._describe(cur, _table_name(index_id))
            if not found:
                self._tables.pop(index_id, None)
                self._rows.pop(index_id, None)
                return None
            table = found[0]
            cur.execute(sql.SQL("SELECT count(*), max(id) FROM {}").format(
                sql.Identifier(self.schema, table.name)))
            count, last_id = cur.fetchone()  # type: ignore[misc]
        self._tables[index_id] = table
        return table, count, last_id

    def load(self, index_id: str) -> LoadedIndex:
        table = self._table(index_id)
        with self._cursor() as cur:
            cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(LOAD_TIMEOUT_S * 1000)))
            # Binary: the vectors arrive as pgvector's packed floats, no text to parse.
            cur.execute(sql.SQL("SELECT id, node_id, text, metadata_, embedding FROM {} "
                                "ORDER BY id").format(sql.Identifier(self.schema, table.name)),
                        binary=True)
            rows = cur.fetchall()
        nodes = [_node(node_id, text, metadata) for _, node_id, text, metadata, _ in rows]
        embeddings = _unpacked([packed for *_, packed in rows], table, self.shown)
        dimension = table.dimension or (int(embeddings.shape[1]) if len(rows) else None)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self._rows[index_id] = _Rows(
            ids=np.array([row[0] for row in rows], dtype=np.int64), nodes=nodes,
            unit=embeddings / np.where(norms == 0, 1.0, norms).astype(np.float32))
        return LoadedIndex(nodes=nodes, embeddings=embeddings, dimension=dimension)

    def vector_search(self, index_id: str, query_vector: np.ndarray, top_k: int,
                      predicate: Predicate | None) -> list[NodeWithScore] | None:
        table, rows = self._table(index_id), self._rows.get(index_id)
        if table.approximate or rows is None or not np.any(query_vector):
            return self._llamaindex_query(table, query_vector, top_k, predicate)
        return self._ranked_by_pgvector(table, rows, query_vector, top_k, predicate)

    def _llamaindex_query(self, table: _Table, query_vector: np.ndarray, top_k: int,
                          predicate: Predicate | None) -> list[NodeWithScore]:
        """PGVectorStore's own query: the HNSW or IVFFlat scan LlamaIndex's runs."""
        store = self._vector_store(table)
        query = VectorStoreQuery(query_embedding=np.asarray(query_vector).tolist(),
                                 similarity_top_k=top_k,
                                 filters=None if predicate is None
                                 else _metadata_filters(predicate))
        with self._translated():
            result = store.query(query)
        return [NodeWithScore(node=node, score=similarity)
                for node, similarity in zip(result.nodes or [], result.similarities or [],
                                            strict=True)]

    def _ranked_by_pgvector(self, table: _Table, rows: _Rows, query_vector: np.ndarray,
                            top_k: int, predicate: Predicate | None) -> list[NodeWithScore]:
        """LlamaIndex's answer on a table without a vector index, fast: its query scans
        and ranks every row (10 ms at 5k rows of 384 dimensions, growing with the
        table). The rows held here choose every row that can be in its top ``top_k``
        (within rounding of the top ``top_k`` by a float32 cosine, Dify's condition
        applied), then pgvector ranks those by PGVectorStore's expression: the same
        order and scores, from a handful of rows."""
        query = np.asarray(query_vector, dtype=np.float32)
        similarities = rows.unit @ (query / np.linalg.norm(query))
        if predicate is not None:
            similarities = np.where(predicate.mask(rows.metadata), similarities, -np.inf)
        candidates = np.flatnonzero(np.isfinite(similarities))
        if len(candidates) > top_k:
            kth = np.partition(similarities[candidates], -top_k)[-top_k]
            candidates = candidates[similarities[candidates] >= kth - _margin(query.size)]
        if not len(candidates):
            return []
        with self._cursor() as cur:
            cur.execute(sql.SQL(
                "SELECT id, 1 - (embedding <=> %(q)s::{kind}) FROM {table} WHERE id = ANY(%(ids)s) "
                "ORDER BY embedding <=> %(q)s::{kind} LIMIT %(k)s").format(
                    kind=sql.SQL("halfvec" if table.halfvec else "vector"),
                    table=sql.Identifier(self.schema, table.name)),
                {"q": _vector_text(query), "ids": rows.ids[candidates].tolist(), "k": top_k})
            ranked = cur.fetchall()
        position = {int(row_id): row for row, row_id in zip(candidates, rows.ids[candidates],
                                                             strict=True)}
        return [NodeWithScore(node=rows.nodes[position[row_id]],
                              score=0.0 if similarity is None else float(similarity))
                for row_id, similarity in ranked]

    def _table(self, index_id: str) -> _Table:
        table = self._tables.get(index_id)
        if table is None:  # not yet described here: version() does, and remembers it
            self.version(index_id)
            table = self._tables.get(index_id)
        if table is None:
            raise KnowledgeBaseDamaged(
                f"the PGVectorStore table of {index_id!r} disappeared while being read")
        return table

    def _vector_store(self, table: _Table) -> PGVectorStore:
        """LlamaIndex's own store for ``table``, kept while the table is the same."""
        store = self._vector_stores.get(table)
        if store is not None:
            return store
        with self._lock:
            store = self._vector_stores.get(table)
            if store is None:
                store = PGVectorStore(
                    table_name=table.name.removeprefix(TABLE_PREFIX),
                    schema_name=self.schema, embed_dim=table.dimension or 0,
                    hybrid_search=table.hybrid, use_jsonb=table.jsonb,
                    use_halfvec=table.halfvec, perform_setup=False,
                    hnsw_kwargs=(None if self._hnsw_ef_search is None
                                 else {"hnsw_ef_search": self._hnsw_ef_search}),
                    # PGVectorStore takes both engines or none; only the synchronous one is
                    # ever used, and an engine connects only when used.
                    engine=self._engine, async_engine=create_async_engine(
                        "postgresql+asyncpg://"))
                stale = [old for old in self._vector_stores if old.name == table.name]
                for old in stale:
                    del self._vector_stores[old]
                self._vector_stores[table] = store
        return store


def from_url(url: str, settings: Settings) -> LlamaIndexStore:
    shown, secrets = redact_url(url), url_secrets(url)
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = (options.pop("schema", "") or "public").lower()
    ef_search = options.pop("hnsw_ef_search", None)
    if ef_search is not None and not ef_search.isdigit():
        raise ConfigurationError(
            f"store URL {shown!r}: hnsw_ef_search must be a whole number, as in the "
            "hnsw_kwargs given to PGVectorStore")
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(options), ""))
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        # Not chained: libpq's message quotes the part it cannot parse, maybe the password.
        raise ConfigurationError(
            f"store URL {shown!r} is not a valid PostgreSQL URL; expected "
            "llamaindex+postgresql://user:password@host:5432/database?schema=public"
        ) from None
    return LlamaIndexStore(PGVectorTables(conninfo, schema, shown, secrets,
                                          None if ef_search is None else int(ef_search)))


# --- helpers ---------------------------------------------------------------------


def _table_name(index_id: str) -> str:
    # PGVectorStore lower-cases the table_name it is given.
    return TABLE_PREFIX + index_id.lower()


def _node(node_id: str, text: str, metadata: dict | None) -> BaseNode:
    """A row as PGVectorStore rebuilds it (``_db_rows_to_query_result``)."""
    try:
        node = metadata_dict_to_node(metadata or {})
        node.set_content(str(text))
    except Exception:  # noqa: BLE001 - LlamaIndex's own fallback, for rows it did not write
        node = TextNode(id_=node_id, text=text, metadata=metadata or {})
    return node


def _unpacked(packed: list[bytes | None], table: _Table, shown: str) -> np.ndarray:
    """pgvector's binary vectors (int16 dimension, int16 unused, big-endian floats) as
    float32 rows; a row without an embedding as zeros (PGVectorStore scores it 0)."""
    dims = {int.from_bytes(blob[:2], "big") for blob in packed if blob is not None}
    if len(dims) > 1:
        raise KnowledgeBaseDamaged(
            f"store {shown}: table {table.name} holds vectors of {sorted(dims)} dimensions")
    dimension = dims.pop() if dims else (table.dimension or 0)
    item = np.dtype(">f2" if table.halfvec else ">f4")
    rows = np.zeros((len(packed), dimension), dtype=np.float32)
    for row, blob in enumerate(packed):
        if blob is not None:
            rows[row] = np.frombuffer(blob, dtype=item, offset=4, count=dimension)
    return rows


def _margin(dimension: int) -> float:
    """A bound on how far a float32 cosine (numpy's here, pgvector's there) strays from
    the exact one: a few roundings per dimension, for vectors of length 1."""
    return 4.0 * dimension * float(np.finfo(np.float32).eps)


def _vector_text(vector: np.ndarray) -> str:
    """pgvector's text form; repr keeps every float32 exactly, as PGVectorStore sends it."""
    return "[" + ",".join(map(repr, vector.tolist())) + "]"


def _metadata_filters(predicate: Predicate) -> MetadataFilters | None:
    """The exactly expressible part of ``predicate`` as PGVectorStore's filters.

    PGVectorStore renders ``metadata_->>'key' = 'text'`` and ``... IN ('a', 'b')``: the
    text form compared, as Dify's SQL does. It pastes keys and values into the SQL text
    unescaped, and SQLAlchemy reads ``:name`` there as a parameter: such keys and values
    stay out, as do the keys LlamaIndex writes itself.
    """
    return exact_metadata_filters(
        predicate, key_ok=lambda key: key not in _WRITTEN_BY_LLAMAINDEX and _pasteable(key),
        value_ok=_pasteable)[0]


def _pasteable(text: str) -> bool:
    """Taken as it is inside PGVectorStore's quotes (``'`` is never in a plain text)."""
    return ":" not in text
