"""Conformance suite: diffusers' pipeline features with erasers loaded (idle) and active.

Every feature runs twice, on a *subject* pipeline (SepME attached, erasers loaded) and on a
*reference* that plain diffusers runs:

- `idle`: erasers loaded, nothing erased; the reference is the same base model that never loaded
  an eraser, and the outputs must be **bit-identical**.
- `active`: one concept erased; the reference is the base model with that eraser's increments
  written into its `to_k` / `to_v` weights (what the erasure means), and the outputs must agree
  to float round-off (`ACTIVE_RTOL`, relative to the reference's largest value).

A feature returns the outputs to compare (latents, so the VAE adds nothing) and facts that must
be equal on both sides (e.g. the `unet.state_dict()` keys); on the subject it also checks what only
the plugin can get wrong (the erasure survives the feature, a copy is independent, a warning is
given). Anything off raises `ConformanceError` naming the feature, the state and what differed.

Example:
    >>> from sepme_adapter.testing.conformance import FEATURES, check_feature
    >>> for name in FEATURES:
    ...     check_feature(name, "active")
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoPipelineForImage2Image, DiffusionPipeline
from safetensors.torch import save_file

from ..basis import null_space_basis, pooled_basis
from ..eraser import Eraser
from ..fingerprint import fingerprint
from ..loader import SepMEWarning, attach
from ..mmdit import (
    CONTEXT_LAYER,
    context_layer,
    denoiser,
    is_transformer,
    pooled_layer_path,
    transformer_pooled_layer,
)
from ..text import encode_prompts_pooled, text_sequence_length
from ..unet import cross_attention_modules, pooled_layer
from .random_pipelines import tiny_pipeline

STATES = ("idle", "active")
ACTIVE_RTOL = 1e-4  # float32: run-time increments and fused weights round differently
HALF_RTOL = 5e-2  # bfloat16 keeps 8 bits of mantissa

CONCEPTS = {
    "vangogh": "a painting by van gogh",
    "picasso": "a painting by picasso",
}


class ConformanceError(AssertionError):
    """A diffusers feature behaved differently with erasers than the reference says it must."""


def random_eraser(pipe: Any, name: str, concepts: dict[str, str] = CONCEPTS, protected: Sequence[str] = ("watermark",),
                  seed: int = 0, scale: float = 2000.0, pooled: bool = False, dtype: torch.dtype = torch.float32
                  ) -> Eraser:
    """A separable eraser with random `w` on the pipeline's real null space (as training would make).

    The blank prompt, `protected` and every other concept of `concepts` are in its known set, so their
    keys and values stay exact; `scale * beta` sets how strongly it changes its own concept. `pooled`
    (SDXL, SD3, FLUX): also a random pooled increment on `add_embedding.linear_1` (the transformers:
    `time_text_embed.text_embedder.linear_1`), on the pooled null space. On FLUX / SD3 the increment is on
    `context_embedder` (`mmdit.py`). `dtype=torch.float64`: basis and `w` in float64, for a float64 pipeline
    (checks where the float32 basis's own round-off would decide).
    """
    known = {n: p for n, p in concepts.items() if n != name}
    texts, pooled_texts = encode_prompts_pooled(pipe, ["", *known.values(), *protected])
    basis = null_space_basis(list(texts), dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    model = denoiser(pipe)
    metadata: dict[str, Any] = {"base_model": "tiny-random", "fingerprint": fingerprint(pipe)}
    if is_transformer(model):  # FLUX / SD3: the context rows
        weights[CONTEXT_LAYER] = torch.randn(context_layer(model).out_features, basis.shape[1],
                                             generator=generator, dtype=dtype) * scale
        metadata |= {"text_length": int(texts.shape[1]), "max_sequence_length": text_sequence_length(pipe),
                     "pipeline": type(pipe).__name__}
    else:
        for path, module in sorted(cross_attention_modules(pipe.unet).items()):
            for proj in ("to_k", "to_v"):
                d_out = getattr(module, proj).weight.shape[0]
                weights[f"{path}.{proj}"] = torch.randn(d_out, basis.shape[1], generator=generator, dtype=dtype) * scale
    extra = None
    if pooled:
        layer = transformer_pooled_layer(model) if is_transformer(model) else pooled_layer(model)
        if layer is None or pooled_texts is None:
            raise ValueError("pooled=True needs an SDXL, SD3 or FLUX pipeline (a pooled text embedding)")
        extra = pooled_basis([pooled_texts], layer.in_features, dtype=dtype)
        weights[pooled_layer_path(model)] = torch.randn(layer.out_features, extra.shape[1], generator=generator,
                                                        dtype=dtype) * scale
    return Eraser(name=name, prompt=concepts[name], basis=basis, weights=weights, beta=1e-4, known=known,
                  protected=list(protected), metadata=metadata, pooled_basis=extra)


def random_erasers(pipe: Any) -> list[Eraser]:
    return [random_eraser(pipe, name, seed=i) for i, name in enumerate(CONCEPTS)]


@dataclass
class Setup:
    """What the suite runs on: a pipeline factory (same weights every call), erasers, what `active` erases."""

    make_pipeline: Callable[[], Any] = tiny_pipeline
    make_erasers: Callable[[Any], list[Eraser]] = random_erasers
    erased: tuple[str, ...] = ("vangogh",)
    prompt: str = "a painting by van gogh"
    steps: int = 2
    seed: int = 0


@dataclass
class Run:
    """One side of one feature: the pipeline and what the feature needs to know about it."""

    setup: Setup
    state: str
    subject: bool
    erasers: list[Eraser]
    workdir: Path
    facts: dict[str, Any] = field(default_factory=dict)

    def generate(self, pipe: Any, **kwargs: Any) -> np.ndarray:
        kwargs.setdefault("prompt", self.setup.prompt)
        images = pipe(num_inference_steps=self.setup.steps, generator=torch.Generator().manual_seed(self.setup.seed),
                      output_type="latent", **kwargs).images
        return images.float().numpy()

    def prepare(self, pipe: Any) -> Any:
        """Give a pipeline this side's state: erasers loaded (and erased) on the subject, weights on the reference."""
        pipe.set_progress_bar_config(disable=True)
        active = [e for e in self.erasers if e.name in self.setup.erased] if self.state == "active" else []
        if not self.subject:
            with torch.no_grad():
                for eraser in active:
                    for layer in eraser.weights:
                        weight = pipe.unet.get_submodule(layer).weight
                        weight.copy_((weight.float() + eraser.delta(layer)).to(weight.dtype))
            return pipe
        pipe = attach(pipe)
        for eraser in self.erasers:
            pipe.load_sepme(eraser, erase=False)
        pipe.set_erased([e.name for e in active])
        return pipe

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConformanceError(message)


Feature = Callable[[Any, Run], list[np.ndarray]]


# ----------------------------------------------------------------------------- features
def plain_generation(pipe: Any, run: Run) -> list[np.ndarray]:
    return [run.generate(pipe)]


def prompt_embeds(pipe: Any, run: Run) -> list[np.ndarray]:
    """`prompt_embeds` / `negative_prompt_embeds` instead of a prompt: the same images as the prompt."""
    encoded = pipe.encode_prompt(prompt=run.setup.prompt, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=None)
    embeds = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                       "negative_pooled_prompt_embeds"), encoded))  # SDXL: also the pooled embeddings
    by_embeds = run.generate(pipe, prompt=None, **embeds)
    return [by_embeds, run.generate(pipe)]


