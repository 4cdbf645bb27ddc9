"""Exact top-k over stores that search elsewhere (PostgreSQL, Qdrant).

The embedded store scores every chunk. A database store cannot afford to, so it
answers from candidates and proves that no other chunk could have done better:

- the keyword side is complete: every chunk holding a query term, with its exact
  score (``KeywordRanking``);
- the vector side is a window, the ``n`` nearest chunks in exact distance order, so
  the last one's similarity bounds every chunk outside it.

A chunk outside the window therefore scores at most ``w · bound + (1 − w) · keyword``.
Keyword chunks whose bound can still reach the current ``want``-th score get their
similarity looked up, best first; the window grows only while a chunk with no
keyword score could still get in. The answer equals scoring every chunk, up to the
store's nearest-neighbour index being approximate.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple, Protocol

import numpy as np
from llama_index.core.schema import BaseNode, NodeWithScore

from llamaindex_kb.scoring import (
    COSINE,
    SimilarityScale,
    best_parents,
    clip_similarities,
    fuse,
    lowest_returned,
    parent_id,
)
from llamaindex_kb.stores.base import QueryPlan

Metadata = dict[str, Any]


class Candidates(NamedTuple):
    """Chunks a store found for one query, as arrays: the search's scoring is numpy work."""

    rows: np.ndarray  # int64
    similarity: np.ndarray  # float64, on the score scale (clipped); 0 without a query vector
    metadata: list[Metadata] | None  # None when nobody reads it: the plan has no condition

    @classmethod
    def of(cls, found: Sequence[tuple[int, float, Metadata | None]],
           with_metadata: bool, scale: SimilarityScale = COSINE) -> Candidates:
        """From (row, cosine similarity, metadata) tuples, as a database cursor returns
        them; ``scale`` is the query's embedding model's (``scoring.SimilarityScale``)."""
        rows, similarity, metadata = tuple(zip(*found, strict=True)) or ((), (), ())
        return cls(np.array(rows, np.int64),
                   clip_similarities(np.array(similarity, np.float64), scale=scale),
                   [m or {} for m in metadata] if with_metadata else None)

    def where(self, keep: np.ndarray) -> Candidates:
        metadata = (None if self.metadata is None else
                    [m for m, kept in zip(self.metadata, keep.tolist(), strict=True) if kept])
        return Candidates(self.rows[keep], self.similarity[keep], metadata)

    @staticmethod
    def joined(parts: Sequence[Candidates]) -> Candidates:
        if len(parts) == 1:
            return parts[0]
        metadata = (None if any(part.metadata is None for part in parts) else
                    [m for part in parts for m in part.metadata or ()])
        return Candidates(np.concatenate([part.rows for part in parts]),
                          np.concatenate([part.similarity for part in parts]), metadata)


class CandidateSource(Protocol):
    """One query's view of a store's chunks, addressed by integer row."""

    def nearest(self, n: int) -> Candidates:
        """The ``n`` chunks most similar to the query, in exact distance order,
        pre-filtered by the condition's exact part."""
        ...

    def lookup(self, rows: Sequence[int]) -> Candidates:
        """Those of the given rows the store holds (and its pre-filter passes)."""
        ...


class ChunkSource(CandidateSource, Protocol):
    """A CandidateSource that also returns the chunks (and their parents) it ranked."""

    def nodes(self, rows: Sequence[int]) -> list[BaseNode]:
        """The rows' nodes, in order."""
        ...

    def parents(self, chosen: list[tuple[str, float]]) -> list[NodeWithScore]:
        """Parent nodes by id, with the scores given, in order."""
        ...


class KeywordRanking:
    """Every chunk holding a query term, with its keyword score.

    Ordered best first, ties to the older row as in the embedded store; only the part
    a search reaches is ever sorted (a common term matches half the chunks).
    """

    def __init__(self, rows: np.ndarray, scores: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        if rows.size > 1 and not np.all(rows[1:] > rows[:-1]):
            by_row = np.argsort(rows, kind="stable")
            rows, scores = rows[by_row], scores[by_row]
        self.rows, self.scores = rows, scores
        self._ranked: list[int] = []  # the first rows in ranking order, grown on demand

    @classmethod
    def empty(cls) -> KeywordRanking:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64))

    def scores_of(self, rows: Sequence[int]) -> np.ndarray:
        """Each row's keyword score, 0 for rows holding no query term."""
        wanted = np.asarray(rows, dtype=np.int64)
        if self.rows.size == 0:
            return np.zeros(wanted.size)
        at = np.minimum(np.searchsorted(self.rows, wanted), self.rows.size - 1)
        return np.where(self.rows[at] == wanted, self.scores[at], 0.0)

    def at_least(self, score: float) -> int:
        """How many chunks score ``score`` or more."""
        return int(np.count_nonzero(self.scores >= score))

    def best(self, count: int) -> list[int]:
        """The first ``count`` rows in ranking order."""
        if count > len(self._ranked) and len(self._ranked) < self.rows.size:
            # A search asks for more and more: sorting at least twice as many as were
            # sorted before keeps the partial sorts of a common term's tens of thousands
            # of rows few.
            self._ranked = self._first(max(count, 2 * len(self._ranked)))
        return self._ranked[:count]

    def _first(self, count: int) -> list[int]:
        chosen = np.arange(self.rows.size)
        if count < chosen.size:
            kth = np.partition(self.scores, self.rows.size - count)[self.rows.size - count]
            chosen = np.flatnonzero(self.scores >= kth)  # ties at the edge included...
        order = np.lexsort((self.rows[chosen], -self.scores[chosen]))
        return self.rows[chosen[order]][:count].tolist()  # ...then cut in order


