"""`sepme app` in a real browser: the command serves a tiny random pipeline with tiny erasers on 127.0.0.1,
and headless Chromium (Debian's `chromium`, driven by playwright; never a downloaded browser) types a prompt,
ticks an eraser, clicks Generate and reads the images the page shows. A screenshot is saved beside the test's
files (its path is printed: `pytest -s`).
"""

import io
import os
import shutil
import socket

import pytest
import torch
from PIL import Image

import sepme_adapter
from sepme_adapter import Eraser
from sepme_adapter import app as web
from sepme_adapter.certificate import certify, collateral_certificate
from sepme_adapter.cli import app as cli_app
from sepme_adapter.cli import main
from sepme_adapter.pipelines import load_pipeline
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.testing.conformance import random_eraser

from .helpers import make_eraser

pytestmark = pytest.mark.slow  # about 30 s on 2 busy cores, most of it importing gradio and starting Chromium
pytest.importorskip("gradio", reason='the web app needs gradio: pip install "sepme-adapter[app]"')
sync_api = pytest.importorskip("playwright.sync_api",
                               reason='the browser test needs playwright: pip install "sepme-adapter[app]"')
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = os.environ.get("SEPME_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium here: apt-get install chromium (or set SEPME_CHROMIUM to a Chromium or Chrome "
                "binary)", allow_module_level=True)
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def eraser_files(pipe, tmp_path):
    """vangogh and picasso (certified, vangogh with a collateral certificate) for the command line; cezanne to
    load from the page; an eraser of another base model that the page must refuse."""
    folder = tmp_path / "erasers"
    for i, name in enumerate(["vangogh", "picasso"]):
        eraser = certify(pipe, make_eraser(pipe, name, seed=i))
        if name == "vangogh":
            held_out = ["a photo of a dog", "a red car", "a house"]
            measured = collateral_certificate(pipe, eraser, held_out)
            eraser.metadata["collateral"] = {**measured, "held_out": held_out}
        eraser.save(folder / f"{name}.safetensors")
    cezanne = make_eraser(pipe, "cezanne", seed=2).save(tmp_path / "upload" / "cezanne.safetensors")
    other = sepme_adapter.attach(tiny_pipeline(seed=3))
    monet = random_eraser(other, "monet", {"monet": "a painting by monet"})
    return folder, cezanne, monet.save(tmp_path / "monet.safetensors")


def picture(page, request, which: str) -> Image.Image:
    """The image the page shows in `#sepme-<which>`, fetched from the page's own server."""
    source = page.locator(f"#sepme-{which} img").get_attribute("src")
    return Image.open(io.BytesIO(request.get(source).body())).convert("RGB")


def native(image: Image.Image, size: int = 16) -> Image.Image:
    """An image the page enlarged pixel for pixel, back at the pipeline's size."""
    return image.resize((size, size), Image.NEAREST)


def generate(page, prompt: str) -> str:
    """Type `prompt`, click Generate, wait until the summary names it; the summary."""
    page.locator("#sepme-prompt textarea").fill(prompt)
    page.locator("#sepme-generate").click()
    summary = page.locator("#sepme-summary")
    sync_api.expect(summary).to_contain_text(prompt, timeout=TIMEOUT_MS)
    return summary.inner_text()


def expect_error(page, text: str) -> None:
    toast = page.locator(".toast-body").filter(has_text=text)
    sync_api.expect(toast.first).to_be_visible(timeout=TIMEOUT_MS)
    for close in page.locator(".toast-close").all():  # out of the way of the next one
        close.click()


