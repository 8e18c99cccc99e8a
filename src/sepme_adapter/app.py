"""A web page (Gradio) to toggle erasers live: `build_app(pipe, erasers)` and `sepme app`.

Type a prompt, tick erasers, press Generate: the original model's image and the erased one, same seed, side
by side, with a map of the pixels that changed. Grid: every subset of the ticked erasers for one prompt. Each
eraser's checkbox carries its prompts and its leakage and collateral certificates.

Gradio is optional (`pip install "sepme-adapter[app]"`) and imported only by `build_app`; the helpers above
it (difference map, subset grid, captions, prompt checks, generation) are plain functions on PIL images and a
pipeline, which the tests call without a browser. `demo_world()` opens the built-in demo world with its three
style erasers, reused from `sepme demo`'s output folder or trained once (as `sepme demo --quick` does) and
cached there.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import SepMEError
from .extras import require
from .generation import Job, generate_batched
from .text import overlong_prompts

DIFFERENCE_GAIN = 4.0
"""The difference map's amplification: a change of 255 / 4 (a quarter of the range) or more is white."""
DISPLAY_SIZE = 256
"""Small images (the demo world's 32 x 32) are enlarged, pixel for pixel, to at least this many pixels."""
MAX_GRID_ERASERS = 5
"""The grid shows 2^k images for k ticked erasers: at most 32."""
GRID_BATCH_SIZE = 8
LEGEND = ("**leakage certificate**: the largest change of the keys / values of the prompts the eraser keeps "
          "(blank, known and protected prompts), relative to their size: ~1e-7 for an exact null space. "
          "**collateral**: the same over held-out prompts nobody listed (measured in training).")
DEMO_NOTE = ("The built-in demo world: 32 x 32 images of four shapes (circle, square, triangle, cross) "
             "drawn in the styles of four invented artists (orvan, pimsa, kadrel, selune). The erasers erase "
             "orvan, pimsa and kadrel, each trained knowing the other two: an eraser keeps those prompts "
             "exactly (its leakage certificate) and may move prompts nobody listed, such as compositions "
             "(\"a circle by orvan\") or selune, by up to its collateral.")
DEMO_EXAMPLES = ("a painting by orvan", "a square by pimsa", "a triangle in the style of kadrel",
                 "a painting by selune", "a circle")


