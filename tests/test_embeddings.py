"""The offline MiniLM embedding, its tokenizer helpers and EmbeddingSpec, on the real model."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from llamaindex_kb.models.local import (
    DIMENSION,
    MAX_TOKENS,
    LocalMiniLMEmbedding,
    minilm_token_count,
    minilm_tokenizer,
)
from llamaindex_kb.models.spec import EmbeddingSpec

# Words that are one WordPiece token each, so n words are exactly n tokens.
HEAD_WORDS = "the cat sat on a mat and looked at small red bird near old house".split()
TAIL_WORDS = "music guitar song piano concert band rock jazz dance stage".split()
UNKNOWN_TOKEN_ID = 100  # [UNK]


@pytest.fixture(scope="module")
def model() -> LocalMiniLMEmbedding:
    return LocalMiniLMEmbedding()


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def words(vocabulary: list[str], n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def test_vectors_are_384_dimensional_and_unit_length(model: LocalMiniLMEmbedding) -> None:
    vectors = [model.get_query_embedding("What is a vector database?")]
    vectors += model.get_text_embedding_batch(["A vector database stores embeddings.", "Hi"])
    for vector in vectors:
        assert len(vector) == DIMENSION == 384
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_model_card_similarities_are_reproduced(model: LocalMiniLMEmbedding) -> None:
    # sentence-transformers' documented similarities for all-MiniLM-L6-v2 (fp32);
    # the int8 weights may move them by about 0.01.
    anchor = model.get_text_embedding("That is a happy person")
    dog, very_happy, sunny = model.get_text_embedding_batch(
        ["That is a happy dog", "That is a very happy person", "Today is a sunny day"]
    )
    similarities = [cosine(anchor, v) for v in (very_happy, dog, sunny)]
    assert similarities == sorted(similarities, reverse=True)
    assert similarities == pytest.approx([0.943, 0.695, 0.257], abs=0.02)


def test_queries_take_the_int8_path_and_stay_close_to_the_document_vectors(
        model: LocalMiniLMEmbedding) -> None:
    texts = ["Retrieval augmented generation", "That is a happy person",
             words(HEAD_WORDS, 60, seed=3), "知识库检索"]
    for text in texts:
        query, document = model.get_query_embedding(text), model.get_text_embedding(text)
        assert 0.97 < cosine(query, document) < 0.99999
    # Close enough that a query ranks documents as the exact path does.
    anchor = model.get_query_embedding("That is a happy person")
    candidates = model.get_text_embedding_batch(
        ["That is a happy dog", "That is a very happy person", "Today is a sunny day"])
    assert np.argsort([-cosine(anchor, c) for c in candidates]).tolist() == [1, 0, 2]


def test_query_vector_is_the_query_embedding_and_cannot_be_changed(
        model: LocalMiniLMEmbedding) -> None:
    query = "which store answers fastest?"
    vector = model.query_vector(query)
    assert vector.tolist() == model.get_query_embedding(query)
    assert model.query_vector(query) is vector  # cached, so it must be read-only
    with pytest.raises(ValueError):
        vector[0] = 0.0


def test_batch_equals_single_whatever_the_order_and_lengths() -> None:
    # A micro-batch of 3 forces several length-sorted batches with padding in each.
    model = LocalMiniLMEmbedding(micro_batch_size=3)
    texts = [words(HEAD_WORDS, n, seed=n) for n in (1, 40, 3, 120, 7, 300, 15, 2)]
    texts += ["", "向量数据库支持元数据过滤"]
    random.Random(0).shuffle(texts)
    batch = model.get_text_embedding_batch(texts)
    for text, vector in zip(texts, batch, strict=True):
        assert cosine(vector, model.get_text_embedding(text)) > 0.9999
    reversed_batch = model.get_text_embedding_batch(texts[::-1])[::-1]
    for a, b in zip(batch, reversed_batch, strict=True):
        assert cosine(a, b) > 0.9999


def test_texts_longer_than_256_tokens_are_truncated(model: LocalMiniLMEmbedding) -> None:
    head = words(HEAD_WORDS, MAX_TOKENS - 2, seed=1)  # [CLS] and [SEP] take the other two
    tail = words(TAIL_WORDS, 500, seed=2)
    long_text = f"{head} {tail}"
    assert minilm_token_count(long_text) == MAX_TOKENS - 2 + 500
    long_vector = model.get_text_embedding(long_text)
    assert cosine(long_vector, model.get_text_embedding(head)) > 0.9999
    assert cosine(long_vector, model.get_text_embedding(tail)) < 0.9


def test_empty_and_blank_texts_give_a_unit_vector(model: LocalMiniLMEmbedding) -> None:
    for text in ("", "   \n"):
        vector = model.get_text_embedding(text)
        assert len(vector) == DIMENSION
        assert np.all(np.isfinite(vector))
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert model.get_text_embedding_batch([]) == []


def test_chinese_text_embeds_but_mostly_as_unknown_tokens(model: LocalMiniLMEmbedding) -> None:
    text = "向量数据库支持元数据过滤和混合检索"
    ids = minilm_tokenizer()(text)
    # One token per character, so chunk sizing holds for Chinese too. But the
    # English vocabulary knows only 244 CJK characters: most become [UNK], so
    # Chinese semantic search needs another embedding model (or leans on BM25).
    assert len(ids) == len(text)
    assert ids.count(UNKNOWN_TOKEN_ID) > len(ids) // 2
    vector = model.get_text_embedding(text)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vector, model.get_text_embedding("")) < 0.9


def test_async_methods_match_sync(model: LocalMiniLMEmbedding) -> None:
    texts = ["first text", "a somewhat longer second text to embed"]

    async def embed() -> tuple[list[float], list[list[float]]]:
        return (
            await model.aget_query_embedding("a query"),
            await model.aget_text_embedding_batch(texts),
        )

    query, batch = asyncio.run(embed())
    assert cosine(query, model.get_query_embedding("a query")) > 0.99999
    for a, b in zip(batch, model.get_text_embedding_batch(texts), strict=True):
        assert cosine(a, b) > 0.99999


# In a whole test run the SDK's test modules import dify_plugin, whose gevent patching
# turns threads into greenlets in this process; a fresh interpreter gives eight real OS
# threads racing to create the session and then running inference at the same time.
CONCURRENCY_SCRIPT = """
import json
from concurrent.futures import ThreadPoolExecutor
from llamaindex_kb.models.local import LocalMiniLMEmbedding