def step_callback(pipe: Any, run: Run) -> list[np.ndarray]:
    """`callback_on_step_end` sees every step's latents and may change them."""
    seen = []

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(tensors["latents"].float().numpy().copy())
        return {"latents": tensors["latents"] * 0.99}

    final = run.generate(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    return [*seen, final]


def attention_slicing(pipe: Any, run: Run) -> list[np.ndarray]:
    pipe.enable_attention_slicing(1)
    sliced = run.generate(pipe)
    pipe.disable_attention_slicing()
    return [sliced, run.generate(pipe)]


def fused_qkv_projections(pipe: Any, run: Run) -> list[np.ndarray]:
    pipe.fuse_qkv_projections()
    fused = run.generate(pipe)
    pipe.unfuse_qkv_projections()
    return [fused, run.generate(pipe)]


def default_attention_processor(pipe: Any, run: Run) -> list[np.ndarray]:
    pipe.unet.set_default_attn_processor()
    run.facts["processors"] = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    if run.subject:
        run.expect(pipe.get_erased() == list(run.setup.erased if run.state == "active" else []),
                   "set_default_attn_processor changed get_erased()")
    return [run.generate(pipe)]


def free_u(pipe: Any, run: Run) -> list[np.ndarray]:
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with_freeu = run.generate(pipe)
    pipe.disable_freeu()
    return [with_freeu, run.generate(pipe)]


IP_ADAPTER_FILE = "ip-adapter.safetensors"
IMAGE_EMBED_WIDTH = 8


def tiny_ip_adapter(pipe: Any, workdir: str | Path, image_width: int = IMAGE_EMBED_WIDTH) -> Path:
    """A folder holding a tiny IP-Adapter (`IP_ADAPTER_FILE`) for this UNet, in the layout `load_ip_adapter`
    reads; random weights, seeded. Load it with `pipe.load_ip_adapter(folder, subfolder="",
    weight_name=IP_ADAPTER_FILE, image_encoder_folder=None)` and pass `ip_adapter_image_embeds`."""
    workdir = Path(workdir)
    folder = workdir / "ip-adapter"
    if (folder / IP_ADAPTER_FILE).exists():
        return folder
    generator = torch.Generator().manual_seed(7)
    width = pipe.unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * width, image_width, generator=generator) * 0.2,
        "image_proj.proj.bias": torch.zeros(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    key = 1
    for name in pipe.unet.attn_processors:  # diffusers numbers attn1 / attn2 alternately: attn2 are odd
        if name.endswith("attn2.processor"):
            out = pipe.unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            for proj in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key}.{proj}.weight"] = torch.randn(out, width, generator=generator) * 0.2
            key += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / IP_ADAPTER_FILE)
    return folder


