"""Fit the multilingual model's ``SimilarityScale`` (models/multilingual.py) from data.

e5's cosines crowd into 0.7-0.9 for related and unrelated text alike; MiniLM's spread
over 0-0.8. The scale maps e5's cosine linearly so that its medians on unrelated
pairs and on relevant pairs land on MiniLM's: a score then means the same relevance
with either bundled model, and one threshold serves both.

Fitted on training splits only (scifact ``train``, nfcorpus ``dev``), never on the
test queries the benchmark reports; cmrc2018's ``dev`` split is printed to show how
Chinese lands on the fitted scale (MiniLM cannot read it, so it cannot be a target).

    python tools/calibration.py --datasets ../shared/datasets [--pairs 300]
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


def pairs(root: Path, split: str, count: int, rng: random.Random
          ) -> tuple[list[str], list[str], list[str]]:
    """(queries, a relevant document of each, an unrelated document of each)."""
    corpus = {}
    with (root / "corpus.jsonl").open(encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)
            corpus[doc["_id"]] = f"{doc.get('title') or ''}\n{doc.get('text') or ''}".strip()
    with (root / "queries.jsonl").open(encoding="utf-8") as lines:
        texts = {q["_id"]: q["text"] for q in map(json.loads, lines)}
    relevant: dict[str, set[str]] = {}
    with (root / "qrels" / f"{split}.tsv").open(encoding="utf-8") as lines:
        for line in lines:
            qid, doc_id, score = line.rstrip("\n").split("\t")[:3]
            if score.isdigit() and int(score) > 0 and doc_id in corpus and qid in texts:
                relevant.setdefault(qid, set()).add(doc_id)
    chosen = rng.sample(sorted(relevant), min(count, len(relevant)))
    ids = sorted(corpus)
    queries, related, unrelated = [], [], []
    for qid in chosen:
        queries.append(texts[qid])
        related.append(corpus[rng.choice(sorted(relevant[qid]))])
        other = rng.choice(ids)
        while other in relevant[qid]:
            other = rng.choice(ids)
        unrelated.append(corpus[other])
    return queries, related, unrelated


def cosines(model, queries: list[str], docs: list[str]) -> np.ndarray:
    q = np.array([model.get_query_embedding(text) for text in queries])
    d = np.array(model.get_text_embedding_batch(docs))
    return np.einsum("ij,ij->i", q, d)


def spread(values: np.ndarray) -> str:
    p = np.percentile(values, [5, 50, 95])
    return f"p5 {p[0]:.3f}  p50 {p[1]:.3f}  p95 {p[2]:.3f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=300, help="queries per data set")
    args = parser.parse_args(argv)
    rng = random.Random(17)
    english, e5 = local_embedding(), LocalMultilingualEmbedding()
    fitted: dict[str, list[np.ndarray]] = {"m_rel": [], "m_unr": [], "e_rel": [], "e_unr": []}
    shown = []
    for name, split in FIT + SHOWN:
        queries, related, unrelated = pairs(args.datasets / name, split, args.pairs, rng)
        e_rel, e_unr = cosines(e5, queries, related), cosines(e5, queries, unrelated)
        m_rel, m_unr = cosines(english, queries, related), cosines(english, queries, unrelated)
        print(f"{name} ({split}, {len(queries)} queries)")
        print(f"  MiniLM  relevant {spread(m_rel)}   unrelated {spread(m_unr)}")
        print(f"  e5 raw  relevant {spread(e_rel)}   unrelated {spread(e_unr)}")
        if (name, split) in FIT:
            for key, values in zip(fitted, (m_rel, m_unr, e_rel, e_unr), strict=True):
                fitted[key].append(values)
        shown.append((name, e_rel, e_unr))
    m_rel, m_unr, e_rel, e_unr = (np.median(np.concatenate(v)) for v in fitted.values())
    slope = (m_rel - m_unr) / (e_rel - e_unr)
    zero = e_unr - m_unr / slope
    scale = SimilarityScale(zero=round(float(zero), 3), one=round(float(zero + 1 / slope), 3))
    print(f"\nfitted: {scale}")
    for name, rel, unr in shown:
        print(f"{name}, e5 on that scale: relevant "
              f"{spread(clip_similarities(rel, scale=scale))}   unrelated "
              f"{spread(clip_similarities(unr, scale=scale))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
