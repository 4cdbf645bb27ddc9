"""Qdrant: knowledge bases in qdrant-client's local mode (a folder) or a Qdrant server.

Store URLs::

    qdrant:///absolute/path              local mode: qdrant-client's in-process engine,
                                         one process at a time, slow past ~20k chunks
    qdrant://host:6333                   a Qdrant server (http)
    http(s)://host:6333                  a Qdrant server; the API key comes from
                                         ``?api_key=`` or ``LLAMAINDEX_KB_STORE_API_KEY``

Collections::

    llamaindex_kb_meta          one point per knowledge base (manifest, BM25 corpus
                                statistics, live chunk collection and generation: the
                                "CURRENT" pointer), per document and parent chunk (their
                                versions), and per publish that removed something (what,
                                for the purge), tagged with their chunk collection;
                                and one per API key's or view's record (``_QdrantRecords``)
    llamaindex_kb_<id>_<uuid>   the base's chunks: point id = row, a "dense" cosine
                                vector, a "sparse" vector of our analyzer's terms
                                (text.analyzer.tokenize, hashed; never fastembed) with
                                ``Modifier.IDF``, payload: node JSON, metadata, term
                                counts, and the generations it lives in (since, until)

Generations: a publish adds its chunks to the live collection as generation g+1 and marks
the chunks, document and parent versions it replaces or removes as ending there, then
moves the pointer to g+1 with one conditional point upsert; a query reads the pointer
once and skips every point generation g+1 would show but g would not (``_visible``),
so it sees a whole change or none of it. A one-document change costs that document (and
a pass over the vocabulary for the absent-term weight: ``_TermStats``); the first in a
process that did not make the base's generation also reads every chunk's term counts
once. Removed points are deleted by the first publish ``PURGE_S`` after their removal;
a query still reading a generation older than that starts again. A writer names what
it is about to touch in the pointer first (``writing``), so the next one can undo what a
writer that died left (``_undo``). A new base, a full replacement (which may change the
embedding's dimension) and the first publish to a base an earlier version wrote (a
collection per publish, no generations: read as it is meanwhile) go into a new
collection, and the pointer then swaps collections.

Writers of one knowledge base, whatever thread, process or machine they run in, take
turns through a lease point in the meta collection (``_Lease``: taken by a conditional
upsert, renewed while held, lapsing within ``LEASE_S`` of its holder's death); a
waiting writer gives up after ``WAIT_S``. The switch is conditional too (on the
generation, and on the writer's own mark in the pointer), and a writer checks its mark
before each batch it writes into the live collection (``_Claim``), so a writer whose
lease lapsed under it fails rather than overwrite a newer change. Not covered: the one
batch a writer may have in flight if it stalls past its lease between that check and
the write, while the next writer is writing the same generation. Conditional
updates need Qdrant 1.16 or later to write; local mode has them, and its folder is
locked to one process by qdrant-client itself.

Scores equal the embedded store's. Both candidate searches run server-side with the
query API: sparse (every chunk holding a query term, with its term counts and dense
vector) and dense (exact filter parts pushed down). The store scores the candidates
itself by ``scoring.py``'s policy: BM25 from the term counts by
``text.bm25.score_postings``; the hybrid top-k found exactly by ``exact_topk.rank`` (as
on PostgreSQL); conditions re-checked with
``Predicate.matches``; the dense search is pre-filtered by the condition's exact part,
translated straight into a Qdrant ``Filter`` (``qdrant_filter``).

Faults, as Dify sees them: a refused or silent connection, a 429 and a 5xx are retried
for ``RETRY_S`` (reads), then a 503 (``StoreUnavailableError``). Every answer is
checked (``check_answer``): one no Qdrant gives (a web page, another API's JSON), a
TLS mismatch and an answer that is not HTTP are a 400 (``ConfigurationError``) saying
what answered. Messages show the URL without its ``api_key``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, NodeWithScore
from llama_index.core.storage.docstore.utils import doc_to_json, json_to_doc
from pydantic import ValidationError
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from llamaindex_kb.conditions.compiled import (
    ExactCheck,
    Predicate,
    TextEquals,
    TextIn,
    plain_key,
)
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    KBError,
    KnowledgeBaseNotFound,
    StoreUnavailableError,
    first_line,
)
from llamaindex_kb.redaction import redact_text, redact_url, url_secrets
from llamaindex_kb.scoring import SimilarityScale
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
    vector_sums,
    with_centroids,
)
from llamaindex_kb.stores.exact_topk import Candidates, KeywordRanking, retrieve
from llamaindex_kb.stores.records import Record
from llamaindex_kb.text.analyzer import ANALYZER_VERSION, tokenize
from llamaindex_kb.text.bm25 import Postings, idf, median_best_weight, score_postings, weights

TIMEOUT_S = 4  # every request to a server
RETRY_S = 2.0  # how long a read keeps retrying a transient failure
LEASE_S = 60.0  # a writer's lease on a knowledge base, renewed every third of it
WAIT_S = 300.0  # how long a writer waits for another writer of the same knowledge base
# How long points a publish removed stay readable: for queries that read the pointer
# before that publish switched it (a query re-reads the pointer at its end and starts
# again if they went meanwhile: _Search.check_readable).
PURGE_S = 60.0
FOREVER = 2**62  # the ``until`` of a point no publish has removed
META = "llamaindex_kb_meta"
_PREFIX = "llamaindex_kb_"
_NS = uuid.UUID("5b0c8a53-3f0e-4f6e-9d5e-6f1f9a3c2b71")
_BATCH = 256
_CONDITIONAL_UPDATES = (1, 16)  # the first Qdrant whose upserts take an update_filter
_META_INDEXES = {key: models.PayloadSchemaType.KEYWORD
                 for key in ("kb", "kind", "version", "collection", "holder",
                             "record_kind", "txn")}
_META_INDEXES["expires"] = models.PayloadSchemaType.FLOAT
_META_INDEXES["generation"] = models.PayloadSchemaType.INTEGER
_META_INDEXES["writing.txn"] = models.PayloadSchemaType.KEYWORD
_SLACK = 64  # points a search asks for beyond those it needs, for other generations'
_STRONG = models.WriteOrdering.STRONG  # through the shard's permanent leader: one order
_MAJORITY = models.ReadConsistencyType.MAJORITY

log = logging.getLogger(__name__)


def from_url(url: str, settings: Settings) -> QdrantStore:
    key = settings.store_api_key
    return QdrantStore(url, api_key=key.get_secret_value() if key is not None else None)


@dataclass(frozen=True)
class _Base:
    """A knowledge base's pointer point: manifest, statistics, live chunk collection and
    generation (which of the collection's points are live: ``_visible``)."""

    manifest: KBManifest
    collection: str
    chunk_count: int
    total_length: int
    absent_term_weight: float
    next_row: int
    # False: written by a version without generations (a collection per publish, every
    # point live); its next publish rewrites it into a collection with them.
    versioned: bool = False
    generation: int = 0
    txn: str = ""  # the publish that made this generation
    dead: int = 0  # removed chunks not yet purged: searches skip them
    readable_from: int = 0  # the oldest generation whose points are all still there
    # (generation, when it was published, chunks it removed): removals not yet purged
    retired: tuple[tuple[int, float, int], ...] = ()
    purging: tuple[int, ...] = ()  # generations being purged (redone by the next publish)
    sums: VectorSums = field(default_factory=dict)  # of the live dense vectors, per script
    # The sum of the live chunks' readable shares (Change.readable), and how many have one
    readable: tuple[float, int] = (0.0, 0)
    writing: dict[str, Any] | None = None  # what a publish under way (or dead) touches


class _Gone(Exception):
    """The chunk collection was replaced by a concurrent publish: read again."""


class _NotQdrant(Exception):
    """An answer no Qdrant gives (raised inside the client by ``check_answer``)."""


def check_answer(response: httpx.Response) -> None:
    """Stop at the first answer that shows the URL reaches something other than Qdrant.

    Qdrant answers JSON, its errors a JSON object with a "status". Left alone, a web
    server's HTML 404 reads as a missing collection and its HTML 200 as a parse
    failure. Answers that any proxy in front of Qdrant gives while Qdrant is away (429,
    5xx) and refusals of the key (401, 403) are judged by the caller.
    """
    status = response.status_code
    if status in (401, 403) or status in _TRANSIENT_STATUS or status >= 500:
        return
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        if status < 300:
            return
        response.read()
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "status" in body:
            return
    raise _NotQdrant(f"HTTP {status} ({kind or 'no content type'})")


class QdrantStore(FindingStore):
    """Knowledge bases in one Qdrant (local folder or server); thread-safe, and writers
    in other processes wait their turn (``_Lease``)."""

    def __init__(self, url: str, api_key: str | None = None, *, lease_s: float = LEASE_S,
                 wait_s: float = WAIT_S, purge_s: float = PURGE_S) -> None:
        # What logs and messages show: the URL without its api_key.
        self.url = shown = redact_url(url)
        self._lease_s, self._wait_s, self._purge_s = lease_s, wait_s, purge_s
        # Per knowledge base, the term statistics of the generation this process last
        # published (by its txn): the next publish here updates them by its own chunks
        # instead of reading every chunk's term counts again.
        self._terms: dict[str, tuple[str, _TermStats]] = {}
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(
                f"store URL {shown!r}: {redact_text(first_line(exc), url_secrets(url))}"
            ) from exc
        scheme = parts.scheme.lower()
        query = parse_qs(parts.query)
        api_key = (query.get("api_key") or [None])[0] or api_key
        self._secrets = (*url_secrets(url), *([api_key] if api_key else []))
        self._local = scheme == "qdrant" and not parts.netloc
        self.searches_in_process = self._local
        if self._local:
            path = unquote(parts.path)
            if not path.startswith("/") or path == "/":
                raise ConfigurationError(
                    f"store URL {shown!r}: local Qdrant needs an absolute folder, e.g. "
                    "qdrant:///srv/kb-qdrant (three slashes), or a server: qdrant://host:6333")
            self._shown = f"qdrant://{path}"
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
                self._client = open_local(path, self._shown, (
                    "(local mode opens a folder in one process at a time): stop the other "
                    "server or CLI command, or run a Qdrant server (qdrant://host:6333) to "
                    "share knowledge bases between processes"))
            except OSError as exc:
                raise ConfigurationError(f"store {self._shown}: {first_line(exc)}") from exc
        else:
            if not parts.hostname:
                raise ConfigurationError(
                    f"store URL {shown!r} names no host: use qdrant://host:6333, "
                    "https://host:6333?api_key=… or qdrant:///absolute/path")
            https = scheme == "https"
            prefix = parts.path.strip("/")
            self._shown = (f"{'https' if https else 'http'}://{parts.hostname}:{port or 6333}"
                           + (f"/{prefix}" if prefix else ""))
            try:
                self._client = retrying_reads(QdrantClient(
                    url=f"{'https' if https else 'http'}://{parts.hostname}",
                    port=port or 6333, api_key=api_key, timeout=TIMEOUT_S,
                    prefix=prefix or None, check_compatibility=False,
                    # Passed through to the httpx client: every answer is checked there.
                    event_hooks={"response": [check_answer]}))
            except ValueError as exc:
                raise ConfigurationError(
                    f"store URL {shown!r}: {redact_text(first_line(exc), self._secrets)}"
                ) from exc
        self._failures = QdrantFailures(self._shown, self._secrets, _CONDITIONAL_UPDATES)
        self._meta_ready = False
        self._conditional_updates = self._local  # local mode has them; a server: asked
        self.access_records = _QdrantRecords(self)

    # --- plumbing -------------------------------------------------------------------

    @contextmanager
    def _calls(self) -> Iterator[QdrantClient]:
        with self._translated():
            self._ensure_meta()
            yield self._client

    @contextmanager
    def _translated(self) -> Iterator[None]:
        with self._failures.translated():
            try:
                yield
            except UnexpectedResponse as exc:
                if exc.status_code == 404:
                    raise _Gone() from exc
                raise
            except ValueError as exc:
                if "not found" in str(exc).lower():  # local mode's missing collection
                    raise _Gone() from exc
                raise

    def _ensure_meta(self) -> None:
        if self._meta_ready:
            return
        if not self._client.collection_exists(META):
            self._client.create_collection(META, vectors_config={})
        if not self._local:  # payload indexes do nothing (and warn) in local mode
            # A server in strict mode may refuse filtered updates (the lease, the switch)
            # on keys without an index; a meta collection made before them lacks some.
            indexed = self._client.get_collection(META).payload_schema
            for key, schema in _META_INDEXES.items():
                if key not in indexed:
                    self._client.create_payload_index(META, key, schema)
        self._meta_ready = True

    @contextmanager
    def _writing(self, knowledge_id: str) -> Iterator[QdrantClient]:
        """The client, with ``knowledge_id``'s write lease held throughout (``_Lease``)."""
        self._require_conditional_updates()
        lease = _Lease(self, knowledge_id, self._lease_s)
        lease.acquire(self._wait_s)
        try:
            with self._calls() as client:
                yield client
        except _Gone as exc:  # another writer retired a collection this one was reading
            raise _overtaken(knowledge_id) from exc
        finally:
            lease.release()

    def _require_conditional_updates(self) -> None:
        """Refuse to write through a server without ``update_filter``: one that ignored
        it would let writers silently take each other's lease and overwrite changes."""
        if self._conditional_updates:
            return
        with self._calls() as client:
            version = client.info().version
        found = re.match(r"(\d+)\.(\d+)", version)
        if found is not None and (int(found[1]), int(found[2])) < _CONDITIONAL_UPDATES:
            raise ConfigurationError(
                f"store {self._shown} runs Qdrant {version}; writing needs Qdrant "
                f"{'.'.join(map(str, _CONDITIONAL_UPDATES))} or later (conditional updates "
                "keep concurrent writers apart): upgrade the server")
        self._conditional_updates = True

    def _load_base(self, client: QdrantClient, knowledge_id: str, *, whole: bool = False
                   ) -> _Base | None:
        """The pointer; ``whole``: with the vector sums only writers need."""
        found = client.retrieve(META, [_meta_id("base", knowledge_id)], with_payload=(
            True if whole else models.PayloadSelectorExclude(exclude=["sums"])))
        if not found:
            return None
        p = found[0].payload or {}
        if p.get("analyzer_version") != ANALYZER_VERSION:
            raise ConfigurationError(
                f"knowledge base {knowledge_id!r} was indexed by keyword analyzer version "
                f"{p.get('analyzer_version')}, this version uses {ANALYZER_VERSION}: drop it "
                "and ingest its documents again")
        return _Base(KBManifest.model_validate(p["manifest"]), p["collection"],
                     int(p["chunk_count"]), int(p["total_length"]),
                     float(p["absent_term_weight"]), int(p["next_row"]),
                     versioned="generation" in p, generation=int(p.get("generation", 0)),
                     txn=p.get("txn", ""), dead=int(p.get("dead", 0)),
                     readable_from=int(p.get("readable_from", 0)),
                     retired=tuple((int(g), float(t), int(n))
                                   for g, t, n in p.get("retired", [])),
                     purging=tuple(int(g) for g in p.get("purging", [])),
                     sums={script: (np.asarray(total, np.float64), int(count))
                           for script, (total, count) in (p.get("sums") or {}).items()},
                     writing=p.get("writing"),
                     readable=(float(p.get("readable_sum", 0.0)), int(p.get("readable_known", 0))))

    def _meta_scroll(self, client: QdrantClient, knowledge_id: str, kind: str,
                     version: str | None = None) -> Iterator[dict[str, Any]]:
        must = [_eq("kb", knowledge_id), _eq("kind", kind)]
        if version is not None:
            must.append(_eq("version", version))
        offset = None
        while True:
            points, offset = client.scroll(META, models.Filter(must=must), limit=_BATCH,
                                           offset=offset, with_payload=True)
            for point in points:
                yield point.payload or {}
            if offset is None:
                return

    # --- KnowledgeStore -------------------------------------------------------------

    def find(self, knowledge_id: str) -> QdrantKnowledgeBase | None:
        with self._calls() as client:
            base = self._load_base(client, knowledge_id)
        return None if base is None else QdrantKnowledgeBase(self, knowledge_id, base)

    def manifests(self) -> list[KBManifest]:
        found = []
        with self._calls() as client:
            offset = None
            while True:
                points, offset = client.scroll(META, models.Filter(must=[_eq("kind", "base")]),
                                               limit=_BATCH, offset=offset, with_payload=True)
                found += [KBManifest.model_validate((p.payload or {})["manifest"])
                          for p in points]
                if offset is None:
                    break
        return sorted(found, key=lambda manifest: manifest.knowledge_id)

    def publish(self, knowledge_id: str, change: Change) -> Published:
        # Counted before taking the lease, which then covers only the store's own work.
        counted = [Counter(tokenize(node.get_content())) for node in change.chunks]
        with self._writing(knowledge_id) as client:
            old = self._load_base(client, knowledge_id, whole=True)
            check_publishable(old.manifest if old is not None else None, change)
            # Trusted again only once this publish has switched the pointer.
            cached = self._terms.pop(knowledge_id, None)
            self._drop_orphans(client, knowledge_id, old)
            if old is None or change.replace or not old.versioned:
                step = self._rewrite(client, knowledge_id, old, change, counted)
            else:
                terms = (cached[1] if cached is not None and cached[0] == old.txn
                         else _scan_terms(client, old))
                step = self._amend(client, knowledge_id, old, change, counted, terms)
            base = step.base
            base["absent_term_weight"] = _absent_term_weight(step.terms)
            if not _switch(client, knowledge_id, old, base, step.claimed):
                if step.fresh:  # its own collection: nobody else reads or writes it
                    self._retire(client, knowledge_id, base["collection"])
                # Points written into the live collection are the next writer's to
                # remove (the pointer names them: ``writing``), if it has not already.
                raise _overtaken(knowledge_id)
            if old is not None and step.fresh:
                self._retire(client, knowledge_id, old.collection)
            self._purge(client, knowledge_id, base["collection"], base["purging"])
            self._terms[knowledge_id] = (base["txn"], step.terms)
        return step.published

    def _rewrite(self, client: QdrantClient, knowledge_id: str, old: _Base | None,
                 change: Change, counted: list[Counter[str]]) -> _Step:
        """A new base, a full replacement, or the first publish to a base an earlier
        version wrote: everything kept and added goes into a new chunk collection, as
        generation 1 (O(the whole base), as every publish cost before generations)."""
        collection = f"{_collection_prefix(knowledge_id)}_{uuid.uuid4().hex[:12]}"
        _create_chunks(client, collection, change.manifest)
        with_sums = needs_centroid(change.manifest)
        terms = _TermStats()
        sums: VectorSums = {}
        documents: dict[str, DocumentInfo] = {}
        parents: list[dict[str, Any]] = []
        rows: dict[str, list[int]] = {}
        next_row = old.next_row if old is not None else 0
        removed = 0
        replaced = set(change.documents) | change.removed
        if old is not None and not change.replace:
            for info in self._meta_scroll(client, knowledge_id, "document", old.collection):
                if info["document_id"] in change.removed:
                    removed += 1
                if info["document_id"] not in replaced:
                    documents[info["document_id"]] = DocumentInfo.model_validate(info["info"])
            kept_parents = {p for info in documents.values() for p in info.parent_ids}
            parents = [p for p in self._meta_scroll(client, knowledge_id, "parent",
                                                    old.collection)
                       if p["node_id"] in kept_parents]
            sums = _copy_chunks(client, old.collection, collection, replaced, terms, rows,
                                with_sums)
        documents.update(change.documents)
        rows_added = _write_chunks(client, collection, change, counted, next_row, 1, terms)
        for row, doc_id in rows_added:
            rows.setdefault(doc_id, []).append(row)
        parents += [_parent(node) for node in change.parents]
        by_document: dict[str, list[str]] = {}
        for parent in parents:
            by_document.setdefault(parent["document_id"], []).append(parent["node_id"])
        meta = [_meta_point("document", knowledge_id, collection, doc_id, [_version(
            1, info=info.model_dump(mode="json"), rows=rows.get(doc_id, []),
            parents=by_document.get(doc_id, []))]) for doc_id, info in documents.items()]
        meta += [_meta_point("parent", knowledge_id, collection, p["node_id"], [_version(
            1, document_id=p["document_id"], node=p["node"])]) for p in parents]
        for start in range(0, len(meta), _BATCH):
            client.upsert(META, meta[start:start + _BATCH], wait=True)
        if with_sums:
            sums = merged(sums, vector_sums(change.vectors))
        # Chunks an earlier version wrote have no share: the manifest keeps its mean.
        base = _pointer(knowledge_id, collection, change.manifest, terms, sums, len(documents),
                        next_row + len(change.chunks), generation=1,
                        readable=_readable(change, (0.0, 0)))
        return _Step(base, terms, Published(documents=len(documents),
                                            chunks=terms.chunk_count, removed=removed),
                     fresh=True)

    def _amend(self, client: QdrantClient, knowledge_id: str, old: _Base, change: Change,
               counted: list[Counter[str]], terms: _TermStats) -> _Step:
        """A change to a versioned base, in its collection, as the next generation: the
        change's chunks added, its documents' old chunks marked removed (``until``), and
        every statistic updated by those alone. O(the change), plus O(the vocabulary)
        for the absent-term weight."""
        collection, g = old.collection, old.generation
        new = g + 1
        if old.writing is not None:
            self._undo(client, knowledge_id, old)
        self._purge(client, knowledge_id, collection, old.purging)  # if its writer died
        with_sums = needs_centroid(change.manifest)
        touched = sorted(set(change.documents) | change.removed)
        found = {(p.payload or {})["document_id"]: p.payload or {} for p in client.retrieve(
            META, [_meta_id("document", knowledge_id, collection, doc_id)
                   for doc_id in touched], with_payload=True)}
        gone_rows: list[int] = []
        gone_parents: set[str] = set()
        gone_documents = removed = 0
        for doc_id, payload in found.items():
            live = _version_at(payload, g)
            if live is not None:
                gone_documents += 1
                removed += doc_id in change.removed
                gone_rows += live["rows"]
                gone_parents.update(live["parents"])
        new_parents = [_parent(node) for node in change.parents]
        parent_ids = sorted(gone_parents | {p["node_id"] for p in new_parents})
        txn = uuid.uuid4().hex
        # Named in the pointer before anything is written: a writer that dies after
        # this leaves the next one a list of what to undo (``_undo``).
        client.set_payload(META, {"writing": {
            "txn": txn, "rows": [old.next_row, old.next_row + len(change.chunks)],
            "documents": touched, "parents": parent_ids}},
            points=models.FilterSelector(filter=_unchanged(knowledge_id, old)),
            wait=True, ordering=_STRONG)
        claim = _Claim(client, knowledge_id, txn)
        claim.check()
        sums = old.sums
        readable_sum, readable_known = old.readable
        for start in range(0, len(gone_rows), _BATCH):
            batch = gone_rows[start:start + _BATCH]
            points = client.retrieve(collection, batch,
                                     with_payload=["tf", "length", "readable"],
                                     with_vectors=["dense"] if with_sums else False)
            for point in points:
                payload = point.payload or {}
                terms.add(payload.get("tf") or {}, int(payload.get("length", 0)), -1)
                if payload.get("readable") is not None:
                    readable_sum -= float(payload["readable"])
                    readable_known -= 1
            if with_sums:
                sums = merged(sums, _negated(vector_sums(_dense(points))))
            claim.check()
            client.set_payload(collection, {"until": new}, points=batch, wait=True)
        rows_added = _write_chunks(client, collection, change, counted, old.next_row, new,
                                   terms, claim)
        if with_sums:
            sums = merged(sums, vector_sums(change.vectors))
        rows: dict[str, list[int]] = {}
        for row, doc_id in rows_added:
            rows.setdefault(doc_id, []).append(row)
        by_document: dict[str, list[str]] = {}
        for parent in new_parents:
            by_document.setdefault(parent["document_id"], []).append(parent["node_id"])
        meta = []
        for doc_id in touched:
            versions = _ended((found.get(doc_id) or {}).get("versions", []), g, new)
            info = change.documents.get(doc_id)
            if info is not None:
                versions.append(_version(new, info=info.model_dump(mode="json"),
                                         rows=rows.get(doc_id, []),
                                         parents=by_document.get(doc_id, [])))
            if versions:  # none: the removal of a document the base never held
                meta.append(_meta_point("document", knowledge_id, collection, doc_id, versions))
        parent_points = {(p.payload or {})["node_id"]: p.payload or {} for p in client.retrieve(
            META, [_meta_id("parent", knowledge_id, collection, node_id)
                   for node_id in parent_ids], with_payload=True)}
        added = {p["node_id"]: p for p in new_parents}
        for node_id in parent_ids:
            versions = _ended((parent_points.get(node_id) or {}).get("versions", []), g, new)
            if node_id in added:
                versions.append(_version(new, document_id=added[node_id]["document_id"],
                                         node=added[node_id]["node"]))
            meta.append(_meta_point("parent", knowledge_id, collection, node_id, versions))
        now = time.time()
        retired = list(old.retired)
        if gone_rows or gone_documents or gone_parents:
            meta.append(models.PointStruct(
                id=_meta_id("retired", knowledge_id, collection, str(new)), vector={},
                payload={"kb": knowledge_id, "kind": "retired", "version": collection,
                         "rows": gone_rows, "documents": touched, "parents": parent_ids}))
            retired.append((new, now, len(gone_rows)))
        for start in range(0, len(meta), _BATCH):
            claim.check()
            client.upsert(META, meta[start:start + _BATCH], wait=True)
        # Removals published more than purge_s ago: no query can still be reading the
        # generations before them (one that began earlier starts again).
        due = [entry for entry in retired if entry[1] < now - self._purge_s]
        documents = (old.manifest.documents or 0) - gone_documents + len(change.documents)
        base = _pointer(knowledge_id, collection, change.manifest, terms, sums, documents,
                        old.next_row + len(change.chunks), generation=new, txn=txn,
                        readable_from=max([old.readable_from, *(u for u, _, _ in due)]),
                        retired=retired, purging=[u for u, _, _ in due],
                        readable=_readable(change, (readable_sum, readable_known)))
        return _Step(base, terms, Published(documents=documents, chunks=terms.chunk_count,
                                            removed=removed), claimed=txn)

    def _undo(self, client: QdrantClient, knowledge_id: str, old: _Base) -> None:
        """Remove what a writer that died during a publish left in the live collection
        (the pointer's ``writing``): its chunks, document and parent versions, and the
        ends it had set on generation ``old.generation``'s."""
        assert old.writing is not None
        collection, g = old.collection, old.generation
        start, end = old.writing["rows"]
        for first in range(start, end, _BATCH):
            client.delete(collection, list(range(first, min(first + _BATCH, end))), wait=True)
        live_rows: list[int] = []
        for kind, ids in (("document", old.writing["documents"]),
                          ("parent", old.writing["parents"])):
            for point in client.retrieve(META, [_meta_id(kind, knowledge_id, collection, i)
                                                for i in ids], with_payload=True):
                payload = point.payload or {}
                versions = [{**v, "until": FOREVER} if int(v["until"]) > g else v
                            for v in payload.get("versions", []) if int(v["since"]) <= g]
                if kind == "document":
                    live_rows += [row for v in versions if _visible(v, g) for row in v["rows"]]
                _rewrite_versions(client, point.id, payload, versions)
        for first in range(0, len(live_rows), _BATCH):
            client.set_payload(collection, {"until": FOREVER},
                               points=live_rows[first:first + _BATCH], wait=True)
        client.delete(META, [_meta_id("retired", knowledge_id, collection, str(g + 1))],
                      wait=True)

    def _purge(self, client: QdrantClient, knowledge_id: str, collection: str,
               generations: Sequence[int]) -> None:
        """Delete the points and versions the given generations removed (each, with the
        list of them, once; again harmlessly if a writer died doing it)."""
        for generation in generations:
            point_id = _meta_id("retired", knowledge_id, collection, str(generation))
            found = client.retrieve(META, [point_id], with_payload=True)
            if not found:
                continue
            retired = found[0].payload or {}
            rows = retired["rows"]
            for start in range(0, len(rows), _BATCH):
                client.delete(collection, rows[start:start + _BATCH], wait=True)
            for kind, ids in (("document", retired["documents"]),
                              ("parent", retired["parents"])):
                for point in client.retrieve(META, [_meta_id(kind, knowledge_id, collection, i)
                                                    for i in ids], with_payload=True):
                    payload = point.payload or {}
                    _rewrite_versions(client, point.id, payload, [
                        v for v in payload.get("versions", [])
                        if int(v["until"]) > generation])
            client.delete(META, [point_id], wait=True)

    def _drop_orphans(self, client: QdrantClient, knowledge_id: str,
                      old: _Base | None) -> None:
        """Delete chunk collections of this knowledge base the pointer does not name:
        left by a writer that died before its switch."""
        own = re.compile(re.escape(_collection_prefix(knowledge_id)) + r"_[0-9a-f]{12}")
        for found in client.get_collections().collections:
            if own.fullmatch(found.name) and (old is None or found.name != old.collection):
                self._retire(client, knowledge_id, found.name)

    def _retire(self, client: QdrantClient, knowledge_id: str, collection: str) -> None:
        client.delete(META, models.FilterSelector(filter=models.Filter(
            must=[_eq("kb", knowledge_id), _eq("version", collection)])), wait=True)
        client.delete_collection(collection)

    def drop(self, knowledge_id: str) -> None:
        with self._writing(knowledge_id) as client:
            base = self._load_base(client, knowledge_id)
            if base is None:
                raise KnowledgeBaseNotFound.missing(knowledge_id)
            self._terms.pop(knowledge_id, None)
            client.delete(META, [_meta_id("base", knowledge_id)], wait=True)
            self._retire(client, knowledge_id, base.collection)

    def close(self) -> None:
        self._client.close()


class QdrantKnowledgeBase:
    """A handle on one knowledge base; every query follows the live pointer."""

    def __init__(self, store: QdrantStore, knowledge_id: str, base: _Base) -> None:
        self._store = store
        self.knowledge_id = knowledge_id
        self._base = base

    @property
    def manifest(self) -> KBManifest:
        return self._base.manifest

    @cached_property
    def documents(self) -> dict[str, DocumentInfo]:
        found = {}
        with self._store._calls() as client:
            for payload in self._store._meta_scroll(client, self.knowledge_id, "document",
                                                    self._base.collection):
                live = _version_at(payload, self._base.generation)
                if live is not None:
                    found[payload["document_id"]] = DocumentInfo.model_validate(live["info"])
        return found

    def document(self, document_id: str) -> DocumentInfo | None:
        with self._store._calls() as client:
            found = client.retrieve(META, [_meta_id(
                "document", self.knowledge_id, self._base.collection, document_id)],
                with_payload=True)
        live = _version_at(found[0].payload or {}, self._base.generation) if found else None
        return None if live is None else DocumentInfo.model_validate(live["info"])

    def __len__(self) -> int:
        return self._base.chunk_count

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]:
        if not plan.query.strip():
            return []
        weight, query_vector = query_embedding(plan, self.manifest, embed_model)
        if query_vector is not None:
            norm = float(np.linalg.norm(query_vector))
            query_vector = query_vector / norm if norm else query_vector
        for _attempt in range(3):
            try:
                with self._store._calls() as client:
                    base = self._store._load_base(client, self.knowledge_id)
                    if base is None:
                        raise KnowledgeBaseNotFound.missing(self.knowledge_id)
                    if base.manifest.embedding != self.manifest.embedding:  # rebuilt
                        return QdrantKnowledgeBase(self._store, self.knowledge_id,
                                                   base).retrieve(plan, embed_model)
                    if base.chunk_count == 0:
                        return []
                    search = _Search(self._store, client, self.knowledge_id, base, plan,
                                     query_vector,
                                     query_scale(base.manifest, query_vector))
                    keyword = (search.keyword_ranking(plan.query) if weight < 1.0
                               else KeywordRanking.empty())
                    found = retrieve(search, keyword, weight, plan,
                                     base.manifest.chunking.get("mode") == "parent_child")
                    search.check_readable()
                    return found
            except _Gone:
                continue  # a publish replaced or purged the generation we were reading
        raise StoreUnavailableError(
            f"knowledge base {self.knowledge_id!r} kept changing while being read; try again")


