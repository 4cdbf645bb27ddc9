"""The retrieval policy every store follows (scoring.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from llamaindex_kb.scoring import (
    TINY_SCORE,
    clip,
    clip_similarities,
    fuse,
    lowest_returned,
    semantic_weight,
)


@pytest.mark.parametrize(("raw", "score"), [
    (0.42, 0.42), (1.7, 1.0), (-0.3, 0.0), (math.nan, 0.0), (None, 0.0), ("0.5", 0.5),
    ("high", 0.0), (math.inf, 1.0), (-math.inf, 0.0),
])
def test_a_score_from_outside_lands_on_the_zero_to_one_scale(raw, score):
    assert clip(raw) == score


def test_unrelated_chunks_are_never_returned_even_without_a_threshold():
    assert lowest_returned(0.0) == TINY_SCORE > 0.0
    assert lowest_returned(0.5) == 0.5


def test_negative_similarity_means_unrelated():
    clipped = clip_similarities(np.array([-0.2, 0.0, 0.3, 1.0000001]), np.float32)
    assert clipped.dtype == np.float32
    assert clipped.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0])


@pytest.mark.parametrize(("mode", "weight", "share"), [
    ("vector", 0.3, 1.0), ("keyword", 0.3, 0.0), ("hybrid", 0.3, 0.3)])
def test_the_mode_decides_the_semantic_share(mode, weight, share):
    assert semantic_weight(mode, weight) == share


def test_fusing_float32_columns_matches_exact_arithmetic_to_float32_rounding():
    rng = np.random.default_rng(7)
    semantic, keyword = rng.random(1000), rng.random(1000)
    exact = 0.7 * semantic + (1.0 - 0.7) * keyword  # the weights as every store derives them
    fused32 = fuse(semantic.astype(np.float32), keyword.astype(np.float32), 0.7)
    assert fused32.dtype == np.float32
    np.testing.assert_allclose(fused32, exact, rtol=2e-7, atol=1e-7)
    np.testing.assert_array_equal(fuse(semantic, keyword, 0.7), exact)


def test_hybrid_gives_the_vector_side_only_the_share_of_the_query_the_model_reads():
    assert semantic_weight("hybrid", 0.7, readable=1.0) == 0.7
    assert semantic_weight("hybrid", 0.7, readable=0.25) == pytest.approx(0.175)
    assert semantic_weight("hybrid", 0.7, readable=0.0) == 0.0
    # Vector and keyword modes ask for one side only, whatever the model reads.
    assert semantic_weight("vector", 0.7, readable=0.0) == 1.0
    assert semantic_weight("keyword", 0.7, readable=1.0) == 0.0


def test_the_local_model_reads_english_but_little_chinese():
    from llamaindex_kb.models.choose import local_embedding

    model = local_embedding()
    assert model.readable_share("How do I connect Dify to a knowledge base?") == 1.0
    assert model.readable_share("大语言模型的检索增强生成是什么") < 0.5
    assert 0.5 < model.readable_share("Dify 外部知识库 API") < 1.0


CHINESE = {
    # The one relevant document mixes in English, so the local model reads more of it
    # than of the others: its vector is the least like a query it reads as unknown tokens.
    "tea.md": "Green tea 绿茶: brew it at 80 °C, 冲泡 with hotter water makes it bitter.",
    "rail.md": "高速铁路让城市之间的旅行时间大大缩短，也改变了人们的通勤方式。",
    "river.md": "长江是中国最长的河流，流经许多省份和城市。",
    "opera.md": "京剧是中国的传统戏曲，融合了唱念做打等多种表演形式。",
}


def _records(data_dir: Path, query: str, **settings: object) -> list[tuple[str, float]]:
    from llamaindex_kb import load_settings
    from llamaindex_kb.contract import RetrievalRequest
    from llamaindex_kb.models.base import Models
    from llamaindex_kb.models.choose import local_embedding
    from llamaindex_kb.retrieval import Library

    library = Library(load_settings({"data_dir": data_dir, **settings}, environ={}))
    found = library.retrieve(RetrievalRequest(knowledge_id="zh", query=query, top_k=4),
                             Models(embed_model=local_embedding()))
    return [(record.metadata["file_name"], record.score) for record in found]


@pytest.fixture(scope="module")
def chinese_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamaindex_kb.ingestion.pipeline import ingest_paths
    from llamaindex_kb.models.base import Models
    from llamaindex_kb.models.choose import local_embedding
    from llamaindex_kb.stores.local.store import LocalStore

    source, data = tmp_path_factory.mktemp("zh-source"), tmp_path_factory.mktemp("zh-data")
    for name, text in CHINESE.items():
        (source / name).write_text(text, encoding="utf-8")
    ingest_paths(LocalStore(data), "zh", [source], models=Models(local_embedding()))
    return data


def test_a_chinese_query_in_hybrid_mode_ranks_by_its_words_not_by_unknown_tokens(chinese_base):
    query = "怎么冲泡绿茶"  # the local model reads almost none of it
    hybrid = _records(chinese_base, query)
    keyword = _records(chinese_base, query, retrieval_mode="keyword")
    assert keyword[0][0] == "tea.md"
    assert hybrid[0][0] == "tea.md"


def test_a_weight_set_on_the_server_is_used_as_it_is(chinese_base):
    query = "怎么冲泡绿茶"
    server_weighted = _records(chinese_base, query, retrieval_mode="hybrid", semantic_weight=0.7)
    default = _records(chinese_base, query)
    # The same weight, given explicitly, is not scaled down: the unknown tokens' vector
    # side counts in full, so the scores differ.
    assert [score for _, score in server_weighted] != [score for _, score in default]


def test_ingestion_records_how_much_of_the_documents_the_model_reads(chinese_base):
    from llamaindex_kb.stores.local.store import LocalStore

    manifest = LocalStore(chinese_base).open("zh").manifest
    # Three of the four documents are Chinese, which the local model mostly cannot read.
    assert manifest.readable_share is not None and 0.2 < manifest.readable_share < 0.7


def test_the_bases_share_scales_the_weight_of_a_query_the_model_reads(chinese_base):
    from llamaindex_kb.models.choose import local_embedding
    from llamaindex_kb.stores.base import QueryPlan, fused_weight
    from llamaindex_kb.stores.local.store import LocalStore

    manifest = LocalStore(chinese_base).open("zh").manifest
    english = QueryPlan(query="how to brew green tea", top_k=3)
    assert fused_weight(english, manifest, local_embedding()) == pytest.approx(
        0.7 * manifest.readable_share)
    explicit = english.model_copy(update={"semantic_weight": 0.7})
    assert fused_weight(explicit, manifest, local_embedding()) == 0.7
