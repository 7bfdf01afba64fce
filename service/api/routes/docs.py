"""The API's documentation pages: Swagger UI at ``/docs``, ReDoc at ``/redoc``, from local
assets under a Content-Security-Policy.

FastAPI's own pages load both from a public CDN, at a floating major version and with no
integrity check, and without a CSP; on a closed network they do not render, and the Swagger
page is where the management API key is typed. ``create_app`` turns them off
(``docs_url=None, redoc_url=None``) for these, which build the same HTML with FastAPI's
``get_swagger_ui_html`` / ``get_redoc_html`` but point it at files from the pinned
``fastapi-offline`` package (requirements/*.txt; 1.7.7 ships Swagger UI 5.32.6 and ReDoc
2.5.3), found through ``importlib.resources`` as package data.

The CSP names no other origin. The one inline script (Swagger UI's start-up call) is allowed
by its SHA-256, computed from the page as served, so no other inline script can run. ReDoc
needs more, found in headless Chromium (tests/browser/test_docs.py): its search index runs in
a Web Worker made from a ``blob:`` URL, and styled-components writes ``<style>`` elements at
run time, which a hash cannot allow ('unsafe-inline' for styles only; scripts stay strict).
ReDoc also always renders an "API docs by Redocly" badge as an image from cdn.redoc.ly (no
option turns it off): the policy refuses it, so the browser logs that one violation and
fetches nothing, and ReDoc hides the badge when its image fails.

Why ``fastapi-offline`` (MIT; a 0.8 MB wheel, 2.8 MB installed; it needs fastapi alone): it
ships both Swagger UI (Apache-2.0) and ReDoc (MIT) and follows their releases;
``swagger-ui-bundle`` has Swagger UI only and needs Jinja2. Its ``FastAPIOffline`` app factory
is not used: our app is ``ServiceApp``, and the pages need their CSP.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import metadata, resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse

from service.api.routes.ui import MEDIA_TYPES
from service.core.errors import NotFoundError

ASSET_PACKAGE = "fastapi_offline"
ASSET_VERSION = metadata.version("fastapi-offline")
# The version in the path: a new release of the package is a new URL, so the files can be
# cached for good (1.7 MB of Swagger UI, 1.1 MB of ReDoc).
ASSET_PREFIX = f"/docs/assets/{ASSET_VERSION}"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")
FAVICON = "/static/favicon.svg"  # the web page's (service/api/routes/ui.py)

# FastAPI's defaults for Swagger UI, plus: no online validator (with a spec URL that is not
# localhost it shows a badge image from validator.swagger.io), and the key typed into
# "Authorize" kept in the page's memory only, never in localStorage (Swagger UI's default,
# stated here because it matters).
SWAGGER_UI_PARAMETERS = {"validatorUrl": None, "persistAuthorization": False}

COMMON_POLICY = (
    "default-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SWAGGER_POLICY = f"{COMMON_POLICY}; style-src 'self'"
REDOC_POLICY = f"{COMMON_POLICY}; style-src 'self' 'unsafe-inline'; worker-src blob:"
PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSET_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "public, max-age=31536000, immutable",
}
# An inline script: a <script> element without a src attribute, and what it holds.
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def _asset_dir() -> Path:
    """The package's folder of Swagger UI and ReDoc files, as a path on disk."""
    folder = resources.files(ASSET_PACKAGE).joinpath("static")
    if not isinstance(folder, Path) or not folder.is_dir():
        raise RuntimeError(f"{ASSET_PACKAGE} is not installed as files on disk: {folder}")
    return folder


ASSET_DIR = _asset_dir()


def script_hashes(html: str) -> list[str]:
    """CSP sources (``'sha256-...'``) for each inline script of ``html``, as the browser
    hashes it: the exact text between ``<script>`` and ``</script>``, UTF-8."""
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in INLINE_SCRIPT.findall(html)
    ]


def _page(page: HTMLResponse, policy: str) -> HTMLResponse:
    """``page`` with its CSP: ``policy``, and scripts from this origin or by their hash."""
    html = bytes(page.body).decode()
    scripts = " ".join(["'self'", *script_hashes(html)])
    headers = {**PAGE_HEADERS, "Content-Security-Policy": f"{policy}; script-src {scripts}"}
    return HTMLResponse(html, headers=headers)


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI: every operation, with "Try it out" and the "Authorize" box for the key."""
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSET_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSET_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{FAVICON}",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )
    return _page(page, SWAGGER_POLICY)


@router.api_route("/redoc", methods=["GET", "HEAD"])
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc: the same document as one reference page."""
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSET_PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{FAVICON}",
        with_google_fonts=False,
    )
    return _page(page, REDOC_POLICY)


@router.api_route(ASSET_PREFIX + "/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> FileResponse:
    """One of the pages' script and style files; 404 for any other name."""
    if name not in ASSETS:
        raise NotFoundError(f"no documentation asset {name!r}", code="not_found")
    path = ASSET_DIR / name
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=ASSET_HEADERS)