class _Search:
    """One query's candidates (exact_topk.CandidateSource) from one chunk collection;
    payloads and similarities are kept, so no point is fetched twice."""

    def __init__(self, store: QdrantStore, client: QdrantClient, knowledge_id: str,
                 base: _Base, plan: QueryPlan, query_vector: np.ndarray | None,
                 scale: SimilarityScale) -> None:
        self.store, self.client, self.knowledge_id = store, client, knowledge_id
        self.base, self.query_vector, self.scale = base, query_vector, scale
        self.payloads: dict[int, dict[str, Any]] = {}
        self.similarity: dict[int, float] = {}
        self.filter = qdrant_filter(plan.predicate) if plan.predicate is not None else None

    def keyword_ranking(self, query: str) -> KeywordRanking:
        """Every chunk holding a query term (a server-side sparse search), scored from
        its term counts by text.bm25.score_postings."""
        terms = tokenize(query)
        sparse = _sparse(Counter(terms))
        if sparse is None or self.base.total_length == 0:
            return KeywordRanking.empty()
        # Only the query terms' counts and the length: their vectors and the rest of
        # their payload are fetched later for the few rows exact_topk looks up
        # (fetching them for every match cost 0.7 s a query at 5k chunks in local mode).
        wanted = sorted(set(terms))
        found = self._visible_points(sparse, "sparse", self.base.chunk_count, None,
                                     ["length", *(f"tf.{term}" for term in wanted)])
        occurrences: dict[str, list[tuple[int, int, int]]] = {}
        for point in found:
            row, payload = int(point.id), point.payload or {}
            tf = payload.get("tf") or {}
            hits = [(term, tf[term]) for term in wanted if term in tf]
            if not hits:
                continue  # a hash collision, or a point the engine returned with score 0
            length = int(payload["length"])
            for term, count in hits:
                occurrences.setdefault(term, []).append((row, int(count), length))
        postings = {term: _postings(found_) for term, found_ in occurrences.items()}
        rows, scores = score_postings(terms, postings, self.base.chunk_count,
                                      self.base.total_length, self.base.absent_term_weight)
        return KeywordRanking(rows, scores)

    def _visible_points(self, query: Any, using: str, limit: int,
                        query_filter: models.Filter | None, payload: list[str]
                        ) -> list[models.ScoredPoint]:
        """The ``limit`` best points of a search that this generation shows. Others in
        the collection (removed and not yet purged, or a publish's under way) are
        skipped here rather than filtered by Qdrant: a payload filter costs local mode a
        Python check of every point, 0.3 s a search at 10k chunks."""
        asked = limit + self.base.dead + _SLACK
        while True:
            points = self.client.query_points(
                self.base.collection, query=query, using=using, query_filter=query_filter,
                limit=asked, with_payload=[*payload, "since", "until"],
                with_vectors=False).points
            shown = [p for p in points if _visible(p.payload or {}, self.base.generation)]
            if len(shown) >= limit or len(points) < asked:
                return shown[:limit]
            asked *= 2

    def check_readable(self) -> None:
        """Raise ``_Gone`` if what this query read may have gone meanwhile: the base was
        rebuilt in another collection (a replacement, the copy of an old layout) or
        dropped, or a publish purged points of this generation (a query that outlived
        ``PURGE_S``). Parents missing from a retired collection raise nothing when
        looked up: only the pointer tells."""
        found = self.client.retrieve(META, [_meta_id("base", self.knowledge_id)],
                                     with_payload=["collection", "readable_from"])
        payload = (found[0].payload or {}) if found else {}
        if payload.get("collection") != self.base.collection or (
                self.base.versioned
                and int(payload.get("readable_from", 0)) > self.base.generation):
            raise _Gone()

    def _cosine(self, vector: Any) -> float:
        if vector is None or self.query_vector is None:
            return 0.0
        stored = np.asarray(vector, np.float64)
        norm = float(np.linalg.norm(stored))
        return float(stored @ self.query_vector) / norm if norm else 0.0

    def nearest(self, n: int) -> Candidates:
        assert self.query_vector is not None, "a vector window needs a query vector"
        points = self._visible_points(self.query_vector.tolist(), "dense", n, self.filter,
                                      ["metadata"])
        window = []
        for point in points:
            row, similarity = int(point.id), point.score
            self.similarity[row] = similarity
            metadata = self.payloads.setdefault(row, point.payload or {}).get("metadata")
            window.append((row, similarity, metadata))
        return Candidates.of(window, with_metadata=True, scale=self.scale)

    def lookup(self, rows: Sequence[int]) -> Candidates:
        missing = [row for row in rows if row not in self.payloads]
        if missing:
            # Metadata only: the node JSON is fetched later for the few rows returned.
            self._fetch(missing, ["metadata"], vectors=self.query_vector is not None)
        return Candidates.of([(row, self.similarity.get(row, 0.0),
                               self.payloads[row].get("metadata"))
                              for row in rows if row in self.payloads], with_metadata=True,
                             scale=self.scale)

    def nodes(self, rows: Sequence[int]) -> list[BaseNode]:
        missing = [row for row in rows if "node" not in self.payloads.get(row, {})]
        if missing:
            self._fetch(missing, True)
        if any("node" not in self.payloads.get(row, {}) for row in rows):
            raise _Gone()  # purged while this query ran
        return [json_to_doc(self.payloads[row]["node"]) for row in rows]

    def parents(self, chosen: list[tuple[str, float]]) -> list[NodeWithScore]:
        found = self.client.retrieve(
            META, [_meta_id("parent", self.knowledge_id, self.base.collection, parent_id)
                   for parent_id, _ in chosen], with_payload=True)
        parents = {}
        for point in found:
            live = _version_at(point.payload or {}, self.base.generation)
            if live is not None:
                parents[(point.payload or {})["node_id"]] = json_to_doc(live["node"])
        return [NodeWithScore(node=parents[parent_id], score=score)
                for parent_id, score in chosen if parent_id in parents]

    def _fetch(self, rows: list[int], payload: list[str] | bool,
               vectors: bool = False) -> None:
        for point in self.client.retrieve(
                self.base.collection, sorted(set(rows)),
                with_payload=payload if payload is True else [*payload, "since", "until"],
                with_vectors=["dense"] if vectors else False):
            if not _visible(point.payload or {}, self.base.generation):
                continue
            row = int(point.id)
            self.payloads[row] = point.payload or {}
            if vectors and isinstance(point.vector, dict):
                self.similarity[row] = self._cosine(point.vector.get("dense"))


