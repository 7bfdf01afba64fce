"""The web page at ``/`` in headless Chromium against a real server with the default model.

One browser and one server for the module; the tests run in file order and each loads the
page afresh. Screenshots (desktop, 375 px wide, monitor) go to ``$BROWSER_SCREENSHOTS`` or a
pytest tmp dir, whose path the tests print (``pytest -s``) for a person to look at.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import MANAGEMENT_KEY, MONITOR_MIN_SAMPLES

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.network]
WAIT_S = 10


def wait_for(browser: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = WAIT_S):
    """Poll ``condition`` until it is truthy; returns its value."""
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)


def text_of(browser: WebDriver, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def open_page(browser: WebDriver, server_url: str) -> None:
    """Load ``/`` and wait until the model list and the default model's metadata are in."""
    browser.get(f"{server_url}/")
    wait_for(browser, lambda d: text_of(d, "model-info"))


def script_errors(browser: WebDriver) -> list[dict]:
    """Console entries from scripts or the Content-Security-Policy since the last call.
    Failed requests ('network') are left out: some tests make the API answer 4xx."""
    return [
        entry
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


def screenshot(browser: WebDriver, path: Path, width: int) -> Path:
    """A full-page screenshot at ``width`` CSS pixels (a device-metrics override, so the
    layout really is that wide); the override is cleared afterwards."""

    def emulate(height: int) -> None:
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    emulate(900)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    emulate(min(int(height), 8000))
    browser.save_screenshot(str(path))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"screenshot: {path}")  # noqa: T201 (where to look, with pytest -s)
    return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PNG of a handwritten-looking "1": dark ink on white paper, as a phone photo of
    a digit would be; the service inverts it to the digits model's dark background."""
    image = Image.new("L", (96, 96), 255)
    draw = ImageDraw.Draw(image)
    draw.line([(40, 22), (50, 12), (50, 84)], fill=0, width=10, joint="curve")
    path = tmp_path_factory.mktemp("images") / "one.png"
    image.save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def model_layers(server_url: str) -> list[dict]:
    """The default model's activation layers, as its metadata reports them."""
    info = httpx.get(f"{server_url}/v1/models/digits", timeout=10).json()
    assert info["activation_layers"], info
    return info["activation_layers"]


def test_upload_shows_prediction_and_layer_charts(
    browser: WebDriver,
    server_url: str,
    digit_png: Path,
    model_layers: list[dict],
    screenshot_dir: Path,
) -> None:
    open_page(browser, server_url)
    assert browser.find_element(By.ID, "model-select").get_attribute("value") == "digits"
    assert "5 activation layers" in text_of(browser, "model-info")

    browser.find_element(By.ID, "file-input").send_keys(str(digit_png))

    rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#topk li"))
    assert len(rows) == 5  # the default top_k
    assert rows[0].find_element(By.CLASS_NAME, "bar-label").text == "1"
    assert text_of(browser, "status").startswith("one.png: 1 (")
    # One summary bar and one card per activation layer, in the metadata's order.
    summary = browser.find_elements(By.CSS_SELECTOR, "#layer-summary .layer-row")
    cards = browser.find_elements(By.CSS_SELECTOR, "#layers .layer-card")
    names = [layer["name"] for layer in model_layers]
    assert [row.find_element(By.CLASS_NAME, "bar-label").text for row in summary] == names
    assert [card.find_element(By.TAG_NAME, "h3").text for card in cards] == names
    for card, layer in zip(cards, model_layers, strict=True):
        bars = card.find_elements(By.CSS_SELECTOR, "svg.channel-strip rect.strip-bar")
        assert len(bars) == layer["channels"]
    assert browser.find_element(By.ID, "file-preview").is_displayed()
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    screenshot(browser, screenshot_dir / "desktop.png", 1280)
    assert script_errors(browser) == []


def test_drawing_on_the_canvas_predicts(
    browser: WebDriver, server_url: str, screenshot_dir: Path
) -> None:
    open_page(browser, server_url)
    canvas = browser.find_element(By.ID, "draw-canvas")
    size = canvas.size["height"]
    # A vertical stroke, as a "1" (offsets are from the canvas's centre), in small steps so
    # the page sees pointermove events all the way down.
    actions = ActionChains(browser, duration=10)
    actions.move_to_element_with_offset(canvas, 0, -int(size * 0.35)).click_and_hold()
    for _ in range(7):
        actions.move_by_offset(0, int(size * 0.1))
    actions.release().perform()

    wait_for(browser, lambda d: text_of(d, "status").startswith("drawing.png: "))
    assert text_of(browser, "status").startswith("drawing.png: 1 (")
    assert "drawing.png" in text_of(browser, "result-meta")
    assert browser.find_elements(By.CSS_SELECTOR, "#layers .layer-card")
    screenshot(browser, screenshot_dir / "drawing.png", 1280)

    browser.find_element(By.ID, "clear-canvas").click()
    assert not browser.find_element(By.ID, "results").is_displayed()
    browser.find_element(By.ID, "predict-canvas").click()
    assert "the canvas is empty" in wait_for(browser, lambda d: text_of(d, "error"))
    assert script_errors(browser) == []


