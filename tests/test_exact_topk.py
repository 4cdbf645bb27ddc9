"""exact_topk.rank must equal scoring every chunk, whatever the windows hold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from llamaindex_kb.conditions.compiled import compile_condition
from llamaindex_kb.conditions.model import parse_metadata_condition
from llamaindex_kb.scoring import best_parents
from llamaindex_kb.stores.base import QueryPlan
from llamaindex_kb.stores.exact_topk import Candidates, KeywordRanking, Metadata, rank


class ArraySource:
    """The CandidateSource protocol over arrays: what a database would answer, exactly,
    counting the rows it is asked about."""

    def __init__(self, similarity: np.ndarray, metadata: list[Metadata],
                 prefilter: Sequence[bool]) -> None:
        self.similarity, self.metadata = similarity, metadata
        self.order = [int(r) for r in np.lexsort((np.arange(similarity.size), -similarity))
                      if prefilter[r]]
        self.rows_read = 0

    def nearest(self, n: int) -> Candidates:
        self.rows_read += min(n, len(self.order))
        return self._found(self.order[:n])

    def lookup(self, rows: Sequence[int]) -> Candidates:
        self.rows_read += len(rows)
        return self._found(rows)

    def _found(self, rows: Sequence[int]) -> Candidates:
        return Candidates.of([(row, float(self.similarity[row]), self.metadata[row])
                              for row in rows], with_metadata=True)


def _exhaustive(similarity, keyword, metadata, weight, plan, want):
    floor = max(plan.score_threshold, np.finfo(np.float32).tiny)
    scored = []
    for row in range(similarity.size):
        score = weight * similarity[row] + (1 - weight) * keyword.get(row, 0.0)
        if score >= floor and (plan.predicate is None or plan.predicate.matches(metadata[row])):
            scored.append((row, score))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:want]


CONDITIONS = [
    None,
    {"logical_operator": "and", "conditions": [
        {"name": "category", "comparison_operator": "is", "value": "c3"}]},
    {"logical_operator": "and", "conditions": [
        {"name": "category", "comparison_operator": "in", "value": ["c1", "c2"]},
        {"name": "year", "comparison_operator": ">", "value": 2015}]},
    {"logical_operator": "or", "conditions": [
        {"name": "category", "comparison_operator": "is", "value": "c9"},
        {"name": "year", "comparison_operator": "<", "value": 2003}]},
]


@pytest.mark.parametrize("seed", range(40))
def test_rank_equals_scoring_every_chunk(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 3000))
    similarity = np.clip(rng.normal(0.1, 0.15, size), 0.0, 1.0)
    hits = rng.random(size) < rng.choice([0.0, 0.01, 0.2, 0.9])
    keyword = {int(row): float(rng.choice([rng.random(), 0.5]))  # ties on purpose
               for row in np.flatnonzero(hits)}
    metadata = [{"category": f"c{rng.integers(10)}", "year": int(2000 + rng.integers(25))}
                for _ in range(size)]
    raw = CONDITIONS[seed % len(CONDITIONS)]
    condition = parse_metadata_condition(raw) if raw else None
    # The store pre-filters on the condition's first part when it is an `and` of `is`.
    first_part = compile_condition(parse_metadata_condition(
        {"conditions": raw["conditions"][:1]})) if raw else None
    prefilter = [first_part is None or raw["logical_operator"] == "or"
                 or first_part.matches(m) for m in metadata]
    weight = float(rng.choice([0.0, 0.3, 0.7, 1.0]))
    if weight == 1.0:
        keyword = {}
    plan = QueryPlan(query="q", top_k=10,
                     predicate=None if condition is None else compile_condition(condition),
                     score_threshold=float(rng.choice([0.0, 0.0, 0.2])))
    ranking = (KeywordRanking(np.array(list(keyword), np.int64),
                              np.array(list(keyword.values()), np.float64))
               if keyword else KeywordRanking.empty())
    want = int(rng.integers(1, 40))
    source = ArraySource(similarity if weight > 0 else np.zeros(size), metadata, prefilter)

    found = rank(source, ranking, weight, plan, want)

    expected = _exhaustive(similarity if weight > 0 else np.zeros(size), keyword, metadata,
                           weight, plan, want)
    assert [row for row, _ in found] == [row for row, _ in expected]
    assert np.allclose([s for _, s in found], [s for _, s in expected])


def test_rank_reads_a_small_window_when_keyword_scores_dominate():
    rng = np.random.default_rng(7)
    size = 100_000
    similarity = np.clip(rng.normal(0.0, 0.05, size), 0.0, 1.0)  # random vectors' cosines
    hits = np.flatnonzero(rng.random(size) < 0.3)
    ranking = KeywordRanking(hits, rng.random(hits.size) ** 4)
    source = ArraySource(similarity, [{}] * size, [True] * size)

    found = rank(source, ranking, 0.7, QueryPlan(query="q", top_k=10), 10)

    assert len(found) == 10
    assert source.rows_read < 2_000, "the bound must stop the search long before a scan"


def test_best_parents_asks_for_more_children_until_top_k_parents():
    children = [(row, 1.0 - row / 100) for row in range(100)]
    asked = []

    def ranked(want):
        asked.append(want)
        return children[:want]

    parents = best_parents(ranked, lambda rows: [f"p{row // 20}" for row in rows], top_k=3)

    assert parents == [("p0", 1.0), ("p1", 0.8), ("p2", 0.6)]
    assert asked == [12, 48]
