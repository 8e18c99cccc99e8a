"""`sepme app` without a browser: the page's helpers (difference map, subset grid, captions, prompt checks,
generation), the command's flags and errors, the demo world's eraser cache, and gradio staying optional.
The page itself in headless Chromium: tests/test_app_browser.py."""

import importlib.util
import os
import runpy
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sepme_adapter
from sepme_adapter import app as web
from sepme_adapter.certificate import certify, collateral_certificate
from sepme_adapter.cli import app as cli_app
from sepme_adapter.cli import main
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.testing.conformance import random_eraser

from .helpers import make_eraser

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason='needs gradio: pip install "sepme-adapter[app]"')


def one_error_line(captured: str) -> str:
    lines = [line for line in captured.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sepme app: error: "), captured
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image(pixels) -> Image.Image:
    return Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB")


def direct(pipe, prompt, erased, seed=0, steps=2, guidance=7.5):
    """The image a plain pipeline call gives with `set_erased(erased)`."""
    before = pipe.get_erased()
    pipe.set_erased(erased)
    try:
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        pipe.set_erased(before)


@pytest.fixture
def loaded(pipe, erasers):
    web.load_erasers(pipe, erasers.values())
    return pipe


# ------------------------------------------------------------------ helpers on images
def test_the_difference_map_is_black_where_nothing_changed_and_bright_where_much_did():
    a = image(np.full((4, 5, 3), 100))
    b = np.full((4, 5, 3), 100)
    b[1, 2, 0], b[3, 4] = 110, 255  # a small change in one channel, a large one in all three
    b = image(b)
    assert web.pixel_difference(a, b)[1, 2] == 10 and web.pixel_difference(a, b)[3, 4] == 155
    heat = np.asarray(web.difference_map(a, b))
    assert heat.shape == (4, 5, 3) and heat.dtype == np.uint8
    changed = np.zeros((4, 5), bool)
    changed[1, 2] = changed[3, 4] = True
    assert not heat[~changed].any()  # black everywhere else
    assert 0 < heat[1, 2, 0] < 255 and heat[1, 2, 2] == 0  # dark red: 10 * gain / 255 of the way
    assert (heat[3, 4] == 255).all()  # white: saturated
    assert not np.asarray(web.difference_map(a, a)).any()
    assert web.difference_summary(a, a) == "identical: no pixel changed"
    assert web.difference_summary(a, b) == "largest pixel change 155/255, mean 8.2/255, 10% of pixels changed"
    with pytest.raises(ValueError, match="differ in size"):
        web.pixel_difference(a, image(np.zeros((5, 4, 3))))


def test_every_subset_and_the_grid_that_shows_them():
    assert web.subsets(["a", "b"]) == [(), ("a",), ("b",), ("a", "b")]
    assert len(web.subsets(list("abcd"))) == 16 and web.subsets([]) == [()]
    assert [web.subset_label(s) for s in web.subsets(["a", "b"])] == ["original", "a", "b", "a + b"]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    cells = [(f"cell {i}", image(np.full((16, 16, 3), c))) for i, c in enumerate(colours)]
    grid = web.subset_grid(cells, columns=2, size=64)
    pixels = np.asarray(grid)
    assert grid.size == (2 * (64 + 4) + 4, 3 * (64 + 14 + 4) + 4)  # 2 columns, 3 rows, each labelled
    for i, colour in enumerate(colours):  # each image enlarged in its own cell
        x, y = 4 + (i % 2) * 68 + 32, 4 + (i // 2) * 82 + 14 + 32
        assert tuple(pixels[y, x]) == colour
    assert web.enlarged(cells[0][1], 256).size == (256, 256)
    assert web.enlarged(cells[0][1], 8).size == (16, 16)
    with pytest.raises(ValueError):
        web.subset_grid([])


def test_each_erasers_caption_gives_its_prompts_and_certificates(pipe):
    eraser = certify(pipe, make_eraser(pipe, "vangogh"))
    held_out = ["a photo of a dog", "a red car"]
    eraser.metadata["collateral"] = {**collateral_certificate(pipe, eraser, held_out), "held_out": held_out}
    pipe.load_sepme(eraser, erase=False)
    pipe.load_sepme(make_eraser(pipe, "picasso"), erase=False)
    info = pipe.list_sepme()
    caption = web.eraser_caption(info["vangogh"])
    leakage, collateral = eraser.certificate, info["vangogh"]["collateral"]
    assert caption == (f"prompts: a painting by van gogh | leakage certificate {leakage:.1e} | collateral "
                       f"max {collateral['max']:.2f}, median {collateral['median']:.2f} (2 held-out prompts)")
    assert web.eraser_caption(info["picasso"]) == ("prompts: a painting by picasso | leakage certificate: "
                                                   "not measured | collateral: not measured")


def test_prompts_that_are_empty_or_too_long_for_the_tokenizer_are_refused(pipe):
    limit = pipe.tokenizer.model_max_length
    assert web.check_prompts(pipe, "  a painting by picasso ") == "a painting by picasso"
    for empty in ("", "   ", None):
        with pytest.raises(ValueError, match="the prompt is empty"):
            web.check_prompts(pipe, empty)
    long = " ".join(["painting"] * limit)
    with pytest.raises(ValueError, match=f"the prompt is {limit + 2} tokens long .* at most {limit}"):
        web.check_prompts(pipe, long)
    with pytest.raises(ValueError, match="the negative prompt is .* tokens long"):
        web.check_prompts(pipe, "a painting", negative_prompt=long)


# ------------------------------------------------------------------ generation
def test_the_original_has_no_eraser_and_the_same_seed_and_unticked_concepts_stay_identical(loaded):
    loaded.set_erased(["cezanne"])  # whatever the pipeline had erased does not leak into the page's images
    prompt = "a painting by van gogh"
    original, erased = web.generate_pair(loaded, prompt, ["vangogh"], seed=3, steps=2)
    assert web.pixel_difference(original, direct(loaded, prompt, [], seed=3)).max() == 0
    assert web.pixel_difference(erased, direct(loaded, prompt, ["vangogh"], seed=3)).max() == 0
    assert web.pixel_difference(original, erased).max() > 8  # the ticked concept changes
    other = web.generate_pair(loaded, "a painting by picasso", ["vangogh"], seed=3, steps=2)
    assert web.pixel_difference(*other).max() <= 1  # an unticked concept: one 8-bit level (seen: identical)
    assert loaded.get_erased() == ["cezanne"]
    seeded = web.generate_pair(loaded, "a painting by van gogh", ["vangogh"], seed=4, steps=2)[0]
    assert web.pixel_difference(seeded, original).max() > 0  # the seed is the page's


def test_the_grid_generates_every_subset_with_progress(loaded):
    reported = []
    settings = {"seed": 1, "steps": 2, "negative_prompt": "a painting by cezanne"}
    cells = web.generate_subsets(loaded, "a painting by van gogh", ["picasso", "vangogh"], **settings,
                                 on_step=lambda *a: reported.append(a))
    assert [label for label, _ in cells] == ["original", "picasso", "vangogh", "picasso + vangogh"]
    assert reported == [(1, 2), (2, 2)]  # 4 images: one pipeline call of 2 steps
    original, erased = web.generate_pair(loaded, "a painting by van gogh", ["vangogh"], **settings)
    assert web.pixel_difference(cells[0][1], original).max() <= 1
    assert web.pixel_difference(cells[2][1], erased).max() <= 1
    with pytest.raises(ValueError, match="at most 5 erasers"):
        web.generate_subsets(loaded, "a painting", list("abcdef"))
    with pytest.raises(KeyError, match="no eraser named"):
        web.generate_pair(loaded, "a painting", ["monet"])


# ------------------------------------------------------------------ the command
@pytest.fixture
def eraser_folder(pipe, tmp_path):
    folder = tmp_path / "erasers"
    for i, name in enumerate(["vangogh", "picasso"]):
        certify(pipe, make_eraser(pipe, name, seed=i)).save(folder / f"{name}.safetensors")
    return folder


def run_app(argv, monkeypatch, port):
    """`sepme app ARGV`; while it serves, fetch its page (instead of waiting for Ctrl+C). Returns the exit
    status, the page and the pipeline the page was built on."""
    seen = {}
    build_app = web.build_app

    def spy(pipe, *args, **kwargs):
        seen["pipe"] = pipe
        return build_app(pipe, *args, **kwargs)

    def serve(app):
        seen["page"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read().decode()

    monkeypatch.setattr(web, "build_app", spy)
    monkeypatch.setattr(cli_app, "serve", serve)
    return main(["app", *argv, "--port", str(port)]), seen


@needs_gradio
def test_sepme_app_serves_the_model_and_its_erasers_on_127_0_0_1(model_folder, eraser_folder, monkeypatch,
                                                                 capsys):
    port = free_port()
    files = [str(eraser_folder / f"{name}.safetensors") for name in ("vangogh", "picasso")]
    code, seen = run_app(["--model", str(model_folder), "--erasers", *files, "--device", "cpu", "--dtype",
                          "float32", "--quiet"], monkeypatch, port)
    out = capsys.readouterr()
    assert code == 0, out.err
    up = f"sepme app: http://127.0.0.1:{port} (up in "
    assert any(line.startswith(up) for line in out.out.splitlines())
    assert f"SepME: toggle erasers live on {model_folder}" in seen["page"]
    pipe = seen["pipe"]
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert list(pipe.list_sepme()) == ["vangogh", "picasso"] and pipe.get_erased() == []
    with pytest.raises(OSError):  # stopped once served
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)


@needs_gradio
def test_bad_input_is_one_line_before_any_model_loads(model_folder, eraser_folder, tmp_path, monkeypatch,
                                                      capsys):
    assert main(["app", "--erasers", str(eraser_folder)]) == 2
    assert "--erasers needs --model" in one_error_line(capsys.readouterr().err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--model", str(model_folder), "--port", str(port)]) == 2
        assert f"--port {port}: already in use" in one_error_line(capsys.readouterr().err)
    assert main(["app", "--port", "70000"]) == 2
    assert "from 1 to 65535" in one_error_line(capsys.readouterr().err)
    other = sepme_adapter.attach(tiny_pipeline(seed=3))  # an eraser of another base model: refused
    mismatched = str(make_eraser(other, "vangogh").save(tmp_path / "other.safetensors"))
    code = main(["app", "--model", str(model_folder), "--erasers", mismatched, "--quiet", "--device", "cpu"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "eraser 'vangogh' was trained on base model" in line and "--allow-base-mismatch" in line
    with pytest.warns(sepme_adapter.SepMEWarning, match="loaded anyway"):  # a warning, not an error
        code, seen = run_app(["--model", str(model_folder), "--erasers", mismatched, "--quiet", "--device",
                              "cpu", "--allow-base-mismatch"], monkeypatch, free_port())
    assert code == 0 and list(seen["pipe"].list_sepme()) == ["vangogh"]


def demo_erasers(folder: Path) -> list:
    """Stand-ins for the demo erasers (random, on the demo world's real null spaces and fingerprint):
    seconds, not the minutes of training."""
    from sepme_adapter.demo import CONCEPTS as DEMO_CONCEPTS
    from sepme_adapter.demo import load_pipeline
    from sepme_adapter.demo.job import ERASED

    pipe = sepme_adapter.attach(load_pipeline("sd"))
    concepts = {name: DEMO_CONCEPTS[name].prompt for name in ERASED}
    erasers = [random_eraser(pipe, name, concepts, seed=i) for i, name in enumerate(ERASED)]
    for eraser in erasers:
        eraser.save(folder / "erasers" / f"{eraser.name}.safetensors")
    return erasers


def test_the_demo_world_trains_its_erasers_on_first_use_and_reuses_them(tmp_path, monkeypatch):
    from sepme_adapter.demo import job

    trained = []

    def train(pipe, out, quick, templates, progress):  # the demo's own training, replaced by stand-ins
        trained.append((out, quick, tuple(templates)))
        return demo_erasers(tmp_path / "scratch")

    monkeypatch.setattr(job, "train_demo_erasers", train)
    log = []
    pipe = web.demo_world(tmp_path / "demo", progress=False, log=log.append)
    assert trained == [(tmp_path / "demo", True, job.TRAIN_TEMPLATES)]  # `sepme demo --quick`'s training
    assert sorted(p.name for p in (tmp_path / "demo" / "erasers").iterdir()) == [
        f"{name}.safetensors" for name in sorted(job.ERASED)]
    assert list(pipe.list_sepme()) == list(job.ERASED) and pipe.get_erased() == []
    assert "training the demo erasers" in log[0] and log[-1].startswith("trained in ")
    log.clear()
    again = web.demo_world(tmp_path / "demo", progress=False, log=log.append)
    assert len(trained) == 1 and list(again.list_sepme()) == list(job.ERASED)  # cached: not trained again
    assert log == [f"demo erasers orvan, pimsa, kadrel from {tmp_path / 'demo' / 'erasers'}"]
    other = sepme_adapter.attach(tiny_pipeline())  # a cached file for other weights: trained again
    stale = random_eraser(other, "orvan", {"orvan": "a painting by orvan"})
    stale.save(tmp_path / "demo" / "erasers" / "orvan.safetensors")
    web.demo_world(tmp_path / "demo", progress=False, log=log.append)
    assert len(trained) == 2 and "do not load" in log[-3]


@needs_gradio
def test_sepme_app_without_a_model_opens_the_demo_world(tmp_path, monkeypatch, capsys):
    demo_erasers(tmp_path / "demo")
    port = free_port()
    code, seen = run_app(["--demo-out", str(tmp_path / "demo")], monkeypatch, port)
    out = capsys.readouterr()
    assert code == 0, out.err
    reused = f"sepme app: demo erasers orvan, pimsa, kadrel from {tmp_path / 'demo' / 'erasers'}"
    assert reused in out.out
    assert "SepME on the demo world" in seen["page"] and "a painting by orvan" in seen["page"]
    assert list(seen["pipe"].list_sepme()) == ["orvan", "pimsa", "kadrel"]
    code, seen = run_app(["--demo-out", str(tmp_path / "demo"), "--quiet"], monkeypatch, free_port())
    out = capsys.readouterr()
    assert code == 0 and "SepME on the demo world" in seen["page"]
    assert reused not in out.out and out.out.strip().startswith("sepme app: http://127.0.0.1:")  # --quiet


# ------------------------------------------------------------------ gradio stays optional
OPTIONAL_GRADIO = """
import sys
import sepme_adapter
from sepme_adapter import attach, Eraser
import sepme_adapter.cli
import sepme_adapter.app
from sepme_adapter.cli import main
try:
    main(["app", "--help"])
except SystemExit:
    pass
print("GRADIO IMPORTED:", "gradio" in sys.modules)

class Hide:  # from here on, as if gradio were not installed
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "gradio" else self.inner.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)
sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
try:
    sepme_adapter.app.build_app(None)
except ImportError as error:
    print("BUILD:", error)
sys.exit(main(["app", "--port", "1"]))
"""


@pytest.mark.slow  # a fresh Python that imports torch: 10-20 s on 2 busy cores
def test_the_core_does_not_import_gradio_and_without_it_the_app_says_which_extra_to_install():
    result = subprocess.run([sys.executable, "-c", OPTIONAL_GRADIO], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert "usage: sepme app" in result.stdout and "GRADIO IMPORTED: False" in result.stdout, result.stderr
    message = ("the web app (sepme app) needs the optional package 'gradio': pip install "
               '"sepme-adapter[app]"')
    assert f"BUILD: {message}" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0 and 'pip install "sepme-adapter[app]"' in one_error_line(result.stderr)


@needs_gradio
def test_the_space_example_builds_the_page_from_its_variables(model_folder, eraser_folder, monkeypatch):
    import gradio as gr

    built, build_app = [], web.build_app

    def spy(pipe, *args, **kwargs):
        built.append(pipe)
        return build_app(pipe, *args, **kwargs)

    monkeypatch.setattr(web, "build_app", spy)
    monkeypatch.setenv("SEPME_MODEL", str(model_folder))
    files = [str(eraser_folder / f"{name}.safetensors") for name in ("vangogh", "picasso")]
    monkeypatch.setenv("SEPME_ERASERS", " ".join(files))
    space = runpy.run_path(str(REPO / "examples" / "app.py"), run_name="space")  # as a Space runs it
    assert isinstance(space["demo"], gr.Blocks)
    assert list(built[0].list_sepme()) == ["vangogh", "picasso"] and built[0].get_erased() == []