def test_drawing_with_the_keyboard(browser: WebDriver, server_url: str) -> None:
    open_page(browser, server_url)
    canvas = browser.find_element(By.ID, "draw-canvas")
    # Pen to the top, down, a stroke to the bottom, up, Enter to predict.
    canvas.send_keys(*[Keys.ARROW_UP] * 9, Keys.SPACE, *[Keys.ARROW_DOWN] * 18, Keys.SPACE)
    canvas.send_keys(Keys.ENTER)
    wait_for(browser, lambda d: text_of(d, "status").startswith("drawing.png: "))
    assert browser.find_elements(By.CSS_SELECTOR, "#topk li")


def test_api_error_is_shown(browser: WebDriver, server_url: str, tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_bytes(b"hello, this is not an image")
    expected = httpx.post(
        f"{server_url}/v1/models/digits/versions/1/predict",
        files={"file": ("notes.txt", not_an_image.read_bytes(), "text/plain")},
        timeout=10,
    )
    assert expected.status_code == 415
    message = expected.json()["error"]["message"]

    open_page(browser, server_url)
    browser.find_element(By.ID, "file-input").send_keys(str(not_an_image))
    shown = wait_for(browser, lambda d: text_of(d, "error"))
    assert shown == f"Error 415 (unsupported_image_format): {message}"
    assert browser.find_element(By.ID, "error").get_attribute("role") == "alert"
    assert not browser.find_element(By.ID, "results").is_displayed()
    assert script_errors(browser) == []


def test_keyboard_tab_to_predict_and_enter(
    browser: WebDriver, server_url: str, digit_png: Path
) -> None:
    open_page(browser, server_url)
    browser.find_element(By.ID, "file-input").send_keys(str(digit_png))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#topk li")) == 5)
    browser.execute_script("document.activeElement.blur(); window.focus();")

    keyboard = ActionChains(browser)
    visited: list[str] = []
    for _ in range(15):
        keyboard.send_keys(Keys.TAB).perform()
        focused = browser.switch_to.active_element
        visited.append(focused.get_attribute("id") or focused.tag_name)
        if visited[-1] == "topk-input":
            # Type a new top-k on the way: select what is there and replace it.
            keyboard.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL)
            keyboard.send_keys("3").perform()
        if visited[-1] == "predict-file":
            break
    expected = ["model-select", "version-select", "topk-input", "tab-try", "file-input"]
    assert [v for v in visited if v in expected] == expected, visited
    assert visited[-1] == "predict-file", visited
    # The focus is visible: :focus-visible draws an outline after keyboard navigation.
    outline = browser.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"

    keyboard.send_keys(Keys.ENTER).perform()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#topk li")) == 3)
    assert script_errors(browser) == []


def test_narrow_screen(
    browser: WebDriver, server_url: str, digit_png: Path, screenshot_dir: Path
) -> None:
    open_page(browser, server_url)
    browser.find_element(By.ID, "file-input").send_keys(str(digit_png))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#layers .layer-card"))
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 812, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        assert browser.execute_script("return window.innerWidth") == 375
        # Nothing wider than the screen: no sideways scrolling.
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        canvas_width = browser.find_element(By.ID, "draw-canvas").size["width"]
        assert 0 < canvas_width <= 375
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    screenshot(browser, screenshot_dir / "narrow-375.png", 375)