class _QdrantRecords:
    """API keys' and views' records (stores/records.py), one point each in the meta
    collection, shared by every process using the store.

    Their points carry no "kb", and their "kind" is "record", so no filter of a knowledge
    base's points selects them. Each write stamps the point with a new "txn": adding and
    updating are conditional on it, so concurrent writers neither both add a name nor
    lose each other's updates, and an update never brings back a removed record.
    """

    def __init__(self, store: QdrantStore) -> None:
        self._store = store

    def records(self, kind: str) -> dict[str, Record]:
        found: dict[str, Record] = {}
        selected = models.Filter(must=[_eq("kind", "record"), _eq("record_kind", kind)])
        with self._store._calls() as client:
            offset = None
            while True:
                points, offset = client.scroll(META, selected, limit=_BATCH, offset=offset,
                                               with_payload=["name", "record"])
                for point in points:
                    payload = point.payload or {}
                    found[payload["name"]] = payload["record"]
                if offset is None:
                    return found

    def add_record(self, kind: str, name: str, record: Record) -> bool:
        self._store._require_conditional_updates()
        point_id = _meta_id("record", kind, name)
        txn = uuid.uuid4().hex
        point = models.PointStruct(id=point_id, vector={}, payload={
            "kind": "record", "record_kind": kind, "name": name, "record": record,
            "txn": txn})
        with self._store._calls() as client:
            if client.retrieve(META, [point_id], with_payload=False):
                return False
            # An existing point is replaced only if it matches update_filter, which this
            # one never does: of adders racing for a name, the first insert stays, and
            # reading the txn back tells each whether it was theirs.
            client.upsert(META, [point], wait=True, ordering=_STRONG,
                          update_filter=models.Filter(
                              must_not=[models.HasIdCondition(has_id=[point_id])]))
            return self._txn(client, point_id) == txn

    def update_record(self, kind: str, name: str, changes: Record) -> bool:
        self._store._require_conditional_updates()
        point_id = _meta_id("record", kind, name)
        with self._store._calls() as client:
            while True:
                found = client.retrieve(META, [point_id], with_payload=["record", "txn"],
                                        consistency=_MAJORITY)
                if not found:
                    return False
                payload = found[0].payload or {}
                txn = uuid.uuid4().hex
                # Not an upsert (that would insert a point removed meanwhile), nor
                # set_payload at the record's path (a null there deletes the field):
                # the whole merged record, on the point only while it is as read.
                client.set_payload(
                    META, {"record": {**payload["record"], **changes}, "txn": txn},
                    points=models.FilterSelector(filter=models.Filter(must=[
                        models.HasIdCondition(has_id=[point_id]),
                        _eq("txn", payload["txn"])])),
                    wait=True, ordering=_STRONG)
                now = self._txn(client, point_id)
                if now is None:  # removed meanwhile, before or after this write: gone now
                    return False
                if now == txn:
                    return True
                # Another update came between the read and the write: merge into it.

    def remove_record(self, kind: str, name: str) -> bool:
        point_id = _meta_id("record", kind, name)
        with self._store._calls() as client:
            # Two processes removing the same record at once may both answer True.
            if not client.retrieve(META, [point_id], with_payload=False,
                                   consistency=_MAJORITY):
                return False
            client.delete(META, [point_id], wait=True, ordering=_STRONG)
        return True

    @staticmethod
    def _txn(client: QdrantClient, point_id: str) -> str | None:
        found = client.retrieve(META, [point_id], with_payload=["txn"], consistency=_MAJORITY)
        return (found[0].payload or {}).get("txn") if found else None


