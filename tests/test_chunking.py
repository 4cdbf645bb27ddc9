"""Chunking like Dify's "chunk settings": sizes in the embedding model's tokens, the
delimiter, overlap, pre-processing rules, Chinese text, stable ids and parent-child."""

from __future__ import annotations

import json
import random
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_index.core.schema import Document, MetadataMode, NodeRelationship, TextNode
from pydantic import ValidationError
from reportlab.pdfgen import canvas

from llamaindex_kb.ingestion.chunking import NODE_NAMESPACE, ChunkingConfig, chunk, clean_text
from llamaindex_kb.ingestion.readers import read_file
from llamaindex_kb.models.local import minilm_token_count

WORDS = ("llama alpaca vicuna guanaco herd fleece pasture andes shearing wool highland "
         "camelid grazing altitude breeder").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def paragraphs(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng, rng.randint(5, 12)) for _ in range(rng.randint(1, 5)))
            for _ in range(count)]


def doc(text: str, document_id: str = "doc-1", **metadata: object) -> Document:
    return Document(text=text, metadata={"document_id": document_id, **metadata})


def texts(nodes: list[TextNode]) -> list[str]:
    return [node.text for node in nodes]


# --- the settings -------------------------------------------------------------------


def test_defaults_fit_the_local_model_and_round_trip_through_json() -> None:
    config = ChunkingConfig()

    assert (config.mode, config.delimiter, config.max_tokens, config.overlap) == (
        "general", "\n\n", 200, 20)
    assert (config.collapse_whitespace, config.remove_urls_emails) == (True, False)
    assert (config.parent_mode, config.parent_delimiter, config.parent_max_tokens,
            config.child_delimiter, config.child_max_tokens) == (
        "paragraph", "\n\n", 1000, "\n", 200)
    assert config.embedded_max_tokens <= 254  # MiniLM's 256 minus [CLS] and [SEP]
    assert ChunkingConfig.model_validate(json.loads(json.dumps(config.model_dump()))) == config


def test_delimiters_typed_escaped_as_in_difys_form_are_unescaped() -> None:
    config = ChunkingConfig(delimiter="\\n\\n", parent_delimiter="\\n", child_delimiter="\\t")

    assert (config.delimiter, config.parent_delimiter, config.child_delimiter) == (
        "\n\n", "\n", "\t")
    assert config == ChunkingConfig(delimiter="\n\n", parent_delimiter="\n",
                                    child_delimiter="\t")


