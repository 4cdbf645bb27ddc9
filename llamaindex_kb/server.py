"""The standalone server: the same ``KnowledgeAPI`` as the plugin, on waitress.

waitress was chosen by measurement (README, "Standalone server"): it receives each
request, body included, in its event loop before a worker thread sees it, so idle
and slow clients hold a socket, never one of the ``threads``; gunicorn's gthread
worker and granian hold a thread for them. On top of waitress this module adds:

* a deadline for receiving each request, since waitress only closes connections that
  go silent and a client sending a byte a second never does;
* the JSON error body for what waitress refuses itself (a body over the server's
  cap, malformed framing), so every answer has ``error_code`` and ``error_msg``;
* ``GET /health`` and ``GET /ready``, unauthenticated, in front of the API;
* one access-log line per request, and a graceful stop on SIGTERM and SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, Task, WSGITask
from waitress.utilities import (
    BadRequest,
    RequestEntityTooLarge,
    RequestHeaderFieldsTooLarge,
    ServerNotImplemented,
)
from werkzeug import Request, Response

from llamaindex_kb.config import Settings
from llamaindex_kb.errors import (
    InvalidFieldError,
    KBError,
    MalformedBodyError,
    MethodNotAllowed,
    PayloadTooLargeError,
    StoreUnavailableError,
)
from llamaindex_kb.http.app import KnowledgeAPI, json_response, route_path
from llamaindex_kb.limits import MiB, over_limit
from llamaindex_kb.service import api_for, library_for

log = logging.getLogger(__name__)
access_log = logging.getLogger("llamaindex_kb.access")

# A body arriving at least this fast never meets the request deadline.
MIN_BODY_RATE = 64 * 1024  # bytes a second
MAX_HEADER_BYTES = 64 * 1024
_PROBES = ("/health", "/ready")
READY_TTL = 2.0  # seconds an answer of the store stands for /ready


def body_cap(settings: Settings) -> int:
    """The most the server reads of one body.

    Above what any route accepts (an upload of ``upload_bytes`` plus its form fields),
    so a body just over a route's limit gets that route's own 413; only far larger
    ones meet this cap, refused from their ``Content-Length`` before they are read.
    """
    limits = settings.limits
    return max(limits.upload_bytes, limits.body_bytes) + 2 * MiB


def wsgi_app(settings: Settings) -> Any:
    """A WSGI application answering the probes and every route of the API."""

    readiness = Readiness(settings)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        path = route_path(request.path)
        try:
            if path in _PROBES:
                response = probe(readiness, request.method, path)
            else:
                response = api_for(settings).handle(request)
        except Exception as exc:  # api_for itself failed: the API's handler never ran
            log.exception("unexpected failure on %s %s", request.method, _printable(path))
            response = KnowledgeAPI.error_response(exc)
        return response(environ, start_response)

    return app


class Readiness:
    """Whether the store answers, asked at most once per ``READY_TTL`` seconds.

    ``/ready`` needs no key, so a flood of probes must not become a flood of store
    queries: while one probe asks the store (seconds, when it is down), the others get
    the last answer instead of a thread each.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._ready = False

    def ready(self) -> bool:
        fresh = (self._checked_at is not None
                 and time.monotonic() - self._checked_at < READY_TTL)
        # The very first probe waits for its answer; later ones never queue behind one.
        if fresh or not self._lock.acquire(blocking=self._checked_at is None):
            return self._ready
        try:
            self._ready = self._store_answers()
            self._checked_at = time.monotonic()
        finally:
            self._lock.release()
        return self._ready

    def _store_answers(self) -> bool:
        try:
            library_for(self.settings).store.manifests()
        except Exception as exc:
            # KBError messages are written to be shown; anything else may hold a URL.
            reason = exc.message if isinstance(exc, KBError) else type(exc).__name__
            log.warning("not ready: the store does not answer (%s)", reason)
            return False
        return True