# --- writing -------------------------------------------------------------------------


class _Lease:
    """One writer's lease on a knowledge base: the point ``lease/<knowledge_id>`` in the
    meta collection, naming its holder and when it lapses (wall-clock seconds).

    Taking it is one conditional upsert: the point is inserted if absent, replaced only
    if it has lapsed; reading it back tells who won. Qdrant applies a shard's updates one
    at a time and checks ``update_filter`` inside the update, so of writers racing for a
    free lease exactly one wins (with several replicas: writes go in strong order through
    the shard's leader, the read back asks a majority). The holder renews it every third
    of its length; one that dies (kill -9, a lost machine) stops renewing, and the lease
    lapses after at most its length.

    Not guaranteed: exclusion when a live holder misses its renewals for the whole length
    (a pause, a partition, a gevent worker busy computing) or when clocks disagree by a
    good part of it. A writer then may lose its lease mid-publish; the switch is
    conditional too (``_switch``), so it fails instead of overwriting a newer change.
    """

    def __init__(self, store: QdrantStore, knowledge_id: str, seconds: float) -> None:
        self._store, self._knowledge_id, self._seconds = store, knowledge_id, seconds
        self._id = _meta_id("lease", knowledge_id)
        self._holder = f"{socket.gethostname()} pid {os.getpid()} #{uuid.uuid4().hex[:8]}"
        self._released = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name=f"qdrant-lease-{self._holder}")

    def acquire(self, wait_s: float) -> None:
        """Take the lease, waiting up to ``wait_s`` for its holder to release it or die."""
        deadline = time.monotonic() + wait_s
        pause = 0.05
        while (holder := self._take()) != self._holder:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    f"knowledge base {self._knowledge_id!r} is being written by another "
                    f"writer ({holder or 'just finished'}); gave up after waiting "
                    f"{wait_s:g} s: try again when it has finished")
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)
        self._renewer.start()

    def release(self) -> None:
        self._released.set()
        self._renewer.join()
        try:
            with self._store._calls() as client:
                client.delete(META, models.FilterSelector(filter=self._mine()), wait=True,
                              ordering=_STRONG)
        except (KBError, _Gone) as exc:
            log.warning("could not release the write lease on %r (it lapses within %g s): %s",
                        self._knowledge_id, self._seconds, exc)

    def _take(self) -> str | None:
        """One attempt; the holder afterwards (this writer's id if it won)."""
        now = time.time()
        point = models.PointStruct(id=self._id, vector={}, payload={
            "kb": self._knowledge_id, "kind": "lease", "holder": self._holder,
            "expires": now + self._seconds})
        lapsed = models.Filter(must=[models.FieldCondition(key="expires",
                                                           range=models.Range(lt=now))])
        with self._store._calls() as client:
            client.upsert(META, [point], update_filter=lapsed, wait=True, ordering=_STRONG)
            found = client.retrieve(META, [self._id], with_payload=["holder"],
                                    consistency=_MAJORITY)
        return (found[0].payload or {}).get("holder") if found else None

    def _renew(self) -> None:
        # set_payload changes matching points and never inserts: a lease that lapsed and
        # went to another writer stays theirs.
        while not self._released.wait(self._seconds / 3):
            try:
                with self._store._calls() as client:
                    client.set_payload(META, {"expires": time.time() + self._seconds},
                                       points=models.FilterSelector(filter=self._mine()),
                                       wait=True, ordering=_STRONG)
            except (KBError, _Gone) as exc:  # the next beat tries again
                log.warning("could not renew the write lease on %r: %s",
                            self._knowledge_id, exc)

    def _mine(self) -> models.Filter:
        return models.Filter(must=[models.HasIdCondition(has_id=[self._id]),
                                   _eq("holder", self._holder)])


