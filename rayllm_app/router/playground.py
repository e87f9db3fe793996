"""The browser playground: a static page that talks to this server's own OpenAI API.

``mount_playground(app)`` adds ``GET /`` and ``GET /playground`` (the page) and
``GET /playground/static/{file}`` (its script and stylesheet). The files ship as package
data under ``rayllm_app/router/static/playground``: plain HTML, JS and CSS with no build step and
no external requests. The page calls ``/v1/models`` and ``/v1/chat/completions`` relative
to the router's root path, so it also works behind a route prefix.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

STATIC_PREFIX = "/playground/static"
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page only ever loads its own files and calls its own server.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _read(name: str) -> bytes:
    return resources.files("rayllm_app.router").joinpath("static", "playground", name).read_bytes()


def _asset(body: bytes, media_type: str) -> _Asset:
    return _Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')


def _send(request: Request, asset: _Asset) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **_SECURITY_HEADERS}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def mount_playground(app: FastAPI) -> None:
    """Serve the playground page at ``/`` and ``/playground``, and its assets."""
    template = _read("index.html").decode("utf-8")
    assets = {name: _asset(_read(name), media_type) for name, media_type in _ASSETS.items()}
    pages: dict[str, _Asset] = {}

    def page_for(root_path: str) -> _Asset:
        # <base href> makes every URL in the page (assets and API calls) relative to the
        # router's root, so a route prefix such as /llm keeps working.
        if root_path not in pages:
            base = html.escape(root_path.rstrip("/") + "/", quote=True)
            pages[root_path] = _asset(template.replace("{{base_href}}", base).encode("utf-8"),
                                      "text/html; charset=utf-8")
        return pages[root_path]

    async def playground_page(request: Request) -> Response:
        return _send(request, page_for(str(request.scope.get("root_path", ""))))

    async def playground_asset(request: Request, name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise HTTPException(status_code=404, detail=f"The playground has no file named '{name}'.")
        return _send(request, asset)

    for path in ("/", "/playground"):
        app.add_api_route(path, playground_page, methods=["GET", "HEAD"], include_in_schema=False,
                          response_class=Response)
    app.add_api_route(STATIC_PREFIX + "/{name}", playground_asset, methods=["GET", "HEAD"],
                      include_in_schema=False, response_class=Response)