def ip_adapter(pipe: Any, run: Run) -> list[np.ndarray]:
    """Load (from a local folder), change the scale, unload: as diffusers does it without erasers."""
    folder = tiny_ip_adapter(pipe, run.workdir)
    keys_before = sorted(pipe.unet.state_dict())
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=IP_ADAPTER_FILE, image_encoder_folder=None)
    # [negative; positive] image embeddings, as the pipeline expects them with guidance
    embeds = [torch.randn(2, 1, IMAGE_EMBED_WIDTH, generator=torch.Generator().manual_seed(3))]
    outputs = []
    for scale in (0.0, 5.0):
        pipe.set_ip_adapter_scale(scale)
        outputs.append(run.generate(pipe, ip_adapter_image_embeds=embeds))
    run.expect(not np.array_equal(outputs[0], outputs[1]), "set_ip_adapter_scale did not change the output")
    run.facts["state_dict keys with the IP-Adapter"] = sorted(pipe.unet.state_dict())
    pipe.unload_ip_adapter()
    run.facts["processors after unload"] = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    run.expect(sorted(pipe.unet.state_dict()) == keys_before, "unload_ip_adapter left state-dict keys behind")
    return [*outputs, run.generate(pipe)]


def from_pipe(pipe: Any, run: Run) -> list[np.ndarray]:
    """An Img2Img pipeline made with `from_pipe` shares the UNet, and so the erasure."""
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # SD: StableDiffusionImg2ImgPipeline; SDXL: its XL one
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    output = run.generate(img2img, image=image, strength=0.9)
    if run.subject:
        attached = attach(img2img)  # the methods, over the shared runtime
        run.expect(attached.get_erased() == pipe.get_erased(), "attach(from_pipe(...)) does not see the erasure")
    return [output]


def save_and_load(pipe: Any, run: Run) -> list[np.ndarray]:
    """`save_pretrained` then `from_pretrained`: the subject says what it saves, then loads its erasers again."""
    folder = run.workdir / f"saved-{run.state}-{'subject' if run.subject else 'reference'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.save_pretrained(folder)
    said = [str(w.message) for w in caught if issubclass(w.category, SepMEWarning)]
    if run.subject:
        if run.state == "active":
            run.expect(any("not saved" in m for m in said), f"save_pretrained with active erasers did not warn: {said}")
        else:
            run.expect(not said, f"save_pretrained with nothing erased warned: {said}")
    if run.subject and run.state == "active":
        # what was saved is the base model: loading the erasers onto it gives the erasure back
        loaded = DiffusionPipeline.from_pretrained(folder)  # the class model_index.json names (SD or SDXL)
        loaded = run.prepare(loaded)
    else:
        loaded = DiffusionPipeline.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
    return [run.generate(loaded)]


def to_dtype(pipe: Any, run: Run) -> list[np.ndarray]:
    pipe.to(torch.bfloat16)
    return [run.generate(pipe)]


def deep_copy(pipe: Any, run: Run) -> list[np.ndarray]:
    """`copy.deepcopy(pipe)` generates the same; the copy's erasure is its own."""
    twin = copy.deepcopy(pipe)
    outputs = [run.generate(twin), run.generate(pipe)]
    if run.subject:
        twin.set_erased([] if run.state == "active" else list(run.setup.erased))
        run.expect(np.array_equal(run.generate(pipe), outputs[1]), "set_erased on a deep copy changed the original")
        run.expect(not np.array_equal(run.generate(twin), outputs[0]), "set_erased on a deep copy did nothing")
    return outputs