@dataclass(frozen=True)
class _Step:
    """What a publish wrote before its switch: the pointer to switch to (its
    ``absent_term_weight`` still to come), the term statistics it holds, the answer."""

    base: dict[str, Any]
    terms: _TermStats
    published: Published
    fresh: bool = False  # in a collection of its own, made by this publish
    claimed: str | None = None  # the txn it marked the pointer with (``writing``)


class _Claim:
    """A publish's mark on the pointer (``writing.txn``), checked before each batch it
    writes into the live collection: a writer whose lease lapsed under it, and whose
    work the next writer undid, stops at its next batch instead of writing on."""

    def __init__(self, client: QdrantClient, knowledge_id: str, txn: str) -> None:
        self._client, self._knowledge_id, self._txn = client, knowledge_id, txn

    def check(self) -> None:
        found = self._client.retrieve(META, [_meta_id("base", self._knowledge_id)],
                                      with_payload=["writing"], consistency=_MAJORITY)
        writing = (found[0].payload or {}).get("writing") if found else None
        if not isinstance(writing, dict) or writing.get("txn") != self._txn:
            raise _overtaken(self._knowledge_id)


class _TermStats:
    """The live chunks' term counts, summarised for the BM25 corpus statistics: chunk
    count, total length, and per term and term frequency how many chunks of each length
    hold it. A term's best weight (``text.bm25.best_term_weights``) is its weight in the
    shortest chunk at one of its frequencies (``weights`` falls as length grows), so a
    publish updates this by its own chunks and recomputes the absent-term weight from
    the vocabulary alone, exactly as a pass over every chunk would."""

    def __init__(self) -> None:
        self.chunk_count = 0
        self.total_length = 0
        self._frequency: dict[str, int] = {}  # chunks holding the term
        # term -> tf -> (length -> chunks), and the shortest of those lengths
        self._lengths: dict[str, dict[int, Counter[int]]] = {}
        self._shortest: dict[str, dict[int, int]] = {}

    def add(self, tf: dict[str, int], length: int, sign: int = 1) -> None:
        """Count a chunk in (``sign`` 1) or out (-1)."""
        self.chunk_count += sign
        self.total_length += sign * length
        for term, count in tf.items():
            count = int(count)
            self._frequency[term] = self._frequency.get(term, 0) + sign
            lengths = self._lengths.setdefault(term, {}).setdefault(count, Counter())
            lengths[length] += sign
            shortest = self._shortest.setdefault(term, {})
            if sign > 0:
                shortest[count] = min(shortest.get(count, length), length)
                continue
            if lengths[length] == 0:
                del lengths[length]
            if not lengths:
                del self._lengths[term][count], shortest[count]
            elif shortest[count] == length and length not in lengths:
                shortest[count] = min(lengths)
            if not self._frequency[term]:
                del self._frequency[term], self._lengths[term], self._shortest[term]

    def absent_term_weight(self) -> float:
        """``text.bm25.best_term_weights`` over the chunks counted in."""
        if self.total_length == 0:
            return 0.0
        tfs: list[int] = []
        lengths: list[int] = []
        idfs: list[float] = []
        starts: list[int] = []
        for term, shortest in self._shortest.items():
            starts.append(len(tfs))
            term_idf = idf(self._frequency[term], self.chunk_count)
            for tf, length in shortest.items():
                tfs.append(tf)
                lengths.append(length)
                idfs.append(term_idf)
        if not starts:
            return 0.0
        found = weights(np.asarray(tfs, np.int64), np.asarray(lengths, np.int64),
                        np.asarray(idfs, np.float64), self.total_length / self.chunk_count)
        return median_best_weight(np.maximum.reduceat(found, np.asarray(starts)))


