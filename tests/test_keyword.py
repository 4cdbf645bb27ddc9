"""Keyword search: the multilingual analyzer, the one BM25, and the embedded store's index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llamaindex_kb.stores.local.keyword import KeywordIndex
from llamaindex_kb.text import bm25
from llamaindex_kb.text.analyzer import tokenize
from llamaindex_kb.text.bm25 import Postings, best_term_weights, score_postings

CORPUS = [
    "大语言模型的检索增强生成是一种常用技术，它先检索相关文档再生成答案。",  # 0
    "向量資料庫支援中繼資料過濾",  # 1
    "LlamaIndex 的混合检索结合了向量检索和关键词检索",  # 2
    "Retrieval of relevant passages from a large corpus.",  # 3
    "The weather in Paris is mild in spring.",  # 4
    "Vector databases store embeddings for similarity search.",  # 5
    "ベクトルデータベースで検索する",  # 6
    "벡터 데이터베이스 검색",  # 7
    "Quarterly revenue grew thanks to strong cloud sales.",  # 8
    "Cloud sales drove revenue growth this quarter.",  # 9
]


@pytest.fixture(scope="module")
def index() -> KeywordIndex:
    # The first Han text loads jieba and the folding table (about a second), once.
    return KeywordIndex.build(CORPUS)


def top_row(index: KeywordIndex, query: str) -> int:
    scores = index.scores(query)
    assert scores.any(), f"{query!r} found nothing"
    return int(np.argmax(scores))


def test_chinese_clause_is_split_so_a_word_inside_it_matches(index: KeywordIndex) -> None:
    assert len(tokenize("大语言模型的检索增强生成")) > 1
    assert top_row(index, "检索增强") == 0
    assert top_row(index, "大语言模型") == 0


def test_traditional_chinese_word_inside_a_clause_matches(index: KeywordIndex) -> None:
    assert top_row(index, "資料庫") == 1
    assert top_row(index, "中繼資料") == 1


def test_simplified_query_finds_traditional_text() -> None:
    assert tokenize("资料库") == tokenize("資料庫")


def test_mixed_english_and_chinese_text_matches_either_part(index: KeywordIndex) -> None:
    terms = tokenize("LlamaIndex 的混合检索")
    assert "llamaindex" in terms and "混合" in terms
    assert top_row(index, "llamaindex") == 2
    assert top_row(index, "混合检索") == 2


def test_english_inflections_share_a_stem(index: KeywordIndex) -> None:
    assert tokenize("retrieving") == tokenize("retrieval")
    assert top_row(index, "retrieving passages") == 3


def test_english_stopwords_are_dropped_with_their_apostrophe_forms() -> None:
    assert tokenize("The cat and the hat") == tokenize("cat hat")
    assert tokenize("don't shouldn't you're") == []


def test_full_width_forms_read_as_ascii() -> None:
    assert tokenize("ＬｌａｍａＩｎｄｅｘ　１２３") == tokenize("LlamaIndex 123")


def test_kana_and_hangul_match_on_character_bigrams(index: KeywordIndex) -> None:
    assert top_row(index, "データ") == 6
    assert top_row(index, "데이터") == 7


@pytest.mark.parametrize("query", ["the of and is", "", "   ", "zyxwvut"])
def test_query_without_indexed_terms_scores_every_row_zero(index: KeywordIndex,
                                                           query: str) -> None:
    scores = index.scores(query)
    assert scores.shape == (len(CORPUS),) and not scores.any()


def test_scores_are_in_unit_range_and_exact_match_beats_partial(index: KeywordIndex) -> None:
    scores = index.scores("Cloud sales drove revenue growth this quarter.")
    assert list(np.argsort(-scores, kind="stable")[:2]) == [9, 8]
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[9] > scores[8] > 0


def test_weak_best_match_still_scores_low() -> None:
    rare = ["zebra migration", "quokka habitat", "axolotl tank"]
    index = KeywordIndex.build(rare + [f"ordinary filler text number {i}" for i in range(20)])
    scores = index.scores("zebra quokka axolotl")
    assert np.flatnonzero(scores).tolist() == [0, 1, 2]
    # The best row holds one of three equally rare terms: about a third, not 1.0.
    assert scores.max() < 0.5


def test_query_words_missing_from_the_index_lower_the_score() -> None:
    index = KeywordIndex.build(
        ["sourdough bread rises with wild yeast", "green tea brewing", "solar panels"]
    )
    assert index.scores("sourdough wild yeast").max() == pytest.approx(1.0)
    assert index.scores("sourdough pizza oven chimney").max() < 0.5


def test_a_query_term_repeated_counts_each_time() -> None:
    index = KeywordIndex.build(["alpha beta", "alpha gamma", "beta gamma", "delta"])
    once, twice = index.scores("alpha beta"), index.scores("alpha alpha beta")
    # Row 1 holds only alpha: twice the alpha is more of the attainable maximum.
    assert twice[1] > once[1] > 0
    assert twice[0] == pytest.approx(1.0) and once[0] == pytest.approx(1.0)


def test_rows_holding_the_same_terms_score_the_same() -> None:
    index = KeywordIndex.build(["alpha beta", "gamma", "alpha beta", "alpha beta"])
    scores = index.scores("alpha")
    assert scores[1] == 0.0
    assert scores[0] == scores[2] == scores[3] > 0


def postings_of(texts: list[str]) -> tuple[dict[str, Postings], int]:
    """What the database stores keep for ``texts``: each term's postings, and the total length."""
    return bm25.postings_of([tokenize(text) for text in texts])


