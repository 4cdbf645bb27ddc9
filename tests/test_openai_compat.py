"""OpenAICompatibleEmbedding against a real local HTTP server speaking OpenAI's embeddings API.

The server embeds with the local model, so every vector can be checked exactly, and
can be told to fail, hang or answer nonsense for the next requests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import API_KEY, dify_body, standalone_server

from llamaindex_kb import ingest_paths, load_settings
from llamaindex_kb.errors import ConfigurationError, EmbeddingMismatchError, StoreUnavailableError
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import local_embedding, models_for
from llamaindex_kb.models.openai import OpenAICompatibleEmbedding, embedding_for
from llamaindex_kb.stores.local.store import LocalStore

SERVER_KEY = "sk-local-test"
MODEL = "local-minilm"
TEXTS = [
    "Solar panels convert sunlight into electricity.",
    "Wind turbines turn moving air into electric power.",
    "Green tea is brewed at a lower temperature than black tea.",
    "Sourdough bread rises thanks to wild yeast.",
    "Hydroelectric dams release river water through turbines.",
]


class EmbeddingServer:
    """``POST /v1/embeddings`` on 127.0.0.1, answering with the local model's vectors.

    ``script`` holds what the next requests get instead of a normal answer: an HTTP
    status to fail with, "hang" (never answer), "garbage" (not JSON) or "narrow"
    (3-dimensional vectors).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[int | str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "authorization": self.headers.get("Authorization")})
                step = server.script.pop(0) if server.script else None
                if self.path != "/v1/embeddings":
                    return self.reply(404, {"error": {"message": "Not Found"}})
                if self.headers.get("Authorization") != f"Bearer {SERVER_KEY}":
                    return self.reply(401, {"error": {"message": "Incorrect API key provided"}})
                if isinstance(step, int):
                    return self.reply(step, {"error": {"message": "model overloaded"}})
                if step == "hang":
                    server.release.wait(10)
                    return None
                if step == "garbage":
                    return self.reply(200, "<html>gateway</html>")
                width = 3 if step == "narrow" else None
                return self.reply(200, embeddings_answer(body, width))

            def reply(self, status: int, payload: object) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(
                    payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def embeddings_answer(body: dict[str, Any], width: int | None) -> dict[str, Any]:
    texts = body["input"]
    vectors = local_embedding().get_text_embedding_batch(texts)
    if width is not None:
        vectors = [vector[:width] for vector in vectors]
    # Reversed on purpose: clients must order by "index", not by position.
    data = [{"object": "embedding", "index": i, "embedding": vectors[i]}
            for i in reversed(range(len(texts)))]
    return {"object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    running = EmbeddingServer()
    yield running
    running.close()


def client(server: EmbeddingServer, **overrides: Any) -> OpenAICompatibleEmbedding:
    return OpenAICompatibleEmbedding(**{"base_url": server.base_url, "api_key": SERVER_KEY,
                                        "model_name": MODEL, **overrides})


def test_vectors_equal_the_local_models_in_batches_with_the_key_sent(server):
    model = client(server, embed_batch_size=2)
    vectors = model.get_text_embedding_batch(TEXTS)
    assert np.allclose(vectors, local_embedding().get_text_embedding_batch(TEXTS), atol=1e-7)
    assert [len(r["body"]["input"]) for r in server.requests] == [2, 2, 1]
    assert all(r["path"] == "/v1/embeddings" for r in server.requests)
    assert all(r["body"]["model"] == MODEL for r in server.requests)
    assert {r["authorization"] for r in server.requests} == {f"Bearer {SERVER_KEY}"}
    query = model.get_query_embedding("sunlight")
    # The server embeds every input as a document, a query too.
    assert np.allclose(query, local_embedding().get_text_embedding("sunlight"), atol=1e-7)
    assert model.spec.id == f"openai:{MODEL}:384"
    assert len(server.requests) == 4  # the dimension came with the answers: no probe


def test_the_spec_learns_the_dimension_with_one_probe(server):
    model = client(server)
    assert model.spec.dimension == 384 and model.spec.kind == "openai"
    assert model.spec.model == MODEL
    assert len(server.requests) == 1


def test_async_calls_match_the_sync_ones(server):
    model = client(server, embed_batch_size=3)
    vectors = asyncio.run(model.aget_text_embedding_batch(TEXTS))
    assert np.allclose(vectors, model.get_text_embedding_batch(TEXTS), atol=1e-7)
    query = asyncio.run(model.aget_query_embedding("wind"))
    assert np.allclose(query, model.get_query_embedding("wind"), atol=1e-7)


def test_a_wrong_key_names_the_key_setting_without_retrying(server):
    with pytest.raises(ConfigurationError, match="HTTP 401.*embedding_api_key"):
        client(server, api_key="sk-wrong").get_query_embedding("hello")
    with pytest.raises(ConfigurationError, match="embedding_api_key"):
        client(server, api_key=None).get_query_embedding("hello")
    assert len(server.requests) == 2


def test_a_wrong_path_names_the_base_url_setting(server):
    base = server.base_url.removesuffix("/v1")
    with pytest.raises(ConfigurationError, match="HTTP 404.*embedding_base_url"):
        client(server, base_url=base).get_query_embedding("hello")


def test_server_errors_are_retried_then_succeed(server):
    server.script = [500, 503]
    started = time.monotonic()
    vector = client(server).get_query_embedding("hello")
    assert np.allclose(vector, local_embedding().get_text_embedding("hello"), atol=1e-7)
    assert len(server.requests) == 3
    assert time.monotonic() - started < 2.5


def test_persistent_server_errors_end_as_unavailable_after_bounded_retries(server):
    server.script = [502] * 10
    with pytest.raises(StoreUnavailableError, match="HTTP 502.*3 attempts"):
        client(server).get_query_embedding("hello")
    assert len(server.requests) == 3


def test_a_server_that_never_answers_fails_well_inside_difys_five_seconds(server):
    server.script = ["hang"] * 5
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="no answer in time"):
        client(server).get_query_embedding("hello")
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed


def test_nothing_listening_is_unavailable_quickly():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # the port was just free: connecting is refused at once
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="ConnectError"):
        OpenAICompatibleEmbedding(base_url=f"http://127.0.0.1:{port}/v1",
                                  model_name=MODEL).get_query_embedding("x")
    assert time.monotonic() - started < 3.0


