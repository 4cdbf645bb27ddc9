"""The multilingual analyzer: text to index terms, the same path for documents and queries.

- Everything is NFKC-normalised first, so full-width letters and digits and
  half-width katakana meet their ordinary forms, then lowercased.
- Latin (and any other space-separated) script: split on everything that is
  not a letter or digit, English stopwords dropped, Snowball English stems.
- Han: Traditional characters folded to Simplified, then jieba's search-mode
  words plus every character bigram jieba did not already produce.
- Kana and hangul: character bigrams, the usual CJK analyzer choice.

Imports nothing of the package: a test times it loaded on its own.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import Stemmer

__all__ = ["ANALYZER_VERSION", "cjk_share", "tokenize"]

logger = logging.getLogger(__name__)

# Bumped whenever tokenize() changes what it emits: an index built by another
# analyzer would silently miss terms, so every store refuses it.
ANALYZER_VERSION = 1

_HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
_HAN = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _HAN_RANGES)
_KANA = "\u3040-\u30ff\u31f0-\u31ff"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
_WORDS = re.compile(r"[^\W_]+")
# A CJK character, or a run of other letters and digits: one word each.
_CJK_OR_WORD = re.compile(rf"([{_HAN}{_KANA}{_HANGUL}])|[^\W_{_HAN}{_KANA}{_HANGUL}]+")
# Only for the rare non-ASCII word: capturing groups make findall several
# times slower over whole documents.
_SCRIPTS = re.compile(rf"([{_HAN}]+)|([{_KANA}]+)|([{_HANGUL}]+)|([^{_HAN}{_KANA}{_HANGUL}]+)")
# NLTK's English list rather than Lucene's 33 words: nDCG@10 0.690 vs 0.688 on SciFact,
# 0.330 vs 0.326 on NFCorpus. Single letters stay: dropping them cost 0.002 on both.
# NLTK's forms with an apostrophe ("don't") are left out: _WORDS splits them
# into words already listed ("don", "t").
_STOPWORDS = frozenset("""
a about above after again against ain all am an and any are aren as at be because been
before being below between both but by can couldn d did didn do does doesn doing don down
during each few for from further had hadn has hasn have haven having he her here hers
herself him himself his how i if in into is isn it its itself just ll m ma me mightn more
most mustn my myself needn no nor not now o of off on once only or other our ours
ourselves out over own re s same shan she should shouldn so some such t than that the
their theirs them themselves then there these they this those through to too under until
up ve very was wasn we were weren what when where which while who whom why will with won
wouldn y you your yours yourself yourselves
""".split())

# PyStemmer's Stemmer objects are not thread-safe, so each thread gets its
# own, with a memo of the words it has stemmed: a corpus repeats its words, and
# the memo more than doubles indexing speed. Cleared when full to bound memory.
_stemmers = threading.local()
_STEM_MEMO_SIZE = 200_000


@dataclass(frozen=True)
class _HanAnalyzer:
    jieba: Any  # jieba.Tokenizer; jieba ships no type information
    fold: dict[int, str]  # Traditional -> Simplified, for str.translate


_han_lock = threading.Lock()
_han_analyzer: _HanAnalyzer | None = None


def _stem(words: list[str]) -> list[str]:
    if not hasattr(_stemmers, "stemmer"):
        _stemmers.stemmer = Stemmer.Stemmer("english")
        _stemmers.memo = {}
    memo: dict[str, str] = _stemmers.memo
    unseen = {w for w in words if w not in memo}
    if unseen:
        if len(memo) + len(unseen) > _STEM_MEMO_SIZE:
            memo.clear()
            unseen = set(words)
        batch = list(unseen)
        memo.update(zip(batch, _stemmers.stemmer.stemWords(batch), strict=True))
    return [memo[w] for w in words]


def _han() -> _HanAnalyzer:
    """jieba and the Traditional->Simplified table, loaded once, on first Han text.

    Loading takes about a second and 80 MB, which English-only deployments
    never pay. jieba writes a dictionary cache: it goes to a per-user
    directory under the system temp dir, and jieba's logger is silenced
    because a failed cache write only costs a slower start.
    """
    global _han_analyzer
    if _han_analyzer is None:
        with _han_lock:
            if _han_analyzer is None:
                _han_analyzer = _load_han_analyzer()
    return _han_analyzer


def _load_han_analyzer() -> _HanAnalyzer:
    import jieba
    from opencc_purepy import OpenCC

    jieba.setLogLevel(logging.CRITICAL)
    user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    cache_dir = Path(tempfile.gettempdir()) / f"llamaindex_kb{user}" / "jieba"
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("jieba cache directory unavailable, starting without cache: %s", exc)
    tokenizer = jieba.Tokenizer()
    tokenizer.tmp_dir = str(cache_dir)
    tokenizer.initialize()

    # Folding lets a Traditional query find a Simplified document (nDCG@10 on
    # CMRC 2018 0.865 -> 0.988) and puts Traditional text through jieba's
    # Simplified dictionary. Characters only: OpenCC's phrase conversion
    # scored the same, and str.translate runs at C speed.
    han = "".join(chr(c) for lo, hi in _HAN_RANGES for c in range(lo, hi + 1))
    simplified = OpenCC("t2s").ts(han)
    fold = {ord(t): s for t, s in zip(han, simplified, strict=True) if t != s}
    return _HanAnalyzer(tokenizer, fold)


def _bigrams(run: str) -> list[str]:
    if len(run) == 1:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


def _han_terms(run: str) -> list[str]:
    # jieba alone misses query words it segments differently from the
    # document (names, rare words); bigrams alone lose jieba's word
    # boundaries. nDCG@10 on CMRC 2018 with its questions / with answer spans
    # as queries: jieba 0.989 / 0.845, bigrams 0.984 / 0.855, both 0.988 / 0.862.
    # jieba's HMM is off because the words it guesses depend on the context,
    # so query and document disagree on them: 0.985 / 0.863 with it on.
    analyzer = _han()
    run = run.translate(analyzer.fold)
    words = list(analyzer.jieba.cut_for_search(run, HMM=False))
    seen = set(words)
    return words + [b for b in _bigrams(run) if b not in seen]


def tokenize(text: str) -> list[str]:
    """Index terms of ``text``: what both documents and queries are reduced to."""
    terms: list[str] = []
    words: list[str] = []
    for run in _WORDS.findall(unicodedata.normalize("NFKC", text).lower()):
        if run.isascii():
            words.append(run)
            continue
        for han, kana, hangul, other in _SCRIPTS.findall(run):
            if other:
                words.append(other)
            elif han:
                terms.extend(_han_terms(han))
            else:
                terms.extend(_bigrams(kana or hangul))
    words = [w for w in words if w not in _STOPWORDS]
    if words:
        terms.extend(_stem(words))
    return terms


def cjk_share(text: str) -> float:
    """The share of ``text``'s words that are Chinese, Japanese or Korean, each CJK
    character counting as a word (0 for text without words)."""
    found = _CJK_OR_WORD.findall(text)
    return sum(1 for cjk in found if cjk) / len(found) if found else 0.0
