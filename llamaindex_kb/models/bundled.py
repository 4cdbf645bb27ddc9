"""The two models that ship with the plugin, and which one a knowledge base gets.

- ``english``: all-MiniLM-L6-v2 (``local.py``), fast, English only;
- ``multilingual``: multilingual-e5-small (``multilingual.py``), ~100 languages
  including Chinese, several times slower to ingest with (README, Benchmark).

A knowledge base built with one of them is always queried and extended with it,
whatever the settings say now: its vectors mean nothing to another model, and both
are always at hand. A new one gets the ``local_model`` setting's choice; ``auto``
(the default) picks by its first documents: ``multilingual`` when most of their words
are Chinese, Japanese or Korean (each CJK character counting as a word), else
``english``, which measured as good on English sets at a fraction of the cost
(README, Benchmark).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from llamaindex_kb.config import LocalModel
from llamaindex_kb.models import multilingual
from llamaindex_kb.models.local import LOCAL_MINILM_SPEC, LocalMiniLMEmbedding
from llamaindex_kb.models.multilingual import LocalMultilingualEmbedding
from llamaindex_kb.models.spec import BlockingEmbedding, EmbeddingSpec
from llamaindex_kb.text.analyzer import cjk_share

log = logging.getLogger(__name__)

# From this share of CJK words on, ``auto`` picks the multilingual model.
MOSTLY = 0.5
# Enough text to tell the language of a batch, little enough to count in microseconds.
_SAMPLE_CHARS = 4000


@functools.cache
def english(spin_threads: bool = False) -> LocalMiniLMEmbedding:
    return LocalMiniLMEmbedding(spin_threads=spin_threads)


@functools.cache
def multilingual_model() -> LocalMultilingualEmbedding:
    """Chosen freely: where it cannot run, its first embedding says so (400), so a
    keyword query on a base it built still answers."""
    return LocalMultilingualEmbedding()


def built_with(spec: EmbeddingSpec | None, spin_threads: bool = False
               ) -> BlockingEmbedding | None:
    """The bundled model that built a knowledge base with ``spec``, if one did."""
    if spec == LOCAL_MINILM_SPEC:
        return english(spin_threads)
    if spec == multilingual.SPEC:
        return multilingual_model()
    return None


def for_new(choice: LocalModel, texts: Sequence[str], spin_threads: bool = False
            ) -> BlockingEmbedding:
    """The bundled model a new knowledge base of ``texts`` is built with."""
    if choice == "multilingual":
        return multilingual_model()
    if choice == "auto" and _mostly_cjk(texts):
        reason = multilingual.unavailable_reason()
        if reason is None:
            return multilingual_model()
        log.warning("documents mostly in Chinese, Japanese or Korean get the English local "
                    "model: the multilingual one cannot run here (%s)", reason)
    return english(spin_threads)


def _mostly_cjk(texts: Sequence[str]) -> bool:
    sample, left = [], _SAMPLE_CHARS
    for text in texts:
        if left <= 0:
            break
        sample.append(text[:left])
        left -= len(sample[-1])
    return cjk_share("\n".join(sample)) >= MOSTLY
