"""Documents → chunks, with the settings of Dify's own knowledge "chunk settings".

Two modes, as in Dify:

- ``general``: the text is split on ``delimiter``; consecutive pieces are packed
  into chunks of at most ``max_tokens``; a piece longer than that is split further
  (paragraphs, then sentences, then clauses, then words, then characters) with
  ``overlap`` tokens repeated between its consecutive parts. The chunks are embedded
  and returned.
- ``parent_child``: parents are the document's paragraphs (``parent_delimiter`` /
  ``parent_max_tokens``, split like general chunks without overlap) or, with
  ``parent_mode="full_doc"``, the whole document. Each parent is split into children
  (``child_delimiter`` / ``child_max_tokens``). Children are embedded and matched;
  the parent is what retrieval returns, so a small precise match brings its context.

Token counts use the embedding model's tokenizer (by default the local MiniLM's
WordPiece), so ``max_tokens`` is what the model really sees. The local model reads
at most 254 tokens of a chunk (256 with [CLS]/[SEP]); chunks longer than that are
truncated when embedded, so keep ``embedded_max_tokens`` ≤ 254 with it. The bounds
50..2000 (parents 50..4000) follow Dify's rule "between 50 and the maximum segment
length" for models with longer inputs.

How this differs from Dify (``api/core/rag``, checked 2026):

- Dify's form defaults are 1024 / overlap 50 (general) and 1024 / 512 (parent /
  child), sized for API embedding models with 8k inputs; the defaults here (200 /
  20, 1000 / 200) fit the local model's 256-token window.
- Recent Dify measures ``max_tokens`` in characters despite its name; here it is
  tokens of the embedding model.
- Dify makes every delimiter-separated piece a chunk of its own, however short (a
  lone Markdown heading becomes a chunk); here consecutive pieces are packed up to
  ``max_tokens``, and chunk boundaries still fall only on delimiters unless one piece
  alone is too long. A chunk never ends in its delimiter.
- Dify's overlap likewise applies only inside an over-long piece; parent-child mode
  has no overlap in either. Same here.
- Dify's full-doc parent joins a file's documents with ``\\n``; here with ``\\n\\n``,
  and the children of a PDF are split per page so each keeps its ``page``. Dify
  truncates a full-doc parent at 10,000 tokens; here it is kept whole (parents are
  not embedded), so ``parent_max_tokens`` applies to paragraph mode only.
- Pre-processing is described in ``clean_text``: Dify's rules, except that its
  control-character pattern also deletes the letters ï, ¿ and ¾ and glues the words
  around a form feed, its URL rule eats text that follows a URL without a space
  (common in Chinese), and its whitespace rule leaves lines holding only spaces; all
  of these are fixed here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.node_parser.text.utils import split_by_sentence_tokenizer
from llama_index.core.schema import (
    Document,
    NodeRelationship,
    ObjectType,
    RelatedNodeInfo,
    TextNode,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamaindex_kb.models.local import minilm_tokenizer

Tokenizer = Callable[[str], Sequence[int]]
# Called between pieces of work; whatever it raises stops the chunking and passes through.
Checkpoint = Callable[[], None]
# Tokenizer calls between two checkpoints: each is microseconds, so a stop is noticed
# within milliseconds even inside one huge paragraph.
_CALLS_PER_CHECKPOINT = 256

# Chunk ids are uuid5(NODE_NAMESPACE, "<document_id>/<index>"): the same document
# chunked the same way gets the same ids (the namespace predates this module, so
# ids of knowledge bases built before it stay the same).
NODE_NAMESPACE = uuid.UUID("6f1c0a3e-4f0e-4d55-9a57-3d1f7f2b8c11")

# Joins the documents (a PDF's pages) of one full-doc parent.
_DOCUMENT_JOINER = "\n\n"


class ChunkingConfig(BaseModel):
    """How a knowledge base's documents are chunked; recorded in its manifest.

    Delimiters may be typed escaped, as in Dify's form: ``"\\\\n\\\\n"`` means two
    newlines and ``"\\\\t"`` a tab. An empty delimiter means "no fixed delimiter":
    only the size limit splits.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["general", "parent_child"] = "general"
    delimiter: str = "\n\n"
    max_tokens: int = Field(200, ge=50, le=2000)
    overlap: int = Field(20, ge=0, description="tokens repeated between parts of a long piece")
    collapse_whitespace: bool = Field(
        True, description="Replace consecutive spaces, newlines and tabs"
    )
    remove_urls_emails: bool = Field(False, description="Delete all URLs and email addresses")
    parent_mode: Literal["paragraph", "full_doc"] = "paragraph"
    parent_delimiter: str = "\n\n"
    parent_max_tokens: int = Field(1000, ge=50, le=4000)
    child_delimiter: str = "\n"
    child_max_tokens: int = Field(200, ge=50, le=2000)

    @field_validator("delimiter", "parent_delimiter", "child_delimiter")
    @classmethod
    def _unescape(cls, value: str) -> str:
        return value.replace("\\n", "\n").replace("\\t", "\t")

    @model_validator(mode="after")
    def _sizes_fit(self) -> Self:
        if self.overlap >= self.max_tokens:
            raise ValueError("overlap must be smaller than max_tokens")
        if (self.mode == "parent_child" and self.parent_mode == "paragraph"
                and self.child_max_tokens > self.parent_max_tokens):
            raise ValueError("child_max_tokens must not exceed parent_max_tokens")
        return self

    @property
    def embedded_max_tokens(self) -> int:
        """The longest chunk that gets embedded: compare with the embedding model's input."""
        return self.child_max_tokens if self.mode == "parent_child" else self.max_tokens


