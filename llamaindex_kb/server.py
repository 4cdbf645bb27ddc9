"""The standalone server: the same ``KnowledgeAPI`` as the plugin, behind a WSGI server."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from werkzeug import Request
from werkzeug.serving import BaseWSGIServer, make_server

from .config import Settings
from .service import api_for

log = logging.getLogger(__name__)


def wsgi_app(settings: Settings) -> Any:
    """A WSGI application answering every route of the External Knowledge API."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        response = api_for(settings).handle(Request(environ))
        return response(environ, start_response)

    return app


def create_server(settings: Settings) -> BaseWSGIServer:
    """Bind (port 0 picks a free port) with one thread per connection."""
    api_for(settings)  # open the library (and build the demo) before accepting requests
    return make_server(settings.host, settings.port, wsgi_app(settings), threaded=True)


def serve(settings: Settings) -> None:
    server = create_server(settings)
    host, port = server.server_address[:2]
    log.info("External Knowledge API listening on http://%s:%s/retrieval", host, port)
    print(f"External Knowledge API: http://{host}:{port}  (paste this URL, without /retrieval)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
