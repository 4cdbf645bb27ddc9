"""Sources → LlamaIndex documents → chunks → embeddings → a new knowledge base version.

Every change (ingest, upload, delete) publishes a complete new version, so a crash
at any point leaves the knowledge base answering as before. Work is split so that
the slow part (reading, chunking, embedding) happens before the write lock is
taken, and the previous version's chunks and embeddings are carried over: only
new or changed documents are embedded. A file's content hash is recorded, so
re-ingesting an unchanged folder does nothing.

A knowledge base may also be created empty (``create_knowledge_base``), its settings
(retrieval mode, weight, chunking, embedding model) recorded then: its first upload is
chunked and embedded by them, as every later one.

The slow part is bounded by ``Limits`` (a file's size, what it expands to, its chunks)
and can be stopped: a ``checkpoint`` (see ``checkpoint_for``) is called between
stages, pages, token counts and embedding batches, and what it raises ends the work
before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode, Document, TextNode
from pydantic import BaseModel, Field

from llamaindex_kb.config import RetrievalMode
from llamaindex_kb.contract import text_problem
from llamaindex_kb.errors import (
    AlreadyExistsError,
    BadRequestError,
    ConfigurationError,
    DocumentNotFound,
    InvalidFieldError,
    PayloadTooLargeError,
    ReadOnlyStoreError,
    ReadOnlyViewError,
    shown,
)
from llamaindex_kb.ids import validate_knowledge_id
from llamaindex_kb.ingestion.chunking import ChunkingConfig, ChunkResult, TooManyChunks, chunk
from llamaindex_kb.ingestion.readers import (
    SUPPORTED_SUFFIXES,
    Checkpoint,
    format_bytes,
    read_file,
    spool,
    upload_name,
)
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, too_large
from llamaindex_kb.models import bundled, multilingual
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.local import MAX_TOKENS, LocalMiniLMEmbedding, minilm_tokenizer
from llamaindex_kb.models.spec import EmbeddingSpec, readable_share
from llamaindex_kb.stores.base import (
    Change,
    DocumentInfo,
    KBManifest,
    KnowledgeBaseHandle,
    KnowledgeStore,
    check_same_embedding,
    document_metadata,
)
from llamaindex_kb.views import Views

log = logging.getLogger(__name__)

EMBED_BATCH = 64
# The embedding model of an empty knowledge base (``create_knowledge_base``).
EmbeddingChoice = Literal["auto", "english", "multilingual", "server"]
EMBEDDING_CHOICES: tuple[EmbeddingChoice, ...] = ("auto", "english", "multilingual", "server")
RESERVED_METADATA = frozenset(
    {"document_id", "chunk_id", "parent_id", "file_name", "file_path", "file_type", "file_size",
     "last_modified", "title"}
)

Progress = Callable[[str, int, int], None]
# True once the work is no longer wanted (e.g. the client disconnected).
Cancelled = Callable[[], bool]
# Metadata values are numbers every store keeps exactly: Qdrant's payload integers
# are 64-bit, and a JSON client reads larger ones wrong.
_INT64 = 2**63
_READ_PIECE = 1 << 20


class IngestSummary(BaseModel):
    knowledge_id: str
    documents: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    total_documents: int = 0
    total_chunks: int = 0
    skipped: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)


@dataclass
class Source:
    """One document to (re)index: its LlamaIndex documents and what we record about it.

    ``label`` names it in an error ("file: a.pdf", "text").
    """

    info: DocumentInfo
    label: str
    documents: list[Document] = field(default_factory=list)


def checkpoint_for(cancelled: Cancelled | None) -> Checkpoint | None:
    """A checkpoint that stops the work, with nothing written, once ``cancelled()``."""
    if cancelled is None:
        return None

    def checkpoint() -> None:
        if cancelled():
            raise BadRequestError(
                "the upload was abandoned: its client disconnected before it finished, "
                "and nothing was written")

    return checkpoint


_APPROXIMATE_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W\u3040-\u30ff"
                                r"\u3400-\u9fff\uac00-\ud7af]+|[^\w\s]")


def approximate_tokens(text: str) -> list[str]:
    """Words, CJK characters and punctuation: ~80 % of WordPiece counts at ~1/4 the cost."""
    return _APPROXIMATE_TOKEN.findall(text)


def document_id_for(file_path: str) -> str:
    return hashlib.sha256(file_path.encode()).hexdigest()[:20]


def _attach(source: Source, documents: list[Document]) -> Source:
    metadata = document_metadata(source.info)
    for document in documents:
        document.metadata = {**document.metadata, **metadata}
        # Metadata is for filters and citations: keep it out of the chunk budget and
        # out of the embedded and BM25-indexed text.
        document.excluded_embed_metadata_keys = list(document.metadata)
        document.excluded_llm_metadata_keys = list(document.metadata)
    source.documents = documents
    return source


def check_user_metadata(metadata: object, field_name: str = "metadata") -> dict[str, Any]:
    """``metadata`` if every store can keep it and every client read it back: a flat
    object of strings, numbers, booleans, nulls and lists of those."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidFieldError(field_name, "must be a JSON object")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip() or not key.isprintable():
            raise InvalidFieldError(field_name, f"key {key!r} must be a non-empty string of "
                                    "printable characters")
        where = f"{field_name}.{key}"
        if key in RESERVED_METADATA:
            raise InvalidFieldError(where, "is set by the knowledge base itself")
        for item in value if isinstance(value, list) else [value]:
            problem = _metadata_value_problem(item)
            if problem:
                raise InvalidFieldError(where, problem)
    return dict(metadata)


