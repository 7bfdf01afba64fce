"""/docs and /redoc (service/api/routes/docs.py): local assets from the pinned package, and a
Content-Security-Policy that names no other origin.

tests/browser/test_docs.py shows both pages rendering under that policy in Chromium; these
check what a TestClient can see.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.routes.docs import ASSET_DIR, ASSET_PREFIX, ASSETS, script_hashes
from service.app import create_app
from tests.service.http_helpers import error_of, make_settings

PAGES = ("/docs", "/redoc")
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}


@pytest.fixture(scope="module")
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo))) as test_client:
        yield test_client


def policy_of(response: httpx.Response) -> dict[str, list[str]]:
    """The response's CSP as {directive: [sources]}."""
    policy: dict[str, list[str]] = {}
    for part in response.headers["content-security-policy"].split(";"):
        name, *sources = part.split()
        assert name not in policy, name
        policy[name] = sources
    return policy


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_nothing_from_another_origin(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    html = response.text
    assert "<title>relu-serve - " in html
    assert re.findall(r"https?://", html) == []  # no CDN, no font host
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references
    for url in references:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        assert client.get(url).status_code == 200, url
    assert client.head(page).status_code == 200


@pytest.mark.parametrize("page", PAGES)
def test_page_has_a_strict_policy(client: TestClient, page: str) -> None:
    response = client.get(page)
    policy = policy_of(response)
    assert policy["default-src"] == ["'self'"]
    for directive, sources in policy.items():
        for source in sources:
            # Only this origin, the page's own inline script by hash, and ReDoc's needs.
            assert source in {"'self'", "'none'", "data:", "blob:", "'unsafe-inline'"} or (
                directive == "script-src" and source.startswith("'sha256-")
            ), (directive, source)
    assert policy["script-src"] == ["'self'", *script_hashes(response.text)]
    assert policy["object-src"] == policy["base-uri"] == policy["frame-ancestors"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_swagger_ui_runs_its_one_inline_script_by_hash(client: TestClient) -> None:
    response = client.get("/docs")
    scripts = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    assert len(scripts) == 1
    assert "SwaggerUIBundle(" in scripts[0]
    assert '"validatorUrl": null' in scripts[0]  # no badge from validator.swagger.io
    hashes = script_hashes(response.text)
    assert len(hashes) == 1
    assert policy_of(response)["script-src"] == ["'self'", hashes[0]]
    assert policy_of(response)["style-src"] == ["'self'"]


def test_redoc_policy_allows_what_redoc_needs_and_no_inline_script(client: TestClient) -> None:
    policy = policy_of(client.get("/redoc"))
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]  # styled-components
    assert policy["worker-src"] == ["blob:"]  # the search index


@pytest.mark.parametrize(("name", "content_type"), ASSET_TYPES.items())
def test_assets_come_from_the_package(client: TestClient, name: str, content_type: str) -> None:
    assert set(ASSET_TYPES) == set(ASSETS)
    response = client.get(f"{ASSET_PREFIX}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "immutable" in response.headers["cache-control"]  # the version is in the path
    assert response.content == (ASSET_DIR / name).read_bytes()
    assert client.head(f"{ASSET_PREFIX}/{name}").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        f"{ASSET_PREFIX}/favicon.png",  # in the package, but not served
        f"{ASSET_PREFIX}/..%2f__init__.py",
        f"{ASSET_PREFIX}/missing.js",
        "/docs/assets/0.0.1/swagger-ui.css",  # another version
        "/docs/oauth2-redirect",  # no OAuth2 flow: a bearer key only
    ],
)
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_pages_are_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(path.startswith(("/docs", "/redoc")) for path in paths)


def test_behind_a_path_prefix_the_urls_carry_it(model_repo: Path) -> None:
    app = create_app(make_settings(model_repo))
    with TestClient(app, root_path="/relu") as client:
        html = client.get("/docs").text
    assert "url: '/relu/openapi.json'" in html
    assert f'src="/relu{ASSET_PREFIX}/swagger-ui-bundle.js"' in html
