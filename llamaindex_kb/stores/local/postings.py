"""A segment's keyword postings: which rows hold each term, how often, and how long
each row is; the raw counts BM25 weights are computed from (``text.bm25``).

Weights are not stored: they depend on the whole knowledge base (chunk count, average
length, each term's document frequency), which every change alters. Counts do not, so
a segment's postings are written once and stay valid in every version that uses it;
``corpus.py`` turns them into weights for the live rows of a version.

Three views of the same occurrences, all ``int32``:

- by term (CSC): term ``t``'s rows ascending are ``rows[indptr[t]:indptr[t + 1]]``,
  their term frequencies ``tfs[...]``; what a query reads;
- by row (CSR): row ``r``'s terms are ``row_terms[row_ptr[r]:row_ptr[r + 1]]``; what
  a deletion reads, to know which terms lose a row without reading every posting;
- the frontier: per term, the occurrences no other occurrence of the term beats on both
  term frequency (higher) and row length (shorter). A term's best weight, for any
  average length, is at one of them, so every term's best (which the score scale
  needs) costs the frontier (about 1.5 points per term), not every posting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamaindex_kb.stores.local.layout import read_array
from llamaindex_kb.text.analyzer import ANALYZER_VERSION, tokenize

__all__ = ["SegmentPostings", "count_terms", "read_vocabulary"]

_META_FILE = "postings.json"
_VOCAB_FILE = "vocab.json"
_ARRAYS = ("indptr", "rows", "tfs", "lengths", "row_ptr", "row_terms", "front", "front_ptr")


@dataclass(frozen=True)
class SegmentPostings:
    vocab: dict[str, int]
    indptr: np.ndarray  # int64, terms + 1
    rows: np.ndarray  # int32, occurrences (by term, then row)
    tfs: np.ndarray  # int32, occurrences
    lengths: np.ndarray  # int64, one per row: its number of terms
    row_ptr: np.ndarray  # int64, rows + 1
    row_terms: np.ndarray  # int32, occurrences (by row, then term)
    front: np.ndarray  # int64 positions into rows/tfs, by term
    front_ptr: np.ndarray  # int64, terms + 1

    @classmethod
    def build(cls, texts: Sequence[str]) -> SegmentPostings:
        return cls.from_occurrences(*count_terms(texts))

    @classmethod
    def from_occurrences(cls, vocab: dict[str, int], terms: np.ndarray, rows: np.ndarray,
                         tfs: np.ndarray, lengths: np.ndarray) -> SegmentPostings:
        """From (term, row, tf) triples sorted by term then row; every term has one."""
        indptr = _pointers(terms, len(vocab))
        # Stable by row: within a row, terms stay in the ascending order they have here.
        by_row = np.argsort(rows, kind="stable")
        row_ptr = _pointers(rows[by_row], lengths.size)
        row_terms = terms[by_row].astype(np.int32)
        del by_row
        front = _frontier(terms, tfs, lengths.astype(np.int32)[rows])
        return cls(vocab, indptr, rows.astype(np.int32), tfs.astype(np.int32),
                   lengths.astype(np.int64), row_ptr, row_terms,
                   front, _pointers(terms[front], len(vocab)))

    def __len__(self) -> int:
        return int(self.lengths.size)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name))
        (directory / _VOCAB_FILE).write_text(json.dumps(self.vocab, ensure_ascii=False),
                                             encoding="utf-8")
        (directory / _META_FILE).write_text(json.dumps({"analyzer_version": ANALYZER_VERSION}))

    @classmethod
    def load(cls, directory: Path) -> SegmentPostings:
        """Read into memory; ``ValueError`` naming the file if the files are damaged or do
        not fit together, so a query never meets postings that fail halfway."""
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("analyzer_version") != ANALYZER_VERSION:
            raise ValueError(
                f"{_META_FILE}: written by keyword analyzer version "
                f"{meta.get('analyzer_version')}, this is {ANALYZER_VERSION}")
        vocab = read_vocabulary(directory / _VOCAB_FILE)
        arrays = {name: read_array(directory / f"{name}.npy") for name in _ARRAYS}
        postings = cls(vocab, **arrays)
        postings.check()
        return postings

    def check(self) -> None:
        """Every index a search or a change computes from these arrays stays in bounds."""
        terms, rows = len(self.vocab), len(self)
        occurrences = self.rows.shape
        if (self.indptr.shape != (terms + 1,) or self.front_ptr.shape != (terms + 1,)
                or self.row_ptr.shape != (rows + 1,) or self.tfs.shape != occurrences
                or self.row_terms.shape != occurrences or self.rows.ndim != 1):
            raise ValueError(f"postings of {occurrences} occurrences do not fit "
                             f"{terms} terms and {rows} rows")
        for name, pointers, size in (("indptr", self.indptr, occurrences[0]),
                                     ("row_ptr", self.row_ptr, occurrences[0]),
                                     ("front_ptr", self.front_ptr, self.front.size)):
            if pointers[0] != 0 or pointers[-1] != size or np.any(np.diff(pointers) < 0):
                raise ValueError(f"postings pointers ({name}) are out of order")
        for name, values, bound in (("rows", self.rows, rows), ("row_terms", self.row_terms, terms),
                                    ("front", self.front, occurrences[0])):
            if values.size and (int(values.min()) < 0 or int(values.max()) >= bound):
                raise ValueError(f"postings ({name}) point outside 0..{bound - 1}")
        ids = np.fromiter(self.vocab.values(), dtype=np.int64, count=terms)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= terms):
            raise ValueError("vocabulary names terms outside the postings")

    def term_rows(self, column: int) -> slice:
        return slice(int(self.indptr[column]), int(self.indptr[column + 1]))

    def terms_of(self, rows: np.ndarray) -> np.ndarray:
        """Every (row, term) occurrence's term for these rows: what deleting them touches."""
        return self.row_terms[_ranges(self.row_ptr, rows)]

    def positions_of(self, columns: np.ndarray) -> np.ndarray:
        """The occurrences of these terms, term by term."""
        return _ranges(self.indptr, columns)


