"""Embeddings from any server that speaks OpenAI's ``POST /v1/embeddings``.

OpenAI itself, Ollama (``http://localhost:11434/v1``), vLLM, Hugging Face TEI and
Xinference all serve the same request ``{"model", "input": [texts]}`` and answer
``{"data": [{"index", "embedding"}]}``. ``base_url`` is the part before
``/embeddings``, as in the OpenAI SDK, so it usually ends in ``/v1``.

Time budget: Dify gives the whole retrieval call 5 s, so a query embedding gets
``query_timeout`` seconds in total, retries included; a batch of chunks (ingestion,
where nobody waits on a 5 s clock) gets ``document_timeout``. Connection failures,
timeouts, 429 and 5xx are retried with backoff while the budget lasts; they end as a
503 ``StoreUnavailableError``. Answers that stay wrong on retry (401/403, 404, other
4xx, a body that is not an embeddings response) are a 400 ``ConfigurationError``
naming the setting to fix.

The spec is ``EmbeddingSpec(kind="openai", model=<model name>, dimension=<vector
length>)``: the same model gives the same vectors wherever it is served, so the
server's address is not part of it. The dimension is learned from the first answer;
reading ``spec`` before any embedding embeds a one-word probe to learn it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from llama_index.core.base.embeddings.base import Embedding
from pydantic import Field, PrivateAttr, SecretStr

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import ConfigurationError, EmbeddingMismatchError, StoreUnavailableError
from llamaindex_kb.models.spec import BlockingEmbedding, EmbeddingSpec
from llamaindex_kb.redaction import redact_text, redact_url, url_secrets

SPEC_KIND = "openai"
PROBE_TEXT = "dimension"
CONNECT_TIMEOUT = 1.0
BACKOFF = 0.2  # seconds before the first retry, doubled for each further one
# No retry is started with less time than this left: it could not finish anyway.
MIN_ATTEMPT = 0.2
_TRANSIENT_STATUSES = {408, 429}


@dataclass(frozen=True)
class _Transient:
    """A failure that may pass: retried while the budget lasts."""

    reason: str
    retry_after: float | None = None


class OpenAICompatibleEmbedding(BlockingEmbedding):
    """Embeddings from an OpenAI-compatible server over httpx (async: in a worker thread)."""

    base_url: str = Field(
        min_length=1, description="The URL before /embeddings, e.g. http://localhost:11434/v1."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Sent as 'Authorization: Bearer <key>' when set."
    )
    model_name: str = Field(min_length=1, description="The model the server should run.")
    embed_batch_size: int = Field(default=64, gt=0, le=2048)
    query_timeout: float = Field(
        default=2.5, gt=0, description="Seconds for one query embedding, retries included."
    )
    document_timeout: float = Field(
        default=60.0, gt=0, description="Seconds for one batch of chunks, retries included."
    )
    max_retries: int = Field(default=2, ge=0, le=5)

    _client: httpx.Client | None = PrivateAttr(default=None)
    _client_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _dimension: int | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "OpenAICompatibleEmbedding"

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/embeddings"

    @property
    def shown_url(self) -> str:
        """``url`` as messages show it: a password or key in it masked."""
        return redact_url(self.url)

    def _scrubbed(self, text: str) -> str:
        """A server's or the network's words without our secrets: servers echo a
        rejected key (OpenAI shows part of it), and errors may quote the URL."""
        key = self.api_key.get_secret_value() if self.api_key is not None else None
        return redact_text(text, (key, *url_secrets(self.url)))

    @property
    def spec(self) -> EmbeddingSpec:
        if self._dimension is None:
            self._embed([PROBE_TEXT], self.query_timeout)
        assert self._dimension is not None  # set by the successful _embed above
        return EmbeddingSpec(kind=SPEC_KIND, model=self.model_name, dimension=self._dimension)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query], self.query_timeout)[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text], self.document_timeout)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts, self.document_timeout)

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = httpx.Client()
        return self._client

    def _embed(self, texts: Sequence[str], budget: float) -> list[Embedding]:
        vectors: list[Embedding] = []
        for start in range(0, len(texts), self.embed_batch_size):
            vectors.extend(self._post(list(texts[start : start + self.embed_batch_size]), budget))
        return vectors

    def _post(self, texts: list[str], budget: float) -> list[Embedding]:
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                response = self._sync_client().post(
                    self.url, json=self._body(texts), headers=self._headers(),
                    timeout=_timeout(deadline),
                )
            except httpx.TransportError as exc:
                failure = _Transient(self._scrubbed(_describe(exc)))
            else:
                failure = self._failure(response)
                if failure is None:
                    return self._vectors(response, len(texts))
            delay = self._retry_delay(failure, attempt, deadline)
            if delay is None:
                raise self._unavailable(failure, attempt + 1, budget)
            time.sleep(delay)
            attempt += 1

    def _body(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model_name, "input": texts}

    def _headers(self) -> dict[str, str]:
        if self.api_key is None:
            return {}
        return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}

    def _failure(self, response: httpx.Response) -> _Transient | None:
        """None for success, a retryable failure, or raise for one that would recur."""
        status = response.status_code
        if 200 <= status < 300:
            return None
        detail = self._scrubbed(_detail(response))
        if status in _TRANSIENT_STATUSES or status >= 500:
            return _Transient(f"HTTP {status}{detail}", _retry_after(response))
        if status in (401, 403):
            raise ConfigurationError(
                f"the embedding server at {self.shown_url} refused the request with HTTP {status}"
                f"{detail}: check the embedding_api_key setting"
            )
        if status == 404:
            raise ConfigurationError(
                f"the embedding server answered HTTP 404 for POST {self.shown_url}{detail}: check "
                "the embedding_base_url setting (OpenAI-compatible servers serve "
                "<base>/embeddings, so it usually ends in /v1) and embedding_model_name "
                f"({self.model_name!r})"
            )
        raise ConfigurationError(
            f"the embedding server at {self.shown_url} rejected the request with HTTP {status}"
            f"{detail}: check the embedding_model_name setting ({self.model_name!r})"
        )

    def _vectors(self, response: httpx.Response, expected: int) -> list[Embedding]:
        try:
            payload = response.json()
        except ValueError:
            raise self._not_embeddings("the body is not JSON") from None
        items = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(items, list) or len(items) != expected:
            raise self._not_embeddings(f"expected {expected} entries under 'data'")
        if not all(isinstance(item, dict) for item in items):
            raise self._not_embeddings("'data' entries are not objects")
        # Servers answer in input order; "index" says so explicitly where present.
        items = sorted(items, key=lambda item: item.get("index", 0))
        try:
            matrix = np.asarray([item["embedding"] for item in items], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise self._not_embeddings(
                "'embedding' is missing, not a list of numbers, or of uneven length"
            ) from None
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise self._not_embeddings("'embedding' is not a list of numbers")
        self._learn(int(matrix.shape[1]))
        return matrix.tolist()

    def _learn(self, dimension: int) -> None:
        known = self._dimension
        self._dimension = dimension
        if known is not None and known != dimension:
            # The new length is kept, so the next query meets the knowledge base's own
            # spec check and its clear "rebuild" message instead of this one again.
            raise EmbeddingMismatchError(
                f"the embedding server at {self.shown_url} now returns {dimension}-dimensional "
                f"vectors for {self.model_name!r}, not {known} as before: the model behind "
                "it changed, so knowledge bases built with it need rebuilding"
            )

    def _retry_delay(self, failure: _Transient, attempt: int, deadline: float) -> float | None:
        if attempt >= self.max_retries:
            return None
        delay = failure.retry_after if failure.retry_after is not None else BACKOFF * 2**attempt
        if time.monotonic() + delay + MIN_ATTEMPT > deadline:
            return None
        return delay

    def _unavailable(self, failure: _Transient, attempts: int, budget: float) -> Exception:
        return StoreUnavailableError(
            f"the embedding server at {self.shown_url} is unavailable: {failure.reason} "
            f"({attempts} attempt{'s' if attempts > 1 else ''} within {budget:g} s)"
        )

    def _not_embeddings(self, problem: str) -> Exception:
        return ConfigurationError(
            f"the server at {self.shown_url} did not answer like an OpenAI embeddings API "
            f"({problem}): check the embedding_base_url setting"
        )


def _timeout(deadline: float) -> httpx.Timeout:
    remaining = max(deadline - time.monotonic(), 0.01)
    return httpx.Timeout(remaining, connect=min(CONNECT_TIMEOUT, remaining))


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _detail(response: httpx.Response) -> str:
    """': <the server's own error message>', or '' when it gave none."""
    try:
        payload = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        text = str(error).strip()
    return f": {text[:300]}" if text else ""


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def embedding_for(settings: Settings) -> OpenAICompatibleEmbedding | None:
    """The configured OpenAI-compatible embedding, or None without ``embedding_base_url``.

    One instance (and so one connection pool and one learned dimension) per distinct
    server, key and model, shared by every request.
    """
    base_url = (settings.embedding_base_url or "").strip().rstrip("/")
    if not base_url:
        return None
    try:
        parsed = httpx.URL(base_url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(
            f"setting embedding_base_url: {redact_url(base_url)!r} is not an http(s) URL; e.g. "
            "https://api.openai.com/v1 or http://localhost:11434/v1"
        )
    model_name = (settings.embedding_model_name or "").strip()
    if not model_name:
        raise ConfigurationError(
            "setting embedding_model_name: needed with embedding_base_url; the model the "
            "server should run, e.g. text-embedding-3-small or nomic-embed-text"
        )
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    return _shared_embedding(base_url, key, model_name)


@functools.lru_cache(maxsize=16)
def _shared_embedding(
    base_url: str, api_key: str | None, model_name: str
) -> OpenAICompatibleEmbedding:
    return OpenAICompatibleEmbedding(
        base_url=base_url,
        api_key=SecretStr(api_key) if api_key else None,
        model_name=model_name,
    )