@pytest.mark.parametrize("settings_", [
    {"max_tokens": 49}, {"max_tokens": 2001}, {"child_max_tokens": 10},
    {"parent_max_tokens": 4001}, {"overlap": -1}, {"max_tokens": 100, "overlap": 100},
    {"mode": "parent_child", "parent_max_tokens": 100, "child_max_tokens": 150},
    {"mode": "qa"}, {"parent_mode": "sentence"}, {"chunk_size": 300},
])
def test_out_of_range_or_unknown_settings_are_refused(settings_: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChunkingConfig.model_validate(settings_)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        ChunkingConfig().max_tokens = 300  # type: ignore[misc]


def test_embedded_max_tokens_is_the_size_of_what_gets_embedded() -> None:
    assert ChunkingConfig(max_tokens=180).embedded_max_tokens == 180
    assert ChunkingConfig(mode="parent_child", child_max_tokens=120).embedded_max_tokens == 120


# --- pre-processing -----------------------------------------------------------------


def test_collapse_whitespace_replaces_runs_of_spaces_tabs_and_blank_lines() -> None:
    text = "Title  \r\n\r\n\r\n\r\n  Body\t\tof   text\u3000\u3000here \n \n \nEnd\tpoint\nnext"

    assert clean_text(text, ChunkingConfig()) == (
        "Title\n\nBody of text here\n\nEnd\tpoint\nnext")
    assert clean_text(text, ChunkingConfig(collapse_whitespace=False)) == (
        "Title  \n\n\n\n  Body\t\tof   text\u3000\u3000here \n \n \nEnd\tpoint\nnext")


def test_remove_urls_and_emails_keeps_markdown_images_and_surrounding_text() -> None:
    text = ("Mail ops@example.com or read https://docs.example.com/a?b=1#top. "
            "详见https://example.cn/guide获取更多。 ![diagram](https://img.example.com/d.png) "
            "and [the wiki](http://wiki.example.org/Llama).")

    assert clean_text(text, ChunkingConfig(remove_urls_emails=True)) == (
        "Mail or read . 详见获取更多。 ![diagram](https://img.example.com/d.png) "
        "and [the wiki]().")
    assert clean_text(text, ChunkingConfig()) == text
    (node,) = chunk([doc(text)], ChunkingConfig(remove_urls_emails=True)).chunks
    assert node.text == clean_text(text, ChunkingConfig(remove_urls_emails=True))


def test_control_characters_and_chat_template_markers_are_always_removed() -> None:
    text = "<|im_start|>system\x00\x07 ok\ufffe|>\r\npage one\x0cpage two"

    assert clean_text(text, ChunkingConfig(collapse_whitespace=False)) == (
        "<im_start>system ok>\npage one\npage two")


# --- general mode -------------------------------------------------------------------


def test_chunks_never_exceed_max_tokens_of_the_minilm_tokenizer() -> None:
    long_paragraph = " ".join(paragraphs(30, seed=2))  # ~1,500 tokens, no delimiter inside
    text = "\n\n".join([*paragraphs(40), long_paragraph, *paragraphs(10, seed=3)])

    for max_tokens in (50, 128, 200):
        chunks = chunk([doc(text)], ChunkingConfig(max_tokens=max_tokens, overlap=10)).chunks
        counts = [minilm_token_count(c.text) for c in chunks]
        assert max(counts) <= max_tokens
        assert max(counts) >= max_tokens * 0.8  # packed, not one chunk per sentence


def test_small_paragraphs_are_packed_and_boundaries_fall_on_the_delimiter() -> None:
    parts = paragraphs(30)
    text = "\n\n".join(parts)

    chunks = texts(chunk([doc(text)], ChunkingConfig(max_tokens=120)).chunks)

    assert len(chunks) < len(parts)
    rebuilt = [piece for c in chunks for piece in c.split("\n\n")]
    assert rebuilt == parts  # every chunk is whole paragraphs, in order, none lost


def test_a_custom_delimiter_decides_the_boundaries() -> None:
    rng = random.Random(4)
    sections = [f"Section {i}.\n\n{sentence(rng, 8)}\n\n{sentence(rng, 8)}" for i in range(8)]
    assert all(25 <= minilm_token_count(s) <= 40 for s in sections)

    chunks = texts(chunk([doc("***".join(sections))],
                         ChunkingConfig(delimiter="***", max_tokens=90)).chunks)

    assert [piece for c in chunks for piece in c.split("***")] == sections
    assert [c.count("Section ") for c in chunks] == [2, 2, 2, 2]  # never cut at a "\n\n"


def test_no_delimiter_packs_by_size_alone() -> None:
    text = "\n\n".join(paragraphs(20))

    chunks = texts(chunk([doc(text)], ChunkingConfig(delimiter="", max_tokens=100,
                                                     overlap=0)).chunks)

    assert len(chunks) > 1
    assert all(minilm_token_count(c) <= 100 for c in chunks)
    assert re.sub(r"\s", "", "".join(chunks)) == re.sub(r"\s", "", text)


def test_overlap_repeats_the_end_of_a_long_paragraph_chunk_at_the_start_of_the_next() -> None:
    rng = random.Random(5)
    long_paragraph = " ".join(sentence(rng, 5) for _ in range(80))

    with_overlap = texts(chunk([doc(long_paragraph)], ChunkingConfig(max_tokens=80,
                                                                     overlap=20)).chunks)
    without = texts(chunk([doc(long_paragraph)], ChunkingConfig(max_tokens=80,
                                                                overlap=0)).chunks)

    assert len(with_overlap) > 3
    for previous, following in zip(with_overlap, with_overlap[1:], strict=False):
        shared = _shared_edge(previous, following)
        assert shared and 1 <= minilm_token_count(shared) <= 20
    assert all(not _shared_edge(a, b) for a, b in zip(without, without[1:], strict=False))
    assert len(without) < len(with_overlap)


def _shared_edge(previous: str, following: str) -> str:
    """The longest start of ``following`` that ``previous`` ends with (whole sentences)."""
    for size in range(min(len(previous), len(following)), 0, -1):
        if previous.endswith(following[:size]) and following[:size].endswith("."):
            return following[:size]
    return ""


def test_chinese_without_spaces_is_cut_at_sentence_ends() -> None:
    rng = random.Random(3)
    clauses = ["羊驼生活在安第斯山脉的高原上", "它们的毛比骆驼更柔软", "牧民每年剪一次毛",
               "检索增强生成先检索相关文档再生成答案", "向量数据库支持元数据过滤"]
    text = "".join(
        "，".join(rng.sample(clauses, rng.randint(1, 3))) + rng.choice("。！？")
        for _ in range(120)
    )

    chunks = texts(chunk([doc(text)], ChunkingConfig(max_tokens=100, overlap=0)).chunks)

    assert len(chunks) > 5
    assert all(minilm_token_count(c) <= 100 for c in chunks)
    assert all(c[-1] in "。！？" for c in chunks)  # whole sentences, never mid-clause
    assert "".join(chunks) == text  # nothing lost


def test_chunk_ids_are_stable_and_derived_from_document_and_position() -> None:
    text = "\n\n".join(paragraphs(30))

    first = chunk([doc(text, "doc-a"), doc(text, "doc-b")], ChunkingConfig(max_tokens=100))
    second = chunk([doc(text, "doc-a"), doc(text, "doc-b")], ChunkingConfig(max_tokens=100))

    assert [c.node_id for c in first.chunks] == [c.node_id for c in second.chunks]
    a_chunks = [c for c in first.chunks if c.metadata["document_id"] == "doc-a"]
    assert [c.node_id for c in a_chunks] == [
        str(uuid.uuid5(NODE_NAMESPACE, f"doc-a/{i}")) for i in range(len(a_chunks))]
    assert len({c.node_id for c in first.chunks}) == len(first.chunks)
    assert first.parents == []


def test_chunks_keep_document_metadata_out_of_the_embedded_text() -> None:
    document = doc("Llamas hum.\n\nAlpacas too.", "doc-a", file_name="a.md", year=2024)

    (node,) = chunk([document], ChunkingConfig()).chunks

    assert node.metadata == {"document_id": "doc-a", "file_name": "a.md", "year": 2024}
    assert node.get_content(metadata_mode=MetadataMode.EMBED) == node.text
    assert node.get_content(metadata_mode=MetadataMode.LLM) == node.text


def test_documents_sharing_a_document_id_number_their_chunks_in_one_sequence(
    tmp_path: Path,
) -> None:
    pdf = canvas.Canvas(str(tmp_path / "guide.pdf"))
    for page in range(3):
        pdf.drawString(72, 720, f"Page {page + 1} explains llama shearing in detail.")
        pdf.showPage()
    pdf.save()
    pages = read_file(tmp_path / "guide.pdf")
    for page in pages:
        page.metadata["document_id"] = "guide"

    chunks = chunk(pages, ChunkingConfig()).chunks

    assert [c.metadata["page"] for c in chunks] == [1, 2, 3]
    assert [c.node_id for c in chunks] == [
        str(uuid.uuid5(NODE_NAMESPACE, f"guide/{i}")) for i in range(3)]


def test_max_tokens_holds_for_a_tokenizer_whose_counts_do_not_add_up() -> None:
    def quadratic(text: str) -> list[int]:  # joining two texts costs more than both apart
        return [0] * len(text.split()) ** 2

    text = "\n\n".join(" ".join(["word"] * 4) for _ in range(40))

    chunks = texts(chunk([doc(text)], ChunkingConfig(max_tokens=64), quadratic).chunks)

    assert all(len(quadratic(c)) <= 64 for c in chunks)
    assert [p for c in chunks for p in c.split("\n\n")] == text.split("\n\n")


# --- parent-child mode --------------------------------------------------------------


def test_every_child_points_to_a_parent_that_contains_it() -> None:
    text = "\n\n".join(paragraphs(40))
    config = ChunkingConfig(mode="parent_child", parent_max_tokens=300, child_max_tokens=60)

    result = chunk([doc(text), doc(text, "doc-2")], config)

    parents = {p.node_id: p for p in result.parents}
    assert len(parents) == len(result.parents) > 2
    assert all(minilm_token_count(p.text) <= 300 for p in result.parents)
    assert all(minilm_token_count(c.text) <= 60 for c in result.chunks)
    for child in result.chunks:
        parent = parents[child.metadata["parent_id"]]
        assert child.text in parent.text
        assert child.relationships[NodeRelationship.PARENT].node_id == parent.node_id
        assert parent.metadata["document_id"] == child.metadata["document_id"]
    for parent in result.parents:
        children = [c.node_id for c in result.chunks if c.metadata["parent_id"] == parent.node_id]
        assert [r.node_id for r in parent.relationships[NodeRelationship.CHILD]] == children
        assert children


def test_children_split_on_the_child_delimiter_inside_paragraph_parents() -> None:
    rng = random.Random(6)
    lines = [sentence(rng, 22) for _ in range(6)]
    assert all(30 <= minilm_token_count(line) <= 45 for line in lines)
    paragraphs_ = ["\n".join(lines[:3]), "\n".join(lines[3:])]
    config = ChunkingConfig(mode="parent_child", parent_max_tokens=150, child_max_tokens=50)

    result = chunk([doc("\n\n".join(paragraphs_))], config)

    assert texts(result.parents) == paragraphs_
    assert texts(result.chunks) == lines
    assert [c.metadata["parent_id"] for c in result.chunks] == (
        [result.parents[0].node_id] * 3 + [result.parents[1].node_id] * 3)


def test_full_doc_mode_gives_one_parent_per_document() -> None:
    one = "\n\n".join(paragraphs(30, seed=1))
    two = "\n\n".join(paragraphs(30, seed=2))
    config = ChunkingConfig(mode="parent_child", parent_mode="full_doc", child_max_tokens=80)

    result = chunk([doc(one, "doc-1"), doc(two, "doc-2")], config)

    assert texts(result.parents) == [one, two]
    assert [p.node_id for p in result.parents] == [
        str(uuid.uuid5(NODE_NAMESPACE, f"{d}/parent/0")) for d in ("doc-1", "doc-2")]
    parents = {p.node_id: p for p in result.parents}
    assert all(c.text in parents[c.metadata["parent_id"]].text for c in result.chunks)
    assert len(result.chunks) > 4


def test_full_doc_parent_of_a_paged_document_joins_pages_and_children_keep_their_page() -> None:
    pages = [doc(f"Page {n} text about llamas.", "manual", page=n, file_name="m.pdf")
             for n in (1, 2, 3)]
    config = ChunkingConfig(mode="parent_child", parent_mode="full_doc")

    result = chunk(pages, config)

    (parent,) = result.parents
    assert parent.text == ("Page 1 text about llamas.\n\nPage 2 text about llamas."
                           "\n\nPage 3 text about llamas.")
    assert parent.metadata == {"document_id": "manual", "file_name": "m.pdf"}
    assert [c.metadata["page"] for c in result.chunks] == [1, 2, 3]
    assert {c.metadata["parent_id"] for c in result.chunks} == {parent.node_id}


def test_parent_child_ids_are_stable() -> None:
    text = "\n\n".join(paragraphs(30))
    config = ChunkingConfig(mode="parent_child", parent_max_tokens=200, child_max_tokens=50)

    first, second = chunk([doc(text)], config), chunk([doc(text)], config)

    assert [n.node_id for n in first.parents + first.chunks] == [
        n.node_id for n in second.parents + second.chunks]
    assert [c.metadata["parent_id"] for c in first.chunks] == [
        c.metadata["parent_id"] for c in second.chunks]


# --- properties over generated text ---------------------------------------------------

_PIECES = st.sampled_from([
    "llama ", "alpaca ", "Herd. ", "Fleece, wool; ", "\n", "\n\n", "\t", "  ", "***",
    "羊驼", "吃草。", "，", "！", "https://example.org/x ", "Ünïcödé ", "x" * 30,
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.lists(_PIECES, max_size=400).map("".join),
    delimiter=st.sampled_from(["\n\n", "\n", "***", "。", ""]),
    max_tokens=st.integers(50, 120),
    overlap=st.integers(0, 30),
    mode=st.sampled_from(["general", "parent_child"]),
    parent_mode=st.sampled_from(["paragraph", "full_doc"]),
)
def test_any_text_chunks_within_limits_into_slices_of_the_cleaned_text(
    text: str, delimiter: str, max_tokens: int, overlap: int, mode: str, parent_mode: str
) -> None:
    config = ChunkingConfig.model_validate({
        "mode": mode, "delimiter": delimiter, "max_tokens": max_tokens, "overlap": overlap,
        "parent_mode": parent_mode, "parent_delimiter": delimiter,
        "parent_max_tokens": 2 * max_tokens, "child_delimiter": delimiter,
        "child_max_tokens": max_tokens,
    })
    cleaned = clean_text(text, config)

    result = chunk([doc(text)], config)

    parents = {p.node_id: p.text for p in result.parents}
    for node in result.chunks:
        assert node.text and node.text == node.text.strip()
        assert minilm_token_count(node.text) <= config.embedded_max_tokens
        assert node.text in cleaned
        if mode == "parent_child":
            assert node.text in parents[node.metadata["parent_id"]]
    if mode == "general" and overlap == 0:
        def squeeze(s: str) -> str:
            return re.sub(r"\s", "", s.replace(delimiter, "") if delimiter else s)

        assert squeeze("".join(texts(result.chunks))) == squeeze(cleaned)  # nothing lost
