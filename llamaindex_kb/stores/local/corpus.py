"""The keyword side of a version: its segments' postings, less their removed rows,
scored as one corpus.

Scores equal those of one index built from the live rows alone (``KeywordIndex``, and
the database stores): the same ``text.bm25`` formula from the same counts, with the
corpus statistics of the live rows. Every statistic is computed without reading every
posting: counts from the rows' lengths, document frequencies from the removed rows'
terms, each term's best weight from the postings' frontier (``postings.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llamaindex_kb.lru import LRU
from llamaindex_kb.stores.local.postings import SegmentPostings
from llamaindex_kb.text.analyzer import tokenize
from llamaindex_kb.text.bm25 import TermWeights, idf, median_best_weight, score_rows, weights


@dataclass(frozen=True)
class CorpusStats:
    """What a BM25 weight needs beyond a row's own counts; written with each version."""

    chunks: int
    total_length: int
    absent_term_weight: float

    @property
    def average_length(self) -> float:
        return self.total_length / self.chunks


@dataclass(frozen=True)
class Part:
    """One segment's postings in a version: its first row in the version's row order,
    and its removed rows (sorted; empty when all are live)."""

    postings: SegmentPostings
    offset: int
    removed: np.ndarray

    def live(self) -> np.ndarray | None:
        if not self.removed.size:
            return None
        live = np.ones(len(self.postings), dtype=bool)
        live[self.removed] = False
        return live


_ABSENT = TermWeights(np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0)


def corpus_stats(parts: Sequence[Part]) -> CorpusStats:
    """The statistics of the live rows, in time proportional to the vocabulary and the
    removed rows (the frontier has about 1.5 points per term)."""
    chunks = sum(len(p.postings) - p.removed.size for p in parts)
    total_length = sum(int(p.postings.lengths.sum()) - int(p.postings.lengths[p.removed].sum())
                       for p in parts)
    if not total_length:
        return CorpusStats(chunks, total_length, 0.0)
    columns, size = _shared_columns([p.postings for p in parts])
    frequency = np.zeros(size, np.int64)
    per_part = []
    for part, column in zip(parts, columns, strict=True):
        postings = part.postings
        df = np.diff(postings.indptr)
        if part.removed.size:
            df = df - np.bincount(postings.terms_of(part.removed), minlength=df.size)
        np.add.at(frequency, column, df)
        per_part.append(df)
    # idf by math.log, once per distinct document frequency: there are few.
    distinct, which = np.unique(frequency, return_inverse=True)
    term_idf = np.array([idf(int(df), chunks) for df in distinct])[which]
    average = total_length / chunks
    best = np.zeros(size, np.float32)
    for part, column in zip(parts, columns, strict=True):
        np.maximum.at(best, column, _best_weights(part, term_idf[column], average))
    return CorpusStats(chunks, total_length, median_best_weight(best[frequency > 0]))


def _best_weights(part: Part, term_idf: np.ndarray, average: float) -> np.ndarray:
    """Each of the part's terms' best weight over its live rows (0.0 if none)."""
    postings = part.postings
    if not postings.front.size:
        return np.zeros(len(postings.vocab), np.float32)
    front = postings.front
    front_terms = np.repeat(np.arange(len(postings.vocab)), np.diff(postings.front_ptr))
    live = part.live()
    if live is not None:
        # A term whose frontier lost a row is weighed over all its live rows instead.
        lost = np.unique(front_terms[~live[postings.rows[front]]])
        if lost.size:
            stays = ~np.isin(front_terms, lost)
            positions = postings.positions_of(lost)
            position_terms = np.repeat(lost, np.diff(postings.indptr)[lost])
            alive = live[postings.rows[positions]]
            front = np.concatenate((front[stays], positions[alive]))
            front_terms = np.concatenate((front_terms[stays], position_terms[alive]))
    found = weights(postings.tfs[front], postings.lengths[postings.rows[front]],
                    term_idf[front_terms], average)
    best = np.zeros(len(postings.vocab), np.float32)
    np.maximum.at(best, front_terms, found)
    return best


def _shared_columns(all_postings: Sequence[SegmentPostings]) -> tuple[list[np.ndarray], int]:
    """Each segment's terms' ids in one vocabulary of all segments, and its size. The
    largest vocabulary's ids are kept, so only the others' terms are looked up."""
    if not all_postings:
        return [], 0
    anchor = max(range(len(all_postings)), key=lambda i: len(all_postings[i].vocab))
    known = all_postings[anchor].vocab
    extra: dict[str, int] = {}
    columns = []
    for index, postings in enumerate(all_postings):
        if index == anchor:
            columns.append(np.arange(len(known), dtype=np.int64))
            continue
        ids = np.empty(len(postings.vocab), np.int64)
        for term, column in postings.vocab.items():
            found = known.get(term)
            ids[column] = (found if found is not None
                           else extra.setdefault(term, len(known) + len(extra)))
        columns.append(ids)
    return columns, len(known) + len(extra)


# A term's weights in a version, computed from its counts on first use: repeated and
# common query terms cost a lookup, as when weights were stored. Shared by the
# process's open versions (keyed by version), within a budget like PostgreSQL's.
TERM_WEIGHTS: LRU[tuple[str, str], TermWeights] = LRU(64 * 2**20, lambda w: w.nbytes + 256)


class CorpusKeyword:
    """BM25 scores of a version's rows (removed rows score 0); immutable, thread-safe.
    ``version`` names the version in the process-wide cache of term weights."""

    def __init__(self, parts: Sequence[Part], stats: CorpusStats, rows: int,
                 version: str) -> None:
        self._parts = [(part, part.live()) for part in parts]
        self._stats = stats
        self._rows = rows
        self._version = version

    def scores(self, query: str) -> np.ndarray:
        """Every row's score for ``query``, ``text.bm25``'s absolute scale (0: no match)."""
        terms = tokenize(query)
        if not self._stats.chunks or not self._stats.total_length:
            return np.zeros(self._rows, np.float64)
        weighted: dict[str, TermWeights] = {}
        for term in dict.fromkeys(terms):
            found = TERM_WEIGHTS.get((self._version, term))
            if found is None:
                found = self._term(term)
                TERM_WEIGHTS.put((self._version, term), found)
            if found.rows.size:
                weighted[term] = found
        return score_rows(terms, weighted, self._stats.absent_term_weight, self._rows)

    def _term(self, term: str) -> TermWeights:
        rows, tfs, lengths = [], [], []
        for part, live in self._parts:
            postings = part.postings
            column = postings.vocab.get(term)
            if column is None:
                continue
            held = postings.term_rows(column)
            local = postings.rows[held]
            counts = postings.tfs[held]
            if live is not None:
                kept = live[local]
                local, counts = local[kept], counts[kept]
            rows.append(local.astype(np.int64) + part.offset)
            tfs.append(counts)
            lengths.append(postings.lengths[local])
        if not rows or not sum(r.size for r in rows):
            return _ABSENT
        all_rows = np.concatenate(rows)
        found = weights(np.concatenate(tfs), np.concatenate(lengths),
                        idf(all_rows.size, self._stats.chunks), self._stats.average_length)
        return TermWeights(all_rows, found, float(found.max()))