@pytest.mark.parametrize("query", [
    "检索增强 retrieval", "資料庫 vector search", "cloud revenue cloud", "データ 데이터",
    "sourdough pizza cloud", "zyxwvut", "quarterly revenue grew thanks to strong cloud sales",
])
def test_embedded_index_scores_as_the_database_stores_postings_do(
    index: KeywordIndex, query: str
) -> None:
    # The database stores score from postings at query time, the embedded store from
    # weights it computed when built: the same query must give the same scores.
    postings, total_length = postings_of(CORPUS)
    absent = best_term_weights(postings.values(), len(CORPUS), total_length)
    terms = tokenize(query)
    rows, scores = score_postings(terms, {t: postings[t] for t in terms if t in postings},
                                  len(CORPUS), total_length, absent)
    expected = np.zeros(len(CORPUS))
    expected[rows] = scores
    np.testing.assert_allclose(index.scores(query), expected, rtol=1e-12, atol=0)


# Written by the bm25s-based index (commit 4c8a073, bm25s 0.3.16) from CORPUS: the
# files of every embedded knowledge base built before this index computed its own weights.
BM25S_INDEX = Path(__file__).parent / "fixtures" / "keyword-bm25s"


def test_an_index_bm25s_wrote_scores_as_one_built_now(index: KeywordIndex) -> None:
    old = KeywordIndex.load(BM25S_INDEX)
    assert len(old) == len(CORPUS)
    for query in ["检索", "資料庫", "cloud revenue", "データ", "vector search", "retrieving"]:
        built, read = index.scores(query), old.scores(query)
        assert np.array_equal(built > 0, read > 0)
        # bm25s computed its weights in float32 arithmetic, this index rounds float64
        # ones to float32: they agree to float32 rounding.
        np.testing.assert_allclose(read, built, rtol=3e-7, atol=0)


def test_saved_index_answers_exactly_like_the_built_one(
    index: KeywordIndex, tmp_path: Path
) -> None:
    index.save(tmp_path / "kw")
    loaded = KeywordIndex.load(tmp_path / "kw")
    assert len(loaded) == len(index)
    for query in ["检索", "資料庫", "cloud revenue", "データ", "vector search"]:
        np.testing.assert_array_equal(loaded.scores(query), index.scores(query))


def test_saving_over_an_index_replaces_it(tmp_path: Path) -> None:
    KeywordIndex.build(["old text"]).save(tmp_path / "kw")
    KeywordIndex.build(["new text", "more new text"]).save(tmp_path / "kw")
    loaded = KeywordIndex.load(tmp_path / "kw")
    assert len(loaded) == 2
    assert not loaded.scores("old").any()
    assert loaded.scores("new").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kw"]


def test_index_from_another_analyzer_version_is_refused(tmp_path: Path) -> None:
    KeywordIndex.build(["some text"]).save(tmp_path / "kw")
    meta_file = tmp_path / "kw" / "keyword.json"
    meta = json.loads(meta_file.read_text())
    meta["analyzer_version"] = -1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rebuild"):
        KeywordIndex.load(tmp_path / "kw")


def test_index_without_any_term_scores_zero_and_round_trips(tmp_path: Path) -> None:
    for texts in ([], ["", "the and of"]):
        index = KeywordIndex.build(texts)
        index.save(tmp_path / "kw")
        loaded = KeywordIndex.load(tmp_path / "kw")
        assert len(loaded) == len(texts)
        assert loaded.scores("anything").shape == (len(texts),)
        assert not loaded.scores("anything").any()


def run_in_os_threads(work: Callable[[], object], count: int) -> list[object]:
    """Run ``work`` in ``count`` real OS threads and return what each returned.

    In a whole test run the SDK's test modules import dify_plugin, which gevent-patches
    ``threading``: its threads would be greenlets that never overlap, proving nothing.
    """
    from gevent import monkey

    start_new_thread = monkey.get_original("_thread", "start_new_thread")
    allocate_lock = monkey.get_original("_thread", "allocate_lock")
    results: list[object] = [None] * count
    finished = [allocate_lock() for _ in range(count)]

    def run(slot: int) -> None:
        try:
            results[slot] = work()
        except BaseException as exc:  # reported to the test below, not lost in the thread
            results[slot] = exc
        finally:
            finished[slot].release()

    for slot, lock in enumerate(finished):
        lock.acquire()
        start_new_thread(run, (slot,))
    for lock in finished:
        lock.acquire()
    return results


def test_concurrent_searches_agree_with_sequential_ones(index: KeywordIndex) -> None:
    queries = ["检索", "資料庫", "cloud revenue", "データ", "retrieving", "混合检索 vector"] * 40

    def search_all() -> list[list[float]]:
        return [index.scores(q).tolist() for q in queries]

    expected = search_all()
    for result in run_in_os_threads(search_all, 8):
        assert result == expected


def test_jieba_starts_quietly_and_caches_only_in_the_temp_dir(tmp_path: Path) -> None:
    # A fresh interpreter, because jieba loads once per process. analyzer.py is
    # loaded by path so the package's heavier imports stay out of the timing.
    module = Path(__file__).resolve().parent.parent / "llamaindex_kb" / "text" / "analyzer.py"
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('keyword_probe', {str(module)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['keyword_probe'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(mod.tokenize('混合检索'))\n"
    )
    temp = tmp_path / "tmp"
    work = tmp_path / "cwd"
    temp.mkdir()
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=work,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "混合" in done.stdout
    assert done.stderr == ""
    assert list(work.iterdir()) == []
    user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    assert [p.name for p in temp.iterdir()] == [f"llamaindex_kb{user}"]
    assert (temp / f"llamaindex_kb{user}" / "jieba" / "jieba.cache").is_file()
