"""A real uvicorn server with the shipped model repository, and headless Chromium driven by
Selenium through the system's chromedriver.

Chromium comes from Debian's packages (``apt-get install chromium chromium-driver``, which
``./scripts/test`` runs as root when they are missing), never from a download by a test tool:
the driver path is given to Selenium, so Selenium Manager is never asked for one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_helpers import uvicorn_server

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_ROOT = REPO_ROOT / "models"
# Small, so a few requests fill it and the page shows dead units, not "window filling".
MONITOR_MIN_SAMPLES = 4
# The management API key: the monitor's reset needs it, and the tests type it into the page.
MANAGEMENT_KEY = "browser-test-management-key-0123"
# Without the background-networking flags Chromium reaches for Google's servers at start-up,
# and on a closed network its connections, ours included, are refused.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # A closed network: no host name resolves but the server's, so anything a page tried to
    # fetch from elsewhere (a CDN) would fail here as it would there.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
INSTALL_HINT = (
    "install Debian's chromium and chromium-driver (./scripts/test does, as root), "
    "or set CHROMIUM and CHROMEDRIVER, or deselect these tests with -m 'not browser'"
)


def _find(env: str, *names: str) -> str:
    """The executable named by ``$env``, else the first of ``names`` on PATH; fails the test
    (slow tests are marked, not skipped) with how to install it."""
    found = os.environ.get(env) or next(filter(None, map(shutil.which, names)), None)
    if not found:
        pytest.fail(f"{' or '.join(names)} not found: {INSTALL_HINT}")
    return found


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a uvicorn subprocess serving ``models/``, with the
    management API (and so the monitor's reset) on."""
    env = {
        "RELU_SERVE_MONITOR_MIN_SAMPLES": str(MONITOR_MIN_SAMPLES),
        "RELU_SERVE_MANAGEMENT_API_KEY": MANAGEMENT_KEY,
    }
    with uvicorn_server(MODEL_ROOT, env=env) as (url, _process):
        yield url


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$BROWSER_SCREENSHOTS`` if set (kept for a person to look at), else a pytest tmp dir."""
    configured = os.environ.get("BROWSER_SCREENSHOTS")
    path = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium (1280x900) under Selenium, with a fresh profile; its console log
    is kept so tests can assert the page raised no script or CSP errors."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: Selenium Manager must never try to download a browser or driver.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = _find("CHROMIUM", "chromium", "chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(_find("CHROMEDRIVER", "chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
