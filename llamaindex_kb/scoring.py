"""The retrieval policy: what a score means, and which chunks a query gets back.

Every store follows it, so one ``score_threshold`` means the same relevance for every
query and store, and about the same across knowledge bases and embedding models (the
README, Models, has the measured limits). Scores are absolute, in [0, 1]:

* vector: cosine similarity of query and chunk embeddings, negatives clipped to 0, on
  the scale of the model that built the base (``SimilarityScale``: the bundled
  multilingual model's cosines count from the centroid of the base's chunks in the
  query's script and are mapped onto the English model's);
* keyword: BM25 divided by the query's attainable maximum (``text/bm25.py``);
* hybrid: ``w · vector + (1 − w) · keyword`` with ``w`` the semantic weight (Dify's
  "weight settings", 0.7 / 0.3 by default) times the share of the query the embedding
  model can read, unless the server sets the weight; vector mode is ``w = 1``, keyword
  ``w = 0``;
* reranked: the reranker's relevance replaces the first-stage score.

A chunk scoring 0 (no relation at all) is never returned, whatever the threshold;
otherwise a chunk is returned when its score reaches the threshold, best first, at most
``top_k``. With parent-child chunking, children are matched and each parent is returned
once, with its best child's score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from llama_index.core.schema import BaseNode

from llamaindex_kb.config import RetrievalMode

# The smallest score returned: "no relation" is 0, and float32 arithmetic can leave a
# sum of zeros a hair above it.
TINY_SCORE = float(np.finfo(np.float32).tiny)

# Children asked for per parent wanted, at first: several children may share a parent.
CHILDREN_PER_PARENT = 4


def lowest_returned(threshold: float) -> float:
    """The lowest score a query with this ``score_threshold`` returns."""
    return max(threshold, TINY_SCORE)


def clip(score: object) -> float:
    """One score from outside (a store's similarity, a reranker's relevance) on our
    scale: NaN or anything that is not a number counts as no relation."""
    try:
        value = float(score)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    if value != value:  # NaN
        return 0.0
    return min(1.0, max(0.0, value))


@dataclass(frozen=True)
class SimilarityScale:
    """Where a model's cosine similarities sit on the score scale: ``zero`` scores 0,
    ``one`` scores 1, linear between, clipped. Most models' cosine is the score as it
    is. A ``centred`` scale counts from the query's similarity to the knowledge base's
    centroid (its mean similarity to the base's chunks): e5 puts any two texts of one
    language close (unrelated Chinese pairs at 0.82, English ones at 0.80, English
    questions to Chinese text at 0.72), so only the distance above that background
    says how related they are."""

    zero: float = 0.0
    one: float = 1.0
    centred: bool = False

    def shifted(self, background: float) -> SimilarityScale:
        """This centred scale for a query whose similarity to the base's centroid is
        ``background``: a plain scale, ready for ``clip_similarities``."""
        return SimilarityScale(self.zero + background, self.one + background)


COSINE = SimilarityScale()


def clip_similarities(similarities: np.ndarray, dtype: type[np.floating] = np.float64,
                      scale: SimilarityScale = COSINE) -> np.ndarray:
    """Cosine similarities on the score scale: at or below the scale's zero (for most
    models, negative) means unrelated (0). A centred scale must be ``shifted`` first."""
    assert not scale.centred, "a centred scale is shifted to the query first"
    if scale != COSINE:
        similarities = (np.asarray(similarities, dtype=dtype) - dtype(scale.zero)) / dtype(
            scale.one - scale.zero)
    return np.clip(similarities, 0.0, 1.0, dtype=dtype)


def semantic_weight(mode: RetrievalMode, weight: float, readable: float = 1.0) -> float:
    """The share of the vector score in the fused score for a retrieval mode.

    In hybrid mode it shrinks with ``readable``, the share of the query the embedding
    model can read: a model that reads a Chinese query as unknown tokens gives it a
    vector that means little, and at full weight that noise buried the keyword side.
    """
    return {"vector": 1.0, "keyword": 0.0}.get(mode, weight * readable)


def fuse(semantic: np.ndarray, keyword: np.ndarray, weight: float) -> np.ndarray:
    """``weight · semantic + (1 − weight) · keyword``, in ``semantic``'s precision: the
    embedded store fuses whole float32 columns, where a float64 temporary per row would
    cost real time at 100k chunks."""
    dtype = semantic.dtype.type
    fused = semantic * dtype(weight)
    fused += keyword.astype(semantic.dtype, copy=False) * dtype(1.0 - weight)
    return fused


def parent_id(child: BaseNode) -> str:
    """The parent a child chunk stands for (parent-child chunking); itself otherwise."""
    return str(child.metadata.get("parent_id", child.node_id))


def best_parents(ranked: Callable[[int], list[tuple[int, float]]],
                 parent_ids: Callable[[list[int]], list[str]], top_k: int
                 ) -> list[tuple[str, float]]:
    """Parent-child chunking: children are matched, each parent returned once with its
    best child's score. Several children may share a parent, so children are asked for
    in growing batches until ``top_k`` parents are found or no more children pass."""
    want = top_k * CHILDREN_PER_PARENT
    while True:
        children = ranked(want)
        best: dict[str, float] = {}
        for parent, (_, score) in zip(parent_ids([row for row, _ in children]), children,
                                      strict=True):
            best.setdefault(parent, score)
        if len(best) >= top_k or len(children) < want:
            return list(best.items())[:top_k]
        want *= 4
