"""The app in a real browser: Debian's headless Chromium, driven by Playwright for Python.

Opens the page, types a prompt, clicks Generate, waits for the image, checks it appeared and
saves a screenshot (under `outputs/tests/app/`, or $ATTNEDIT_TEST_OUTPUT); then clicks a pixel of
the Attention maps image for its self-attention, draws a box on the Multi-subject canvas, paints
a MasaCtrl mask with the mouse and runs with it, paints on an uploaded photo and edits it, and
checks that a bad size shows its reason in the page. In CI (CI=true) a missing browser or
Playwright fails the test; elsewhere it skips.
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
# the README screenshot: ATTNEDIT_APP_TEST_MODEL=shapes-sd ATTNEDIT_APP_TEST_STEPS=25
MODEL = os.environ.get("ATTNEDIT_APP_TEST_MODEL", "tiny-sd")
STEPS = os.environ.get("ATTNEDIT_APP_TEST_STEPS", "2")
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


def _click_a_pixel_for_its_self_attention(page) -> None:
    page.get_by_role("tab", name="Attention maps").click()
    page.locator("#maps-steps input[type=number]").fill("2")
    page.locator("#maps-steps input[type=number]").press("Enter")
    page.locator("#maps-button").click()
    image = page.locator("#maps-image img")
    image.wait_for(state="visible", timeout=90_000)
    page.wait_for_function("() => { const i = document.querySelector('#maps-image img');"
                           " return i && i.complete && i.naturalWidth === 256; }", timeout=30_000)
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 0.25, "y": box["height"] * 0.5})
    page.locator("#maps-self img").wait_for(state="visible", timeout=30_000)
    # the click lands on pixel (16, 32) of the 64 x 64 image, shown 4x
    assert page.get_by_label("Pixel x").input_value() == "16"
    assert page.get_by_label("Pixel y").input_value() == "32"


def _draw_a_box_on_the_canvas(page) -> None:
    page.get_by_role("tab", name="Multi-subject").click()
    page.get_by_role("button", name="Clear boxes").click()
    page.wait_for_function("() => document.querySelector('#multi-boxes textarea').value === ''")
    canvas = page.locator("#multi-canvas img")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    canvas.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.5})
    page.wait_for_timeout(500)
    canvas.click(position={"x": box["width"] * 0.5 + 40, "y": box["height"] * 0.5 + 40})
    page.wait_for_function("() => document.querySelector('#multi-boxes textarea').value !== ''", timeout=15_000)
    x0, y0, x1, y1 = (float(v) for v in page.locator("#multi-boxes textarea").input_value().split(","))
    assert x0 < x1 and y0 < y1 and 0.0 <= x0 and x1 <= 1.0


def _paint_a_mask_and_run_masactrl(page) -> None:
    """Paint on the Consistent tab's mask canvas with the mouse; the run uses the painted mask."""
    page.get_by_role("tab", name="Consistent & edit").click()
    steps = page.locator("#consistent-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#consistent-use-mask input[type=checkbox]").check()
    canvas = page.locator("#consistent-mask canvas").first
    canvas.wait_for(state="visible", timeout=30_000)
    canvas.scroll_into_view_if_needed()
    page.locator("#consistent-mask button[aria-label=Brush]").click()
    _stroke(page, canvas, start=(-60, -60), step=(6, 6))  # the image sits in the middle
    page.get_by_role("button", name="Generate source and targets").click()
    # the info line of a finished run (an empty mask would be refused with its reason instead)
    page.wait_for_function("() => (document.querySelector('#consistent-info') || {}).innerText"
                           "?.includes('(3 images), drawn mask')", timeout=90_000)


def _stroke(page, canvas, start: tuple[int, int], step: tuple[int, int]) -> None:
    """Drag the mouse in 20 moves of `step` px from `start` px off the canvas centre (a brush stroke)."""
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2 + start[0], box["y"] + box["height"] / 2 + start[1]
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x + i * step[0], y + i * step[1], steps=3)
    page.mouse.up()


def _paint_on_the_upload_and_edit(page, folder: Path) -> None:
    """Upload a photo to edit: the mask canvas shows it (fitted, enlarged); paint on it and edit."""
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(photo).ellipse((40, 40, 160, 160), fill=(200, 30, 30))
    photo.save(folder / "photo.png")
    page.locator("#edit-image input[type=file]").set_input_files(str(folder / "photo.png"))
    steps = page.locator("#edit-steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#edit-use-mask input[type=checkbox]").check()
    canvas = page.locator("#edit-mask canvas").first
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(2000)  # the canvas takes the fitted upload as its background
    page.locator("#edit-mask button[aria-label=Brush]").click()
    _stroke(page, canvas, start=(-40, -20), step=(4, 2))
    page.get_by_role("button", name="Invert and edit").click()
    # 64x40 is the upload fitted to the model: a canvas of another size would be refused with its reason
    page.wait_for_function("() => (document.querySelector('#edit-info') || {}).innerText"
                           "?.includes('2 steps, 40x64') && document.querySelector('#edit-info').innerText"
                           ".includes('drawn mask')", timeout=90_000)


def _a_bad_size_shows_its_reason(page) -> None:
    page.get_by_role("tab", name="Generate").click()
    width = page.locator("#generate-width input")
    width.fill("61")
    width.press("Enter")
    page.locator("#generate-button").click()
    page.get_by_text("width must be a multiple of 8 for this model").first.wait_for(state="visible", timeout=30_000)


def test_page_generates_an_image_in_headless_chromium(tmp_path):
    _browser_or_fail()
    from playwright.sync_api import sync_playwright

    from apps.app import build_app, launch

    demo = build_app([MODEL])
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
                steps.fill(STEPS)
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
                assert f"{STEPS} steps" in info and "64x64" in info, info
                assert "/gradio_api/file=" in (image.get_attribute("src") or "")
                page.screenshot(path=str(shot), full_page=True)
                _click_a_pixel_for_its_self_attention(page)
                if page.get_by_role("tab", name="Multi-subject").count():
                    _draw_a_box_on_the_canvas(page)
                if page.get_by_role("tab", name="Consistent & edit").count():
                    _paint_a_mask_and_run_masactrl(page)
                    _paint_on_the_upload_and_edit(page, tmp_path)
                _a_bad_size_shows_its_reason(page)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, tmp_path / "app.png")
