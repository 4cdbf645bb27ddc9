"""All knowledge bases of one store: lookup and retrieval (with optional reranking).

The store (``stores/``) decides where they live and keeps them open across
requests; a version published by another process is picked up without a restart.

A retrieval test may ask what each score is made of (``explain``): the same plan is run
again in vector and in keyword mode, narrowed to the answered records' documents, and
each record's chunk is read back from both (``Library.explain``). Dify never asks, and
pays nothing for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import NodeWithScore

from llamaindex_kb.conditions.compiled import Predicate, compile_condition
from llamaindex_kb.conditions.model import Condition, MetadataCondition
from llamaindex_kb.config import Settings
from llamaindex_kb.contract import MAX_TOP_K, Record, RetrievalRequest, ScoreParts
from llamaindex_kb.errors import InvalidFieldError, KnowledgeBaseNotFound
from llamaindex_kb.models.base import Models, Reranker
from llamaindex_kb.scoring import clip, lowest_returned
from llamaindex_kb.stores.base import (
    DocumentInfo,
    KBManifest,
    KnowledgeBaseHandle,
    KnowledgeStore,
    QueryPlan,
    document_metadata,
    effective_mode,
    fused_weight,
)
from llamaindex_kb.stores.records import records_for
from llamaindex_kb.stores.registry import store_for
from llamaindex_kb.views import View, Views

DEMO_KB = "demo"
DEMO_SOURCE = Path(__file__).parent / "demo"
# A reranker sees more candidates than asked for, so it can promote one the first stage
# ranked below top_k.
CANDIDATE_FACTOR = 3
MIN_CANDIDATES = 20


class Library:
    """Knowledge bases and views by ``knowledge_id``, from the store the settings name."""

    def __init__(self, settings: Settings, store: KnowledgeStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else store_for(settings)
        self.records = records_for(self.store, settings.data_dir)
        self.views = Views(self.records, self.store)

    def open(self, knowledge_id: str) -> KnowledgeBaseHandle:
        return self.store.open(knowledge_id)

    def knowledge_ids(self) -> set[str]:
        """Every knowledge base's and view's id."""
        return ({manifest.knowledge_id for manifest in self.manifests()}
                | {view.name for view in self.views.list()})

    def resolve(self, knowledge_id: str) -> tuple[KnowledgeBaseHandle, View | None]:
        """The knowledge base ``knowledge_id`` names, directly or as a view (then with
        the view). A base is looked for first: asking it costs nothing once open, and
        most requests name one."""
        try:
            return self.store.open(knowledge_id), None
        except KnowledgeBaseNotFound:
            view = self.views.get(knowledge_id)
            if view is None:
                raise
        base = self.store.find(view.knowledge_base)
        if base is None:  # not naming it: a key limited to the view must not learn it
            raise KnowledgeBaseNotFound(
                f"view {knowledge_id!r} reads a knowledge base that does not exist any more "
                "(GET /views names it)")
        return base, view

    def documents(self, knowledge_id: str) -> list[DocumentInfo]:
        """A knowledge base's documents by path (or title): every store keeps its own
        order, and a listing should not change with the store. Through a view, those
        whose metadata passes its filter (a reader's per-chunk fields, such as a page
        number, are not known here)."""
        kb, view = self.resolve(knowledge_id)
        infos = list(kb.documents.values())
        predicate = None if view is None else view.predicate()
        if predicate is not None:
            infos = [info for info in infos if predicate.matches(document_metadata(info))]
        return sorted(infos, key=lambda info: (info.file_path or info.title, info.document_id))

    def manifests(self) -> list[KBManifest]:
        """Every knowledge base's manifest, without opening its indices."""
        return self.store.manifests()

    def retrieve(self, request: RetrievalRequest, models: Models) -> list[Record]:
        kb, view = self.resolve(request.knowledge_id)
        plan = self.plan(request, kb, view)
        embed_model = models.embedding_for(kb.manifest.embedding)
        first_stage: dict[str, float] | None = None  # None: not reranked
        if models.reranker is None:
            hits = kb.retrieve(plan, embed_model)
        else:
            wider = plan.model_copy(update={"top_k": candidate_count(plan.top_k),
                                            "score_threshold": 0.0})
            candidates = kb.retrieve(wider, embed_model)
            first_stage = {hit.node.node_id: clip(hit.score) for hit in candidates}
            hits = rerank_hits(models.reranker, plan.query, candidates, plan.top_k,
                               plan.score_threshold)
        records = [to_record(hit) for hit in hits]
        if not request.explain:
            return records
        return self.explain(kb, plan, embed_model, records, first_stage)

    def plan(self, request: RetrievalRequest, kb: KnowledgeBaseHandle,
             view: View | None) -> QueryPlan:
        """What the request asks of ``kb``: its own overrides (a retrieval test's) over
        the server's settings, a view's settings over both."""
        if (request.retrieval_mode not in (None, "keyword") and kb.manifest.embedding is None
                and (view is None or view.retrieval_mode is None)):
            raise InvalidFieldError(
                "retrieval_setting.retrieval_mode",
                f"knowledge base {kb.manifest.knowledge_id!r} was built for keyword search "
                f"only; {request.retrieval_mode} retrieval needs an embedding model")
        asked = None if request.condition is None else compile_condition(request.condition)
        plan = QueryPlan(
            query=request.query,
            top_k=request.top_k,
            score_threshold=request.score_threshold,
            predicate=asked,
            mode=request.retrieval_mode or self.settings.retrieval_mode,
            semantic_weight=(self.settings.semantic_weight if request.semantic_weight is None
                             else request.semantic_weight),
        )
        if view is not None:  # its settings win over the server's (and so the base's)
            plan = plan.model_copy(update={
                "top_k": view.top_k(request.top_k),
                "predicate": Predicate.all_of(view.predicate(), asked),
                "mode": view.retrieval_mode or plan.mode,
                "semantic_weight": (plan.semantic_weight if view.semantic_weight is None
                                    else view.semantic_weight)})
        return plan

    def explain(self, kb: KnowledgeBaseHandle, plan: QueryPlan,
                embed_model: BaseEmbedding | None, records: list[Record],
                first_stage: dict[str, float] | None) -> list[Record]:
        """``records`` with their ``score_parts``: the semantic and keyword scores of each
        record's chunk, read from the same plan run in vector and in keyword mode over the
        records' documents, so that for plain chunking a hybrid score is exactly
        ``semantic_weight · semantic + (1 − semantic_weight) · keyword``. With
        parent-child chunking each side is the parent's best child on that side alone,
        which need not be the child that gave the hybrid score. A chunk a side does not
        return scores 0 there (no relation); ``semantic`` is null on a keyword-only base.
        ``first_stage`` maps chunk ids to their scores before reranking, if reranked."""
        if not records:
            return records
        mode, _ = effective_mode(plan, kb.manifest)
        weight = fused_weight(plan, kb.manifest, embed_model)
        documents = sorted({str(record.metadata["document_id"]) for record in records})
        theirs = compile_condition(MetadataCondition(conditions=[
            Condition(name="document_id", comparison_operator="in", value=documents)]))
        narrowed = plan.model_copy(update={
            "top_k": MAX_TOP_K, "score_threshold": 0.0,
            "predicate": Predicate.all_of(plan.predicate, theirs)})

        def side(side_mode: str) -> dict[str, float]:
            hits = kb.retrieve(narrowed.model_copy(update={"mode": side_mode}), embed_model)
            return {hit.node.node_id: clip(hit.score) for hit in hits}

        semantic = None if kb.manifest.embedding is None else side("vector")
        keyword = side("keyword")
        explained = []
        for record in records:
            chunk_id = str(record.metadata["chunk_id"])
            parts = ScoreParts(
                mode=mode, semantic_weight=weight,
                semantic=None if semantic is None else semantic.get(chunk_id, 0.0),
                keyword=keyword.get(chunk_id, 0.0),
                first_stage=(record.score if first_stage is None
                             else first_stage.get(chunk_id, 0.0)),
                rerank=None if first_stage is None else record.score)
            explained.append(record.model_copy(update={"score_parts": parts}))
        return explained


def to_record(hit: NodeWithScore) -> Record:
    metadata: dict[str, Any] = dict(hit.node.metadata)
    metadata.setdefault("document_id", hit.node.ref_doc_id or hit.node.node_id)
    metadata["chunk_id"] = hit.node.node_id
    title = metadata.get("title") or metadata.get("file_name") or str(metadata["document_id"])
    return Record(
        content=hit.node.get_content(),
        score=clip(hit.score),
        title=str(title),
        metadata=metadata,
    )


def candidate_count(top_k: int) -> int:
    return max(top_k * CANDIDATE_FACTOR, MIN_CANDIDATES)


def rerank_hits(
    reranker: Reranker, query: str, hits: list[NodeWithScore], top_k: int, threshold: float
) -> list[NodeWithScore]:
    if not hits:
        return []
    ranked = reranker.rerank(query, [hit.node.get_content() for hit in hits], top_k)
    scored = [NodeWithScore(node=hits[index].node, score=clip(score)) for index, score in ranked]
    scored.sort(key=lambda hit: -(hit.score or 0.0))
    floor = lowest_returned(threshold)
    return [hit for hit in scored if (hit.score or 0.0) >= floor][:top_k]
