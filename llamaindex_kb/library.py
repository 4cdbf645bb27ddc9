"""All knowledge bases under one data directory: lookup, caching and retrieval.

A knowledge base is opened on first use and kept open (memory-mapped) across
requests. Each request checks the tiny ``CURRENT`` pointer, so a version published
by ``ingest`` in another process is picked up without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

from llama_index.core.schema import NodeWithScore

from .config import Settings
from .contract import Record, RetrievalRequest
from .errors import KnowledgeBaseNotFound
from .knowledge_base import KBManifest, KnowledgeBase, QueryPlan
from .layout import KBLayout, all_layouts, current_version
from .models import Models
from .rerank import candidate_count, rerank_hits

log = logging.getLogger(__name__)

DEMO_KB = "demo"
DEMO_SOURCE = Path(__file__).parent / "demo"


class Library:
    """Knowledge bases by ``knowledge_id``, opened lazily and cached."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self._open: dict[str, KnowledgeBase] = {}
        self._lock = threading.Lock()

    def open(self, knowledge_id: str) -> KnowledgeBase:
        version = KBLayout(self.data_dir, knowledge_id).current_version()
        if version is None:
            raise KnowledgeBaseNotFound(f"knowledge base {knowledge_id!r} does not exist")
        cached = self._open.get(knowledge_id)
        if cached is not None and cached.version_dir == version:
            return cached
        with self._lock:
            cached = self._open.get(knowledge_id)
            if cached is None or cached.version_dir != version:
                cached = KnowledgeBase(version)
                self._open[knowledge_id] = cached
                log.info("opened knowledge base %s (%d chunks)", knowledge_id, len(cached))
        return cached

    def manifests(self) -> list[KBManifest]:
        """Every knowledge base's manifest, without opening its indices."""
        found = []
        for root in all_layouts(self.data_dir):
            version = current_version(root)
            if version is not None:
                found.append(KBManifest.read(version))
        return sorted(found, key=lambda manifest: manifest.knowledge_id)

    def retrieve(self, request: RetrievalRequest, models: Models) -> list[Record]:
        kb = self.open(request.knowledge_id)
        plan = QueryPlan(
            query=request.query,
            top_k=request.top_k,
            score_threshold=request.score_threshold,
            condition=request.condition,
            mode=self.settings.retrieval_mode,
            semantic_weight=self.settings.semantic_weight,
        )
        if models.reranker is None:
            hits = kb.retrieve(plan, models.embed_model)
        else:
            wider = plan.model_copy(update={"top_k": candidate_count(plan.top_k),
                                            "score_threshold": 0.0})
            hits = rerank_hits(models.reranker, plan.query, kb.retrieve(wider, models.embed_model),
                               plan.top_k, plan.score_threshold)
        return [to_record(hit) for hit in hits]


def to_record(hit: NodeWithScore) -> Record:
    metadata: dict[str, Any] = dict(hit.node.metadata)
    metadata.setdefault("document_id", hit.node.ref_doc_id or hit.node.node_id)
    metadata["chunk_id"] = hit.node.node_id
    title = metadata.get("title") or metadata.get("file_name") or str(metadata["document_id"])
    return Record(
        content=hit.node.get_content(),
        score=min(1.0, max(0.0, float(hit.score or 0.0))),
        title=str(title),
        metadata=metadata,
    )


def demo_fingerprint() -> str:
    digest = hashlib.sha256()
    for file in sorted(DEMO_SOURCE.rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(DEMO_SOURCE).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
