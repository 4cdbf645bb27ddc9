"""The retrieval engine on real knowledge bases built by real ingestion."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PLUGIN_ROOT
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from llama_index.core.schema import TextNode

from llamaindex_kb import load_settings
from llamaindex_kb.conditions.compiled import compile_condition
from llamaindex_kb.conditions.model import parse_metadata_condition
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.errors import (
    EmbeddingMismatchError,
    InvalidFieldError,
    InvalidFilterError,
    KnowledgeBaseNotFound,
)
from llamaindex_kb.ingestion.pipeline import ingest_paths, publish_nodes
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.models.spec import EmbeddingSpec
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.local.store import LocalStore

DOCS = {
    "solar.md": "Solar panels convert sunlight into electricity using photovoltaic cells.",
    "wind.md": "Wind turbines turn the kinetic energy of moving air into electric power.",
    "tea.txt": "Green tea is brewed at a lower temperature than black tea to avoid bitterness.",
    "bread.md": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
    "zh_simplified.md": "向量数据库支持元数据过滤和混合检索，适合大规模语义搜索。",
    "zh_traditional.md": "向量資料庫支援中繼資料過濾，適合大規模語意搜尋。",
    "mixed.md": "LlamaIndex 的混合检索结合了 BM25 关键词检索与向量检索。",
}


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (source / name).write_text(text, encoding="utf-8")
    data_dir = tmp_path_factory.mktemp("data")
    summary = ingest_paths(LocalStore(data_dir), "energy", [source],
                           models=Models(local_embedding()))
    assert summary.documents == len(DOCS) and not summary.failed
    return data_dir


def library(data_dir: Path, **overrides: Any) -> Library:
    return Library(load_settings({"data_dir": data_dir, **overrides}, environ={}))


def ask(lib: Library, text: str, top_k: int = 3, threshold: float = 0.0,
        condition: dict[str, Any] | None = None, kb: str = "energy") -> list[Any]:
    return lib.retrieve(RetrievalRequest(
        knowledge_id=kb, query=text, top_k=top_k, score_threshold=threshold,
        condition=parse_metadata_condition(condition)), Models(local_embedding()))


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_each_mode_finds_the_relevant_document_with_bounded_sorted_scores(kb_dir, mode):
    found = ask(library(kb_dir, retrieval_mode=mode), "photovoltaic solar electricity")
    assert found[0].metadata["file_name"] == "solar.md"
    scores = [r.score for r in found]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)


def test_vector_search_matches_meaning_without_shared_words(kb_dir):
    found = ask(library(kb_dir, retrieval_mode="vector"), "how do windmills make power")
    assert found[0].metadata["file_name"] == "wind.md"


def test_keyword_mode_returns_nothing_for_unrelated_words(kb_dir):
    assert ask(library(kb_dir, retrieval_mode="keyword"), "quantum chromodynamics") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [("元数据过滤", "zh_simplified.md"), ("資料庫", "zh_traditional.md"),
     ("混合检索 BM25", "mixed.md")],
    ids=["simplified", "traditional", "mixed"],
)
def test_chinese_sub_phrases_match_in_keyword_mode(kb_dir, query, expected):
    found = ask(library(kb_dir, retrieval_mode="keyword"), query)
    assert found and found[0].metadata["file_name"] == expected


def test_scores_are_absolute_so_a_weak_best_match_stays_low(kb_dir):
    lib = library(kb_dir, retrieval_mode="keyword")
    strong = ask(lib, "sourdough wild yeast lactic bacteria")[0].score
    weak = ask(lib, "sourdough pizza oven chimney")[0].score
    assert strong > 0.8 and weak < 0.5


def test_hybrid_weight_moves_between_the_two_pure_modes(kb_dir):
    text = "wind electric power"
    vector = ask(library(kb_dir, retrieval_mode="vector"), text)[0].score
    keyword = ask(library(kb_dir, retrieval_mode="keyword"), text)[0].score
    hybrid = ask(library(kb_dir, retrieval_mode="hybrid", semantic_weight=0.5), text)[0].score
    assert hybrid == pytest.approx(0.5 * vector + 0.5 * keyword, abs=1e-6)


def test_records_carry_source_file_name_path_and_stable_ids(kb_dir):
    first = ask(library(kb_dir), "green tea temperature")[0]
    again = ask(library(kb_dir), "green tea temperature")[0]
    assert first.metadata["file_name"] == "tea.txt"
    assert first.metadata["file_path"].endswith("/tea.txt")
    assert first.metadata["document_id"] == again.metadata["document_id"]
    assert first.title == "tea.txt"


def test_several_knowledge_bases_answer_independently(kb_dir, tmp_path):
    (tmp_path / "only.md").write_text("Kombucha is fermented sweet tea.", encoding="utf-8")
    ingest_paths(LocalStore(kb_dir), "drinks", [tmp_path / "only.md"],
                 models=Models(local_embedding()))
    lib = library(kb_dir)
    assert ask(lib, "fermented tea", kb="drinks")[0].metadata["file_name"] == "only.md"
    assert all(r.metadata["file_name"] != "only.md" for r in ask(lib, "fermented tea"))
    with pytest.raises(KnowledgeBaseNotFound):
        ask(lib, "tea", kb="nope")


def test_reingesting_a_changed_file_replaces_its_chunks(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    note = source / "note.md"
    note.write_text("The launch code is apple.", encoding="utf-8")
    data = tmp_path / "data"
    ingest_paths(LocalStore(data), "kb", [source], models=Models(local_embedding()), mode="keyword")
    note.write_text("The launch code is banana.", encoding="utf-8")
    ingest_paths(LocalStore(data), "kb", [source], models=Models(local_embedding()), mode="keyword")
    lib = library(data)
    assert ask(lib, "apple", kb="kb") == []
    assert len(ask(lib, "banana launch code", kb="kb")) == 1


def test_knowledge_base_survives_a_process_restart(kb_dir):
    before = [(r.metadata["chunk_id"], round(r.score, 5))
              for r in ask(library(kb_dir), "wind turbines")]
    script = (
        "import json, sys; from pathlib import Path;"
        "from llamaindex_kb import load_settings, Library, RetrievalRequest;"
        "from llamaindex_kb.models.choose import models_for;"
        "settings = load_settings({'data_dir': Path(sys.argv[1])}, environ={});"
        "hits = Library(settings).retrieve(RetrievalRequest(knowledge_id='energy',"
        " query='wind turbines', top_k=3), models_for(settings));"
        "print(json.dumps([[h.metadata['chunk_id'], round(h.score, 5)] for h in hits]))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(kb_dir)], cwd=PLUGIN_ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    assert [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])] == before


def test_concurrent_queries_agree_with_sequential_ones(kb_dir):
    lib = library(kb_dir)
    queries = ["solar", "wind power", "tea", "bread yeast", "向量数据库", "混合检索"] * 10
    expected = [[r.model_dump() for r in ask(lib, q)] for q in queries]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: [r.model_dump() for r in ask(lib, q)], queries))
    assert got == expected


def test_query_embedding_mismatch_is_a_clear_400_class_error(tmp_path):
    other = EmbeddingSpec(kind="openai", model="text-embedding-3-small", dimension=3)
    node = TextNode(text="hello world", metadata={"document_id": "d1"})
    publish_nodes(LocalStore(tmp_path), "foreign", [node], np.ones((1, 3), dtype=np.float32), other)
    with pytest.raises(EmbeddingMismatchError, match="text-embedding-3-small"):
        ask(library(tmp_path, retrieval_mode="vector"), "hello", kb="foreign")
    assert ask(library(tmp_path, retrieval_mode="keyword"), "hello", kb="foreign")


def test_ingesting_with_another_embedding_model_is_the_same_mismatch_error(tmp_path):
    other = EmbeddingSpec(kind="openai", model="text-embedding-3-small", dimension=3)
    node = TextNode(text="hello world", metadata={"document_id": "d1"})
    store = LocalStore(tmp_path / "d")
    publish_nodes(store, "foreign", [node], np.ones((1, 3), dtype=np.float32), other)
    (tmp_path / "a.md").write_text("more words", encoding="utf-8")
    with pytest.raises(EmbeddingMismatchError, match="text-embedding-3-small") as refused:
        ingest_paths(store, "foreign", [tmp_path / "a.md"], models=Models(local_embedding()))
    assert refused.value.error_code == 3004
    assert list(store.open("foreign").documents) == ["d1"]  # nothing written


def test_keyword_only_knowledge_base_refuses_vector_mode_clearly(tmp_path):
    (tmp_path / "a.md").write_text("keyword only corpus", encoding="utf-8")
    ingest_paths(LocalStore(tmp_path / "d"), "kw", [tmp_path / "a.md"], models=Models(None),
                 mode="keyword")
    assert ask(library(tmp_path / "d"), "corpus", kb="kw")
    with pytest.raises(InvalidFieldError, match="keyword search only"):
        ask(library(tmp_path / "d", retrieval_mode="vector"), "corpus", kb="kw")


# --- metadata filters: the engine's answer equals the reference evaluator's -------------

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]
FILTER_KEYS = ["color", "size", "year", "tags"]


def _filtered_kb(data_dir: Path) -> tuple[Library, list[TextNode]]:
    rng = np.random.default_rng(7)
    nodes = []
    for i in range(120):
        metadata: dict[str, Any] = {"document_id": f"doc-{i}"}
        if rng.random() < 0.8:
            metadata["color"] = str(rng.choice(["red", "green", "blue", ""]))
        if rng.random() < 0.8:
            metadata["size"] = int(rng.integers(0, 10))
        if rng.random() < 0.7:
            metadata["year"] = f"20{rng.integers(10, 25)}-0{rng.integers(1, 9)}-01T00:00:00"
        if rng.random() < 0.5:
            metadata["tags"] = [str(t) for t in rng.choice(WORDS, 2, replace=False)]
        text = " ".join(rng.choice(WORDS, 6))
        nodes.append(TextNode(id_=f"n{i}", text=text, metadata=metadata))
    publish_nodes(LocalStore(data_dir), "filtered", nodes, None, None, mode="keyword")
    return library(data_dir), nodes


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Library, list[TextNode]]:
    return _filtered_kb(tmp_path_factory.mktemp("filtered"))


conditions = st.fixed_dictionaries({
    "name": st.sampled_from(FILTER_KEYS),
    "comparison_operator": st.sampled_from([
        "contains", "not contains", "start with", "end with", "is", "is not", "empty",
        "not empty", "in", "not in", "=", "≠", ">", "<", "≥", "≤", "before", "after"]),
    "value": st.one_of(st.sampled_from(["red", "re", "", "blue,green", "alpha"]),
                       st.integers(0, 10), st.just(None),
                       st.just("2018-01-01T00:00:00"), st.just(["red", "blue"])),
})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(conditions, min_size=1, max_size=3), st.sampled_from(["and", "or"]),
       st.integers(1, 30))
def test_filtered_answer_equals_reference_top_k_over_every_chunk(filtered, raw, logic, top_k):
    lib, nodes = filtered
    try:
        condition = parse_metadata_condition({"logical_operator": logic, "conditions": raw})
    except InvalidFilterError:
        assume(False)  # invalid combinations are the parser's tests' business
    query = "alpha gamma"
    got = ask(lib, query, top_k=top_k, condition={"logical_operator": logic, "conditions": raw},
              kb="filtered")
    unfiltered = ask(lib, query, top_k=len(nodes), kb="filtered")
    predicate = None if condition is None else compile_condition(condition)
    reference = [r for r in unfiltered
                 if predicate is None or predicate.matches(r.metadata)][:top_k]
    assert [r.metadata["chunk_id"] for r in got] == [r.metadata["chunk_id"] for r in reference]



def test_parent_child_chunking_matches_children_and_returns_each_parent_once(tmp_path):
    from llamaindex_kb.ingestion.chunking import ChunkingConfig

    source = tmp_path / "guide.md"
    baking = ("Ovens must be preheated for twenty minutes before any loaf goes in.\n"
              "Bread bakes at 230 degrees until the crust is deep brown and sounds hollow.")
    tools = ("Knives are sharpened weekly on the whetstone kept under the counter.\n"
             "Cutting boards are oiled monthly with food-safe mineral oil, then dried.")
    source.write_text(f"{baking}\n\n{tools}", encoding="utf-8")
    config = ChunkingConfig(mode="parent_child", child_max_tokens=50, parent_max_tokens=50)
    ingest_paths(LocalStore(tmp_path / "d"), "kitchen", [source], models=Models(None),
                 mode="keyword", chunking=config)
    found = ask(library(tmp_path / "d"), "bread bakes preheated oven", top_k=5, kb="kitchen")
    assert [r.content for r in found] == [baking]
    both = ask(library(tmp_path / "d"), "weekly monthly bread", top_k=5, kb="kitchen")
    assert len(both) == 2 and len({r.metadata["chunk_id"] for r in both}) == 2


def test_chunks_longer_than_the_local_model_reads_are_refused(tmp_path):
    from llamaindex_kb.errors import ConfigurationError
    from llamaindex_kb.ingestion.chunking import ChunkingConfig

    (tmp_path / "a.md").write_text("text", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="254"):
        ingest_paths(LocalStore(tmp_path / "d"), "k", [tmp_path / "a.md"],
                     models=Models(local_embedding()),
                     chunking=ChunkingConfig(max_tokens=500))
    assert not (tmp_path / "d" / "kbs" / "k" / "CURRENT").exists()


def test_a_segments_chunks_are_readable_through_llamaindex_docstore(kb_dir):
    # docstore.sqlite keeps chunks where LlamaIndex's KVDocumentStore looks for them.
    from llama_index.core.storage.docstore.keyval_docstore import KVDocumentStore

    from llamaindex_kb.stores.local.docstore import SQLiteKVStore

    kb = LocalStore(kb_dir).open("energy")
    (segment,) = kb.segments
    node_ids = [str(node_id) for node_id in segment.node_ids]
    docstore = KVDocumentStore(SQLiteKVStore(segment.folder / "docstore.sqlite", read_only=True))
    assert [docstore.get_node(node_id).get_content() for node_id in node_ids] == [
        node.get_content() for node in kb.chunks(range(len(node_ids)))]
    assert len(node_ids) >= len(DOCS)
