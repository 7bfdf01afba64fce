"""Swagger UI (``/docs``) and ReDoc (``/redoc``) in headless Chromium: they render from the
service's own assets, under their Content-Security-Policy, with nothing fetched from another
origin (the browser resolves no host name but 127.0.0.1: conftest's CHROMIUM_FLAGS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import MANAGEMENT_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.network]
WAIT_S = 20  # ReDoc parses 2 MB of script on a loaded 2-core machine
RESET_OPERATION = "reset_activations_v1_models__name__activations_reset_post"
# ReDoc 2.5.3 always renders its "API docs by Redocly" badge as an <img> from its CDN (no
# option turns it off). The CSP refuses it, so nothing is fetched, and ReDoc hides the badge
# when the image fails; the one violation is expected, and no other.
REDOCLY_BADGE = frozenset({"https://cdn.redoc.ly/redoc/logo-mini.svg"})

# Runs before any script of every page: records the CSP violations the page meets, which a
# console log shows only as text.
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


def wait_for(browser: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = WAIT_S):
    """Poll ``condition`` until it is truthy; returns its value."""
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)


@pytest.fixture
def docs_browser(browser: WebDriver) -> Iterator[WebDriver]:
    """The session's browser with the violation recorder installed, its console log emptied
    before and after."""
    browser.get_log("browser")
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS}
    )
    try:
        yield browser
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )
        browser.get_log("browser")


def check_clean(browser: WebDriver, server_url: str, refused: frozenset[str] = frozenset()) -> None:
    """No CSP violation and no console error but the ``refused`` URLs', and every other
    resource from the server itself."""
    violations = browser.execute_script("return window.__cspViolations")
    assert violations == [f"img-src {url}" for url in sorted(refused)]
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [m for m in errors if not any(url in m for url in refused)] == []
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map((r) => r.name)"
    )
    assert resources, "no resource loaded"
    outside = {url for url in resources if not url.startswith(f"{server_url}/")}
    assert outside <= refused


def test_swagger_ui_renders_every_operation(docs_browser: WebDriver, server_url: str) -> None:
    schema = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    docs_browser.get(f"{server_url}/docs")
    blocks = wait_for(
        docs_browser,
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, ".opblock")) and found,
    )
    assert len(blocks) == operations
    paths = {e.text for e in docs_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/models/{name}/activations/reset" in {p.replace("\u200b", "") for p in paths}
    assert docs_browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith("relu-serve")
    # The "Authorize" box, where the management API key is typed.
    assert docs_browser.find_element(By.CSS_SELECTOR, "button.authorize").is_displayed()
    check_clean(docs_browser, server_url)


def test_swagger_ui_tries_a_call_with_the_key(docs_browser: WebDriver, server_url: str) -> None:
    """Authorize with the key, then "Try it out" on the monitor reset: the call goes out from
    the page (connect-src 'self') with the bearer token and the service answers 200."""
    docs_browser.get(f"{server_url}/docs")
    operation = wait_for(
        docs_browser, lambda d: d.find_element(By.ID, f"operations-activations-{RESET_OPERATION}")
    )
    docs_browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    key_input = wait_for(
        docs_browser, lambda d: d.find_element(By.CSS_SELECTOR, ".auth-container input")
    )
    key_input.send_keys(MANAGEMENT_KEY)
    docs_browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.authorize").click()
    docs_browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper button.btn-done").click()

    operation.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    wait_for(
        docs_browser, lambda d: operation.find_elements(By.CSS_SELECTOR, "button.try-out__btn")
    )
    operation.find_element(By.CSS_SELECTOR, "button.try-out__btn").click()
    operation.find_element(By.CSS_SELECTOR, "input[placeholder='name']").send_keys("digits")
    operation.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = wait_for(
        docs_browser,
        lambda d: operation.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"
        ),
    )
    assert status[0].text.strip() == "200"
    check_clean(docs_browser, server_url)


def test_redoc_renders(docs_browser: WebDriver, server_url: str) -> None:
    docs_browser.get(f"{server_url}/redoc")
    title = wait_for(docs_browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".api-info h1"))
    assert title[0].text.startswith("relu-serve")
    tags = docs_browser.find_elements(By.CSS_SELECTOR, "[role=menu] > li[data-item-id^='tag/']")
    schema = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    used = {tag for path in schema["paths"].values() for op in path.values() for tag in op["tags"]}
    assert {t.get_attribute("aria-label") for t in tags} == used
    # The search box, whose index runs in a Web Worker made from a blob: URL.
    search = docs_browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search...']")
    search.send_keys("reset")
    found = wait_for(
        docs_browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-role='search:results'] li")
    )
    assert found[0].get_attribute("data-item-id").endswith(RESET_OPERATION)
    check_clean(docs_browser, server_url, refused=REDOCLY_BADGE)
