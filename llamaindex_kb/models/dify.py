"""The Dify workspace's own models, called back through the plugin's request session.

In the plugin, an endpoint request carries a Dify ``Session``; its
``session.model.text_embedding`` and ``session.model.rerank`` send a backwards
invocation to the plugin daemon, which runs the model the workspace has configured
(with the workspace's credentials and quota) and answers on the same stdio stream.

This is the only core module that imports ``dify_plugin``: importing it
monkey-patches the process with gevent, so ``service`` imports this module only
when a request arrives with a session, and the standalone server never does.

Embedding spec. A workspace model is recorded as
``EmbeddingSpec(kind="dify", model="<provider>/<model>", dimension=<vector length>)``,
e.g. ``dify:langgenius/openai/openai/text-embedding-3-small:1536``. The model-selector
value carries no dimension, so it is learned from the first vectors the workspace
returns. A knowledge base built through the plugin records ``embed_model.spec`` in
its manifest, and a query is checked against that spec *before* the query is
embedded; so reading ``spec`` before any embedding embeds a one-word probe first.
The dimension is then remembered per process for that endpoint and model, so the
probe costs one extra call per process, not per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dify_plugin.core.runtime import Session
from dify_plugin.entities.model import EmbeddingInputType
from dify_plugin.entities.model.rerank import RerankModelConfig
from dify_plugin.entities.model.text_embedding import TextEmbeddingModelConfig
from llama_index.core.base.embeddings.base import Embedding
from pydantic import Field, PrivateAttr

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    ConfigurationError,
    EmbeddingMismatchError,
    KBError,
    StoreUnavailableError,
)
from llamaindex_kb.models.spec import BlockingEmbedding, EmbeddingSpec

SPEC_KIND = "dify"
PROBE_TEXT = "dimension"

# Learned vector lengths, keyed by (endpoint id, provider, model): the endpoint keeps
# two workspaces that name different custom models alike from sharing an entry.
_dimensions: dict[tuple[str | None, str, str], int] = {}

# Daemon and SDK messages that describe a passing condition, worth a 503 (which Dify
# retries). Everything else the daemon reports (model not configured, no credentials,
# quota exhausted, permission denied, bad request) stays wrong until someone changes
# a setting, so it is a 400-class ConfigurationError.
_TRANSIENT_MARKERS = (
    "invocation exited without response",  # the SDK gave up waiting for the daemon
    "rate limit",
    "ratelimit",
    "too many requests",
    "timed out",
    "timeout",
    "temporarily",
    "unavailable",
    "connection",
)


def error_from_daemon(what: str, setting: str, exc: Exception) -> KBError:
    """Our error for a failed backwards invocation; the SDK raises plain ``Exception``."""
    message = str(exc).strip() or type(exc).__name__
    if any(marker in message.lower() for marker in _TRANSIENT_MARKERS):
        return StoreUnavailableError(f"the Dify workspace's {what} is unavailable: {message}")
    return ConfigurationError(
        f"the Dify workspace's {what} failed: {message}. Check the model chosen in the "
        f"{setting} setting and that it is set up in Settings → Model Provider"
    )


class DifyWorkspaceEmbedding(BlockingEmbedding):
    """A text-embedding model of the Dify workspace, through the request's session.

    Queries are sent with ``input_type="query"`` and chunks with ``"document"``, so
    models with asymmetric embeddings (e.g. Cohere, Jina, Voyage) embed each side right.
    """

    provider: str = Field(
        min_length=1, description='Plugin-qualified provider id, e.g. "langgenius/openai/openai".'
    )
    model_name: str = Field(min_length=1, description="The model's name within the provider.")
    # Texts per backwards invocation. Request and answer each travel as one JSON line,
    # and the daemon's line buffer is 5 MiB: 32 vectors of 3072 floats stay near 2 MB.
    embed_batch_size: int = Field(default=32, gt=0, le=256)

    _session: Session = PrivateAttr()

    def __init__(self, session: Session, **data: object) -> None:
        super().__init__(**data)
        self._session = session

    @classmethod
    def class_name(cls) -> str:
        return "DifyWorkspaceEmbedding"

    def _cache_key(self) -> tuple[str | None, str, str]:
        return (self._session.endpoint_id, self.provider, self.model_name)

    @property
    def spec(self) -> EmbeddingSpec:
        dimension = _dimensions.get(self._cache_key())
        if dimension is None:
            self._embed([PROBE_TEXT], EmbeddingInputType.QUERY)
            dimension = _dimensions[self._cache_key()]
        return EmbeddingSpec(
            kind=SPEC_KIND, model=f"{self.provider}/{self.model_name}", dimension=dimension
        )

    def _embed(self, texts: Sequence[str], input_type: EmbeddingInputType) -> list[Embedding]:
        vectors: list[Embedding] = []
        config = TextEmbeddingModelConfig(provider=self.provider, model=self.model_name)
        for start in range(0, len(texts), self.embed_batch_size):
            batch = list(texts[start : start + self.embed_batch_size])
            try:
                result = self._session.model.text_embedding.invoke(
                    config, batch, input_type=input_type
                )
            except Exception as exc:
                raise error_from_daemon(
                    f"embedding model {self.provider}/{self.model_name}", "embedding_model", exc
                ) from exc
            vectors.extend(self._checked(result.embeddings, len(batch)))
        return vectors

    def _checked(self, vectors: list[list[float]], expected: int) -> list[Embedding]:
        name = f"{self.provider}/{self.model_name}"
        lengths = {len(vector) for vector in vectors}
        if len(vectors) != expected or len(lengths) != 1 or 0 in lengths:
            raise ConfigurationError(
                f"the Dify workspace's embedding model {name} returned {len(vectors)} vectors "
                f"of lengths {sorted(lengths)} for {expected} texts"
            )
        dimension = lengths.pop()
        known = _dimensions.setdefault(self._cache_key(), dimension)
        if known != dimension:
            # Remember the new length, so the next request fails the knowledge base's
            # own spec check with its clear "rebuild" message instead of repeating this.
            _dimensions[self._cache_key()] = dimension
            raise EmbeddingMismatchError(
                f"the Dify workspace's embedding model {name} now returns {dimension}-dimensional "
                f"vectors, not {known} as before: its configuration changed, so knowledge "
                "bases built with it need rebuilding"
            )
        return vectors

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query], EmbeddingInputType.QUERY)[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text], EmbeddingInputType.DOCUMENT)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts, EmbeddingInputType.DOCUMENT)



@dataclass(frozen=True)
class DifyWorkspaceReranker:
    """The ``Reranker`` protocol over a rerank model of the Dify workspace."""

    session: Session
    provider: str
    model: str

    def rerank(self, query: str, texts: Sequence[str], top_n: int) -> list[tuple[int, float]]:
        if not texts or top_n <= 0:
            return []
        # Threshold 0 at the model: the request's score_threshold applies afterwards
        # (retrieval.rerank_hits), to the same scores, so one place decides what passes.
        config = RerankModelConfig(
            provider=self.provider, model=self.model, score_threshold=0.0, top_n=top_n
        )
        try:
            result = self.session.model.rerank.invoke(config, list(texts), query)
        except Exception as exc:
            raise error_from_daemon(
                f"rerank model {self.provider}/{self.model}", "rerank_model", exc
            ) from exc
        ranked = [(doc.index, doc.score) for doc in result.docs if 0 <= doc.index < len(texts)]
        ranked.sort(key=lambda pair: -pair[1])
        return ranked[:top_n]


def workspace_embedding(settings: Settings, session: Session) -> DifyWorkspaceEmbedding | None:
    """The embedding model chosen in the plugin form, or None when none is chosen."""
    value = settings.embedding_model or {}
    provider = str(value.get("provider") or "").strip()
    model = str(value.get("model") or "").strip()
    if not provider and not model:
        return None
    if not provider or not model:
        raise ConfigurationError(
            "setting embedding_model: choose a text-embedding model, or clear the setting "
            "to use the bundled local model"
        )
    model_type = value.get("model_type")
    if model_type not in (None, "text-embedding"):
        raise ConfigurationError(
            f"setting embedding_model: {provider}/{model} is a {model_type} model, "
            "not a text-embedding model"
        )
    return DifyWorkspaceEmbedding(session, provider=provider, model_name=model)


def workspace_reranker(settings: Settings, session: Session) -> DifyWorkspaceReranker | None:
    """The rerank model named in the plugin form, or None when both fields are empty."""
    provider = (settings.rerank_provider or "").strip()
    model = (settings.rerank_model or "").strip()
    if not provider and not model:
        return None
    if not provider:
        raise ConfigurationError(
            "setting rerank_provider: needed with rerank_model; the provider id as Dify "
            "lists it, e.g. langgenius/jina/jina"
        )
    if not model:
        raise ConfigurationError(
            "setting rerank_model: needed with rerank_provider; the rerank model's name, "
            "e.g. jina-reranker-v2-base-multilingual"
        )
    return DifyWorkspaceReranker(session, provider, model)