def test_an_answer_that_is_not_an_embeddings_response_names_the_base_url(server):
    server.script = ["garbage"]
    with pytest.raises(ConfigurationError, match="not JSON.*embedding_base_url"):
        client(server).get_query_embedding("hello")


def test_a_changed_dimension_is_a_clear_mismatch(server):
    model = client(server)
    model.get_query_embedding("hello")
    server.script = ["narrow"]
    with pytest.raises(EmbeddingMismatchError, match="now returns 3-dimensional"):
        model.get_query_embedding("hello")


def test_settings_choose_one_shared_client_and_check_their_fields(server):
    environ = {"LLAMAINDEX_KB_EMBEDDING_BASE_URL": server.base_url + "/",
               "LLAMAINDEX_KB_EMBEDDING_MODEL_NAME": MODEL,
               "LLAMAINDEX_KB_EMBEDDING_API_KEY": SERVER_KEY}
    first = models_for(load_settings({}, environ=environ)).embed_model
    again = models_for(load_settings({"port": 0}, environ=environ)).embed_model
    assert isinstance(first, OpenAICompatibleEmbedding) and first is again
    assert first.url == server.base_url + "/embeddings"

    with pytest.raises(ConfigurationError, match="setting embedding_model_name"):
        embedding_for(load_settings({"embedding_base_url": server.base_url}, environ={}))
    with pytest.raises(ConfigurationError, match="setting embedding_base_url"):
        embedding_for(load_settings({"embedding_base_url": "localhost:11434",
                                     "embedding_model_name": MODEL}, environ={}))


def test_standalone_retrieval_with_a_knowledge_base_built_through_the_server(
    server, tmp_path: Path
):
    source = tmp_path / "docs"
    source.mkdir()
    for i, text in enumerate(TEXTS):
        (source / f"doc{i}.md").write_text(text, encoding="utf-8")
    data_dir = tmp_path / "data"
    ingest_paths(LocalStore(data_dir), "energy", [source], models=Models(client(server)),
                 mode="vector")

    settings = {"embedding_base_url": server.base_url, "embedding_model_name": MODEL,
                "embedding_api_key": SERVER_KEY}
    with standalone_server(data_dir, **settings) as url:
        server.requests.clear()
        response = httpx.post(
            f"{url}/retrieval", timeout=5.0,
            content=dify_body({"knowledge_id": "energy", "query": "power from moving air",
                               "retrieval_setting": {"top_k": 2, "score_threshold": 0.0}}),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    assert records[0]["metadata"]["file_name"] == "doc1.md"
    assert len(records) == 2
    assert [r["body"]["input"] for r in server.requests][-1] == ["power from moving air"]
