"""The web page served by tools/serve.py, driven in a real (headless) Chromium against the real server.

Skipped when Chromium or the `playwright` package is missing, unless LDM_REQUIRE_BROWSER=1 (CI), where
that is a failure. One server (default model) and one browser page are shared by the module's tests.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from live_server import start_server

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GENERATE_TIMEOUT_MS = 60_000

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

_missing = ("the `playwright` package is not installed" if sync_playwright is None
            else None if CHROMIUM else "Chromium is not installed (/usr/bin/chromium or `chromium` on PATH)")
if _missing:
    if os.environ.get("LDM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LDM_REQUIRE_BROWSER=1 but {_missing}", pytrace=False)
    pytest.skip(f"browser test needs a browser: {_missing}", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url():
    """The real server on the embedded default model, started once for the module."""
    with start_server() as server:
        yield server.url.rstrip("/")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's, not a Playwright download), started once for the module."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(browser, server_url):
    """The page, loaded once; records JavaScript errors and any request that leaves the server."""
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.js_errors = []
    page.foreign_requests = []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    page.on("request", lambda req: None if req.url.startswith((server_url + "/", "data:", "blob:"))
            else page.foreign_requests.append(req.url))
    page.goto(server_url + "/")
    expect(page.locator("#sampler option").first).to_be_attached()  # settings loaded from the server
    yield page
    page.close()


@pytest.fixture(autouse=True)
def _clean_page(page):
    """After each test: no JavaScript error was thrown, and nothing was fetched from outside the server
    (the page must work offline: no CDN, no external fonts)."""
    page.js_errors.clear()
    yield
    assert not page.js_errors, f"JavaScript errors on the page: {page.js_errors}"
    assert not page.foreign_requests, f"the page fetched from outside the server: {page.foreign_requests}"


def _fill(page, prompt: str, *, width: str = "32", height: str = "32", steps: str = "8", count: str = "1") -> None:
    page.fill("#prompt", prompt)
    page.fill("#width", width)
    page.fill("#height", height)
    page.fill("#steps", steps)
    page.fill("#batch_size", count)
    page.fill("#seed", "-1")


def _wait_for_images(page, count: int) -> None:
    page.wait_for_function("n => document.querySelectorAll('#gallery img').length >= n", arg=count,
                           timeout=GENERATE_TIMEOUT_MS)


def _newest(page):
    """The newest result card (the gallery shows newest first), once its image has decoded."""
    card = page.locator("#gallery figure").first
    card.locator("img").evaluate("img => img.decode()")
    return card


def test_generate_button_makes_an_image(page, server_url):
    """Proves the page loads its settings from /options and /samplers, and that typing a prompt and pressing
    Generate runs txt2img and shows a decoded 32x32 image (scaled up, pixelated) with its parameters text and seed."""
    assert page.locator("#model").inner_text() not in ("", "…")
    assert page.input_value("#width") == "32" and page.get_attribute("#width", "step") == "16"
    assert page.locator("#sampler option").count() >= 1
    before = page.locator("#gallery img").count()
    _fill(page, "red apple")
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as response:
        page.click("#generate")
    assert response.value.status == 200
    _wait_for_images(page, before + 1)
    card = _newest(page)
    img = card.locator("img")
    assert img.evaluate("img => img.naturalWidth") == 32
    assert img.evaluate("img => img.naturalHeight") == 32
    assert img.evaluate("img => img.getBoundingClientRect().width") >= 192  # small images are shown scaled up
    assert img.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    params = card.locator(".params").inner_text()
    assert params.startswith("red apple") and "Steps: 8" in params and "Size: 32x32" in params
    assert re.search(r"Seed \d+", card.locator(".seed").inner_text())
    assert page.locator("#error").is_hidden()
    expect(page.locator("#generate")).to_be_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "server-page.png"), full_page=True)


def test_ctrl_enter_generates(page):
    """Proves Ctrl+Enter in the prompt box generates without the button, adding one more image on top."""
    before = page.locator("#gallery img").count()
    _fill(page, "grinning face")
    page.press("#prompt", "Control+Enter")
    _wait_for_images(page, before + 1)
    assert page.locator("#gallery img").count() == before + 1
    assert _newest(page).locator(".params").inner_text().startswith("grinning face")


def test_init_image_uses_img2img(page, tmp_path):
    """Proves choosing an init image switches the page to /img2img (with the init image as a data URL and
    the denoising strength), and the result's parameters text carries "Denoising strength"."""
    init = tmp_path / "init.png"
    picture = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(picture).ellipse((4, 4, 27, 27), fill=(220, 20, 40))
    picture.save(init)
    page.set_input_files("#init_image", str(init))
    expect(page.locator("#init_preview")).to_be_visible()  # read as a data URL
    before = page.locator("#gallery img").count()
    _fill(page, "red heart")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/img2img")) as request:
        page.click("#generate")
    body = request.value.post_data_json
    assert body["init_images"][0].startswith("data:image/png;base64,")
    assert 0 < body["denoising_strength"] <= 1
    _wait_for_images(page, before + 1)
    card = _newest(page)
    assert card.locator("img").evaluate("img => img.naturalWidth") == 32
    assert "Denoising strength" in card.locator(".params").inner_text()
    page.click("#init_clear")  # back to txt2img for the tests after this one
    expect(page.locator("#init_preview")).to_be_hidden()


def test_bad_value_shows_the_servers_error(page):
    """Proves a value the server rejects (width 33, not a multiple of the model's size step) shows the
    server's own `detail` message in the #error alert box, and adds no image."""
    before = page.locator("#gallery img").count()
    _fill(page, "red apple", width="33")
    with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/txt2img")) as response:
        page.click("#generate")
    assert 400 <= response.value.status < 500
    detail = response.value.json()["detail"]
    assert isinstance(detail, str) and "width" in detail.lower()
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(detail)
    assert error.get_attribute("role") == "alert"
    expect(page.locator("#generate")).to_be_enabled()
    assert page.locator("#gallery img").count() == before