def first_window(want: int) -> int:
    """The size of a search's first vector window.

    A wider first window bounds unseen rows more tightly, so fewer keyword rows need a
    look-up: at 100k chunks 60 rows (not 20) halved them and cut p95 by a quarter. But
    on PostgreSQL the HNSW walk for it costs more than the look-ups it saves: 40 rows
    (pgvector's default ef_search) answered ~0.9 ms sooner than 60 at p50 and p90.
    """
    return max(2 * want, 40)


def first_lookup(want: int) -> int:
    """How many keyword rows a search looks up first: at 100k chunks a top-10 hybrid
    query looked up 210 at the median, and a statement costs as much as 40 rows."""
    return max(8 * want, 128)


def rank(source: CandidateSource, keyword: KeywordRanking, weight: float, plan: QueryPlan,
         want: int) -> list[tuple[int, float]]:
    """The best ``want`` (row, score) passing the condition and the threshold, best
    first; fewer only when no more chunks pass."""
    floor = lowest_returned(plan.score_threshold)
    known: set[int] = set()
    # Every chunk seen that passes, unordered: a few hundred at most, so sorting them
    # whenever the cutoff is needed costs less than keeping a heap in Python.
    passing_rows, passing_scores = np.zeros(0, np.int64), np.zeros(0, np.float64)

    def admit(found: Candidates) -> None:
        nonlocal passing_rows, passing_scores
        rows = found.rows.tolist()
        keep = np.array([row not in known for row in rows], dtype=bool)
        known.update(rows)
        scores = fuse(found.similarity, keyword.scores_of(found.rows), weight)
        keep &= scores >= floor
        if plan.predicate is not None:
            assert found.metadata is not None, "a condition needs the candidates' metadata"
            matches = plan.predicate.matches
            for at in np.flatnonzero(keep).tolist():
                keep[at] = matches(found.metadata[at])
        passing_rows = np.concatenate((passing_rows, found.rows[keep]))
        passing_scores = np.concatenate((passing_scores, scores[keep]))

    def best() -> np.ndarray:
        """Indices into passing_* of the best ``want``, best first, ties to the older row."""
        return np.lexsort((passing_rows, -passing_scores))[:want]

    looked_up = 0  # the first `looked_up` keyword rows in ranking order are all known
    n = first_window(want)
    while True:
        outside, window_done = 0.0, True
        if weight > 0.0:
            window = source.nearest(n)
            admit(window)
            window_done = window.rows.size < n
            outside = 0.0 if window_done else weight * float(window.similarity[-1])
        batch = first_lookup(want)
        while True:
            chosen = best()
            cutoff = float(passing_scores[chosen[-1]]) if chosen.size == want else floor
            # Keyword chunks outside the window that could still reach the cutoff.
            reachable = keyword.at_least((cutoff - outside) / (1.0 - weight)) if weight < 1 else 0
            if looked_up >= reachable:
                break
            end = min(reachable, looked_up + batch)
            pending = [row for row in keyword.best(end)[looked_up:] if row not in known]
            if pending:
                admit(source.lookup(pending))
                known.update(pending)  # rows the store did not return cannot pass either
            looked_up = end
            batch *= 2
        # A chunk with no keyword score and outside the window scores at most `outside`.
        if window_done or outside < cutoff:
            return list(zip(passing_rows[chosen].tolist(), passing_scores[chosen].tolist(),
                            strict=True))
        n *= 4


def retrieve(source: ChunkSource, keyword: KeywordRanking, weight: float, plan: QueryPlan,
             parent_child: bool) -> list[NodeWithScore]:
    """The plan's answer: the top chunks, or with parent-child chunking their parents."""
    ranked = partial(rank, source, keyword, weight, plan)
    if parent_child:
        chosen = best_parents(
            ranked, lambda rows: [parent_id(child) for child in source.nodes(rows)],
            plan.top_k)
        return source.parents(chosen)
    found = ranked(plan.top_k)
    return [NodeWithScore(node=node, score=score)
            for node, (_, score) in zip(source.nodes([row for row, _ in found]), found,
                                        strict=True)]