texts = ["the cat sat on the mat " * n for n in (1, 5, 20)] + ["并发调用"]

def embed(_):
    model = LocalMiniLMEmbedding()
    session = model.session()  # the racing creation: each thread keeps what it got
    vectors = model.get_text_embedding_batch(texts)
    return id(session), vectors

with ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(embed, range(8)))
print(json.dumps({
    "sessions": len({session for session, _ in results}),
    "identical": all(vectors == results[0][1] for _, vectors in results),
}))
"""


def test_eight_os_threads_share_one_session_and_agree() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENCY_SCRIPT],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout) == {"sessions": 1, "identical": True}


def test_spinning_threads_change_no_vector_and_get_a_session_of_their_own() -> None:
    texts = ["the cat sat on the mat", words(HEAD_WORDS, 200, seed=5), "自旋线程"]
    quiet, spinning = LocalMiniLMEmbedding(), LocalMiniLMEmbedding(spin_threads=True)
    assert np.allclose(spinning.get_text_embedding_batch(texts),
                       quiet.get_text_embedding_batch(texts), atol=1e-6)
    assert spinning.session() is not quiet.session()

    def spins(model: LocalMiniLMEmbedding) -> tuple[str, str]:
        options = model.session().get_session_options()
        return (options.get_session_config_entry("session.intra_op.allow_spinning"),
                options.get_session_config_entry("session.force_spinning_stop"))

    # Spinning, but only within a run: it stops when the run returns.
    assert (spins(quiet), spins(spinning)) == (("0", "0"), ("1", "1"))


def test_spec_id_is_stable() -> None:
    spec = LocalMiniLMEmbedding().spec
    assert spec.id == "local:all-MiniLM-L6-v2-int8:384"
    assert spec == LocalMiniLMEmbedding(micro_batch_size=4).spec
    assert EmbeddingSpec.model_validate(spec.model_dump()) == spec
    assert spec.model_dump()["id"] == spec.id
    assert spec != EmbeddingSpec(kind="local", model="all-MiniLM-L6-v2-int8", dimension=768)


def test_spec_is_frozen_and_rejects_an_ambiguous_kind() -> None:
    spec = EmbeddingSpec(kind="openai", model="nomic-embed-text:latest", dimension=768)
    assert spec.id == "openai:nomic-embed-text:latest:768"
    with pytest.raises(ValidationError):
        spec.dimension = 384  # type: ignore[misc]
    with pytest.raises(ValidationError):
        EmbeddingSpec(kind="open:ai", model="m", dimension=8)


def test_token_count_of_a_known_sentence() -> None:
    assert minilm_tokenizer()("That is a happy person") == [2008, 2003, 1037, 3407, 2711]
    assert minilm_token_count("That is a happy person") == 5
    assert minilm_token_count("") == 0
    # Counting is neither truncated nor padded, unlike the vendored file's defaults.
    assert minilm_token_count(words(HEAD_WORDS, 600, seed=3)) == 600


def test_sentence_splitter_sizes_chunks_in_minilm_tokens() -> None:
    from llama_index.core.node_parser import SentenceSplitter

    text = " ".join(f"Sentence {i} mentions 检索增强生成 and tokenisation." for i in range(200))
    splitter = SentenceSplitter(chunk_size=120, chunk_overlap=0, tokenizer=minilm_tokenizer())
    chunks = splitter.split_text(text)
    assert len(chunks) > 1
    assert max(minilm_token_count(chunk) for chunk in chunks) <= 120
