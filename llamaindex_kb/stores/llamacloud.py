"""LlamaCloud managed indexes (pipelines) as a read-only store.

Store URL::

    llamacloud://<api_key>@api.cloud.llamaindex.ai/?project=Default&organization=<org id>
    llamacloud://<api_key>@/?region=eu                 (api.cloud.eu.llamaindex.ai)
    llamacloud://?api_key=<api_key>&region=na          (key as a query parameter instead)

* API key: the URL's user part (percent-encoded if needed) or ``api_key=``; else the
  ``LLAMA_CLOUD_API_KEY`` environment variable. It is required: no key, no store.
* Host: ``api.cloud.llamaindex.ai`` (North America, the default) or
  ``api.cloud.eu.llamaindex.ai``; ``region=na|eu`` picks one without naming it.
  A host and a region that disagree are refused. ``insecure=true`` speaks plain HTTP
  (only for a local stand-in of the API, as the tests use).
* ``project`` (a project name) and ``organization`` (an organization id, a UUID as
  LlamaCloud requires) narrow where index names are looked up; without them the
  lookup covers whatever LlamaCloud lists for the key.

A ``knowledge_id`` is a LlamaCloud index (pipeline) name, or a pipeline id (what the
official LlamaCloud Dify plugin takes). The calls, as LlamaCloud's OpenAPI definition
states them, all with ``Authorization: Bearer <key>``:

* ``GET /api/v1/pipelines/{pipeline_id}`` (a UUID, else 422; no query parameters):
  is this a pipeline id? A pipeline id is global, so ``project`` does not narrow it.
* ``GET /api/v1/pipelines?pipeline_type=MANAGED&pipeline_name=&project_name=&
  organization_id=``, a JSON array of pipelines (``id``, ``name``, ``project_id``,
  ``pipeline_type``, ``created_at``...): by name, and (without ``pipeline_name``) the
  listing behind ``manifests``. ``MANAGED`` leaves out the playground copies a
  LlamaCloud index may have under the same name (as LlamaIndex's own resolver does).
  A pipeline has no document or chunk counts, so manifests report both as unknown
  (``None``), never 0.
* ``GET /api/v1/pipelines/{pipeline_id}/files2?limit=&offset=``, a page of the index's
  files (``{files, limit, offset, total_count}``; a file: ``id``, ``file_id``,
  ``name``, ``file_size``, ``file_type``, ``custom_metadata``, ``status``,
  ``last_modified_at``...), page after page: the index's ``documents``, listed only on
  request. Each file is a document under the ``document_id`` its chunks carry in
  retrieval records (its ``document_id`` metadata, else its ``file_id``); LlamaCloud
  does not say how many chunks a file has, so ``chunks`` is ``None``. (LlamaCloud marks
  this call, like the whole pipelines API, deprecated in favour of its Index v2.)
* ``POST /api/v1/pipelines/{pipeline_id}/retrieve`` with ``query``,
  ``dense_similarity_top_k``, ``sparse_similarity_top_k``, ``rerank_top_n`` (each 1 to
  100; LlamaCloud's defaults 30, 30 and 6 would cap what reranking returns),
  ``retrieval_mode: "chunks"``, ``alpha`` (0 to 1, only when a retrieval mode is
  configured: vector 1, keyword 0, hybrid the semantic weight) and ``search_filters``
  (LlamaIndex ``MetadataFilters`` JSON: ``filters`` of ``{key, value, operator}`` and
  ``condition``, for the part of ``metadata_condition`` that LlamaIndex's operators
  express exactly: the exact part's ``TextEquals`` as ``==`` and ``TextIn`` as ``in``,
  ``_search_filters``); the answer's
  ``retrieval_nodes[].node`` (``id_``, ``text``, ``extra_info``, ``relationships``) and
  ``retrieval_nodes[].score``. ``enable_reranking`` is not sent, so LlamaCloud's
  default applies.

Every answer is checked here: scores clipped to [0, 1] and sorted, ``score_threshold``
applied to the score reported, ``metadata_condition`` re-checked on every record with
``Predicate.matches`` (fetching more, up to LlamaCloud's 100, when that leaves fewer than
``top_k``), ``top_k`` respected, ``metadata`` an object with a stable ``document_id``
(``document_id``, else ``file_id``, else the source document's id, else the file
path or name, else the chunk id).

Errors (FastAPI's: ``{"detail": ...}``, a list of ``{loc, msg, type}`` for 422):
LlamaCloud's 401/403 is a wrong key in the store URL, so a 400 naming the fix
(never our own 403, which means Dify's key to us is wrong); an unknown index is 404
(2001); 429, 5xx, timeouts and connection failures are retried with backoff and become
503 (5003) within ``DEADLINE_S``. Indexes are managed in LlamaCloud, so every write
(ingest, upload, delete, drop) answers 400 ``ReadOnlyStoreError`` (3007) saying so.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from datetime import datetime
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.core.vector_stores.types import MetadataFilter

from llamaindex_kb.conditions.compiled import (
    Predicate,
)
from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    KnowledgeBaseNotFound,
    ReadOnlyStoreError,
    StoreUnavailableError,
)
from llamaindex_kb.redaction import redact_text
from llamaindex_kb.scoring import clip, lowest_returned, semantic_weight
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    KBManifest,
    Published,
    QueryPlan,
    effective_mode,
)
from llamaindex_kb.stores.llamaindex.filters import exact_metadata_filters

log = logging.getLogger(__name__)

REGIONS = {"na": "api.cloud.llamaindex.ai", "us": "api.cloud.llamaindex.ai",
           "eu": "api.cloud.eu.llamaindex.ai"}
DEADLINE_S = 4.0  # per store call, retries included: Dify waits 5 s for the whole answer
ATTEMPT_TIMEOUT_S = 1.6  # one HTTP attempt; leaves room for a retry inside the deadline
MAX_TOP_K = 100  # LlamaCloud's limit for dense_similarity_top_k and friends
FILES_PAGE = 100  # files asked for per page of an index's listing
# Listing an index's files is an operator's request (the CLI, GET .../documents), not
# Dify's 5 s retrieval: a large index takes many pages.
LIST_DEADLINE_S = 30.0
RESOLVE_TTL_S = 60.0  # how long an index name → pipeline id lookup is reused
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}$")
# Keys to_record (and this module) add to every record: LlamaCloud's nodes lack them,
# so a pushed-down filter on them would wrongly match nothing there.
_SYNTHESIZED_KEYS = frozenset({"document_id", "chunk_id"})
_TRUE = {"1", "true", "yes", "on"}

READ_ONLY = ("LlamaCloud indexes are read-only here: add, replace or delete their "
             "documents in LlamaCloud (https://cloud.llamaindex.ai)")
KEY_HELP = ("create an API key at https://cloud.llamaindex.ai (API Keys) and put it in the "
            "store URL: llamacloud://<api_key>@api.cloud.llamaindex.ai/?project=<project>; "
            "an account in the EU region needs region=eu (api.cloud.eu.llamaindex.ai)")


def from_url(url: str, settings: Settings) -> LlamaCloudStore:
    return LlamaCloudStore(url)


def _query_value(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1].strip() or None if values else None


class LlamaCloudStore:
    """LlamaCloud indexes by name (or pipeline id); read-only, thread-safe."""

    searches_in_process = False
    read_only = READ_ONLY
    access_records = None  # kept in the data directory beside it (stores/records.py)

    def __init__(self, url: str, *, transport: httpx.BaseTransport | None = None) -> None:
        parts = urlsplit(url)
        params = parse_qs(parts.query, keep_blank_values=True)
        known = {"api_key", "region", "project", "organization", "insecure"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigurationError(
                f"LlamaCloud store URL: unknown parameter(s) {', '.join(unknown)}; "
                f"use {', '.join(sorted(known))}")
        api_key = (unquote(parts.username) if parts.username else None) \
            or _query_value(params, "api_key") or os.environ.get("LLAMA_CLOUD_API_KEY")
        if not api_key:
            raise ConfigurationError(f"LlamaCloud store URL has no API key: {KEY_HELP}")
        region = (_query_value(params, "region") or "").lower() or None
        if region is not None and region not in REGIONS:
            raise ConfigurationError(
                f"LlamaCloud store URL: region {region!r} is unknown; use region=na or region=eu")
        host = parts.hostname
        if host and region and REGIONS[region] != host:
            raise ConfigurationError(
                f"LlamaCloud store URL names host {host!r} and region {region!r}, which "
                f"disagree; give one (region {region} is {REGIONS[region]})")
        host = host or REGIONS[region or "na"]
        scheme = "http" if (_query_value(params, "insecure") or "").lower() in _TRUE else "https"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        self.base_url = f"{scheme}://{netloc}"
        self.project = _query_value(params, "project")
        self.organization = _query_value(params, "organization")
        if self.organization is not None and not _UUID.match(self.organization):
            # LlamaCloud would answer every lookup 422: organization_id is a UUID there.
            raise ConfigurationError(
                f"LlamaCloud store URL: organization {self.organization!r} is not an "
                "organization id (a UUID, shown in LlamaCloud's organization settings)")
        # The key never appears in url (logged, shown by the CLI).
        query = "&".join(f"{k}={quote(v)}" for k, v in
                         (("project", self.project), ("organization", self.organization))
                         if v)
        self.url = f"llamacloud://{netloc}/" + (f"?{query}" if query else "")
        self._api_key = api_key  # only to keep it out of what LlamaCloud's errors echo
        self._client = httpx.Client(
            base_url=self.base_url, transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        )
        self._resolved: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    # --- KnowledgeStore ----------------------------------------------------------

    def open(self, knowledge_id: str) -> LlamaCloudIndex:
        found = self.find(knowledge_id)
        if found is None:
            where = f" in project {self.project!r}" if self.project else ""
            raise KnowledgeBaseNotFound(
                f"knowledge base {knowledge_id!r} does not exist: no LlamaCloud index with "
                f"that name or pipeline id{where}")
        return found

    def find(self, knowledge_id: str) -> LlamaCloudIndex | None:
        deadline = time.monotonic() + DEADLINE_S
        pipeline = self._pipeline(knowledge_id, deadline)
        return (None if pipeline is None
                else LlamaCloudIndex(self, knowledge_id, pipeline, deadline=deadline))

    def manifests(self) -> list[KBManifest]:
        pipelines = self._request("GET", "/api/v1/pipelines", time.monotonic() + DEADLINE_S,
                                  params=self._search())
        found = [_manifest(str(p.get("name") or p.get("id")), p)
                 for p in _pipeline_list(pipelines)]
        return sorted(found, key=lambda manifest: manifest.knowledge_id)

    def publish(self, knowledge_id: str, change: Change) -> Published:
        raise ReadOnlyStoreError.refusing(knowledge_id, READ_ONLY)

    def drop(self, knowledge_id: str) -> None:
        raise ReadOnlyStoreError.refusing(knowledge_id, READ_ONLY)

    def close(self) -> None:
        self._client.close()

    # --- LlamaCloud calls --------------------------------------------------------

    def _search(self, **extra: str) -> dict[str, str]:
        """Query parameters of ``GET /api/v1/pipelines``: managed indexes in scope."""
        search = {"pipeline_type": "MANAGED", **extra}
        if self.project:
            search["project_name"] = self.project
        if self.organization:
            search["organization_id"] = self.organization
        return search

    def _pipeline(self, knowledge_id: str, deadline: float) -> dict[str, Any] | None:
        """The pipeline a knowledge_id names (cached briefly), None if there is none."""
        if not knowledge_id:
            return None
        cached = self._resolved.get(knowledge_id)
        if cached is not None and time.monotonic() - cached[0] < RESOLVE_TTL_S:
            return cached[1]
        pipeline = None
        if _UUID.match(knowledge_id):
            pipeline = self._request("GET", f"/api/v1/pipelines/{knowledge_id}", deadline,
                                     missing_ok=True)
        if pipeline is None:
            named = self._request("GET", "/api/v1/pipelines", deadline,
                                  params=self._search(pipeline_name=knowledge_id))
            exact = [p for p in _pipeline_list(named) if p.get("name") == knowledge_id]
            if len(exact) > 1:
                raise ConfigurationError(
                    f"{len(exact)} LlamaCloud indexes are named {knowledge_id!r}: add "
                    "project=<name> to the store URL, or use the pipeline id as knowledge_id")
            pipeline = exact[0] if exact else None
        with self._lock:
            self._resolved[knowledge_id] = (time.monotonic(), pipeline)
        return pipeline

    def _request(self, method: str, path: str, deadline: float, *,
                 params: dict[str, str] | None = None, json: Any = None,
                 missing_ok: bool = False) -> Any:
        """One call, retried on 429/5xx/timeouts while the deadline allows."""
        delay = 0.2
        problem = "no attempt fit in the time allowed"
        while True:
            remaining = deadline - time.monotonic()
            if remaining < 0.05:
                raise StoreUnavailableError(
                    f"LlamaCloud ({self.base_url}) is unavailable: {problem}; try again shortly")
            timeout = min(ATTEMPT_TIMEOUT_S, remaining)
            try:
                response = self._client.request(method, path, params=params, json=json,
                                                 timeout=timeout)
            except httpx.TimeoutException:
                problem = f"no answer within {timeout:.1f} s"
            except httpx.TransportError as exc:
                problem = f"cannot connect ({type(exc).__name__})"
            else:
                status = response.status_code
                if status < 300:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise StoreUnavailableError(
                            f"LlamaCloud ({self.base_url}) answered {path} with non-JSON") \
                            from exc
                if status in (401, 403):
                    raise ConfigurationError(
                        f"LlamaCloud rejected the API key (HTTP {status}): {KEY_HELP}")
                if status in (404, 422) and missing_ok:
                    return None
                if status == 404:
                    raise KnowledgeBaseNotFound(
                        f"LlamaCloud has no such index or pipeline ({method} {path}: 404)")
                if status == 429 or status >= 500:
                    problem = f"HTTP {status}"
                    retry_after = response.headers.get("Retry-After", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        delay = max(delay, min(float(retry_after), 1.0))
                else:
                    raise ConfigurationError(
                        f"LlamaCloud refused {method} {path} (HTTP {status}): "
                        f"{redact_text(_detail(response), [self._api_key])}")
            log.warning("LlamaCloud %s %s: %s; retrying", method, path, problem)
            if time.monotonic() + delay >= deadline - 0.05:
                raise StoreUnavailableError(
                    f"LlamaCloud ({self.base_url}) is unavailable: {problem}; try again shortly")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class LlamaCloudIndex:
    """One LlamaCloud index opened for reading."""

    def __init__(self, store: LlamaCloudStore, knowledge_id: str,
                 pipeline: dict[str, Any], *, deadline: float | None = None) -> None:
        self.store = store
        # A retrieval right after open (one Dify request) shares open's deadline, so
        # looking the index up and searching it take DEADLINE_S together, not each.
        self._open_deadline = deadline
        self.knowledge_id = knowledge_id
        self.pipeline_id = str(pipeline["id"])
        self._manifest = _manifest(knowledge_id, pipeline)

    @property
    def manifest(self) -> KBManifest:
        return self._manifest

    def document(self, document_id: str) -> DocumentInfo | None:
        return self.documents.get(document_id)

    @cached_property
    def documents(self) -> dict[str, DocumentInfo]:
        """The index's files, listed on first use (retrieval never needs them)."""
        deadline = time.monotonic() + LIST_DEADLINE_S
        path = f"/api/v1/pipelines/{self.pipeline_id}/files2"
        found: dict[str, DocumentInfo] = {}
        offset = 0
        while True:
            page = self.store._request("GET", path, deadline,
                                       params={"limit": str(FILES_PAGE), "offset": str(offset)})
            files = page.get("files") if isinstance(page, dict) else None
            total = page.get("total_count") if isinstance(page, dict) else None
            if not isinstance(files, list) or not isinstance(total, int):
                raise StoreUnavailableError(
                    "LlamaCloud's files answer has no files list or total_count")
            for file in files:
                if isinstance(file, dict) and file.get("id"):
                    info = _document_info(file)
                    found[info.document_id] = info
            # By what came back, not by what was asked: a server may cap a page.
            offset += len(files)
            if not files or offset >= total:
                return found

    def retrieve(self, plan: QueryPlan, embed_model: BaseEmbedding | None
                 ) -> list[NodeWithScore]:
        """LlamaCloud embeds the query itself, so ``embed_model`` is not used."""
        if not plan.query.strip() or plan.top_k <= 0:
            return []
        deadline = time.monotonic() + DEADLINE_S
        if self._open_deadline is not None and self._open_deadline > time.monotonic():
            deadline = self._open_deadline
        body: dict[str, Any] = {"query": plan.query, "retrieval_mode": "chunks"}
        if plan.mode is not None:
            # LlamaCloud's alpha is our semantic share; unset, the index's own settings apply.
            body["alpha"] = semantic_weight(*effective_mode(plan, self.manifest))
        pushed_everything = True
        if plan.predicate is not None:
            search_filters, pushed_everything = _search_filters(plan.predicate)
            if search_filters is not None:
                body["search_filters"] = search_filters
        want = min(MAX_TOP_K, plan.top_k if pushed_everything else plan.top_k * 4)
        while True:
            body.update(dense_similarity_top_k=want, sparse_similarity_top_k=want,
                        rerank_top_n=want)
            answer = self.store._request(
                "POST", f"/api/v1/pipelines/{self.pipeline_id}/retrieve", deadline, json=body)
            nodes = answer.get("retrieval_nodes") if isinstance(answer, dict) else None
            if not isinstance(nodes, list):
                raise StoreUnavailableError(
                    "LlamaCloud's retrieve answer has no retrieval_nodes list")
            hits, rejected = self._hits(nodes, plan)
            # More can help only if LlamaCloud had more to give, the filter (not the
            # threshold) is what left us short, and the limit allows asking for more.
            if (len(hits) >= plan.top_k or not rejected or len(nodes) < want
                    or want >= MAX_TOP_K):
                break
            want = min(MAX_TOP_K, want * 4)
        hits.sort(key=lambda hit: (-(hit.score or 0.0), hit.node.node_id))
        return hits[: plan.top_k]

    def _hits(self, nodes: list[Any], plan: QueryPlan) -> tuple[list[NodeWithScore], int]:
        hits: list[NodeWithScore] = []
        rejected = 0
        seen: set[str] = set()
        floor = lowest_returned(plan.score_threshold)
        for position, item in enumerate(nodes):
            if not isinstance(item, dict) or not isinstance(item.get("node"), dict):
                continue
            node = _text_node(item["node"], position)
            if node.node_id in seen:
                continue
            seen.add(node.node_id)
            if plan.predicate is not None and not plan.predicate.matches(node.metadata):
                rejected += 1
                continue
            score = clip(item.get("score"))
            if score >= floor:
                hits.append(NodeWithScore(node=node, score=score))
        return hits, rejected