def _absent_term_weight(terms: _TermStats) -> float:
    return terms.absent_term_weight()


def _scan_terms(client: QdrantClient, base: _Base) -> _TermStats:
    """The term statistics of ``base``'s live chunks, read from every chunk: O(the
    base), for a writer that did not make the generation it changes."""
    terms = _TermStats()
    offset = None
    while True:
        points, offset = client.scroll(base.collection, limit=_BATCH * 4, offset=offset,
                                       with_payload=["tf", "length", "since", "until"])
        for point in points:
            payload = point.payload or {}
            if _visible(payload, base.generation):
                terms.add(payload.get("tf") or {}, int(payload.get("length", 0)))
        if offset is None:
            return terms


def _pointer(knowledge_id: str, collection: str, manifest: KBManifest, terms: _TermStats,
             sums: VectorSums, documents: int, next_row: int, *, generation: int,
             txn: str | None = None, readable_from: int = 0,
             retired: Sequence[tuple[int, float, int]] = (),
             purging: Sequence[int] = (), readable: tuple[float, int] = (0.0, 0)
             ) -> dict[str, Any]:
    sums = {script: (total, count) for script, (total, count) in sums.items() if count}
    update: dict[str, Any] = {"documents": documents, "chunks": terms.chunk_count,
                              "updated_at": time.time()}
    readable_sum, readable_known = readable
    if terms.chunk_count and readable_known == terms.chunk_count:
        # Every chunk's share is known: their exact mean, rounded as PostgreSQL's is
        # (the sums add and subtract in another order than a bulk build's).
        update["readable_share"] = round(readable_sum / terms.chunk_count, 9)
    manifest = with_centroids(manifest.model_copy(update=update),
                              sums if needs_centroid(manifest) else {})
    return {"kb": knowledge_id, "kind": "base", "collection": collection,
            "generation": generation, "txn": txn or uuid.uuid4().hex,
            "manifest": manifest.model_dump(mode="json"), "analyzer_version": ANALYZER_VERSION,
            "chunk_count": terms.chunk_count, "total_length": terms.total_length,
            "next_row": next_row, "readable_from": readable_from,
            "readable_sum": readable_sum if readable_known else 0.0,
            "readable_known": readable_known,
            "dead": sum(n for _, _, n in retired),
            "retired": [list(entry) for entry in retired if entry[0] not in purging],
            "purging": list(purging),
            "sums": {script: [np.asarray(total, np.float64).tolist(), count]
                     for script, (total, count) in sums.items()}}