def _metadata_value_problem(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return None if text_problem(value) is None else (
            "must be valid Unicode text without NUL characters or lone surrogates")
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else "must be a 64-bit integer"
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number, not NaN or Infinity"
    return "must be a string, number, boolean, null or a list of those"


def file_source(file: Path, file_path: str, source_root: str | None,
                limits: Limits = DEFAULT_LIMITS) -> Source:
    """A file found by ``scan``, hashed a piece at a time; refused past ``upload_bytes``."""
    stat = file.stat()
    label = f"file: {file_path}"
    if stat.st_size > limits.upload_bytes:
        raise too_large(label, f"is larger than {format_bytes(limits.upload_bytes)}",
                         "upload_bytes")
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        while piece := stream.read(_READ_PIECE):
            digest.update(piece)
    info = DocumentInfo(
        document_id=document_id_for(file_path), title=file.name, file_name=file.name,
        file_path=file_path, file_type=file.suffix.lower().lstrip("."), file_size=stat.st_size,
        last_modified=int(stat.st_mtime), content_hash=digest.hexdigest(),
        source_root=source_root,
    )
    return Source(info, label)


def upload_source(stream: IO[bytes], filename: str, metadata: dict[str, Any], *,
                  limits: Limits = DEFAULT_LIMITS,
                  checkpoint: Checkpoint | None = None) -> Source:
    """An uploaded file, copied from ``stream`` a piece at a time (hashed on the way,
    never held whole in memory) and read within ``limits``."""
    name = upload_name(filename)
    digest = hashlib.sha256()
    with spool(stream, filename, limits, digest.update) as path:
        size = path.stat().st_size
        documents = read_file(path, source_name=name, limits=limits, checkpoint=checkpoint)
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    info = DocumentInfo(
        document_id=document_id_for(f"upload/{name}"), title=name, file_name=name,
        file_path=f"upload/{name}", file_type=Path(name).suffix.lower().lstrip("."),
        file_size=size, last_modified=int(time.time()), content_hash=digest.hexdigest(),
        metadata=metadata,
    )
    return _attach(Source(info, f"file: {name}"), documents)


def text_source(title: str, text: str, metadata: dict[str, Any],
                document_id: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Source:
    if not text.strip():
        raise InvalidFieldError("text", "is empty")
    if len(text) > limits.extracted_chars:
        raise too_large("text:", f"has more than {limits.extracted_chars:,} characters",
                         "extracted_chars")
    key = json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False)
    info = DocumentInfo(
        document_id=document_id or document_id_for(f"text/{title}"), title=title,
        file_name=title, file_path=f"text/{title}", file_type="text",
        file_size=len(text.encode()), last_modified=int(time.time()),
        content_hash=hashlib.sha256(key.encode()).hexdigest(), metadata=metadata,
    )
    return _attach(Source(info, "text:"), [Document(text=text)])


def scan(paths: Sequence[Path]) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(file, file_path, source root) for supported files under ``paths``, and skipped ones.

    ``file_path`` starts with the named folder's own name, so two folders with the same
    relative layout never collide, and moving a folder keeps its documents' ids.
    """
    found: list[tuple[Path, str, str]] = []
    skipped: list[str] = []
    for root in paths:
        if not root.exists():
            raise InvalidFieldError("PATH", f"{root} does not exist")
        root = root.resolve()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        base = root.parent
        for file in files:
            file_path = file.relative_to(base).as_posix()
            if any(part.startswith(".") for part in Path(file_path).parts):
                continue
            if file.suffix.lower() in SUPPORTED_SUFFIXES:
                found.append((file, file_path, str(root)))
            else:
                skipped.append(file_path)
    return found, skipped


def embed_texts(texts: Sequence[str], embed_model: BaseEmbedding,
                progress: Progress | None = None,
                checkpoint: Checkpoint | None = None) -> np.ndarray:
    rows: list[list[float]] = []
    for start in range(0, len(texts), EMBED_BATCH):
        if checkpoint is not None:
            checkpoint()
        rows.extend(embed_model.get_text_embedding_batch(list(texts[start : start + EMBED_BATCH])))
        if progress is not None:
            progress("embedding", min(start + EMBED_BATCH, len(texts)), len(texts))
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray(rows, dtype=np.float32)


def embed_nodes(nodes: Sequence[BaseNode], embed_model: BaseEmbedding) -> np.ndarray:
    return embed_texts([node.get_content() for node in nodes], embed_model)


def check_writable(store: KnowledgeStore, knowledge_id: str) -> None:
    """Refuse a write to a read-only store, or to a view, before any reading, chunking
    or embedding, rather than when its publish refuses at the end."""
    if store.read_only is not None:
        raise ReadOnlyStoreError.refusing(knowledge_id, store.read_only)
    if store.access_records is not None:  # every store that takes writes keeps views
        Views(store.access_records, store).check_writable(knowledge_id)


def ingest_paths(
    store: KnowledgeStore,
    knowledge_id: str,
    paths: Sequence[Path],
    *,
    models: Models,
    mode: RetrievalMode = "hybrid",
    semantic_weight: float = 0.7,
    chunking: ChunkingConfig | None = None,
    sync: bool = False,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestSummary:
    """Add new and changed files under ``paths``; with ``sync``, remove vanished ones.

    A file that cannot be read or is over one of ``limits`` is reported in
    ``summary.failed`` and the others go on.
    """
    validate_knowledge_id(knowledge_id, field="--kb", creating=False)
    check_writable(store, knowledge_id)
    files, skipped = scan(paths)
    summary = IngestSummary(knowledge_id=knowledge_id, skipped=skipped)
    existing = store.find(knowledge_id)
    if existing is None:
        validate_knowledge_id(knowledge_id, field="--kb")
    known = existing.documents if existing is not None else {}
    sources: list[Source] = []
    seen: set[str] = set()
    for number, (file, file_path, root) in enumerate(files, start=1):
        # Seen even if it fails below: sync removes only what has vanished.
        seen.add(document_id_for(file_path))
        try:
            source = file_source(file, file_path, root, limits)
            previous = known.get(source.info.document_id)
            if previous is not None and previous.content_hash == source.info.content_hash:
                summary.unchanged += 1
            else:
                sources.append(_attach(source, read_file(file, source_name=file_path,
                                                         limits=limits)))
        except (InvalidFieldError, PayloadTooLargeError, OSError) as exc:
            summary.failed[file_path] = getattr(exc, "message", None) or str(exc)
        if progress is not None:
            progress("reading", number, len(files))
    roots = {str(p.resolve()) for p in paths}
    removed = set()
    if sync:
        removed = {doc_id for doc_id, info in known.items()
                   if info.source_root in roots and doc_id not in seen}
    return apply_changes(store, knowledge_id, sources, removed, summary,
                         models=models, mode=mode, semantic_weight=semantic_weight,
                         chunking=chunking, progress=progress, limits=limits, keep_going=True)


def apply_changes(
    store: KnowledgeStore,
    knowledge_id: str,
    sources: Sequence[Source],
    removed: set[str],
    summary: IngestSummary,
    *,
    models: Models | None = None,
    mode: RetrievalMode = "hybrid",
    semantic_weight: float = 0.7,
    chunking: ChunkingConfig | None = None,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
    checkpoint: Checkpoint | None = None,
    keep_going: bool = False,
) -> IngestSummary:
    """Publish a version with ``sources`` added or replaced and ``removed`` deleted.

    A source over ``limits`` raises ``PayloadTooLargeError``, or with ``keep_going`` is
    left out and reported in ``summary.failed``. ``checkpoint`` is called between
    stages and batches; what it raises ends the work before anything is written.
    ``models`` embeds the new chunks (``Models.embedding_for``: a base keeps the model
    that built it); only a change that adds nothing may leave it out.
    """
    validate_knowledge_id(knowledge_id, creating=False)
    check_writable(store, knowledge_id)
    existing = store.find(knowledge_id)
    creating = existing is None
    if existing is None:
        validate_knowledge_id(knowledge_id)
    embed_model = None
    needs_vectors = (existing.manifest.embedding is not None if existing is not None
                     else mode != "keyword")
    if needs_vectors and (sources or existing is None):
        assert models is not None, "adding documents takes the request's models"
        embed_model = models.embedding_for(
            existing.manifest.embedding if existing is not None else None,
            [doc.get_content() for source in sources for doc in source.documents])
    manifest = _manifest_for(existing, knowledge_id, embed_model, mode, semantic_weight, chunking)
    config = ChunkingConfig.model_validate(manifest.chunking)
    # Chunks are sized in MiniLM's tokens, what the English model reads (at most 254, so
    # none is silently cut); e5 reads 512 of its own, fewer than MiniLM counts for
    # Chinese, and embeds longer text in windows. Other models read far more. A
    # keyword-only knowledge base has no such limit and uses a far cheaper count.
    tokenizer = minilm_tokenizer() if manifest.embedding is not None else approximate_tokens
    result, sources = _chunk_sources(sources, config, tokenizer, limits, checkpoint,
                                     summary if keep_going else None)
    new_vectors = readable = None
    if manifest.embedding is not None and result.chunks:
        texts = [n.get_content() for n in result.chunks]
        new_vectors = embed_texts(texts, check_same_embedding(manifest, embed_model), progress,
                                  checkpoint)
        readable = np.array([readable_share(embed_model, text) for text in texts])
        manifest = manifest.model_copy(update={"readable_share": _readable_share(
            manifest, readable, existing.manifest.chunks if existing else 0)})
    counts: dict[str, int] = {}
    for node in result.chunks:
        counts[node.metadata["document_id"]] = counts.get(node.metadata["document_id"], 0) + 1
    parent_ids: dict[str, list[str]] = {}
    for node in result.parents:
        parent_ids.setdefault(node.metadata["document_id"], []).append(node.node_id)
    new_infos = {
        s.info.document_id: s.info.model_copy(update={
            "chunks": counts.get(s.info.document_id, 0),
            "parent_ids": parent_ids.get(s.info.document_id, [])})
        for s in sources
    }
    if not new_infos and not removed:
        summary.total_documents = len(existing.documents) if existing else 0
        summary.total_chunks = (existing.manifest.chunks or 0) if existing else 0
        return summary
    if checkpoint is not None:
        checkpoint()  # the last chance: a publish is never stopped halfway
    if creating:  # a view of this name may have been made while the documents embedded
        check_writable(store, knowledge_id)
    # Let go of the version read above: a version a reader holds is kept on disk, so
    # holding it through the publish would leave it behind for the next writer.
    existing = None

    published = store.publish(knowledge_id, Change(
        manifest=manifest, chunks=result.chunks, vectors=new_vectors, readable=readable,
        documents=new_infos, parents=result.parents, removed=frozenset(removed)))
    summary.documents = len(new_infos)
    summary.chunks = len(result.chunks)
    summary.removed = published.removed
    summary.total_documents = published.documents
    summary.total_chunks = published.chunks
    log.info("knowledge base %s: %d documents, %d chunks", knowledge_id, published.documents,
             published.chunks)
    return summary


def _chunk_sources(
    sources: Sequence[Source], config: ChunkingConfig, tokenizer: Callable[[str], Sequence[int]],
    limits: Limits, checkpoint: Checkpoint | None, failed: IngestSummary | None,
) -> tuple[ChunkResult, list[Source]]:
    """Every source's chunks, each source within ``chunks_per_document`` and, with its
    metadata copied onto every chunk, within ``inflated_bytes``; a source over either
    raises, or with ``failed`` is reported there and left out."""
    result = ChunkResult()
    kept = []
    for source in sources:
        if checkpoint is not None:
            checkpoint()
        try:
            chunked = chunk(source.documents, config, tokenizer,
                            max_chunks=limits.chunks_per_document, checkpoint=checkpoint)
            _check_metadata_copies(source, len(chunked.chunks) + len(chunked.parents), limits)
        except TooManyChunks as exc:
            error = too_large(source.label, f"gives more than {exc.max_chunks:,} chunks",
                               "chunks_per_document")
            if failed is None:
                raise error from None
            failed.failed[source.info.file_path or source.info.title] = error.message
            continue
        except PayloadTooLargeError as exc:
            if failed is None:
                raise
            failed.failed[source.info.file_path or source.info.title] = exc.message
            continue
        result.chunks.extend(chunked.chunks)
        result.parents.extend(chunked.parents)
        kept.append(source)
    return result, kept


def _check_metadata_copies(source: Source, nodes: int, limits: Limits) -> None:
    """Every chunk carries its document's metadata (its title and path too): refuse
    metadata that, copied onto each, would write more than ``inflated_bytes``."""
    size = len(json.dumps(document_metadata(source.info), ensure_ascii=False).encode())
    if size * nodes > limits.inflated_bytes:
        raise too_large(source.label, f"has {format_bytes(size)} of metadata, which copied "
                         f"onto each of its {nodes:,} chunks would take more than "
                         f"{format_bytes(limits.inflated_bytes)}", "inflated_bytes")


def publish_nodes(
    store: KnowledgeStore,
    knowledge_id: str,
    nodes: Sequence[TextNode],
    vectors: np.ndarray | None,
    embedding: EmbeddingSpec | None,
    mode: RetrievalMode = "hybrid",
    readable: float | None = None,
) -> None:
    """Publish ready-made nodes (row i = nodes[i] = vectors[i]) as a whole knowledge base.

    For corpora that arrive already split and embedded (the benchmark, tests);
    ``readable`` is the share of their tokens the embedding model read, if known.
    """
    counts = Counter(str(node.metadata["document_id"]) for node in nodes)
    documents = {doc_id: DocumentInfo(document_id=doc_id, title=doc_id, chunks=count)
                 for doc_id, count in counts.items()}
    manifest = KBManifest(knowledge_id=knowledge_id, embedding=embedding, retrieval_mode=mode,
                          documents=len(documents), readable_share=readable)
    store.publish(knowledge_id, Change(
        manifest=manifest, chunks=list(nodes), vectors=vectors, documents=documents,
        replace=True))


def delete_document(store: KnowledgeStore, knowledge_id: str,
                    document_id: str) -> DocumentInfo:
    check_writable(store, knowledge_id)
    info = store.open(knowledge_id).document(document_id)
    if info is None:
        raise DocumentNotFound(
            f"document {shown(document_id)} is not in knowledge base {shown(knowledge_id)}")
    apply_changes(store, knowledge_id, [], {document_id},
                  IngestSummary(knowledge_id=knowledge_id))
    return info


def create_knowledge_base(
    store: KnowledgeStore,
    knowledge_id: str,
    *,
    models: Models,
    mode: RetrievalMode = "hybrid",
    semantic_weight: float = 0.7,
    chunking: ChunkingConfig | None = None,
    embedding: EmbeddingChoice = "auto",
) -> KBManifest:
    """An empty knowledge base with these settings, its manifest as published.

    Its embedding model is decided now, never later: a store lays a base out for its
    model's dimension when it is created (PostgreSQL's vector column, Qdrant's
    collection), and ``KBManifest.embedding`` None already means keyword-only. So
    ``auto`` is what a first upload would get without knowing its language: the
    configured model, else the ``local_model`` setting, whose own ``auto`` (which picks
    by the documents' language) gives the English model here; ask for ``multilingual``
    for documents mostly in Chinese, Japanese or Korean. A view's name is refused
    (``check_writable``).
    """
    validate_knowledge_id(knowledge_id)
    check_writable(store, knowledge_id)
    if store.find(knowledge_id) is not None:
        raise AlreadyExistsError(f"knowledge base {shown(knowledge_id)} exists")
    embed_model = None if mode == "keyword" else _embedding_for_empty(models, embedding)
    if mode == "keyword" and embedding != "auto":
        raise InvalidFieldError(
            "embedding", f"a keyword-only knowledge base has no embedding model; got "
            f"{shown(embedding)}: leave it out, or choose another retrieval_mode")
    manifest = _manifest_for(None, knowledge_id, embed_model, mode, semantic_weight, chunking)
    store.publish(knowledge_id, Change(manifest=manifest))
    log.info("knowledge base %s: created empty", knowledge_id)
    return store.open(knowledge_id).manifest


def _embedding_for_empty(models: Models, choice: EmbeddingChoice) -> BaseEmbedding:
    if choice == "english":
        return bundled.english(models.spin_threads)
    if choice == "multilingual":
        reason = multilingual.unavailable_reason()
        if reason is not None:
            raise InvalidFieldError(
                "embedding", f"the multilingual local model cannot run here: {reason}")
        return bundled.multilingual_model()
    if models.embed_model is not None:  # "server", or "auto" as a first upload would
        return models.embed_model
    if choice == "server":
        raise InvalidFieldError(
            "embedding", "this server has no embedding model configured (a workspace model "
            "in the plugin's settings, or embedding_base_url); choose auto, english or "
            "multilingual")
    return bundled.for_new(models.local_model, (), models.spin_threads)


def drop_knowledge_base(store: KnowledgeStore, knowledge_id: str) -> None:
    """Delete a whole knowledge base; a view's name is refused, naming how to delete the
    view instead (not its base: a key limited to the view must not learn it)."""
    if store.read_only is not None:
        raise ReadOnlyStoreError.refusing(knowledge_id, store.read_only)
    if store.access_records is not None and Views(store.access_records, store).get(
            knowledge_id) is not None:
        raise ReadOnlyViewError(
            f"{knowledge_id!r} is a view, not a knowledge base: delete the view with "
            f"DELETE /views/{knowledge_id} (CLI: views delete {knowledge_id})")
    store.drop(knowledge_id)


def _readable_share(manifest: KBManifest, added: np.ndarray, chunks_before: int | None
                    ) -> float:
    """The base's share of tokens the model reads, with chunks of shares ``added``: a
    chunk-weighted mean of what was recorded and theirs (``stores.base.fused_weight``).
    Stores that keep each chunk's share replace it with the exact mean of the chunks
    they then hold (``Change.readable``); for the others it stays a running mean."""
    mean = float(np.mean(added))
    before = manifest.readable_share
    if before is None or not chunks_before:
        return mean
    return (before * chunks_before + mean * added.size) / (chunks_before + added.size)


def _manifest_for(existing: KnowledgeBaseHandle | None, knowledge_id: str,
                  embed_model: BaseEmbedding | None, mode: RetrievalMode,
                  semantic_weight: float, chunking: ChunkingConfig | None) -> KBManifest:
    if existing is not None:
        recorded = ChunkingConfig.model_validate(existing.manifest.chunking)
        if chunking is not None and chunking != recorded:
            raise ConfigurationError(
                f"knowledge base {knowledge_id!r} was built with other chunking settings "
                f"({recorded.model_dump_json()}); drop it to change them"
            )
        return existing.manifest.model_copy(update={"updated_at": time.time()})
    if mode != "keyword" and embed_model is None:
        raise ConfigurationError(f"{mode} retrieval needs an embedding model")
    config = chunking or ChunkingConfig()
    if (mode != "keyword" and isinstance(embed_model, LocalMiniLMEmbedding)
            and config.embedded_max_tokens > MAX_TOKENS - 2):
        raise ConfigurationError(
            f"chunks of {config.embedded_max_tokens} tokens exceed what the local embedding "
            f"model reads ({MAX_TOKENS - 2}); the rest would be silently ignored. Use at most "
            f"{MAX_TOKENS - 2}, or an embedding model with a longer input"
        )
    return KBManifest(
        knowledge_id=knowledge_id,
        embedding=embed_model.spec if embed_model is not None and mode != "keyword" else None,
        retrieval_mode=mode,
        semantic_weight=semantic_weight,
        chunking=config.model_dump(),
    )
