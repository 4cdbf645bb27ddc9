"""Files → LlamaIndex documents → chunks → embeddings → a new knowledge base version.

Re-ingesting a file replaces its chunks (a file's ``document_id`` is derived from
its path relative to the ingested folder); other documents are carried over with
their embeddings, so only new or changed text is embedded.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core import SimpleDirectoryReader
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, Document, TextNode
from pydantic import BaseModel, Field

from .builder import write_version
from .embeddings import minilm_tokenizer
from .errors import ConfigurationError, InvalidFieldError
from .knowledge_base import KBManifest, KnowledgeBase, RetrievalMode
from .layout import KBLayout, validate_knowledge_id

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
CHUNK_TOKENS = 200
CHUNK_OVERLAP = 20
EMBED_BATCH = 64
_NODE_NAMESPACE = uuid.UUID("6f1c0a3e-4f0e-4d55-9a57-3d1f7f2b8c11")


class IngestSummary(BaseModel):
    knowledge_id: str
    documents: int = 0
    chunks: int = 0
    total_chunks: int = 0
    skipped: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


def document_id_for(relative_path: str) -> str:
    return hashlib.sha256(relative_path.encode()).hexdigest()[:20]


def collect_files(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, path relative to what the user named) for supported files, and skipped ones."""
    found: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for root in paths:
        if not root.exists():
            raise InvalidFieldError("PATH", f"{root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        base = root.parent if root.is_file() else root
        for file in files:
            relative = file.relative_to(base).as_posix()
            if any(part.startswith(".") for part in Path(relative).parts):
                continue
            if file.suffix.lower() in TEXT_SUFFIXES:
                found.append((file, relative))
            else:
                skipped.append(relative)
    return found, skipped


def load_documents(file: Path, relative: str) -> list[Document]:
    stat = file.stat()
    metadata = {
        "document_id": document_id_for(relative),
        "file_name": file.name,
        "file_path": relative,
        "file_type": file.suffix.lower().lstrip("."),
        "file_size": stat.st_size,
        "last_modified": int(stat.st_mtime),
    }
    reader = SimpleDirectoryReader(
        input_files=[file], file_metadata=lambda _: dict(metadata), raise_on_error=True
    )
    documents = reader.load_data()
    for document in documents:
        # Metadata is for filters and citations: keep it out of the chunk budget and
        # out of the embedded and BM25-indexed text.
        document.excluded_embed_metadata_keys = list(metadata)
        document.excluded_llm_metadata_keys = list(metadata)
    return documents


def chunk_documents(documents: Iterable[Document]) -> list[TextNode]:
    splitter = SentenceSplitter(
        chunk_size=CHUNK_TOKENS,
        chunk_overlap=CHUNK_OVERLAP,
        tokenizer=minilm_tokenizer(),
        include_prev_next_rel=False,
    )
    nodes: list[TextNode] = []
    per_document: dict[str, int] = {}
    for node in splitter.get_nodes_from_documents(list(documents)):
        if not node.get_content().strip():
            continue
        document_id = node.metadata["document_id"]
        index = per_document.get(document_id, 0)
        per_document[document_id] = index + 1
        chunk = TextNode(
            id_=str(uuid.uuid5(_NODE_NAMESPACE, f"{document_id}/{index}")),
            text=node.get_content(),
            metadata=dict(node.metadata),
        )
        chunk.excluded_embed_metadata_keys = list(chunk.metadata)
        chunk.excluded_llm_metadata_keys = list(chunk.metadata)
        nodes.append(chunk)
    return nodes


def embed_nodes(nodes: Sequence[BaseNode], embed_model: BaseEmbedding) -> np.ndarray:
    texts = [node.get_content() for node in nodes]
    rows: list[list[float]] = []
    for start in range(0, len(texts), EMBED_BATCH):
        rows.extend(embed_model.get_text_embedding_batch(texts[start : start + EMBED_BATCH]))
    dimension = embed_model.spec.dimension if hasattr(embed_model, "spec") else 0
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1 if texts else dimension)


