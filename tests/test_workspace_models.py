"""The Dify workspace's models, called back through the plugin's session.

The process tests run ``python -m main`` over the SDK's real stdio protocol and play
the daemon: they answer the plugin's backwards invocations with real vectors from the
local model and real rerank scores. The in-process tests replace only the SDK's
transport (``_backwards_invoke``, the SDK's own test idiom) and keep its response
handling, so the same answer events reach our code.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    API_KEY,
    DaemonAnswer,
    PluginProcess,
    daemon_error,
    daemon_response,
    dify_body,
    go_raw_request,
)
from dify_plugin.core.entities.plugin.io import PluginInStreamBase, PluginInStreamEvent
from dify_plugin.core.runtime import Session
from dify_plugin.invocations.model.rerank import RerankInvocation
from dify_plugin.invocations.model.text_embedding import TextEmbeddingInvocation
from llama_index.core.schema import TextNode
from pydantic_core import to_jsonable_python

from llamaindex_kb import plugin_settings
from llamaindex_kb.errors import ConfigurationError, EmbeddingMismatchError
from llamaindex_kb.ingestion.pipeline import publish_nodes
from llamaindex_kb.models.choose import local_embedding, models_for
from llamaindex_kb.models.dify import (
    DifyWorkspaceEmbedding,
    DifyWorkspaceReranker,
    error_from_daemon,
)
from llamaindex_kb.models.local import LocalMiniLMEmbedding
from llamaindex_kb.models.spec import EmbeddingSpec
from llamaindex_kb.stores.local.store import LocalStore

PROVIDER, MODEL = "acme/emb/acme", "text-emb"
RERANK_PROVIDER, RERANK_MODEL = "acme/rr/acme", "rerank-1"
KB = "acme"
DOCS = {
    "solar.md": "Solar panels convert sunlight into electricity using photovoltaic cells.",
    "wind.md": "Wind turbines turn the kinetic energy of moving air into electric power.",
    "hydro.md": "Hydroelectric dams release stored river water through turbines.",
    "tea.md": "Green tea is brewed at a lower temperature than black tea to avoid bitterness.",
    "bread.md": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
}
QUERY = "renewable electricity from sunlight and wind"
USAGE = {"tokens": 3, "total_tokens": 3, "unit_price": "0", "price_unit": "0",
         "total_price": "0", "currency": "USD", "latency": 0.01}
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def rerank_scores(query: str, docs: list[str]) -> list[float]:
    """A real relevance score: cosine of the local model's vectors, mapped to [0, 1]."""
    model = local_embedding()
    q = np.asarray(model.get_query_embedding(query))
    d = np.asarray(model.get_text_embedding_batch(docs))
    return ((d @ q + 1.0) / 2.0).tolist()


class LocalModelDaemon:
    """Plays Dify's model runtime with the local model and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls.append((kind, request))
        if kind == "text_embedding":
            vectors = local_embedding().get_text_embedding_batch(request["texts"])
            return daemon_response({"model": request["model"], "embeddings": vectors,
                                    "usage": USAGE})
        if kind == "rerank":
            scores = rerank_scores(request["query"], request["docs"])
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request["top_n"]]
            return daemon_response({"model": request["model"], "docs": [
                {"index": i, "text": request["docs"][i], "score": scores[i]} for i in order]})
        return daemon_error(f"unsupported invoke type: {kind}")

    def requests(self, kind: str) -> list[dict[str, Any]]:
        return [request for called, request in self.calls if called == kind]


def wired_session(answer: DaemonAnswer) -> Session:
    """A real SDK session whose model calls reach ``answer`` instead of a daemon.

    Only the transport is replaced: the SDK's own ``_line_converter_wrapper`` turns the
    answer events into results or exceptions, as it does for the daemon's lines.
    """
    session = Session.empty_session()

    def transport(invocation: Any, kind: Any, data_type: Any, data: dict[str, Any]) -> Any:
        # As the SDK's writer serialises it (model_dump_json): enums become their values.
        events = answer(kind.value, to_jsonable_python(data))
        chunks = (PluginInStreamBase(session_id="", data={"backwards_request_id": "b", **event},
                                     event=PluginInStreamEvent.BackwardInvocationResponse)
                  for event in events)
        return invocation._line_converter_wrapper(chunks, data_type)

    class Embedding(TextEmbeddingInvocation):
        def _backwards_invoke(self, type, data_type, data):
            return transport(self, type, data_type, data)

    class Rerank(RerankInvocation):
        def _backwards_invoke(self, type, data_type, data):
            return transport(self, type, data_type, data)

    session.model.text_embedding = Embedding(session)
    session.model.rerank = Rerank(session)
    return session


# --- the plugin process, over the daemon's stdio protocol ------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A knowledge base built with the workspace model: local vectors, the dify spec."""
    data = tmp_path_factory.mktemp("workspace-data")
    nodes = [TextNode(id_=name, text=text, metadata={"document_id": name, "file_name": name})
             for name, text in DOCS.items()]
    vectors = np.asarray(local_embedding().get_text_embedding_batch(list(DOCS.values())),
                         dtype=np.float32)
    spec = EmbeddingSpec(kind="dify", model=f"{PROVIDER}/{MODEL}", dimension=384)
    publish_nodes(LocalStore(data), KB, nodes, vectors, spec, mode="vector")
    return data