def _readable(change: Change, before: tuple[float, int]) -> tuple[float, int]:
    """``before`` (sum of shares, chunks with one) with the change's chunks added."""
    if change.readable is None:
        return before
    return before[0] + float(np.sum(change.readable)), before[1] + len(change.readable)


def _unchanged(knowledge_id: str, old: _Base | None) -> models.Filter:
    """Matches the pointer while it is still ``old`` (none: while there is none)."""
    if old is None:
        return models.Filter(must_not=[_eq("kind", "base")])
    must: list[models.Condition] = [
        models.HasIdCondition(has_id=[_meta_id("base", knowledge_id)]),
        _eq("collection", old.collection)]
    if old.versioned:
        must.append(models.FieldCondition(key="generation",
                                          match=models.MatchValue(value=old.generation)))
    return models.Filter(must=must)


def _switch(client: QdrantClient, knowledge_id: str, old: _Base | None,
            base: dict[str, Any], claimed: str | None) -> bool:
    """Make ``base`` the knowledge base's pointer in one point write, so readers see the
    old generation or the new one; only if no writer moved the pointer since ``old`` was
    read (nor, for a ``claimed`` publish, marked it since). Whether it did."""
    point_id = _meta_id("base", knowledge_id)
    # update_filter decides whether an existing point is replaced; an absent one is
    # inserted regardless. A new knowledge base must stay absent: no base matches.
    unchanged = _unchanged(knowledge_id, old)
    if claimed is not None:
        unchanged = models.Filter(must=[unchanged, _eq("writing.txn", claimed)])
    client.upsert(META, [models.PointStruct(id=point_id, vector={}, payload=base)],
                  update_filter=unchanged, wait=True, ordering=_STRONG)
    found = client.retrieve(META, [point_id], with_payload=["txn"], consistency=_MAJORITY)
    return bool(found) and (found[0].payload or {}).get("txn") == base["txn"]


def _overtaken(knowledge_id: str) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"knowledge base {knowledge_id!r} was changed by another writer while this one "
        "was writing (its lease had lapsed), so this change was not applied; try again")


def _create_chunks(client: QdrantClient, collection: str, manifest: KBManifest) -> None:
    vectors: dict[str, models.VectorParams] = {}
    if manifest.embedding is not None:
        vectors["dense"] = models.VectorParams(size=int(manifest.embedding.dimension),
                                               distance=models.Distance.COSINE)
    client.create_collection(
        collection, vectors_config=vectors,
        sparse_vectors_config={"sparse": models.SparseVectorParams(
            modifier=models.Modifier.IDF)})


def _write_chunks(client: QdrantClient, collection: str, change: Change,
                  counted: list[Counter[str]], next_row: int, since: int, terms: _TermStats,
                  claim: _Claim | None = None) -> list[tuple[int, str]]:
    """Write the change's chunks from ``next_row`` on, live from generation ``since``,
    counting them into ``terms``; each row with its document."""
    points = []
    for offset, (node, counts) in enumerate(zip(change.chunks, counted, strict=True)):
        length = sum(counts.values())
        terms.add(counts, length)
        vector: dict[str, Any] = {}
        if change.vectors is not None:
            vector["dense"] = np.asarray(change.vectors[offset], np.float32).tolist()
        sparse = _sparse(counts)
        if sparse is not None:
            vector["sparse"] = sparse
        points.append(models.PointStruct(id=next_row + offset, vector=vector, payload={
            "document_id": str(node.metadata.get("document_id", node.node_id)),
            "metadata": dict(node.metadata), "node": doc_to_json(node),
            "tf": dict(counts), "length": length, "since": since, "until": FOREVER,
            **({} if change.readable is None else {"readable": float(change.readable[offset])})
        }))
    for start in range(0, len(points), _BATCH):
        if claim is not None:
            claim.check()
        client.upsert(collection, points[start:start + _BATCH], wait=True)
    return [(int(point.id), (point.payload or {})["document_id"]) for point in points]


def _copy_chunks(client: QdrantClient, source: str, target: str, replaced: set[str],
                 terms: _TermStats, rows: dict[str, list[int]], with_sums: bool
                 ) -> VectorSums:
    """Copy the chunks of documents not replaced from a base an earlier version wrote,
    keeping their rows (the tie-break order), live from generation 1; counted into
    ``terms`` and ``rows`` (per document); with ``with_sums``, the per-script sums of
    their dense vectors (``vector_sums``)."""
    offset = None
    kept: list[models.Record] = []
    while True:
        points, offset = client.scroll(source, limit=_BATCH, offset=offset,
                                       with_payload=True, with_vectors=True)
        kept += [p for p in points if (p.payload or {}).get("document_id") not in replaced]
        if offset is None:
            break
    kept.sort(key=lambda p: int(p.id))
    for point in kept:
        payload = point.payload or {}
        terms.add(payload.get("tf") or {}, int(payload.get("length", 0)))
        rows.setdefault(str(payload.get("document_id")), []).append(int(point.id))
    for start in range(0, len(kept), _BATCH):
        client.upsert(target, [models.PointStruct(
            id=p.id, vector=p.vector if isinstance(p.vector, dict) else {},
            payload={**(p.payload or {}), "since": 1, "until": FOREVER})
            for p in kept[start:start + _BATCH]], wait=True)
    return vector_sums(_dense(kept)) if with_sums else {}


def _dense(points: Sequence[models.Record]) -> np.ndarray | None:
    dense = [p.vector["dense"] for p in points
             if isinstance(p.vector, dict) and "dense" in p.vector]
    return np.asarray(dense, np.float32) if dense else None


def _negated(sums: VectorSums) -> VectorSums:
    return {script: (-total, -count) for script, (total, count) in sums.items()}


def _parent(node: BaseNode) -> dict[str, Any]:
    return {"node_id": node.node_id,
            "document_id": str(node.metadata.get("document_id", node.ref_doc_id)),
            "node": doc_to_json(node)}


# --- generations ---------------------------------------------------------------------
#
# A chunk point carries ``since`` (the generation that added it) and ``until`` (the one
# that removed it; FOREVER while live). A document or parent point, one per id, keeps a
# list of versions, each with its own ``since`` and ``until``. Generation g shows what
# has since <= g < until; points of a base an earlier version wrote have neither, and
# that base has generation 0: all of it shows.


def _visible(payload: dict[str, Any], generation: int) -> bool:
    return int(payload.get("since", 0)) <= generation < int(payload.get("until", FOREVER))


def _version_at(payload: dict[str, Any], generation: int) -> dict[str, Any] | None:
    """The version of a document or parent point generation ``generation`` shows."""
    versions = payload.get("versions")
    if versions is None:  # written by an earlier version: the point is its one version
        return payload
    return next((v for v in versions if _visible(v, generation)), None)


def _version(since: int, **fields: Any) -> dict[str, Any]:
    return {"since": since, "until": FOREVER, **fields}


def _ended(versions: list[dict[str, Any]], generation: int, end: int) -> list[dict[str, Any]]:
    """``versions`` with the one ``generation`` shows ending at generation ``end``."""
    return [{**v, "until": end} if _visible(v, generation) else v for v in versions]


def _meta_point(kind: str, knowledge_id: str, collection: str, key: str,
                versions: list[dict[str, Any]]) -> models.PointStruct:
    """A document's ("document", by document id) or a parent chunk's ("parent", by node
    id) point in the meta collection, with its versions."""
    field = {"document": "document_id", "parent": "node_id"}[kind]
    return models.PointStruct(
        id=_meta_id(kind, knowledge_id, collection, key), vector={},
        payload={"kb": knowledge_id, "kind": kind, "version": collection, field: key,
                 "versions": versions})


def _rewrite_versions(client: QdrantClient, point_id: Any, payload: dict[str, Any],
                      versions: list[dict[str, Any]]) -> None:
    """Store a document or parent point with ``versions``, or delete it if none are left."""
    if versions:
        client.upsert(META, [models.PointStruct(id=point_id, vector={},
                                                payload={**payload, "versions": versions})],
                      wait=True)
    else:
        client.delete(META, [point_id], wait=True)


