"""The web page at ``/``: a static client of the public /v1 API (``service/api/static/``).

Explicit routes rather than a ``StaticFiles`` mount: FastAPI's ``include_router`` does not
carry mounts over, and three small files need no directory listing or range requests. The
page fetches nothing from other origins; the Content-Security-Policy makes a browser enforce
that, so an accidental CDN link fails in the browser test instead of in someone's network.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse

from service.core.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Explicit types: the platform's mimetypes table varies (e.g. .js as application/javascript).
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

PAGE_HEADERS = {
    # Same origin only; inline scripts and style attributes refused (styles set from JS via
    # the CSSOM are allowed); blob:/data: for the preview of the image the user chose.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new release's page is seen at once; the three files are small (tens of KiB).
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _static_file(relative: str) -> FileResponse:
    """The file ``relative`` under ``STATIC_DIR`` with its media type; 404 for anything
    outside it, a folder, or a type the page does not use."""
    root = STATIC_DIR.resolve()
    path = (root / relative).resolve()
    media_type = MEDIA_TYPES.get(path.suffix.lower())
    if not path.is_relative_to(root) or not path.is_file() or media_type is None:
        raise NotFoundError(f"no static file {relative!r}", code="not_found")
    return FileResponse(path, media_type=media_type, headers=PAGE_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The page: try a model, see its layers' statistics and the live monitor."""
    return _static_file("index.html")


@router.api_route("/static/{relative:path}", methods=["GET", "HEAD"])
async def static(relative: str) -> FileResponse:
    """The page's scripts and styles."""
    return _static_file(relative)
