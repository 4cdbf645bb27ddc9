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

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .filters import matches
from .knowledge_base import QueryPlan

# A score of 0 means "no relation": such chunks are never returned.
TINY_SCORE = float(np.finfo(np.float32).tiny)

Metadata = dict[str, Any]


class CandidateSource(Protocol):
    """One query's view of a store's chunks, addressed by integer row."""

    def nearest(self, n: int) -> list[tuple[int, float, Metadata]]:
        """The ``n`` chunks most similar to the query (exact distance order, pre-filtered
        by the condition's exact part): row, similarity clipped to [0, 1], metadata."""
        ...

    def lookup(self, rows: Sequence[int]) -> dict[int, tuple[float, Metadata]]:
        """Similarity (0 without a query vector) and metadata of the given rows."""
        ...


class KeywordRanking:
    """Every chunk holding a query term, with its keyword score, best first.

    Ties go to the older row, as in the embedded store.
    """

    def __init__(self, rows: np.ndarray, scores: np.ndarray) -> None:
        order = np.lexsort((rows, -scores))
        self.rows = np.asarray(rows, dtype=np.int64)[order]
        self.scores = np.asarray(scores, dtype=np.float64)[order]
        by_row = np.argsort(self.rows, kind="stable")
        self._sorted_rows = self.rows[by_row]
        self._sorted_scores = self.scores[by_row]

    @classmethod
    def empty(cls) -> KeywordRanking:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64))

    def __len__(self) -> int:
        return int(self.rows.size)

    def score(self, row: int) -> float:
        at = int(np.searchsorted(self._sorted_rows, row))
        if at < self._sorted_rows.size and self._sorted_rows[at] == row:
            return float(self._sorted_scores[at])
        return 0.0

    def at_least(self, score: float) -> int:
        """How many chunks (a prefix of ``rows``) score ``score`` or more."""
        return int(np.searchsorted(-self.scores, -score, side="right"))


def rank(source: CandidateSource, keyword: KeywordRanking, weight: float, plan: QueryPlan,
         want: int) -> list[tuple[int, float]]:
    """The best ``want`` (row, score) passing the condition and the threshold, best
    first; fewer only when no more chunks pass."""
    floor = max(plan.score_threshold, TINY_SCORE)
    known: dict[int, float | None] = {}  # row -> score, None when it fails the condition

    def admit(row: int, similarity: float, metadata: Metadata | None) -> None:
        score = weight * similarity + (1.0 - weight) * keyword.score(row)
        passes = metadata is not None and (
            plan.condition is None or matches(plan.condition, metadata))
        known[row] = score if passes else None

    looked_up = 0  # keyword.rows[:looked_up] are all known
    n = max(2 * want, 20)
    while True:
        outside, window_done = 0.0, True
        if weight > 0.0:
            window = source.nearest(n)
            for row, similarity, metadata in window:
                if row not in known:
                    admit(row, similarity, metadata)
            window_done = len(window) < n
            outside = 0.0 if window_done else weight * window[-1][1]
        batch = max(4 * want, 64)
        while True:
            scored = sorted(((row, score) for row, score in known.items()
                             if score is not None and score >= floor),
                            key=lambda item: (-item[1], item[0]))
            cutoff = scored[want - 1][1] if len(scored) >= want else floor
            # Keyword chunks outside the window that could still reach the cutoff.
            reachable = keyword.at_least((cutoff - outside) / (1.0 - weight)) if weight < 1 else 0
            if looked_up >= reachable:
                break
            end = min(reachable, looked_up + batch)
            pending = [row for row in keyword.rows[looked_up:end].tolist() if row not in known]
            if pending:
                found = source.lookup(pending)
                for row in pending:
                    admit(row, *found.get(row, (0.0, None)))
            looked_up = end
            batch *= 4
        # A chunk with no keyword score and outside the window scores at most `outside`.
        if window_done or outside < cutoff:
            return scored[:want]
        n *= 4


def best_parents(ranked: Callable[[int], list[tuple[int, float]]],
                 parent_ids: Callable[[list[int]], list[str]], top_k: int
                 ) -> list[tuple[str, float]]:
    """Parent-child chunking: children are matched, each parent returned once with its
    best child's score. Asks for more children until ``top_k`` parents are found or
    no more children pass."""
    want = top_k * 4
    while True:
        children = ranked(want)
        best: dict[str, float] = {}
        for parent_id, (_, score) in zip(parent_ids([row for row, _ in children]), children,
                                         strict=True):
            best.setdefault(parent_id, score)
        if len(best) >= top_k or len(children) < want:
            return list(best.items())[:top_k]
        want *= 4
