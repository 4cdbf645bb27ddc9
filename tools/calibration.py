"""Fit the multilingual model's ``SimilarityScale`` (models/multilingual.py) from data.

e5's cosines crowd into 0.7-0.95 for related and unrelated text alike, and how high
depends on the language: unrelated Chinese pairs sit higher than English ones. So its
scale is centred: a similarity counts from the query's similarity to the knowledge
base's centroid (its mean similarity to the base's chunks), which carries that
language and genre background. The centred similarity is then mapped linearly so
that its medians on unrelated pairs and on relevant pairs land on MiniLM's raw
cosine medians: a score means the same relevance with either bundled model, and one
threshold serves both.

Fitted on training splits only (scifact ``train``, nfcorpus ``dev``), never on the
test queries the benchmark reports. cmrc2018's ``dev`` split shows where Chinese lands
on the fitted scale (MiniLM cannot read it, so it cannot be a target), and off-topic
questions in both languages show whether a threshold cuts them alike.

    PYTHONPATH=. python tools/calibration.py --datasets ../shared/datasets [--pairs 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from llamaindex_kb.models.choose import local_embedding
from llamaindex_kb.models.multilingual import LocalMultilingualEmbedding
from llamaindex_kb.scoring import SimilarityScale, clip_similarities

FIT = (("scifact", "train"), ("nfcorpus", "dev"))
SHOWN = (("cmrc2018_retrieval", "dev"),)
# Documents whose mean embedding stands for the base's centroid.
CENTROID_SAMPLE = 300
OFF_TOPIC = ["今天天气怎么样", "股票价格走势分析", "如何学习弹钢琴", "周末去哪里玩",
             "推荐一部好看的电影", "what's the weather like today", "stock price trend analysis",
             "how to learn piano", "where to go this weekend", "recommend a good movie"]


def read_set(root: Path, split: str) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """(documents, queries, relevant documents per judged query of ``split``)."""
    corpus = {}
    with (root / "corpus.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            corpus[doc["_id"]] = f"{doc.get('title') or ''}\n{doc.get('text') or ''}".strip()
    with (root / "queries.jsonl").open(encoding="utf-8") as lines:
        queries = {q["_id"]: q["text"] for q in map(json.loads, lines)}
    relevant: dict[str, set[str]] = {}
    with (root / "qrels" / f"{split}.tsv").open(encoding="utf-8") as lines:
        for line in lines:
            qid, doc_id, score = line.rstrip("\n").split("\t")[:3]
            if score.isdigit() and int(score) > 0 and doc_id in corpus and qid in queries:
                relevant.setdefault(qid, set()).add(doc_id)
    return corpus, queries, relevant


def pairs(corpus: dict[str, str], queries: dict[str, str], relevant: dict[str, set[str]],
          count: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(queries, a relevant document of each, an unrelated document of each)."""
    chosen = rng.sample(sorted(relevant), min(count, len(relevant)))
    ids = sorted(corpus)
    texts, related, unrelated = [], [], []
    for qid in chosen:
        texts.append(queries[qid])
        related.append(corpus[rng.choice(sorted(relevant[qid]))])
        other = rng.choice(ids)
        while other in relevant[qid]:
            other = rng.choice(ids)
        unrelated.append(corpus[other])
    return texts, related, unrelated


def spread(values: np.ndarray) -> str:
    p = np.percentile(values, [5, 50, 95])
    return f"p5 {p[0]:.3f}  p50 {p[1]:.3f}  p95 {p[2]:.3f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=200, help="queries per data set")
    args = parser.parse_args(argv)
    rng = random.Random(17)
    english, e5 = local_embedding(), LocalMultilingualEmbedding()
    fit: dict[str, list[np.ndarray]] = {"m_rel": [], "m_unr": [], "e_rel": [], "e_unr": [],
                                        "background": []}
    shown = []
    for name, split in FIT + SHOWN:
        corpus, queries, relevant = read_set(args.datasets / name, split)
        sample = rng.sample(sorted(corpus), min(CENTROID_SAMPLE, len(corpus)))
        documents = np.array(e5.get_text_embedding_batch([corpus[d] for d in sample]))
        centroid = documents.mean(axis=0)
        texts, related, unrelated = pairs(corpus, queries, relevant, args.pairs, rng)
        q = np.array([e5.query_vector(text) for text in texts])
        background = q @ centroid
        e_rel = np.einsum("ij,ij->i", q, e5.get_text_embedding_batch(related)) - background
        e_unr = np.einsum("ij,ij->i", q, e5.get_text_embedding_batch(unrelated)) - background
        qm = np.array([english.get_query_embedding(text) for text in texts])
        m_rel = np.einsum("ij,ij->i", qm, english.get_text_embedding_batch(related))
        m_unr = np.einsum("ij,ij->i", qm, english.get_text_embedding_batch(unrelated))
        off = np.array([e5.query_vector(text) for text in OFF_TOPIC])
        off_top = (off @ documents.T).max(axis=1) - off @ centroid
        print(f"{name} ({split}, {len(texts)} queries, centroid of {len(sample)} documents)")
        print(f"  MiniLM       relevant {spread(m_rel)}   unrelated {spread(m_unr)}")
        print(f"  e5 centred   relevant {spread(e_rel)}   unrelated {spread(e_unr)}"
              f"   background {spread(background)}")
        if (name, split) in FIT:
            for key, values in zip(fit, (m_rel, m_unr, e_rel, e_unr, background), strict=True):
                fit[key].append(values)
        shown.append((name, e_rel, e_unr, off_top))
    m_rel, m_unr, e_rel, e_unr, background = (np.median(np.concatenate(v)) for v in fit.values())
    slope = (m_rel - m_unr) / (e_rel - e_unr)
    zero = e_unr - m_unr / slope
    scale = SimilarityScale(zero=round(float(zero), 4), one=round(float(zero + 1 / slope), 4),
                            centred=True)
    print(f"\nfitted: {scale}")
    plain = SimilarityScale(scale.zero, scale.one)
    for name, rel, unr, off_top in shown:
        print(f"{name} on that scale: relevant {spread(clip_similarities(rel, scale=plain))}"
              f"   unrelated {spread(clip_similarities(unr, scale=plain))}")
        scored = clip_similarities(off_top, scale=plain)
        print(f"  best score of off-topic questions over the sample: Chinese "
              f"{scored[:5].min():.3f}-{scored[:5].max():.3f}, English "
              f"{scored[5:].min():.3f}-{scored[5:].max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
