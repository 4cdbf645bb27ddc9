"""Shared fixtures: an isolated environment, a built demo knowledge base, and two
transports that deliver exactly what Dify sends: raw HTTP bytes through the Dify
plugin SDK's own executor, and real HTTP to the standalone server."""

from __future__ import annotations

# Like main.py in the plugin process, import the SDK first: it gevent-monkey-patches
# threading and sockets at import time, which must happen before anything else runs.
import dify_plugin  # noqa: F401  isort: skip

import binascii
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PLUGIN_ROOT))

API_KEY = "test-key-5f2c"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LLAMAINDEX_KB_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the demo knowledge base, built once per test run."""
    from llamaindex_kb.service import ensure_demo, local_embedding

    data_dir = tmp_path_factory.mktemp("demo-data")
    ensure_demo(data_dir, local_embedding())
    return data_dir


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def dify_body(payload: dict[str, Any]) -> bytes:
    """What Dify's httpx client puts on the wire: json.dumps, so CJK arrives as \\uXXXX."""
    return json.dumps(payload).encode()


def go_raw_request(path: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    """The daemon's re-serialisation (Go's Request.Write): Host, User-Agent, Content-Length,
    then the remaining headers in canonical form, sorted, plus Dify-Hook-Id."""
    merged = {"Dify-Hook-Id": "hook-test", **headers}
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: localhost:5002",
        "User-Agent: Go-http-client/1.1",
        f"Content-Length: {len(body or b'')}",
    ]
    lines += [f"{name}: {value}" for name, value in sorted(merged.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class PluginTransport:
    """Raw request bytes → ``PluginExecutor.invoke_endpoint``, as the daemon delivers them."""

    name = "plugin"

    def __init__(self, settings: dict[str, Any]) -> None:
        from dify_plugin.config.config import DifyPluginEnv
        from dify_plugin.core.plugin_executor import PluginExecutor
        from dify_plugin.core.plugin_registration import PluginRegistration

        cwd = os.getcwd()
        os.chdir(PLUGIN_ROOT)  # the SDK reads ./manifest.yaml and scans ./_assets
        try:
            config = DifyPluginEnv()
            self.executor = PluginExecutor(config, PluginRegistration(config))
        finally:
            os.chdir(cwd)
        self.settings = settings

    def post(self, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        from dify_plugin.core.entities.plugin.request import EndpointInvokeRequest
        from dify_plugin.core.runtime import Session

        raw = go_raw_request(path, body, headers)
        request = EndpointInvokeRequest(
            settings=self.settings, raw_http_request=binascii.hexlify(raw).decode()
        )
        chunks = list(self.executor.invoke_endpoint(Session.empty_session(), request))
        head = chunks[0]
        payload = b"".join(binascii.unhexlify(c["result"]) for c in chunks if "result" in c)
        return Reply(int(head["status"]), payload, dict(head["headers"]))


class ServerTransport:
    """Real HTTP to the standalone server, with Dify's 5 s timeouts."""

    name = "server"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.client = httpx.Client(timeout=httpx.Timeout(5.0))

    def post(self, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        # Dify concatenates strings, f"{endpoint}/retrieval", so do the same.
        response = self.client.post(self.base_url + path, content=body, headers=headers)
        return Reply(response.status_code, response.content, dict(response.headers))


@pytest.fixture(scope="session")
def running_server(demo_data_dir: Path) -> Iterator[str]:
    from llamaindex_kb import load_settings
    from llamaindex_kb.server import create_server

    settings = load_settings(
        {"api_key": API_KEY, "data_dir": demo_data_dir, "demo": True, "port": 0}, environ={}
    )
    server = create_server(settings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session", params=["plugin", "server"])
def transport(
    request: pytest.FixtureRequest, demo_data_dir: Path
) -> PluginTransport | ServerTransport:
    if request.param == "plugin":
        return PluginTransport({"api_key": API_KEY, "data_dir": str(demo_data_dir), "demo": True})
    return ServerTransport(request.getfixturevalue("running_server"))
