"""The app in a real browser: Debian's headless Chromium, driven by Playwright for Python.

Opens the page, types a prompt, clicks Generate, waits for the image, checks it appeared and
saves a screenshot (under `outputs/tests/app/`, or $ATTNEDIT_TEST_OUTPUT). In CI (CI=true) a
missing browser or Playwright fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
OUTPUT = Path(os.environ.get("ATTNEDIT_TEST_OUTPUT", REPO / "outputs" / "tests")) / "app"


def _need(what: str) -> None:
    message = f"{what} (install with: bash .ci/install_app_deps.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _browser_or_fail() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        _need(f"the headless browser {CHROMIUM} is missing")
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        _need(f"{err.name} is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_generates_an_image_in_headless_chromium(tmp_path):
    _browser_or_fail()
    from playwright.sync_api import sync_playwright

    from apps.app import build_app, launch

    demo = build_app(["tiny-sd"])
    url = launch(demo, "127.0.0.1", _free_port(), block=False)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "app.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS, headless=True,
                viewport={"width": 1280, "height": 900},
            )
            try:
                page = browser.new_page()
                page.goto(url, wait_until="domcontentloaded")
                page.locator("#prompt textarea").fill("a green triangle and a red circle")
                steps = page.locator("#generate-steps input[type=number]")
                steps.fill("2")
                steps.press("Enter")
                assert page.locator("#generate-image img").count() == 0  # nothing before the click
                page.locator("#generate-button").click()
                image = page.locator("#generate-image img")
                image.wait_for(state="visible", timeout=90_000)
                page.wait_for_function(
                    "() => { const i = document.querySelector('#generate-image img');"
                    " return i && i.complete && i.naturalWidth === 64 && i.naturalHeight === 64; }",
                    timeout=30_000,
                )
                info = page.locator("#generate-info").inner_text()
                assert "2 steps" in info and "64x64" in info, info
                assert "/gradio_api/file=" in (image.get_attribute("src") or "")
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, tmp_path / "app.png")