class TooManyChunks(Exception):
    """A document gives more than the ``max_chunks`` that ``chunk`` was allowed."""

    def __init__(self, document_id: str, max_chunks: int) -> None:
        super().__init__(f"document {document_id} gives more than {max_chunks} chunks")
        self.document_id = document_id
        self.max_chunks = max_chunks


@dataclass(frozen=True)
class ChunkResult:
    """``chunks`` are embedded and indexed; ``parents`` (parent-child mode) are returned."""

    chunks: list[TextNode] = field(default_factory=list)
    parents: list[TextNode] = field(default_factory=list)


_LINE_BREAKS = re.compile(r"\r\n?|[\v\f]")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufffe\uffff]")
_HORIZONTAL_SPACE = "\t\x20\u00a0\u1680\u180e\u2000-\u200a\u202f\u205f\u3000"
_SPACE_RUN = re.compile(f"[{_HORIZONTAL_SPACE}]{{2,}}")
_SPACE_AROUND_NEWLINE = re.compile(f"[{_HORIZONTAL_SPACE}]*\n[{_HORIZONTAL_SPACE}]*")
_BLANK_LINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"[A-Za-z0-9_.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# A Markdown image is matched first and kept whole; any other http(s) URL is
# removed. A URL is made of RFC 3986 characters and does not end in punctuation.
_URL_OR_IMAGE = re.compile(
    r"(!\[[^\]]*\]\([^)\s]*\))"
    r"|https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'*+,;=%]*[A-Za-z0-9\-_~/#=&%+]"
)


def clean_text(text: str, config: ChunkingConfig) -> str:
    """The pre-processing applied to every document before it is split.

    Always: ``\\r\\n``, ``\\r``, vertical tab and form feed become ``\\n``; other
    control characters except tab, and the non-characters U+FFFE/U+FFFF, are deleted;
    ``<|`` becomes ``<`` and ``|>`` becomes ``>``, so a document cannot carry chat
    template tokens such as ``<|im_start|>`` into an LLM prompt (Dify does the same).

    ``remove_urls_emails`` (first, so the whitespace left behind is collapsed):
    email addresses (``name@host.tld``) and ``http://`` / ``https://`` URLs are
    deleted, except URLs of Markdown images ``![alt](url)``, which are kept whole. A
    URL is a run of ASCII characters allowed in URLs other than parentheses, so it
    ends at whitespace, at ``(`` or ``)`` (as in a Markdown link) and at non-ASCII
    text such as Chinese written right after it, and it never takes trailing
    punctuation such as a sentence's final period.

    ``collapse_whitespace``: every run of two or more spaces, tabs or other
    horizontal whitespace (including the ideographic space) becomes one space;
    horizontal whitespace at the start and end of lines is removed; three or more
    newlines become two, so paragraph breaks survive.
    """
    text = _CONTROLS.sub("", _LINE_BREAKS.sub("\n", text)).replace("<|", "<").replace("|>", ">")
    if config.remove_urls_emails:
        text = _EMAIL.sub("", text)
        text = _URL_OR_IMAGE.sub(lambda m: m.group(1) or "", text)
    if config.collapse_whitespace:
        text = _SPACE_RUN.sub(" ", text)
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text)
    return text