# --- helpers ---------------------------------------------------------------------


def _search_filters(predicate: Predicate) -> tuple[dict[str, Any] | None, bool]:
    """(LlamaCloud search_filters or None, whether they express the whole condition):
    LlamaIndex ``MetadataFilters`` as JSON, without the keys this store adds itself."""
    filters, complete = exact_metadata_filters(
        predicate, key_ok=lambda key: key not in _SYNTHESIZED_KEYS)
    if filters is None:
        return None, False
    payload = {"filters": [{"key": f.key, "value": f.value, "operator": f.operator.value}
                           for f in filters.filters if isinstance(f, MetadataFilter)],
               "condition": str(filters.condition.value if filters.condition else "and")}
    return payload, complete


def _text_node(raw: dict[str, Any], position: int) -> TextNode:
    # LlamaCloud's TextNode: metadata in extra_info, relationships keyed by
    # LlamaIndex's NodeRelationship values ("1" is SOURCE, the source document).
    extra_info = raw.get("extra_info")
    metadata: dict[str, Any] = dict(extra_info) if isinstance(extra_info, dict) else {}
    node_id = str(raw.get("id_") or f"llamacloud-{position}")
    source = raw.get("relationships", {}) if isinstance(raw.get("relationships"), dict) else {}
    source_node = source.get("1")
    source_id = source_node.get("node_id") if isinstance(source_node, dict) else None
    document_id = (_document_id(metadata) or source_id or metadata.get("file_path")
                   or metadata.get("file_name") or node_id)
    metadata["document_id"] = str(document_id)
    text = raw.get("text")
    return TextNode(id_=node_id, text=text if isinstance(text, str) else "", metadata=metadata)