def ingest(
    data_dir: Path,
    knowledge_id: str,
    paths: Sequence[Path],
    *,
    embed_model: BaseEmbedding | None,
    mode: RetrievalMode = "hybrid",
    semantic_weight: float = 0.7,
) -> IngestSummary:
    """Add or replace the given files' documents in ``knowledge_id``."""
    validate_knowledge_id(knowledge_id, field="--kb")
    if mode != "keyword" and embed_model is None:
        raise ConfigurationError(f"{mode} retrieval needs an embedding model")
    files, skipped = collect_files(paths)
    summary = IngestSummary(knowledge_id=knowledge_id, skipped=skipped)
    documents: list[Document] = []
    for file, relative in files:
        try:
            documents.extend(load_documents(file, relative))
        except Exception as exc:  # a bad file is reported, never aborts the others
            summary.failed[relative] = f"{type(exc).__name__}: {exc}"
    new_nodes = chunk_documents(documents)
    summary.documents = len({d.metadata["document_id"] for d in documents})
    summary.chunks = len(new_nodes)
    return add_nodes(
        data_dir, knowledge_id, new_nodes, summary,
        embed_model=embed_model if mode != "keyword" else None,
        mode=mode, semantic_weight=semantic_weight,
    )


def add_nodes(
    data_dir: Path,
    knowledge_id: str,
    new_nodes: list[TextNode],
    summary: IngestSummary,
    *,
    embed_model: BaseEmbedding | None,
    mode: RetrievalMode,
    semantic_weight: float,
    chunking: dict[str, Any] | None = None,
) -> IngestSummary:
    """Publish a version holding the previous chunks (minus replaced documents) plus these."""
    layout = KBLayout(data_dir, knowledge_id)
    new_vectors = embed_nodes(new_nodes, embed_model) if embed_model is not None else None
    replaced = {node.metadata["document_id"] for node in new_nodes}
    with layout.write_lock():
        previous = layout.current_version()
        kept_nodes: list[BaseNode] = []
        kept_vectors: np.ndarray | None = None
        manifest = KBManifest(
            knowledge_id=knowledge_id,
            embedding=embed_model.spec if embed_model is not None else None,
            retrieval_mode=mode,
            semantic_weight=semantic_weight,
            chunking=chunking or {"chunk_tokens": CHUNK_TOKENS, "chunk_overlap": CHUNK_OVERLAP},
        )
        if previous is not None:
            old = KnowledgeBase(previous)
            _check_same_embedding(old.manifest, manifest)
            manifest = old.manifest.model_copy(update={"updated_at": manifest.updated_at})
            keep_rows = np.flatnonzero(~np.isin(old.document_ids, list(replaced)))
            kept_nodes = old.nodes(old.node_ids[keep_rows].tolist())
            if old.vectors is not None:
                kept_vectors = np.asarray(old.vectors.rows(keep_rows))
        nodes = kept_nodes + list(new_nodes)
        vectors = None
        if manifest.embedding is not None:
            parts = [v for v in (kept_vectors, new_vectors) if v is not None and len(v)]
            vectors = np.vstack(parts) if parts else np.zeros((0, manifest.embedding.dimension))
        documents = {node.metadata.get("document_id") for node in nodes}
        manifest = manifest.model_copy(update={"documents": len(documents)})
        write_version(layout, manifest, nodes, vectors)
    summary.total_chunks = len(nodes)
    log.info("knowledge base %s: %d chunks", knowledge_id, len(nodes))
    return summary


def _check_same_embedding(old: KBManifest, new: KBManifest) -> None:
    if old.embedding is None and new.embedding is None:
        return
    if old.embedding is None or new.embedding is None or old.embedding.id != new.embedding.id:
        raise ConfigurationError(
            f"knowledge base {old.knowledge_id!r} was built with embedding "
            f"{old.embedding.id if old.embedding else 'none (keyword only)'}; adding documents "
            f"with {new.embedding.id if new.embedding else 'none'} would mix vector spaces. "
            "Use the same embedding or drop and rebuild it"
        )
