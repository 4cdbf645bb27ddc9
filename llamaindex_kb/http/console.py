"""``GET /console``: the browser console's three files, shipped in the package.

They hold no data, so they are served without a key; everything the page shows comes
from the documented API, called with the key the user signs in with. The
Content-Security-Policy lets the page load only these files and talk only to this
server (no CDN, no inline script, no framing), so it works air-gapped and a value
shown in it cannot run as script.
"""

from __future__ import annotations

from pathlib import Path

from werkzeug import Request, Response

from llamaindex_kb.errors import RouteNotFound

FOLDER = Path(__file__).resolve().parent.parent / "console"
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
          "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def console_file(request: Request, asset: str = "") -> Response:
    """One of the console's files; the page itself at ``/console`` (without a slash:
    its relative links ``console/…`` and the API's paths count from there)."""
    if not asset and request.path.endswith("/"):
        # A relative target keeps the plugin's /e/<id> prefix, which we do not see.
        return Response(status=308, headers={"Location": "../console"})
    if asset not in FILES:
        raise RouteNotFound(f"no console file {asset!r}")
    name, content_type = FILES[asset]
    response = Response((FOLDER / name).read_bytes(), content_type=content_type)
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"  # a plugin upgrade shows at once
    return response