# Sentence ends in Chinese and Japanese text, which has no space after them, so the
# (English) Punkt sentence tokenizer does not see them.
_CJK_SENTENCE_END = re.compile(r"(?<=[。！？])")
_CLAUSE_PUNCTUATION = ",.;:，、；：。？！\n"
# Every character belongs to exactly one match, so no text is lost between clauses.
_CLAUSES = f"[^{_CLAUSE_PUNCTUATION}]*[{_CLAUSE_PUNCTUATION}]+|[^{_CLAUSE_PUNCTUATION}]+"


def _sentence_splitter() -> Callable[[str], list[str]]:
    """Punkt's English sentences, cut again after Chinese/Japanese sentence ends.

    The parts always add up to the whole text: Punkt drops whitespace before the
    first sentence, which here stays attached to it, or the paragraph break before
    it would vanish when SentenceSplitter joins its splits back together.
    """
    punkt = split_by_sentence_tokenizer()

    def split(text: str) -> list[str]:
        parts = [part for sentence in punkt(text)
                 for part in _CJK_SENTENCE_END.split(sentence) if part]
        dropped = len(text) - sum(len(part) for part in parts)
        if dropped:
            parts = [text[:dropped] + (parts[0] if parts else ""), *parts[1:]]
        return parts

    return split