def probe(readiness: Readiness, method: str, path: str) -> Response:
    """``/health``: the process answers. ``/ready``: the store answers too.

    The library and the embedding model are loaded before the server accepts a
    connection, so only the store can make a running server unready. Neither
    answer names a version, path or URL.
    """
    if method not in ("GET", "HEAD"):
        return KnowledgeAPI.error_response(
            MethodNotAllowed(f"{method} is not allowed on {path}; use GET"))
    if path == "/ready" and not readiness.ready():
        return KnowledgeAPI.error_response(
            StoreUnavailableError("not ready: the knowledge store does not answer"))
    return json_response({"status": "ok"})


class _TimedParser(HTTPRequestParser):
    """One request being received, and when its first byte arrived."""

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        self.started = time.monotonic()
        self.refusal: KBError | None = None

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        # POST /retrieval takes far less than the server's cap: refuse a longer declared
        # body now, rather than read it (or wait for a client that never sends it).
        if route_path(self.path) != "/retrieval":
            return
        if self.content_length > self.adj.retrieval_body_bytes:
            self._refuse(self.content_length)

    def _refuse(self, declared: int | None) -> None:
        limit = self.adj.retrieval_body_bytes
        self.refusal = over_limit("the request body", declared, "body_bytes", limit)
        self.error = RequestEntityTooLarge(self.refusal.message)
        self.completed = True


class _AccessLogged(Task):
    def service(self) -> None:
        try:
            super().service()
        finally:
            request = self.request
            started = getattr(request, "started", None)
            elapsed_ms = (time.monotonic() - started) * 1000 if started is not None else 0.0
            # Never headers, query strings or bodies: they carry keys and documents.
            access_log.info(
                "%s %s %s %.1f ms",
                getattr(request, "command", None) or "-",
                _printable(getattr(request, "path", None) or "-"),
                self.status.split(" ", 1)[0] if self.wrote_header else "-",
                elapsed_ms,
            )


def _printable(path: str) -> str:
    """The path as one bounded log line: a client chooses it."""
    text = path.encode("latin-1", "backslashreplace").decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 200 else text[:200] + "…"


class _AppTask(_AccessLogged, WSGITask):
    pass


class _RefusedTask(_AccessLogged, ErrorTask):
    """What waitress refuses before the app runs, answered in the API's JSON."""

    def execute(self) -> None:
        refusal = self.request.error
        response = KnowledgeAPI.error_response(
            _as_kb_error(refusal, self.request, self.channel.server.adj))
        self.status = response.status
        self.response_headers.append(("Content-Type", response.content_type or ""))
        self.set_close_on_finish()
        body = response.get_data()
        self.content_length = len(body)
        self.write(body)


def _as_kb_error(refusal: object, request: HTTPRequestParser, adj: Adjustments) -> Exception:
    if getattr(request, "refusal", None) is not None:
        return request.refusal
    if isinstance(refusal, RequestEntityTooLarge):
        declared = request.content_length or None  # None: a chunked body
        return over_limit("the request body", declared, "upload_bytes",
                          adj.max_request_body_size - 1)
    if isinstance(refusal, RequestHeaderFieldsTooLarge):
        return PayloadTooLargeError(
            f"the request line and headers are over {adj.max_request_header_size:,} bytes")
    if isinstance(refusal, ServerNotImplemented):
        return InvalidFieldError("Transfer-Encoding", "only chunked is supported")
    if isinstance(refusal, BadRequest):
        # waitress quotes the offending line after a '"': it may be an Authorization header.
        reason = str(refusal.body).split('"', 1)[0].strip().rstrip(":")
        return MalformedBodyError(f"malformed HTTP request: {reason}")
    return RuntimeError("waitress refused a request for an unknown reason")


class _Channel(HTTPChannel):
    parser_class = _TimedParser
    task_class = _AppTask
    error_task_class = _RefusedTask


class _Listener(TcpWSGIServer):
    """waitress's server, plus a deadline for receiving each request."""

    channel_class = _Channel
    request_timeout = 60.0

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # closes connections silent for longer than idle_timeout
        clock = time.monotonic()
        slow = 0
        for channel in list(self.active_channels.values()):
            request = channel.request  # received in part; None between requests
            if request is None or channel.will_close:
                continue
            allowed = self.request_timeout + request.body_bytes_received / MIN_BODY_RATE
            if clock - request.started > allowed:
                channel.will_close = True
                slow += 1
        if slow:  # one line a sweep, however many: a flood of slow clients is one event
            log.info("closed %d connections that took over %.0f s to send a request",
                     slow, self.request_timeout)