def browse(url: str, eraser_files, screenshot) -> dict:
    """Drive the page as a person would; what it showed."""
    folder, cezanne, other = eraser_files
    seen = {"outside": []}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})

            def local_only(route):  # the page must work offline: nothing but its own server
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    seen["outside"].append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(url, timeout=TIMEOUT_MS)
            vangogh, picasso = page.get_by_label("vangogh"), page.get_by_label("picasso")
            vangogh.wait_for(timeout=TIMEOUT_MS)
            seen["captions"] = page.locator("#sepme-eraser-vangogh").inner_text()
            steps = page.locator("#sepme-steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            vangogh.check()  # vangogh ticked, picasso not
            assert not picasso.is_checked()
            for prompt, key in (("a painting by van gogh", "ticked"), ("a painting by picasso", "unticked")):
                seen[f"{key} summary"] = generate(page, prompt)
                seen[key] = [picture(page, page.request, w) for w in ("original", "erased", "difference")]
            page.locator("#sepme-prompt textarea").fill("a painting by van gogh")
            page.locator("#sepme-grid-button").click()
            page.locator("#sepme-grid img").wait_for(timeout=TIMEOUT_MS)
            seen["grid"] = picture(page, page.request, "grid")
            page.locator("#sepme-prompt textarea").fill("   ")
            page.locator("#sepme-generate").click()
            expect_error(page, "the prompt is empty")
            page.locator("#sepme-prompt textarea").fill("a painting by van gogh and a painting by picasso")
            page.locator("#sepme-generate").click()
            expect_error(page, "tokens long")
            page.locator("#sepme-upload input[type=file]").set_input_files(str(other))
            expect_error(page, "eraser 'monet' was trained on base model")
            page.locator("#sepme-upload input[type=file]").set_input_files(str(cezanne))
            page.get_by_label("cezanne").wait_for(timeout=TIMEOUT_MS)  # a new checkbox
            seen["ticked after upload"] = vangogh.is_checked()
            seen["last summary"] = generate(page, "a painting by cezanne")
            seen["last"] = [picture(page, page.request, w) for w in ("original", "erased")]
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


def test_the_page_erases_the_ticked_concept_and_leaves_an_unticked_one_alone(model_folder, eraser_files,
                                                                            tmp_path, monkeypatch, capsys):
    port, seen, screenshot = free_port(), {}, tmp_path / "app.png"

    def serve(app):  # instead of waiting for Ctrl+C: a person at the page
        try:
            seen.update(browse(f"http://127.0.0.1:{port}/", eraser_files, screenshot))
        except BaseException as error:  # noqa: B036 - re-raised below, past the command's own error handling
            seen["error"] = error

    monkeypatch.setattr(cli_app, "serve", serve)
    code = main(["app", "--model", str(model_folder), "--erasers", str(eraser_files[0]), "--port", str(port),
                 "--device", "cpu", "--dtype", "float32", "--quiet"])
    if "error" in seen:
        raise seen["error"]
    assert code == 0, capsys.readouterr().err
    assert seen["outside"] == []

    # each checkbox carries its eraser's prompts and certificates
    vangogh = Eraser.load(eraser_files[0] / "vangogh.safetensors")
    assert "a painting by van gogh" in seen["captions"]
    assert f"leakage certificate {vangogh.certificate:.1e}" in seen["captions"]
    collateral = vangogh.metadata["collateral"]
    assert f"collateral max {collateral['max']:.2f}, median {collateral['median']:.2f} (3 held-out prompts)" \
        in seen["captions"]

    # the original is the model with no eraser, same seed; the ticked concept changes, an unticked one not
    pipe = load_pipeline(str(model_folder), "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a painting by van gogh", num_inference_steps=2, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0)).images[0]
    original, erased, difference = seen["ticked"]
    assert web.pixel_difference(original, web.enlarged(expected)).max() == 0
    assert web.pixel_difference(original, erased).max() > 8
    assert difference.getbbox() is not None  # the map shows where
    assert "erased: vangogh" in seen["ticked summary"] and "largest pixel change" in seen["ticked summary"]
    assert "seed 0, 2 steps, guidance 7.5" in seen["ticked summary"]
    original, erased, difference = seen["unticked"]
    assert web.pixel_difference(original, erased).max() <= 1  # to one 8-bit level (observed: identical)
    assert "erased: vangogh" in seen["unticked summary"]

    # the grid: the original, then vangogh erased; the bad prompts and the other model's eraser were refused
    cells = [seen["grid"].crop((x, 4 + 14, x + 128, 4 + 14 + 128)) for x in (4, 4 + 128 + 4)]
    for cell, shown in zip(cells, seen["ticked"]):
        assert web.pixel_difference(native(cell), native(shown)).max() == 0
    assert seen["ticked after upload"]  # loading an eraser from the page keeps what was ticked
    assert "a painting by cezanne" in seen["last summary"] and "erased: vangogh |" in seen["last summary"]
    assert web.pixel_difference(*seen["last"]).max() <= 1  # cezanne, loaded from the page, is not ticked
    image = Image.open(screenshot)
    assert image.format == "PNG" and image.width == 1400
    print(f"screenshot: {screenshot}")