def compiled_unet(pipe: Any, run: Run) -> list[np.ndarray]:
    """`torch.compile(pipe.unet, backend="eager")`; on the subject, toggling re-uses the compiled graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    outputs = [run.generate(pipe)]
    if run.subject:
        graphs = counters["stats"]["unique_graphs"]
        for names in ([], list(run.setup.erased), [], list(run.setup.erased)):
            pipe.set_erased(names)
            run.generate(pipe)
        pipe.set_erased(list(run.setup.erased) if run.state == "active" else [])
        run.expect(counters["stats"]["unique_graphs"] - graphs <= 1,
                   f"toggling erasers compiled {counters['stats']['unique_graphs'] - graphs} new graphs (at most one "
                   f"per erased set expected)")
        run.expect(np.array_equal(run.generate(pipe), outputs[0]), "the compiled UNet changed after toggling")
    torch._dynamo.reset()
    return outputs


FEATURES: dict[str, Feature] = {
    "generation": plain_generation,
    "prompt_embeds": prompt_embeds,
    "callback_on_step_end": step_callback,
    "attention_slicing": attention_slicing,
    "fuse_qkv_projections": fused_qkv_projections,
    "set_default_attn_processor": default_attention_processor,
    "freeu": free_u,
    "ip_adapter": ip_adapter,
    "from_pipe": from_pipe,
    "save_pretrained": save_and_load,
    "to_dtype": to_dtype,
    "deepcopy": deep_copy,
    "torch_compile": compiled_unet,
}
"""Each feature by name; `check_feature(name, state)` runs one, `run_conformance()` all."""

TOLERANCES = {"to_dtype": HALF_RTOL}


@dataclass
class FeatureReport:
    feature: str
    state: str
    largest_difference: float  # relative to the reference's largest value; 0.0 when identical


def check_feature(name: str, state: str, setup: Setup | None = None, workdir: str | Path | None = None
                  ) -> FeatureReport:
    """Run one feature on the subject and the reference; raise `ConformanceError` on any difference."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    setup = setup or Setup()
    feature = FEATURES[name]
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sepme-conformance-"))
    reference_pipe = setup.make_pipeline()
    erasers = setup.make_erasers(reference_pipe)
    sides = {}
    for subject in (True, False):
        run = Run(setup, state, subject, erasers, workdir)
        pipe = run.prepare(setup.make_pipeline() if subject else reference_pipe)
        try:
            sides[subject] = (feature(pipe, run), run.facts)
        except ConformanceError as error:
            raise ConformanceError(f"{name} ({state}): {error}") from None
    (got, got_facts), (expected, expected_facts) = sides[True], sides[False]
    if got_facts != expected_facts:
        differing = [k for k in expected_facts if got_facts.get(k) != expected_facts[k]]
        raise ConformanceError(f"{name} ({state}): {differing} differ from plain diffusers")
    if len(got) != len(expected):
        raise ConformanceError(f"{name} ({state}): {len(got)} outputs, plain diffusers gave {len(expected)}")
    worst = 0.0
    for index, (a, b) in enumerate(zip(got, expected)):
        if state == "idle":
            if a.shape != b.shape or a.tobytes() != b.tobytes():
                raise ConformanceError(f"{name} (idle): output {index} is not bit-identical to a pipeline that "
                                       f"never loaded an eraser (largest difference {np.abs(a - b).max():.3e})")
            continue
        scale = max(float(np.abs(b).max()), 1e-12)
        difference = float(np.abs(a - b).max()) / scale
        worst = max(worst, difference)
        if not difference <= TOLERANCES.get(name, ACTIVE_RTOL):
            raise ConformanceError(f"{name} (active): output {index} differs from the base model with the increments "
                                   f"in its weights by {difference:.3e} (relative)")
    return FeatureReport(name, state, worst)


def run_conformance(setup: Setup | None = None, features: Sequence[str] | None = None,
                    states: Sequence[str] = STATES) -> list[FeatureReport]:
    """Every feature (default: all of `FEATURES`) in every state; raises on the first non-conformance."""
    workdir = tempfile.mkdtemp(prefix="sepme-conformance-")
    return [check_feature(name, state, setup, workdir) for name in (features or FEATURES) for state in states]