def _pipeline_list(answer: Any) -> list[dict[str, Any]]:
    """The pipelines of a ``GET /api/v1/pipelines`` answer, a JSON array."""
    return [p for p in answer if isinstance(p, dict) and p.get("id")] \
        if isinstance(answer, list) else []


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _manifest(knowledge_id: str, pipeline: dict[str, Any]) -> KBManifest:
    times = {k: t for k, t in (("created_at", _timestamp(pipeline.get("created_at"))),
                               ("updated_at", _timestamp(pipeline.get("updated_at"))))
             if t is not None}
    return KBManifest(knowledge_id=knowledge_id, embedding=None,
                      chunking={"store": "llamacloud", "pipeline_id": str(pipeline.get("id"))},
                      documents=None, chunks=None, **times)


def _document_id(metadata: dict[str, Any]) -> str | None:
    """The document a chunk's or a file's metadata names: the ``document_id`` a user
    gave the file, else LlamaCloud's file id. Records and the listing both use it."""
    named = metadata.get("document_id") or metadata.get("file_id")
    return str(named) if named else None


def _document_info(file: dict[str, Any]) -> DocumentInfo:
    """A file of ``GET .../files2`` as a document, under its chunks' ``document_id``."""
    custom = file.get("custom_metadata")
    metadata: dict[str, Any] = dict(custom) if isinstance(custom, dict) else {}
    name = file.get("name") if isinstance(file.get("name"), str) else None
    size, kind = file.get("file_size"), file.get("file_type")
    modified = _timestamp(file.get("last_modified_at"))
    if isinstance(file.get("status"), str):
        # Only a file LlamaCloud finished indexing ("SUCCESS") has chunks to find.
        metadata["llamacloud_status"] = file["status"]
    return DocumentInfo(
        document_id=_document_id({**metadata, "file_id": file.get("file_id")})
        or str(file["id"]),
        title=name or str(file.get("file_id") or file["id"]),
        file_name=name,
        file_type=kind if isinstance(kind, str) else None,
        file_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        last_modified=None if modified is None else int(modified),
        chunks=None,
        metadata=metadata,
    )


def _detail(response: httpx.Response) -> str:
    """LlamaCloud's reason: FastAPI's ``detail``, a text or (422) a list of problems."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            if isinstance(item, dict) else str(item) for item in detail)
    text = str(detail) if detail else response.text
    return text[:300] or "no details"