def test_monitor_populates_refreshes_and_resets(
    browser: WebDriver,
    server_url: str,
    digit_png: Path,
    model_layers: list[dict],
    screenshot_dir: Path,
) -> None:
    open_page(browser, server_url)
    # Arrow keys move between the tabs (WAI-ARIA tabs pattern).
    browser.find_element(By.ID, "tab-try").send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("id") == "tab-monitor"
    assert browser.find_element(By.ID, "panel-monitor").is_displayed()
    assert not browser.find_element(By.ID, "panel-try").is_displayed()
    fill = f"of {MONITOR_MIN_SAMPLES} samples"
    wait_for(browser, lambda d: fill in text_of(d, "monitor-fill-text"))

    # Reset takes the management API key: without it, and with a wrong one, the API's 401 and
    # 403 messages stay on screen (the monitor's 3 s refreshes do not clear them).
    reset_url = f"{server_url}/v1/models/digits/activations/reset"
    missing = httpx.post(reset_url, timeout=10).json()["error"]["message"]
    wrong = httpx.post(reset_url, headers={"Authorization": "Bearer nope"}, timeout=10)
    key_field = browser.find_element(By.ID, "admin-key")
    assert key_field.get_attribute("type") == "password"
    browser.find_element(By.ID, "monitor-reset").send_keys(Keys.SPACE)  # from the keyboard
    shown = wait_for(browser, lambda d: text_of(d, "reset-error"))
    assert shown == f"Error 401 (unauthorized): {missing}. Type the management API key above."
    assert browser.switch_to.active_element == key_field
    assert key_field.get_attribute("aria-invalid") == "true"
    key_field.send_keys("not-the-key")
    browser.find_element(By.ID, "monitor-reset").click()
    wait_for(browser, lambda d: text_of(d, "reset-error").startswith("Error 403"))
    assert text_of(browser, "reset-error") == (
        f"Error 403 (invalid_api_key): {wrong.json()['error']['message']}. "
        "Check the management API key and try again."
    )
    key_field.clear()
    # A refresh of the monitor (as every 3 s) leaves the refusal on screen.
    browser.execute_script("document.getElementById('monitor-updated').textContent = ''")
    browser.find_element(By.ID, "monitor-refresh").click()
    wait_for(browser, lambda d: text_of(d, "monitor-updated"))
    assert text_of(browser, "reset-error").startswith("Error 403")
    assert "reset at" not in text_of(browser, "monitor-status")

    # The right key, then Enter in the field (the form's submit), and the window is empty.
    key_field.send_keys(MANAGEMENT_KEY, Keys.ENTER)
    wait_for(browser, lambda d: text_of(d, "monitor-fill-text").startswith("0 of"))
    assert "Window of digits reset at" in text_of(browser, "monitor-status")
    assert not browser.find_element(By.ID, "reset-error").is_displayed()
    assert key_field.get_attribute("aria-invalid") is None
    # The key lives in the field only: nothing in the page's storage or cookies.
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie]"
    )
    assert stored == [0, 0, ""]
    rows = browser.find_elements(By.CSS_SELECTOR, "#monitor-table tbody tr")
    assert len(rows) == len(model_layers)

    # Live traffic that asks for statistics fills the window; the page refreshes itself.
    image = digit_png.read_bytes()
    for i in range(MONITOR_MIN_SAMPLES):
        response = httpx.post(
            f"{server_url}/v1/models/digits/predict",
            params={"stats": "summary"},
            files={"file": (f"{i}.png", image, "image/png")},
            timeout=10,
        )
        assert response.status_code == 200, response.text
    full = f"{MONITOR_MIN_SAMPLES} of {MONITOR_MIN_SAMPLES} samples (100%), full"
    wait_for(browser, lambda d: text_of(d, "monitor-fill-text").startswith(full))
    assert "threshold 0.10" in text_of(browser, "monitor-drift")
    rows = browser.find_elements(By.CSS_SELECTOR, "#monitor-table tbody tr")
    names = [row.find_element(By.TAG_NAME, "th").text for row in rows]
    assert names == [layer["name"] for layer in model_layers]
    for row in rows:
        # Once the window is full, dead units are counted, not "window filling".
        dead = row.find_element(By.CSS_SELECTOR, '[data-label="Dead units"]').text
        assert re.fullmatch(r"\d+( \(.*\))?", dead), dead
    bars = browser.find_elements(By.CSS_SELECTOR, "#monitor-chart .monitor-row")
    assert len(bars) == len(model_layers)
    screenshot(browser, screenshot_dir / "monitor.png", 1280)
    screenshot(browser, screenshot_dir / "monitor-375.png", 375)
    assert script_errors(browser) == []


def test_page_without_a_server_shows_the_network_error(browser: WebDriver, server_url: str) -> None:
    open_page(browser, server_url)
    # The page handles a failed fetch too (service gone, proxy down): simulate it in-page.
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('offline'));")
    browser.find_element(By.ID, "tab-monitor").click()
    shown = wait_for(browser, lambda d: text_of(d, "monitor-error"))
    assert shown == "Error: could not reach the service (offline)"
