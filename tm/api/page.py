"""``GET /`` and ``/ui``: the status page, one HTML page with its stylesheet and script served
from the same origin (``/ui/status.css``, ``/ui/status.js``; the text is in
:mod:`tm.api.page_assets`).

The page draws itself from the JSON endpoints every few seconds: ``/api/health/detailed``,
``/api/partitions``, ``/api/rates``, ``/api/metrics/json`` (the shared task counts) and, with the
API token, ``/api/dead-letters`` and ``/api/tasks/{id}``. Each of those answers from what the API
process already holds or shares for a few seconds, so ten open pages cost what one does. The
token is typed into the page and kept in the tab's session storage; the HTML says only whether
one is needed. The Content-Security-Policy allows nothing but this origin: no inline script or
style, no other host.
"""

from __future__ import annotations

from aiohttp import web

from tm.api.context import api_of
from tm.api.page_assets import CSS, HTML, JS

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _answer(text: str, content_type: str) -> web.Response:
    response = web.Response(text=text, content_type=content_type, charset="utf-8")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response


async def page(request: web.Request) -> web.Response:
    token_required = api_of(request).settings.http.api_token is not None
    html = HTML.replace("{token_required}", "true" if token_required else "false")
    return _answer(html, "text/html")


async def stylesheet(_request: web.Request) -> web.Response:
    return _answer(CSS, "text/css")


async def script(_request: web.Request) -> web.Response:
    return _answer(JS, "text/javascript")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/status.css", stylesheet)
    app.router.add_get("/ui/status.js", script)
