"""The web console of `qwenkit serve`: GET / (chat and status pages), /console/app.js, /console/app.css.

Contract: three static files shipped inside the package (serve/console/), read once, served without a key
(see security.PUBLIC_PATHS: they hold no data; the page asks for the key once, keeps it in sessionStorage
and sends it on every API call) under a strict Content-Security-Policy: scripts and styles only from this
origin, no inline code, fetches only to this origin, no framing. The page inserts model text with
textContent only, never as HTML.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {  # URL path -> (file in serve/console/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/console/app.css": ("app.css", "text/css; charset=utf-8"),
}


@cache
def asset(name: str) -> bytes:
    """One of the console's files, from the installed package."""
    return resources.files("qwenkit.serve").joinpath("console", name).read_bytes()


def install_console(app: FastAPI) -> None:
    """Add the console's routes to `app` (GET only; excluded from the API document)."""
    for path, (name, media_type) in FILES.items():
        app.add_api_route(path, _route(name, media_type), methods=["GET"], include_in_schema=False)


def _route(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    # No parameters: nothing from the request picks the file.
    async def serve() -> Response:
        return Response(asset(name), media_type=media_type, headers=HEADERS)

    return serve
