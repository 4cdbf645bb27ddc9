"""`serve` as a user runs it: a separate process on a free port, driven over real sockets.

A whole test run is gevent-patched (the SDK's test modules import dify_plugin); these servers run
in their own unpatched interpreters, as `python -m llamaindex_kb serve` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import PLUGIN_ROOT

KEY = "srv-test-key-9d41e7"
AUTH = {"Authorization": f"Bearer {KEY}"}
RETRIEVAL = json.dumps({"knowledge_id": "demo", "query": "hybrid search",
                        "retrieval_setting": {"top_k": 3, "score_threshold": 0.0}}).encode()


class ServeProcess:
    """``python -m llamaindex_kb serve ...``; its stdout and stderr kept in files."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.out, self.err = tmp / "stdout.txt", tmp / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAINDEX_KB_")}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llamaindex_kb", "serve", "--api-key", KEY,
                 "--port", "0", *flags],
                cwd=PLUGIN_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.url = self._wait_for_url()
        parts = urlsplit(self.url)
        self.address = (parts.hostname or "", parts.port or 0)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            found = re.search(r"External Knowledge API: (\S+)", self.out.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"serve did not start in time: {self.log()}")

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def access_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "llamaindex_kb.access" in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@contextlib.contextmanager
def serving(tmp: Path, *flags: str) -> Iterator[ServeProcess]:
    server = ServeProcess(tmp, *flags)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServeProcess]:
    """Short timeouts and two threads, so a handful of slow clients would show."""
    with serving(tmp_path_factory.mktemp("serve"), "--demo", "--data-dir", str(demo_data_dir),
                 "--threads", "2", "--idle-timeout", "1", "--request-timeout", "2") as proc:
        yield proc


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def closed_by_server_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it did not."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def refuses_connections_within(address: tuple[str, int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=1).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def test_health_and_ready_answer_without_a_key_and_reveal_nothing(server):
    for path in ("/health", "/ready"):
        reply = httpx.get(server.url + path, timeout=5)
        assert (reply.status_code, reply.json()) == (200, {"status": "ok"})
        assert reply.content == b'{"status": "ok"}'
        assert "server" not in reply.headers  # would name the software
    reply = httpx.post(server.url + "/health", timeout=5)
    assert (reply.status_code, reply.json()["error_code"]) == (405, 2004)