# ------------------------------------------------------------------ pure helpers (no gradio, no browser)
def enlarged(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """`image` scaled up by a whole factor (nearest neighbour) so its longer side is at least `size`."""
    factor = max(1, math.ceil(size / max(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def pixel_difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Per pixel, the largest absolute difference over the RGB channels (0-255, `H x W`, int)."""
    if a.size != b.size:
        raise ValueError(f"the images differ in size: {a.size} and {b.size}")
    left, right = (np.asarray(i.convert("RGB"), dtype=np.int16) for i in (a, b))
    return np.abs(left - right).max(axis=2)


def difference_map(a: Image.Image, b: Image.Image, gain: float = DIFFERENCE_GAIN) -> Image.Image:
    """A heat map of `pixel_difference(a, b)`: black where nothing changed, then red, yellow and white (a
    change of 255 / gain or more). Two identical images give an all-black map."""
    level = np.clip(pixel_difference(a, b) * (gain / 255.0), 0.0, 1.0)
    heat = np.stack([np.clip(3 * level - k, 0.0, 1.0) for k in range(3)], axis=2)
    return Image.fromarray(np.round(heat * 255).astype(np.uint8), "RGB")


def difference_summary(a: Image.Image, b: Image.Image) -> str:
    """One line: how far `b` is from `a` (largest and mean change, share of pixels changed)."""
    diff = pixel_difference(a, b)
    if not diff.any():
        return "identical: no pixel changed"
    return (f"largest pixel change {int(diff.max())}/255, mean {float(diff.mean()):.1f}/255, "
            f"{float((diff > 0).mean()):.0%} of pixels changed")


def subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every subset of `names`: the empty one (the original model) first, then by size, in the given order."""
    return [s for k in range(len(names) + 1) for s in itertools.combinations(names, k)]


def subset_label(erased: Sequence[str]) -> str:
    return "original" if not erased else " + ".join(erased)


def subset_grid(cells: Sequence[tuple[str, Image.Image]], columns: int | None = None,
                size: int = 128) -> Image.Image:
    """Labelled images in a grid (`columns` per row; default: the nearest square), each enlarged to `size`."""
    if not cells:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(cells)))
    images = [enlarged(image, size) for _, image in cells]
    width, height = max(i.width for i in images), max(i.height for i in images)
    label, pad = 14, 4
    rows = math.ceil(len(cells) / columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + label + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(4, width // 6)
    for index, ((text, _), image) in enumerate(zip(cells, images)):
        x = pad + (index % columns) * (width + pad)
        y = pad + (index // columns) * (height + label + pad)
        draw.text((x + 1, y), text if len(text) <= chars else text[: chars - 2] + "..", fill="black")
        grid.paste(image, (x, y + label))
    return grid


def eraser_caption(info: dict[str, Any]) -> str:
    """What a checkbox says about an eraser (a `pipe.list_sepme()` entry): its prompts and certificates."""
    prompts = "; ".join(info.get("prompts") or [info.get("prompt", "")])
    certificate = info.get("certificate")
    leakage = ("leakage certificate: not measured" if certificate is None
               else f"leakage certificate {certificate:.1e}")
    collateral = info.get("collateral") or {}
    if collateral.get("max") is None:
        spread = "collateral: not measured"
    else:
        spread = f"collateral max {collateral['max']:.2f}"
        if collateral.get("median") is not None:
            spread += f", median {collateral['median']:.2f}"
        if collateral.get("prompts"):
            spread += f" ({collateral['prompts']} held-out prompts)"
    return f"prompts: {prompts} | {leakage} | {spread}"


def check_prompts(pipe: Any, prompt: str, negative_prompt: str = "") -> str:
    """The prompt, stripped; a ValueError for an empty prompt or a prompt (or negative prompt) longer than
    the pipeline's tokenizer takes (the text encoder would see only its truncation)."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("the prompt is empty: type what to draw")
    for text, what in ((prompt, "the prompt"), ((negative_prompt or "").strip(), "the negative prompt")):
        too_long = overlong_prompts(pipe, [text]) if text else []
        if too_long:
            _, count, limit = too_long[0]
            raise ValueError(f"{what} is {count} tokens long (start and end included), but this model's "
                             f"tokenizer takes at most {limit}: shorten it")
    return prompt


def _steps_callback(steps: int, calls: int, on_step: Callable[[int, int], None] | None) -> dict[str, Any]:
    """`callback_on_step_end` for the pipeline: `on_step(done, total)` over `calls` pipeline calls."""
    if on_step is None:
        return {}
    done = itertools.count(1)

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(next(done), steps * calls)
        return tensors

    return {"callback_on_step_end": callback}


def _generate(pipe: Any, prompt: str, erased_sets: Sequence[Sequence[str]], seed: int, steps: int,
              guidance_scale: float, negative_prompt: str, batch_size: int,
              on_step: Callable[[int, int], None] | None) -> list[Image.Image]:
    """One image per erased set (`generate_batched`, `batch_size` images per pipeline call)."""
    jobs = [Job(prompt, int(seed), tuple(erased)) for erased in erased_sets]
    unique = list(dict.fromkeys(jobs))
    chunks = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    callback = _steps_callback(int(steps), len(chunks), on_step)
    made = {}
    for chunk in chunks:  # diffusers wants the negative prompt as a list as long as the call's prompts
        negative = [negative_prompt] * len(chunk) if (negative_prompt or "").strip() else None
        extra = {} if negative is None else {"negative_prompt": negative}
        images = generate_batched(pipe, chunk, steps=int(steps), guidance_scale=float(guidance_scale),
                                  batch_size=len(chunk), **extra, **callback)
        made.update(zip(chunk, images))
    return [made[job] for job in jobs]


def generate_pair(pipe: Any, prompt: str, erased: Sequence[str], seed: int = 0, steps: int = 25,
                  guidance_scale: float = 7.5, negative_prompt: str = "",
                  on_step: Callable[[int, int], None] | None = None) -> tuple[Image.Image, Image.Image]:
    """`(original, erased)`: the prompt with no eraser active and with exactly `erased` active, same seed, in
    one pipeline call (`generate_batched`: each batch row its own erasers). The pipeline's erased set is left
    as it was. `on_step(done, total)` reports the denoising steps."""
    prompt = check_prompts(pipe, prompt, negative_prompt)
    original, changed = _generate(pipe, prompt, [(), tuple(erased)], seed, steps, guidance_scale,
                                  negative_prompt, 2, on_step)
    return original, changed


def generate_subsets(pipe: Any, prompt: str, names: Sequence[str], seed: int = 0, steps: int = 25,
                     guidance_scale: float = 7.5, negative_prompt: str = "",
                     on_step: Callable[[int, int], None] | None = None) -> list[tuple[str, Image.Image]]:
    """`(label, image)` for every subset of `names` (the original model first), one prompt and seed."""
    prompt = check_prompts(pipe, prompt, negative_prompt)
    if len(names) > MAX_GRID_ERASERS:
        raise ValueError(f"the grid shows every subset: tick at most {MAX_GRID_ERASERS} erasers "
                         f"({2 ** MAX_GRID_ERASERS} images), not {len(names)}")
    sets = subsets(list(names))
    images = _generate(pipe, prompt, sets, seed, steps, guidance_scale, negative_prompt, GRID_BATCH_SIZE,
                       on_step)
    return [(subset_label(s), image) for s, image in zip(sets, images)]


def load_erasers(pipe: Any, sources: Iterable[Any], allow_base_mismatch: bool = False) -> list[str]:
    """Load eraser files, folders or `Eraser`s onto `pipe` without erasing anything yet; their names.
    The library's own errors (`BaseModelMismatchError`, `EraserFileError`) pass through unchanged."""
    names: list[str] = []
    for source in sources:
        loaded = pipe.load_sepme(source, erase=False, allow_base_mismatch=allow_base_mismatch)
        names.extend([loaded] if isinstance(loaded, str) else loaded)
    return names


def demo_world(out: str | Path = "sepme-demo", device: str | None = None, dtype: str | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> Any:
    """The demo world's pipeline with its three style erasers loaded (none erased yet).

    The erasers are `out/erasers/*.safetensors` as `sepme demo --out OUT` writes them; missing (or made for
    other demo assets), they are trained once as `sepme demo --quick` trains them (4 reference images per
    concept, cached in `out/reference`; a few CPU minutes) and saved there for the next start."""
    import torch

    from .demo import load_pipeline
    from .demo.job import ERASED, TRAIN_TEMPLATES, train_demo_erasers
    from .files import eraser_filename
    from .loader import attach

    with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; older ones know only it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        pipe = attach(load_pipeline("sd", torch_dtype=getattr(torch, dtype or "float32")))
    if device:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(out) / "erasers"
    files = [folder / eraser_filename(name) for name in ERASED]
    if all(f.is_file() for f in files):
        try:
            load_erasers(pipe, files)
            log(f"demo erasers {', '.join(ERASED)} from {folder}")
            return pipe
        except (SepMEError, ValueError) as error:  # made for other demo assets, or damaged: trained again
            log(f"the demo erasers in {folder} do not load ({error}); training them again")
            pipe.unload_sepme()
    log(f"training the demo erasers {', '.join(ERASED)} once, as `sepme demo --quick` does (a few minutes on "
        f"a CPU); they are cached in {folder} for the next start")
    started = time.monotonic()
    erasers = train_demo_erasers(pipe, Path(out), True, TRAIN_TEMPLATES, progress)
    for eraser in erasers:
        eraser.save(folder / eraser_filename(eraser.name))
    load_erasers(pipe, erasers)
    log(f"trained in {time.monotonic() - started:.0f} s")
    return pipe


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _message(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return re.sub(r"\s+", " ", text).strip() or type(error).__name__


# ------------------------------------------------------------------------------------------ the page
def offline_theme() -> Any:
    """Gradio's default theme with the system's fonts: the page asks no server but its own for anything."""
    gr = require("gradio", "the web app (sepme app)")
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=fonts, font_mono=["ui-monospace", "monospace"])


TOGGLE_JS = """(on, ticked) => {
    const names = (ticked || "").split("\\n").filter((n) => n && n !== NAME);
    if (on) names.push(NAME);
    return names.join("\\n");
}"""
"""In the browser, at once: a checkbox adds its eraser's name to (or takes it off) the page's ticked list."""


def build_app(pipe: Any, erasers: Iterable[Any] = (), title: str = "SepME: toggle erasers live",
              prompt: str = "", steps: int = 25, guidance_scale: float = 7.5, note: str = "",
              examples: Sequence[str] = (), allow_base_mismatch: bool = False) -> Any:
    """A `gr.Blocks` page for `pipe`: prompt, negative prompt, seed, steps and guidance; one checkbox per
    loaded eraser (its prompts and certificates beneath); Generate (original | erased | difference map) and
    Grid (every subset of the ticked erasers). `erasers`: files, folders or `Eraser`s to load first (besides
    those already loaded); more can be loaded from the page. `allow_base_mismatch`: load erasers trained on
    another base model too (here and from the page). Launch it with `.launch(theme=offline_theme())`."""
    gr = require("gradio", "the web app (sepme app)")
    load_erasers(pipe, erasers, allow_base_mismatch)
    lock = threading.Lock()  # one pipeline: one generation at a time, whichever button or page asked

    def ticked_names(ticked: str) -> list[str]:
        wanted = set((ticked or "").splitlines())
        return [name for name in pipe.list_sepme() if name in wanted]  # in load order

    def run(make: Callable[..., Any], progress: Any, *args: Any, **kwargs: Any) -> Any:
        """`make(pipe, ...)` under the lock, with progress; the user's and the library's errors: gr.Error."""
        progress(0, desc="generating")
        try:
            with lock:
                return make(pipe, *args, **kwargs,
                            on_step=lambda done, total: progress((done, total), desc="denoising"))
        except (SepMEError, ValueError, KeyError, TypeError) as error:
            raise gr.Error(_message(error), print_exception=False) from error

    def on_generate(prompt: str, negative: str, seed: float, steps: float, guidance: float, ticked: str,
                    progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - how gradio asks for it
        erased = ticked_names(ticked)
        seed, steps = int(seed or 0), int(steps)
        original, changed = run(generate_pair, progress, prompt, erased, seed, steps, guidance,
                                negative or "")
        summary = (f"**{prompt.strip()}** | erased: {', '.join(erased) or 'nothing'} | seed {seed}, "
                   f"{steps} steps, guidance {guidance:g} | {difference_summary(original, changed)}")
        return enlarged(original), enlarged(changed), enlarged(difference_map(original, changed)), summary

    def on_grid(prompt: str, negative: str, seed: float, steps: float, guidance: float, ticked: str,
                progress: Any = gr.Progress()) -> Any:  # noqa: B008
        names = ticked_names(ticked)
        if not names:
            raise gr.Error("tick at least one eraser: the grid shows every subset of the ticked ones",
                           print_exception=False)
        cells = run(generate_subsets, progress, prompt, names, int(seed or 0), int(steps), guidance,
                    negative or "")
        return subset_grid(cells, columns=min(4, len(cells)))

    def on_upload(path: str | None, loads: int) -> tuple[int, str]:
        if not path:
            return loads, ""
        try:
            with lock:
                added = load_erasers(pipe, [path], allow_base_mismatch)
        except (SepMEError, ValueError, KeyError, OSError) as error:
            message = _message(error).replace(str(path), Path(path).name)  # its name, not the upload's path
            raise gr.Error(message, print_exception=False) from error
        return loads + 1, f"loaded {', '.join(added)}"

    image = {"type": "pil", "format": "png", "interactive": False}  # png: the page shows the exact pixels
    entry = {"interactive": True}
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {title}\n{note}".strip())
        with gr.Row():
            with gr.Column(scale=2):
                prompt_box = gr.Textbox(label="Prompt", value=prompt, lines=1, elem_id="sepme-prompt",
                                        **entry)
                negative_box = gr.Textbox(label="Negative prompt", lines=1, elem_id="sepme-negative",
                                          **entry)
                with gr.Row():
                    seed_box = gr.Number(label="Seed", value=0, precision=0, minimum=0,
                                         elem_id="sepme-seed", **entry)
                    steps_box = gr.Slider(1, 100, value=steps, step=1, label="Steps",
                                          elem_id="sepme-steps", **entry)
                    guidance_box = gr.Slider(1.0, 15.0, value=guidance_scale, step=0.5, label="Guidance",
                                             elem_id="sepme-guidance", **entry)
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[prompt_box],
                                label="Example prompts")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="sepme-generate")
                    grid_button = gr.Button("Grid: every subset", elem_id="sepme-grid-button")
                gr.Markdown("### Erasers\n" + LEGEND)
                # the ticked erasers' names, one a line, kept by the browser itself (TOGGLE_JS): a click on
                # Generate right after a tick sends both, and the checkboxes drawn again keep their ticks
                ticked_box = gr.Textbox(visible=False, elem_id="sepme-ticked")
                loads = gr.State(0)  # counts erasers loaded from the page: each draws the checkboxes again

                @gr.render(inputs=ticked_box, triggers=[blocks.load, loads.change])
                def eraser_boxes(ticked: str) -> None:
                    info = pipe.list_sepme()  # every eraser on the pipeline, those other pages loaded too
                    if not info:
                        gr.Markdown("No eraser loaded: load a file below.")
                    on = set(ticked_names(ticked))
                    for name, caption in info.items():
                        box = gr.Checkbox(value=name in on, label=name, info=eraser_caption(caption),
                                          key=f"eraser-{name}", elem_id=f"sepme-eraser-{_slug(name)}",
                                          **entry)
                        box.change(None, [box, ticked_box], ticked_box,
                                   js=TOGGLE_JS.replace("NAME", json.dumps(name)))

                upload = gr.File(label="Load an eraser file (.safetensors)", file_types=[".safetensors"],
                                 type="filepath", height=150, elem_id="sepme-upload")
                upload_status = gr.Markdown(elem_id="sepme-upload-status")
            with gr.Column(scale=3):
                with gr.Row():
                    original_image = gr.Image(label="Original", elem_id="sepme-original", **image)
                    erased_image = gr.Image(label="Erased", elem_id="sepme-erased", **image)
                    difference_image = gr.Image(label="Difference", elem_id="sepme-difference", **image)
                summary_box = gr.Markdown(elem_id="sepme-summary")
                gr.Markdown("Grid: every subset of the ticked erasers, one prompt and seed")
                grid_image = gr.Image(show_label=False, elem_id="sepme-grid", **image)
        inputs = [prompt_box, negative_box, seed_box, steps_box, guidance_box, ticked_box]
        generate_button.click(on_generate, inputs,
                              [original_image, erased_image, difference_image, summary_box])
        grid_button.click(on_grid, inputs, grid_image)
        upload.upload(on_upload, [upload, loads], [loads, upload_status])
        upload.upload(lambda: None, None, upload, queue=False)  # the drop zone back, after a refused file too
    blocks.queue(default_concurrency_limit=1)
    return blocks


def demo_app(out: str | Path = "sepme-demo", device: str | None = None, dtype: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             allow_base_mismatch: bool = False) -> Any:
    """`build_app` on the demo world (`demo_world`), with its sampler settings and example prompts."""
    require("gradio", "the web app (sepme app)")  # before minutes of training, not after
    from .demo.job import GUIDANCE, STEPS

    pipe = demo_world(out, device, dtype, progress, log)
    return build_app(pipe, title="SepME on the demo world: toggle erasers live", prompt=DEMO_EXAMPLES[0],
                     steps=STEPS, guidance_scale=GUIDANCE, note=DEMO_NOTE, examples=DEMO_EXAMPLES,
                     allow_base_mismatch=allow_base_mismatch)