class Server:
    """The standalone server, bound and ready; ``serve_forever`` runs it.

    ``shutdown`` (from another thread) or SIGTERM/SIGINT (under ``serve``) stop it
    gracefully: no new connections, requests in flight finish within
    ``settings.shutdown_timeout``, then every connection is closed.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        adjustments = Adjustments(
            host=settings.host,
            port=settings.port,
            threads=settings.threads,
            connection_limit=settings.connection_limit,
            channel_timeout=settings.idle_timeout,
            cleanup_interval=1,  # how often both timeouts are checked
            # waitress refuses at size >= max: a body of exactly the cap is read.
            max_request_body_size=body_cap(settings) + 1,
            max_request_header_size=MAX_HEADER_BYTES,
            # Keeps reading while a request runs, so environ["waitress.client_disconnected"]()
            # tells the app when its client has gone.
            channel_request_lookahead=1,
            asyncore_use_poll=True,  # select() fails past file descriptor 1024
            ident="",  # no Server header: it would name the software
            log_socket_errors=False,  # a client resetting its connection is not our error
            expose_tracebacks=False,
        )
        adjustments.retrieval_body_bytes = settings.limits.body_bytes  # read by _TimedParser
        self._map: dict[int, Any] = {}
        self._listener = _Listener(wsgi_app(settings), map=self._map, adj=adjustments)
        self._listener.request_timeout = float(settings.request_timeout)
        self._serving = threading.Event()
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._stopped = threading.Event()
        self._closed = False

    @property
    def server_address(self) -> tuple[str, int]:
        return self._listener.effective_host, self._listener.effective_port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._serving.set()
        loop_timeout = self._listener.adj.asyncore_loop_timeout
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=loop_timeout, map=self._map, use_poll=True, count=1)
            self._drain()
        finally:
            self._stopped.set()

    def request_stop(self) -> None:
        """Begin a graceful stop; a second call stops waiting for requests in flight.

        Safe in a signal handler: the trigger is pulled without taking a lock.
        """
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()
        self._listener.pull_trigger()

    def shutdown(self) -> None:
        """Stop gracefully and wait until ``serve_forever`` has returned."""
        self.request_stop()
        if self._serving.is_set():
            self._stopped.wait(self.settings.shutdown_timeout + 10)

    def server_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        wasyncore.close_all(self._map)

    def _drain(self) -> None:
        # Only the listening socket: the trigger still wakes the loop for finished responses.
        wasyncore.dispatcher.close(self._listener)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while True:
            in_flight = 0
            for channel in list(self._listener.active_channels.values()):
                if channel.requests or channel.total_outbufs_len:
                    in_flight += 1
                else:  # idle, or still sending a request that has not started
                    channel.will_close = True
            if not in_flight or self._hurry.is_set() or time.monotonic() >= deadline:
                break
            wasyncore.loop(timeout=0.05, map=self._map, use_poll=True, count=1)
        if in_flight:
            log.warning("stopping with %d requests unfinished after the shutdown timeout",
                        in_flight)
        self.server_close()


def create_server(settings: Settings) -> Server:
    """Open the library (building the demo), load the model, then bind (port 0: any free)."""
    api_for(settings)
    _allow_open_files(settings.connection_limit + 64)
    return Server(settings)


def _allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files (often 1024) to the hard limit.

    ``wanted`` covers the connections; each open knowledge base also holds a lock and a
    docstore connection per worker thread, which the hard limit leaves room for.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max(wanted, hard):
        target = max(wanted, 65536) if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("only %d open files are allowed: lower connection_limit below %d",
                        target, target - 64)


def serve(settings: Settings) -> None:
    server = create_server(settings)
    # waitress warns on every request that waits for a thread: routine in a burst.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: finishing requests in flight (at most %d s)",
                 signal.Signals(signum).name, settings.shutdown_timeout)
        server.request_stop()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    log.info("External Knowledge API listening on %s/retrieval (%d threads)",
             server.url, settings.threads)
    print(f"External Knowledge API: {server.url}  (paste this URL, without /retrieval)",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