def _postings(occurrences: list[tuple[int, int, int]]) -> Postings:
    array = np.asarray(occurrences, np.int64)
    return Postings(array[:, 0], array[:, 1], array[:, 2])


# --- helpers -------------------------------------------------------------------------


def _term_index(term: str) -> int:
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "big")


def _sparse(terms: Counter[str] | dict[str, int]) -> models.SparseVector | None:
    merged: dict[int, float] = {}
    for term, count in terms.items():
        index = _term_index(term)
        merged[index] = merged.get(index, 0.0) + float(count)
    if not merged:
        return None
    indices = sorted(merged)
    return models.SparseVector(indices=indices, values=[merged[i] for i in indices])


def _collection_prefix(knowledge_id: str) -> str:
    """A collection name Qdrant accepts, unique per ``knowledge_id``."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", knowledge_id)[:40]
    digest = hashlib.sha256(knowledge_id.encode()).hexdigest()[:10]
    return f"{_PREFIX}{safe}_{digest}"


def _meta_id(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "\x00".join(parts)))


def _eq(key: str, value: str) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def qdrant_filter(predicate: Predicate) -> models.Filter | None:
    """The predicate's exact part as a Qdrant filter on the ``metadata`` payload; a
    superset of what it matches (a list matches an element in Qdrant), so
    ``predicate.matches`` re-checks every candidate. ``None``: nothing to push down."""
    pushed = predicate.exact_part.translate(_qdrant_condition)
    if pushed is None:
        return None
    conditions = list(pushed.parts)
    if pushed.logical_operator == "and":
        return models.Filter(must=conditions)
    return models.Filter(should=conditions)


def _qdrant_condition(check: ExactCheck) -> models.Condition | None:
    # Qdrant reads a key's dots and brackets as a path into the payload.
    if not plain_key(check.key):
        return None
    key = f"metadata.{check.key}"
    match check:
        case TextEquals(_, text):
            return models.FieldCondition(key=key, match=models.MatchValue(value=text))
        case TextIn(_, texts):
            return models.FieldCondition(key=key, match=models.MatchAny(any=list(texts)))
    # A numeric range compares JSON numbers only; Dify's numeric form also reads numeric
    # strings and ISO times, which it would miss.
    return None


class QdrantFailures:
    """What a failed Qdrant call means to Dify, with the store URL shown redacted: a 400
    naming what answered instead of Qdrant, a refused key or a TLS mismatch; a 503 for an
    outage or rate limiting. One reading for this store and for the collections
    LlamaIndex wrote (``stores/llamaindex/qdrant.py``)."""

    def __init__(self, shown: str, secrets: tuple[str, ...],
                 oldest: tuple[int, int] | None = None) -> None:
        self.shown = shown
        self.secrets = secrets
        self.oldest = oldest  # the oldest Qdrant whose answers the caller can use

    @contextmanager
    def translated(self) -> Iterator[None]:
        try:
            yield
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise ConfigurationError(
                    f"store {self.shown} refused the API key ({exc.status_code}); set "
                    "?api_key=… in the store URL or LLAMAINDEX_KB_STORE_API_KEY") from exc
            raise StoreUnavailableError(
                f"store {self.shown}: {self.problem(exc)}; try again") from exc
        except ResourceExhaustedResponse as exc:
            raise StoreUnavailableError(
                f"store {self.shown} is rate limiting requests (HTTP 429); try again in "
                f"{exc.retry_after_s} s") from exc
        except ResponseHandlingException as exc:
            raise self.not_answering(exc.source) from exc
        except (ConnectionError, TimeoutError, httpx.HTTPError) as exc:
            raise self.not_answering(exc) from exc
        except json.JSONDecodeError as exc:  # an answer said JSON and was not
            raise self.not_answering(exc) from exc

    def not_answering(self, exc: BaseException) -> KBError:
        """A request that got no usable answer: what reached the URL, or an outage."""
        if isinstance(exc, _NotQdrant):
            return ConfigurationError(
                f"store URL {self.shown} answered {exc}, which is not a Qdrant server: "
                "check the host and port")
        if isinstance(exc, ValidationError | json.JSONDecodeError):
            what = "JSON" if isinstance(exc, ValidationError) else "a body"
            oldest = "" if self.oldest is None else (
                f", and that the server runs Qdrant {'.'.join(map(str, self.oldest))} or later")
            return ConfigurationError(
                f"store URL {self.shown} answered {what} that is not a Qdrant answer: check "
                f"the host and port{oldest}")
        if _not_http(exc):
            return ConfigurationError(
                f"store URL {self.shown} answered something that is not HTTP "
                f"({self.problem(exc)}), so not a Qdrant server: check the host and port")
        if any(isinstance(cause, ssl.SSLError) for cause in _causes(exc)):
            return ConfigurationError(
                f"store URL {self.shown}: the TLS handshake failed ({self.problem(exc)}): "
                "use http:// or qdrant:// for a server without TLS, and https:// only with "
                "a certificate this machine trusts")
        return StoreUnavailableError(
            f"store {self.shown} is unreachable ({self.problem(exc)}); is Qdrant "
            "running and reachable from here?")

    def problem(self, exc: BaseException) -> str:
        return redact_text(first_line(exc), self.secrets)


class _OneCallAtATime:
    """A local-mode client whose calls take turns: its engine is not thread-safe.

    Per call, not per reader or writer, so a query and a publish interleave as on a
    server (a query that loses its collection to the publish reads again: ``_Gone``).
    """

    def __init__(self, client: QdrantClient) -> None:
        self._client = client
        self._turn = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def in_turn(*args: Any, **kwargs: Any) -> Any:
            with self._turn:
                return attribute(*args, **kwargs)

        return in_turn


def one_call_at_a_time(client: QdrantClient) -> QdrantClient:
    return cast(QdrantClient, _OneCallAtATime(client))


def open_local(path: str, shown: str, in_use: str) -> QdrantClient:
    """qdrant-client's local mode on ``path``, one call at a time; a folder another
    process holds is a ``ConfigurationError`` saying "in use by another process", then
    ``in_use`` (what to do about it), and any other failure one naming ``shown``."""
    try:
        return one_call_at_a_time(QdrantClient(path=path))
    except RuntimeError as exc:
        # qdrant-client flocks <path>/.lock without waiting: a second opener fails.
        if "already accessed" not in str(exc):
            raise ConfigurationError(f"store {shown}: {first_line(exc)}") from exc
        raise ConfigurationError(
            f"store {shown} is in use by another process {in_use}") from exc


_READS = frozenset({"collection_exists", "count", "get_collection", "get_collections", "info",
                    "query_points", "retrieve", "scroll"})
_TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


class _RetryingReads:
    """A server client whose reads survive a brief outage (a restart, a failover, a
    proxy's 502): retried with backoff for up to ``RETRY_S``, then the error stands
    and becomes a 503. Writes are not retried here: a publish reports and is re-run."""

    def __init__(self, client: QdrantClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in _READS:
            return attribute

        @functools.wraps(attribute)
        def retried(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + RETRY_S
            pause = 0.1
            while True:
                try:
                    return attribute(*args, **kwargs)
                except (ResponseHandlingException, UnexpectedResponse,
                        ResourceExhaustedResponse) as exc:
                    transient = (_transient(exc.source)
                                 if isinstance(exc, ResponseHandlingException)
                                 else isinstance(exc, ResourceExhaustedResponse)
                                 or exc.status_code in _TRANSIENT_STATUS)
                    if not transient or time.monotonic() + pause > deadline:
                        raise
                time.sleep(pause)
                pause *= 2

        return retried


def _transient(failure: Exception) -> bool:
    """Whether a request that got no usable answer may get one if tried again."""
    return not (isinstance(failure, _NotQdrant | ValidationError) or _not_http(failure)
                or any(isinstance(cause, ssl.SSLError) for cause in _causes(failure)))


def _not_http(failure: BaseException) -> bool:
    # h11 calls what is not an HTTP status or header line "illegal"; its other protocol
    # errors (a connection closed before or during the answer, as a proxy does while
    # Qdrant restarts) may pass.
    return isinstance(failure, httpx.RemoteProtocolError) and "illegal" in str(failure)


def _causes(failure: BaseException) -> Iterator[BaseException]:
    seen: list[BaseException] = []
    cause: BaseException | None = failure
    while cause is not None and not any(cause is known for known in seen):
        seen.append(cause)
        yield cause
        cause = cause.__cause__ or cause.__context__


def retrying_reads(client: QdrantClient) -> QdrantClient:
    return cast(QdrantClient, _RetryingReads(client))
