"""The web page at ``/`` (service/api/routes/ui.py, service/api/static/): served, typed,
self-contained.

The browser test (tests/browser/test_page.py) shows the page working; these check what a
TestClient can see: the files, their content types, and that the page loads nothing from
another origin and calls only the public API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.routes.ui import STATIC_DIR
from service.app import create_app
from tests.service.http_helpers import error_of, make_settings


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo))) as test_client:
        yield test_client


def test_index_is_the_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>relu-serve" in response.text
    assert '<script src="/static/app.js" defer></script>' in response.text
    assert '<link rel="stylesheet" href="/static/style.css">' in response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/index.html", "text/html; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
        ("/static/favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_have_their_types(client: TestClient, path: str, content_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == (STATIC_DIR / path.removeprefix("/static/")).read_bytes()
    assert client.head(path).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.js",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fsettings.py",
        "/static/",
    ],
)
def test_only_the_static_files_are_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_page_is_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not any(path.startswith("/static") for path in paths)


def _static_text() -> dict[str, str]:
    return {p.name: p.read_text() for p in STATIC_DIR.iterdir() if p.is_file()}


def test_page_references_only_local_assets() -> None:
    files = _static_text()
    assert set(files) >= {"index.html", "app.js", "style.css"}
    html = files["index.html"]
    for attr in re.findall(r'(?:src|href)="([^"]+)"', html):
        # Same-origin paths and in-page anchors only: nothing from a CDN.
        assert attr.startswith(("/", "#")), attr
        assert not attr.startswith("//"), attr
        if attr.startswith("/static/"):
            assert (STATIC_DIR / attr.removeprefix("/static/")).is_file(), attr
    for name, text in files.items():
        urls = re.findall(r"https?://[^\s\"')]+", text)
        # The SVG namespace is a name, not a fetch.
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "@import" not in text, name


def test_script_calls_only_the_public_v1_api() -> None:
    script = _static_text()["app.js"]
    called = set(re.findall(r"""callApi\(\s*[`"']([^`"'$]+)""", script))
    templates = set(re.findall(r"`(/v1/[^`$]*)", script))
    assert called | templates, "no API call found"
    for path in called | templates:
        assert path.startswith("/v1/models"), path
    # The routes the page relies on exist in the API (and so in the README).
    for fragment in ("/predict?", "/activations`", "/activations/reset`"):
        assert fragment in script, fragment


def test_page_controls_have_labels() -> None:
    html = _static_text()["index.html"]
    labelled = set(re.findall(r'<label[^>]*\sfor="([^"]+)"', html))
    for control in re.findall(r"<(?:input|select)\b[^>]*>", html):
        name = re.search(r'id="([^"]+)"', control)
        assert name, control
        nested = re.search(rf"<label[^>]*>\s*{re.escape(control)}", html)
        assert name.group(1) in labelled or nested, control
    assert 'aria-live="polite"' in html
    assert 'role="alert"' in html
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