class _Splitter:
    """Splits a text on a delimiter and packs the pieces into chunks of ≤ max_tokens."""

    def __init__(self, delimiter: str, max_tokens: int, overlap: int, tokenizer: Tokenizer):
        self.delimiter = delimiter
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.tokenizer = tokenizer
        self._long_pieces: SentenceSplitter | None = None

    def count(self, text: str) -> int:
        return len(self.tokenizer(text))

    def split(self, text: str) -> list[str]:
        """Chunks of ``text``; each is a slice of it, so it appears in ``text`` verbatim."""
        chunks: list[str] = []
        group: list[tuple[int, int]] = []  # (start, end) of the pieces being packed
        total = 0
        seam = self.count(self.delimiter) if self.delimiter else 0
        for start, end in self._pieces(text):
            tokens = self.count(text[start:end])
            if tokens > self.max_tokens:
                chunks.extend(self._pack(text, group))
                group, total = [], 0
                chunks.extend(self._split_long(text[start:end]))
                continue
            if group and total + seam + tokens > self.max_tokens:
                chunks.extend(self._pack(text, group))
                group, total = [], 0
            total = total + seam + tokens if group else tokens
            group.append((start, end))
        chunks.extend(self._pack(text, group))
        return chunks

    def _pack(self, text: str, group: list[tuple[int, int]]) -> list[str]:
        """The slice of ``text`` spanning ``group``, as one chunk if it really fits.

        Packing summed the pieces' counts, which is exact for WordPiece; a tokenizer
        that counts a joined text differently (BPE merging across the seam) gets the
        group's last piece moved to a chunk of its own until the rest fits.
        """
        if not group:
            return []
        whole = text[group[0][0]:group[-1][1]]
        if len(group) == 1 or self.count(whole) <= self.max_tokens:
            return [whole]
        return self._pack(text, group[:-1]) + self._pack(text, group[-1:])

    def _pieces(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every non-blank piece between delimiters, without its edge space."""
        bounds = []
        position = 0
        while position <= len(text):
            found = text.find(self.delimiter, position) if self.delimiter else -1
            stop = len(text) if found < 0 else found
            piece = text[position:stop]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                bounds.append((position + lead, position + len(piece.rstrip())))
            if found < 0:
                break
            position = found + len(self.delimiter)
        return bounds

    def _split_long(self, piece: str) -> list[str]:
        if self._long_pieces is None:
            # Built on first need: loading the Punkt sentence model takes ~0.4 s.
            self._long_pieces = SentenceSplitter(
                chunk_size=self.max_tokens,
                chunk_overlap=self.overlap,
                tokenizer=self.tokenizer,
                paragraph_separator="\n\n",
                chunking_tokenizer_fn=_sentence_splitter(),
                secondary_chunking_regex=_CLAUSES,
                include_prev_next_rel=False,
            )
        return self._long_pieces.split_text(piece)


def chunk(
    documents: Sequence[Document],
    config: ChunkingConfig,
    tokenizer: Tokenizer | None = None,
    *,
    max_chunks: int | None = None,
    checkpoint: Checkpoint | None = None,
) -> ChunkResult:
    """Chunk ``documents`` as ``config`` says, counting tokens with ``tokenizer``.

    Documents are grouped by ``metadata["document_id"]`` (several LlamaIndex
    documents, such as a PDF's pages, can make up one knowledge-base document); one
    without it forms its own group under its ``id_``. Chunk ``i`` of a group gets the
    id ``uuid5(NODE_NAMESPACE, f"{document_id}/{i}")`` and parent ``i`` the id
    ``uuid5(NODE_NAMESPACE, f"{document_id}/parent/{i}")``, so chunking the same text
    with the same settings gives the same ids.

    Every node copies its document's metadata (a full-doc parent only what all the
    group's documents share) with all of it excluded from the embedded and LLM text.
    In parent-child mode each child carries ``metadata["parent_id"]`` and a PARENT
    relationship, and each parent CHILD relationships, in order.

    A document (group) with more than ``max_chunks`` chunks raises ``TooManyChunks``,
    checked after each of its LlamaIndex documents (a PDF's pages). ``checkpoint`` is
    called every few hundred token counts, so even one long paragraph can be stopped.
    """
    tokenizer = tokenizer or minilm_tokenizer()
    if checkpoint is not None:
        tokenizer = _checkpointed(tokenizer, checkpoint)

    def counted(document_id: str, chunks: int) -> None:
        if max_chunks is not None and chunks > max_chunks:
            raise TooManyChunks(document_id, max_chunks)
    groups: dict[str, list[Document]] = {}
    for document in documents:
        groups.setdefault(str(document.metadata.get("document_id") or document.id_), []).append(
            document
        )
    result = ChunkResult()
    if config.mode == "general":
        splitter = _Splitter(config.delimiter, config.max_tokens, config.overlap, tokenizer)
        for document_id, group in groups.items():
            index = 0
            for document in group:
                for text in splitter.split(clean_text(document.text, config)):
                    result.chunks.append(_node(document_id, str(index), text, document.metadata))
                    index += 1
                counted(document_id, index)
        return result

    parent_splitter = _Splitter(config.parent_delimiter, config.parent_max_tokens, 0, tokenizer)
    child_splitter = _Splitter(config.child_delimiter, config.child_max_tokens, 0, tokenizer)
    for document_id, group in groups.items():
        cleaned = [(document, clean_text(document.text, config)) for document in group]
        # (parent text, its metadata, the (text, metadata) sources of its children)
        families: list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]]
        if config.parent_mode == "full_doc":
            texts = [text.strip() for _, text in cleaned if text.strip()]
            if not texts:
                continue
            shared = _shared_metadata([document.metadata for document in group])
            families = [(_DOCUMENT_JOINER.join(texts), shared,
                         [(text, document.metadata) for document, text in cleaned])]
        else:
            families = [(parent, document.metadata, [(parent, document.metadata)])
                        for document, text in cleaned for parent in parent_splitter.split(text)]
        index = 0
        for parent_index, (parent_text, parent_metadata, sources) in enumerate(families):
            parent = _node(document_id, f"parent/{parent_index}", parent_text, parent_metadata)
            children = []
            for source_text, metadata in sources:
                for text in child_splitter.split(source_text):
                    child = _node(document_id, str(index), text,
                                  {**metadata, "parent_id": parent.node_id})
                    child.relationships[NodeRelationship.PARENT] = RelatedNodeInfo(
                        node_id=parent.node_id, node_type=ObjectType.TEXT
                    )
                    children.append(child)
                    index += 1
                counted(document_id, index)
            parent.relationships[NodeRelationship.CHILD] = [
                RelatedNodeInfo(node_id=child.node_id, node_type=ObjectType.TEXT)
                for child in children
            ]
            result.parents.append(parent)
            result.chunks.extend(children)
    return result


def _checkpointed(tokenizer: Tokenizer, checkpoint: Checkpoint) -> Tokenizer:
    calls = 0

    def tokenize(text: str) -> Sequence[int]:
        nonlocal calls
        calls += 1
        if calls % _CALLS_PER_CHECKPOINT == 0:
            checkpoint()
        return tokenizer(text)

    return tokenize


def _node(document_id: str, key: str, text: str, metadata: dict[str, Any]) -> TextNode:
    node = TextNode(
        id_=str(uuid.uuid5(NODE_NAMESPACE, f"{document_id}/{key}")),
        text=text,
        metadata=dict(metadata),
    )
    # Metadata is for filters and citations: keep it out of the embedded, BM25 and
    # LLM text.
    node.excluded_embed_metadata_keys = list(node.metadata)
    node.excluded_llm_metadata_keys = list(node.metadata)
    return node


def _shared_metadata(metadatas: list[dict[str, Any]]) -> dict[str, Any]:
    """The items every one of ``metadatas`` has with the same value (drops a PDF's page)."""
    first, *rest = metadatas
    return {k: v for k, v in first.items() if all(k in m and m[k] == v for m in rest)}
