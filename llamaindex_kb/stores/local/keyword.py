"""The embedded store's keyword index: every term's BM25 weights, computed once per version.

The weights are ``text.bm25``'s, the same the database stores compute from their
postings at query time, kept as a sparse terms-by-rows matrix in CSC arrays: term
``t``'s rows and weights are ``indices[indptr[t]:indptr[t + 1]]`` and
``data[...]``. The files are those bm25s wrote, which built this index before, so
knowledge bases built then are read as they are.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llamaindex_kb.stores.local.layout import read_array
from llamaindex_kb.stores.local.postings import count_terms, read_vocabulary
from llamaindex_kb.text.analyzer import ANALYZER_VERSION, tokenize
from llamaindex_kb.text.bm25 import TermWeights, idf, median_best_weight, score_rows, weights

__all__ = ["KeywordIndex"]

_META_FILE = "keyword.json"
_TOKEN_MAX_FILE = "token_max.npy"  # each term's best weight
_VOCAB_FILE = "vocab.index.json"  # term -> column
_CSC_FILES = {name: f"{name}.csc.index.npy" for name in ("data", "indices", "indptr")}
_SLICE = 1 << 20  # occurrences weighed at a time


class KeywordIndex:
    """A static BM25 index over texts addressed by row number (0..len-1).

    Immutable once built, so concurrent searches need no lock; any change to
    the texts means building a new index.
    """

    def __init__(self, vocab: dict[str, int], data: np.ndarray, indices: np.ndarray,
                 indptr: np.ndarray, token_max: np.ndarray, num_docs: int) -> None:
        self._vocab = vocab
        self._data, self._indices, self._indptr = data, indices, indptr
        self._token_max = token_max
        self._num_docs = num_docs
        self._absent_term_weight = median_best_weight(token_max)

    @classmethod
    def build(cls, texts: Sequence[str]) -> KeywordIndex:
        vocab, terms, rows, tfs, lengths = count_terms(texts)
        if not vocab:
            return cls._empty(len(texts))
        document_frequency = np.bincount(terms, minlength=len(vocab))
        indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(document_frequency, out=indptr[1:])
        # idf by math.log, once per distinct document frequency: there are few.
        distinct, which = np.unique(document_frequency, return_inverse=True)
        term_idf = np.array([idf(int(df), len(texts)) for df in distinct])[which]
        average_length = int(lengths.sum()) / len(texts)
        # In slices: the float64 temporaries of a whole 100k-chunk corpus took ~300 MB.
        data = np.empty(rows.size, dtype=np.float32)
        for at in range(0, rows.size, _SLICE):
            part = slice(at, at + _SLICE)
            data[part] = weights(tfs[part], lengths[rows[part]], term_idf[terms[part]],
                                 average_length)
        token_max = np.maximum.reduceat(data, indptr[:-1])  # every term has a row
        return cls(vocab, data, rows, indptr, token_max, len(texts))

    @classmethod
    def _empty(cls, num_docs: int) -> KeywordIndex:
        return cls({}, np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64),
                   np.zeros(0, np.float32), num_docs)

    def __len__(self) -> int:
        return self._num_docs

    def save(self, directory: Path) -> None:
        """Write the index to ``directory``, replacing any index already there.

        The files are written beside it and swapped in, so a reader never
        sees half an index and a searcher that loaded the old files
        keeps working.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would hide the index from a
        # server running as another user.
        staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}")
        staging.mkdir()
        try:
            if self._vocab:
                for name, array in (("data", self._data), ("indices", self._indices),
                                    ("indptr", self._indptr)):
                    np.save(staging / _CSC_FILES[name], array)
                (staging / _VOCAB_FILE).write_text(
                    json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
            np.save(staging / _TOKEN_MAX_FILE, self._token_max)
            meta = {"analyzer_version": ANALYZER_VERSION, "num_docs": self._num_docs}
            (staging / _META_FILE).write_text(json.dumps(meta))
            if directory.exists():
                retired = staging.with_name(staging.name + ".old")
                directory.rename(retired)
                staging.rename(directory)
                shutil.rmtree(retired)
            else:
                staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> KeywordIndex:
        """Open a saved index, read into memory (``layout.read_array`` says why not
        mapped); ``ValueError`` naming the file if the files are damaged or do not fit
        together, so a query never meets an index that fails halfway."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("analyzer_version") != ANALYZER_VERSION:
            raise ValueError(
                f"keyword index at {directory} was built by analyzer version "
                f"{meta.get('analyzer_version')}, this is {ANALYZER_VERSION}: rebuild it"
            )
        num_docs = int(meta["num_docs"])
        token_max = read_array(directory / _TOKEN_MAX_FILE)
        if token_max.ndim != 1:
            raise ValueError(f"{_TOKEN_MAX_FILE} has shape {token_max.shape}")
        if not token_max.size:
            return cls._empty(num_docs)
        vocab = read_vocabulary(directory / _VOCAB_FILE)
        arrays = {name: read_array(directory / file) for name, file in _CSC_FILES.items()}
        _check_matrix(vocab, **arrays, terms=token_max.size, num_docs=num_docs)
        return cls(vocab, token_max=token_max, num_docs=num_docs, **arrays)

    def scores(self, query: str) -> np.ndarray:
        """Every row's score for ``query``, ``text.bm25``'s absolute scale (0: no match)."""
        terms = tokenize(query)
        weighted: dict[str, TermWeights] = {}
        for term in terms:
            column = self._vocab.get(term)
            if column is not None and term not in weighted:
                start, end = self._indptr[column], self._indptr[column + 1]
                weighted[term] = TermWeights(self._indices[start:end], self._data[start:end],
                                             float(self._token_max[column]))
        return score_rows(terms, weighted, self._absent_term_weight, self._num_docs)


def _check_matrix(vocab: dict[str, int], data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                  terms: int, num_docs: int) -> None:
    """Every index a search computes from these arrays stays in bounds."""
    if indptr.shape != (terms + 1,) or data.shape != indices.shape or data.ndim != 1:
        raise ValueError(f"score matrix of {indptr.shape} pointers and {data.shape} weights "
                         f"does not fit {terms} terms")
    if indptr[0] != 0 or indptr[-1] != data.size or np.any(np.diff(indptr) < 0):
        raise ValueError("score matrix pointers are out of order")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= num_docs):
        raise ValueError(f"score matrix names rows outside 0..{num_docs - 1}")
    try:
        ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vocabulary holds a term id that is not a number ({exc})") from exc
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= terms):
        raise ValueError("vocabulary names terms outside the score matrix")