@pytest.fixture(scope="module")
def plugin() -> Iterator[PluginProcess]:
    process = PluginProcess({**os.environ, "INSTALL_METHOD": "local"})
    yield process
    process.close()


def form(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """The plugin's settings form, with a workspace embedding model and a rerank model."""
    return {
        "api_key": API_KEY, "data_dir": str(data_dir), "demo": False,
        "embedding_model": {"provider": PROVIDER, "model": MODEL, "model_type": "text-embedding"},
        "rerank_provider": RERANK_PROVIDER, "rerank_model": RERANK_MODEL, **extra,
    }


def retrieval(top_k: int = 2) -> bytes:
    body = dify_body({"knowledge_id": KB, "query": QUERY,
                      "retrieval_setting": {"top_k": top_k, "score_threshold": 0.0}})
    return go_raw_request("/retrieval", body, HEADERS)


def test_retrieval_embeds_and_reranks_with_the_workspace_models(plugin, data_dir):
    daemon = LocalModelDaemon()
    answer = plugin.invoke("ws-1", form(data_dir), retrieval(top_k=2), answer=daemon)
    assert answer["status"] == 200, answer

    embeddings = daemon.requests("text_embedding")
    assert embeddings, "the query must be embedded by the workspace model"
    for request in embeddings:  # what the daemon's InvokeTextEmbeddingRequest requires
        assert request["provider"] == PROVIDER and request["model"] == MODEL
        assert request["model_type"] == "text-embedding"
        assert request["input_type"] == "query" and isinstance(request["texts"], list)
    assert embeddings[-1]["texts"] == [QUERY]

    (rerank,) = daemon.requests("rerank")  # what InvokeRerankRequest requires
    assert (rerank["provider"], rerank["model"], rerank["model_type"]) == (
        RERANK_PROVIDER, RERANK_MODEL, "rerank")
    assert rerank["query"] == QUERY
    assert rerank["score_threshold"] == 0.0 and rerank["top_n"] == 2
    assert len(rerank["docs"]) >= 2 and set(rerank["docs"]) <= set(DOCS.values())

    scores = rerank_scores(QUERY, rerank["docs"])
    expected = sorted(zip(rerank["docs"], scores, strict=True), key=lambda p: -p[1])[:2]
    records = answer["json"]["records"]
    assert [(r["content"], r["score"]) for r in records] == [
        (text, pytest.approx(score, abs=1e-9)) for text, score in expected]
    assert {records[0]["metadata"]["file_name"], records[1]["metadata"]["file_name"]} <= {
        "solar.md", "wind.md", "hydro.md"}


@pytest.mark.parametrize(
    ("failing", "message", "status", "code"),
    [
        ("text_embedding",
         "invoke text-embedding model failed: request failed: "
         "Model text-emb credentials is not initialized.", 400, 3005),
        ("text_embedding",
         "permission denied, you need to enable text-embedding access in plugin manifest",
         400, 3005),
        ("rerank",
         "invoke rerank model failed: request failed: [acme] Rate Limit Error, try later",
         503, 5003),
    ],
    ids=["embedding-not-configured", "embedding-permission", "rerank-rate-limited"],
)
def test_a_daemon_error_becomes_a_clear_json_error(plugin, data_dir, failing, message,
                                                   status, code):
    daemon = LocalModelDaemon()

    def answer(kind: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        return daemon_error(message) if kind == failing else daemon(kind, request)

    started = time.monotonic()
    reply = plugin.invoke(f"ws-err-{failing}-{status}-{len(message)}", form(data_dir),
                          retrieval(), timeout=20, answer=answer)
    assert time.monotonic() - started < 5
    assert reply["status"] == status
    assert reply["json"]["error_code"] == code
    assert message in reply["json"]["error_msg"]
    setting = "embedding_model" if failing == "text_embedding" else "rerank_model"
    if status == 400:
        assert setting in reply["json"]["error_msg"]


# --- in process: the SDK's response handling, our models --------------------------------


def test_documents_are_embedded_as_documents_in_batches_and_queries_as_queries():
    daemon = LocalModelDaemon()
    model = DifyWorkspaceEmbedding(wired_session(daemon), provider=PROVIDER,
                                   model_name="batching", embed_batch_size=2)
    texts = list(DOCS.values())
    vectors = model.get_text_embedding_batch(texts)
    assert np.allclose(vectors, local_embedding().get_text_embedding_batch(texts), atol=1e-6)
    calls = daemon.requests("text_embedding")
    assert [len(c["texts"]) for c in calls] == [2, 2, 1]
    assert {c["input_type"] for c in calls} == {"document"}

    model.get_query_embedding("where does electricity come from")
    assert daemon.requests("text_embedding")[-1]["input_type"] == "query"
    # The dimension is known from the answers: reading the spec costs no extra call.
    assert model.spec.id == f"dify:{PROVIDER}/batching:384"
    assert len(daemon.requests("text_embedding")) == 4

    assert np.allclose(asyncio.run(model.aget_text_embedding_batch(texts)), vectors, atol=1e-7)
    assert daemon.requests("text_embedding")[-1]["input_type"] == "document"


def test_the_spec_probes_once_per_process_then_is_remembered_across_requests():
    daemon = LocalModelDaemon()
    first = DifyWorkspaceEmbedding(wired_session(daemon), provider=PROVIDER, model_name="probe")
    assert first.spec == EmbeddingSpec(kind="dify", model=f"{PROVIDER}/probe", dimension=384)
    (probe,) = daemon.requests("text_embedding")
    assert probe["input_type"] == "query" and len(probe["texts"]) == 1
    later = DifyWorkspaceEmbedding(wired_session(daemon), provider=PROVIDER, model_name="probe")
    assert later.spec.dimension == 384
    assert len(daemon.calls) == 1


def test_a_model_whose_dimension_changes_is_a_clear_mismatch():
    answers = iter([384, 3])

    def answer(kind: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        width = next(answers)
        return daemon_response({"model": MODEL, "usage": USAGE,
                                "embeddings": [[0.1] * width for _ in request["texts"]]})

    model = DifyWorkspaceEmbedding(wired_session(answer), provider=PROVIDER, model_name="shifty")
    model.get_query_embedding("one")
    with pytest.raises(EmbeddingMismatchError, match="now returns 3-dimensional"):
        model.get_query_embedding("two")
    assert model.spec.dimension == 3  # the next request meets the knowledge base's check


def test_the_reranker_sends_what_the_daemon_requires_and_returns_best_first():
    daemon = LocalModelDaemon()
    reranker = DifyWorkspaceReranker(wired_session(daemon), RERANK_PROVIDER, RERANK_MODEL)
    texts = list(DOCS.values())
    ranked = reranker.rerank("baking bread with yeast", texts, top_n=2)
    scores = rerank_scores("baking bread with yeast", texts)
    assert ranked == [(i, pytest.approx(scores[i])) for i in np.argsort(scores)[::-1][:2]]
    assert texts[ranked[0][0]] == DOCS["bread.md"]
    (request,) = daemon.requests("rerank")
    assert request == {"provider": RERANK_PROVIDER, "model": RERANK_MODEL,
                       "model_type": "rerank", "score_threshold": 0.0, "top_n": 2,
                       "docs": texts, "query": "baking bread with yeast"}
    assert reranker.rerank("anything", [], top_n=3) == []
    assert len(daemon.calls) == 1


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ("invoke text-embedding model failed: request failed: Provider acme does not exist.",
         400),
        ("invoke text-embedding model failed: request failed: Your quota for Dify Hosted "
         "Model Provider has been exhausted.", 400),
        ("invocation exited without response after 250 seconds", 503),
        ("invoke text-embedding model failed: request failed: Connection error.", 503),
        ("", 400),
    ],
)
def test_daemon_messages_map_to_400_unless_transient(message, status):
    error = error_from_daemon("embedding model a/b", "embedding_model", Exception(message))
    assert error.status == status
    assert message in error.message


def test_models_for_picks_workspace_models_from_the_plugin_form(tmp_path):
    session = wired_session(LocalModelDaemon())
    models = models_for(plugin_settings(form(tmp_path)), session)
    assert isinstance(models.embed_model, DifyWorkspaceEmbedding)
    assert (models.embed_model.provider, models.embed_model.model_name) == (PROVIDER, MODEL)
    assert models.reranker == DifyWorkspaceReranker(session, RERANK_PROVIDER, RERANK_MODEL)

    empty = {"embedding_model": {"provider": "", "model": "", "model_type": "text-embedding"},
             "rerank_provider": "", "rerank_model": ""}
    local = models_for(plugin_settings(form(tmp_path, **empty)), session)
    assert local.embed_model is None and local.reranker is None  # a bundled model, then
    assert isinstance(local.embedding_for(None), LocalMiniLMEmbedding)
    # Outside the plugin there is no session to call the workspace with.
    standalone = models_for(plugin_settings(form(tmp_path)))
    assert isinstance(standalone.embedding_for(None), LocalMiniLMEmbedding)
    assert standalone.reranker is None


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ({"embedding_model": {"provider": PROVIDER, "model": "", "model_type": "text-embedding"}},
         "embedding_model"),
        ({"embedding_model": {"provider": PROVIDER, "model": "chat", "model_type": "llm"}},
         "embedding_model"),
        ({"rerank_provider": ""}, "rerank_provider"),
        ({"rerank_model": ""}, "rerank_model"),
    ],
)
def test_half_filled_model_settings_are_configuration_errors(tmp_path, extra, setting):
    with pytest.raises(ConfigurationError, match=f"setting {setting}"):
        models_for(plugin_settings(form(tmp_path, **extra)), wired_session(LocalModelDaemon()))