def read_vocabulary(path: Path) -> dict[str, int]:
    """A saved vocabulary (term -> column); ``ValueError`` naming the file if damaged."""
    try:
        vocab = json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc
    if not isinstance(vocab, dict):
        raise ValueError(f"{path.name} holds {type(vocab).__name__}, not a vocabulary")
    return vocab


def count_terms(texts: Sequence[str]
                ) -> tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The texts tokenized and counted: the vocabulary (term -> column); the term, row
    and term frequency of every distinct (term, row), by term then row; each row's
    length in terms. What BM25 weights, and segments' postings, are made from."""
    vocab: dict[str, int] = {}
    # int32 arrays, not lists: at 100k chunks lists of Python ints alone took ~400 MB.
    corpus_ids = [
        np.fromiter((vocab.setdefault(term, len(vocab)) for term in tokenize(text)),
                    dtype=np.int32)
        for text in texts
    ]
    lengths = np.fromiter((ids.size for ids in corpus_ids), np.int64, count=len(corpus_ids))
    terms, rows, tfs = _occurrence_counts(corpus_ids, lengths)
    return vocab, terms, rows, tfs, lengths


def _occurrence_counts(corpus_ids: list[np.ndarray], lengths: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(term, row, term frequency) of every distinct term of every row, in CSC order (by
    term, then row). One (term, row) key per occurrence, sorted in place and counted:
    a 100k-chunk corpus has ~10 million occurrences, so every whole-corpus temporary
    counts, and none is made twice."""
    if not corpus_ids or not int(lengths.sum()):
        empty = np.zeros(0, np.int32)
        return empty, empty, empty
    keys = np.concatenate(corpus_ids).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.repeat(np.arange(len(corpus_ids), dtype=np.uint64), lengths)
    keys.sort()
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    tfs = np.diff(np.append(starts, keys.size)).astype(np.int32)
    keys = keys[starts]
    return ((keys >> np.uint64(32)).astype(np.int32),
            (keys & np.uint64(0xFFFFFFFF)).astype(np.int32), tfs)


def _pointers(sorted_ids: np.ndarray, count: int) -> np.ndarray:
    pointers = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_ids, minlength=count), out=pointers[1:])
    return pointers


def _ranges(pointers: np.ndarray, which: np.ndarray) -> np.ndarray:
    """The positions ``pointers[w]:pointers[w + 1]`` of every ``w`` in ``which``, joined."""
    starts, ends = pointers[which], pointers[np.asarray(which) + 1]
    sizes = ends - starts
    if not sizes.size or not int(sizes.sum()):
        return np.zeros(0, np.int64)
    # Each position is its range's start plus its index within the range.
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    return np.arange(int(sizes.sum()), dtype=np.int64) + shift


def _frontier(terms: np.ndarray, tfs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions of each term's undominated occurrences (module docstring), by term."""
    if not terms.size:
        return np.zeros(0, np.int64)
    if int(terms.max()) < 1 << 24 and int(tfs.max()) < 1 << 20 and int(lengths.max()) < 1 << 20:
        # One 64-bit key sorts in half the time of three (term, -tf, length) keys.
        key = terms.astype(np.uint64) << np.uint64(40)
        key |= (np.uint64((1 << 20) - 1) - tfs.astype(np.uint64)) << np.uint64(20)
        key |= lengths.astype(np.uint64)
        order = np.argsort(key, kind="stable")
        del key
    else:
        order = np.lexsort((lengths, -tfs.astype(np.int64), terms))
    # Memory counts here (a 100k-chunk corpus has ~6 million occurrences): one array
    # at a time, freed as soon as it is used.
    t = terms[order]
    group_start = np.concatenate(([True], t[1:] != t[:-1]))
    tf = tfs[order]
    tf_start = group_start | np.concatenate(([True], tf[1:] != tf[:-1]))
    del tf
    # Shortest length so far within the term: shifting each term below the previous
    # ones lets one running minimum over the whole array stay within each term.
    shifted = lengths[order].astype(np.int64)
    shifted -= t.astype(np.int64) * (int(shifted.max()) + 1)
    del t
    shortest = np.minimum.accumulate(shifted)
    undominated = tf_start
    undominated[1:] &= group_start[1:] | (shifted[1:] < shortest[:-1])
    return np.sort(order[undominated]).astype(np.int64)