def test_ready_is_503_when_the_store_does_not_answer_and_names_no_url(tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens here once this closes
    store = f"postgresql://kb:pw-sentinel-51c3@127.0.0.1:{port}/kb"
    with serving(tmp_path, "--store", store) as proc:
        assert httpx.get(proc.url + "/health", timeout=5).status_code == 200
        reply = httpx.get(proc.url + "/ready", timeout=15)
        assert (reply.status_code, reply.json()["error_code"]) == (503, 5003)
        assert reply.json()["error_msg"] == "not ready: the knowledge store does not answer"
        # The answer stands for a moment: a flood of probes is not a flood of store queries.
        started = time.monotonic()
        for _ in range(20):
            assert httpx.get(proc.url + "/ready", timeout=5).status_code == 503
        windows = 1 + int((time.monotonic() - started) / 2.0)  # READY_TTL
        assert proc.log().count("not ready: the store does not answer") <= windows + 1
        assert "pw-sentinel-51c3" not in proc.log()


def test_idle_connections_are_closed_after_the_idle_timeout(server):
    silent = [socket.create_connection(server.address) for _ in range(20)]
    kept_alive = socket.create_connection(server.address)
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
        for sock in [*silent, kept_alive]:
            closed_after = closed_by_server_within(sock, 4.0)
            assert closed_after is not None, "an idle connection was kept past the timeout"
    finally:
        for sock in [*silent, kept_alive]:
            sock.close()


def test_slow_drip_clients_are_dropped_and_do_not_block_other_requests(server):
    """More drip clients than threads, headers or body a byte at a time, never idle."""
    header_drips = [socket.create_connection(server.address) for _ in range(10)]
    body_drips = [socket.create_connection(server.address) for _ in range(10)]
    for sock in body_drips:
        sock.sendall(b"POST /retrieval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n")
    request = b"POST /retrieval HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 500
    dropped: dict[int, float] = {}
    stop = threading.Event()

    def drip() -> None:
        started = time.monotonic()
        for i in range(60):
            for n, sock in enumerate(header_drips + body_drips):
                if n in dropped:
                    continue
                try:
                    sock.sendall(request[i:i + 1] if n < 10 else b" ")
                except OSError:
                    dropped[n] = time.monotonic() - started
            if stop.wait(0.2):
                return

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        with httpx.Client(timeout=5) as client:
            for _ in range(5):
                reply = client.post(server.url + "/retrieval", content=RETRIEVAL, headers=AUTH)
                assert reply.status_code == 200 and reply.json()["records"]
                assert reply.elapsed.total_seconds() < 1.5
        closed = [closed_by_server_within(sock, 6.0) for sock in header_drips + body_drips]
        assert all(after is not None for after in closed), "a slow client was never dropped"
    finally:
        stop.set()
        dripper.join()
        for sock in header_drips + body_drips:
            sock.close()


def test_chunked_bodies_are_read_or_refused_with_json(server):
    def chunked(body: bytes) -> bytes:
        pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100])
                          for i in range(0, len(body), 100))
        return (b"POST /retrieval HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode() + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + pieces + b"0\r\n\r\n")

    status, body = status_and_json(raw_exchange(server.address, chunked(RETRIEVAL)))
    assert status == 200 and body["records"]
    status, body = status_and_json(raw_exchange(server.address, chunked(b" " * 2_000_000)))
    assert (status, body["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_BODY_BYTES" in body["error_msg"]
    broken = chunked(RETRIEVAL).replace(b"64\r\n", b"zz\r\n", 1)
    status, body = status_and_json(raw_exchange(server.address, broken))
    assert (status, body["error_code"]) == (400, 3001)
    assert body["error_msg"] == "malformed HTTP request: Invalid chunk size"


def test_a_body_over_the_server_cap_is_refused_at_once_without_reading_it(server):
    started = time.monotonic()
    answer = raw_exchange(server.address, b"POST /documents HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 500000000\r\n\r\n")
    status, body = status_and_json(answer)
    assert (status, body["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_UPLOAD_BYTES" in body["error_msg"]
    assert time.monotonic() - started < 1.0


def test_a_retrieval_declaring_more_than_its_limit_is_refused_before_the_body_arrives(server):
    started = time.monotonic()
    # 2 MB declared, one byte sent, and the client waits: the answer must not wait for it.
    answer = raw_exchange(server.address, b"POST /retrieval HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{")
    status, body = status_and_json(answer)
    assert (status, body["error_code"]) == (413, 3006)
    assert "2,000,000 bytes" in body["error_msg"]
    assert "LLAMAINDEX_KB_MAX_BODY_BYTES" in body["error_msg"]
    assert time.monotonic() - started < 1.0


def test_access_log_has_one_line_per_request_and_never_the_key_or_query(server):
    before = len(server.access_lines())
    with httpx.Client(timeout=5) as client:
        assert client.post(server.url + "/retrieval?token=query-sentinel", content=RETRIEVAL,
                           headers=AUTH).status_code == 200
        assert client.get(server.url + "/knowledge-bases", headers=AUTH).status_code == 200
        assert client.get(server.url + "/knowledge-bases",
                          headers={"Authorization": "Bearer wrong-sentinel"}).status_code == 403
    # A header line waitress cannot parse, carrying the key: refused, and echoed nowhere.
    answer = raw_exchange(server.address, b"GET /knowledge-bases HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization : Bearer " + KEY.encode() + b"\r\n\r\n")
    assert status_and_json(answer)[1]["error_code"] == 3001
    assert KEY.encode() not in answer
    time.sleep(0.2)  # the last line is written after the answer is sent
    lines = server.access_lines()[before:]
    assert len(lines) == 4, lines
    assert re.search(r"POST /retrieval 200 \d+\.\d ms$", lines[0])
    assert re.search(r"GET /knowledge-bases 403 \d+\.\d ms$", lines[2])
    log = server.log()
    for secret in (KEY, "wrong-sentinel", "query-sentinel"):
        assert secret not in log


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tmp_path):
    text = " ".join(f"Sentence {i} is about topic {i % 37} and detail {i * 7 % 101}."
                    for i in range(400))
    with serving(tmp_path, "--data-dir", str(tmp_path / "data"),
                 "--shutdown-timeout", "30") as proc:
        answer: dict[str, httpx.Response] = {}

        def upload() -> None:
            answer["reply"] = httpx.post(
                proc.url + "/documents", headers=AUTH, timeout=30,
                json={"knowledge_id": "notes", "title": "Notes", "text": text})

        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(0.5)  # the body is sent and the upload is embedding
        proc.proc.send_signal(signal.SIGTERM)
        assert refuses_connections_within(proc.address, 2.0), proc.log()
        assert uploader.is_alive(), "the upload ended before the server stopped accepting"
        uploader.join()
        assert answer["reply"].status_code == 201, answer["reply"].text
        assert proc.proc.wait(timeout=30) == 0
        assert re.search(r"POST /documents 201 \d+\.\d ms", proc.log())
