"""Build the demo world's assets: a tiny trained Stable Diffusion pipeline and its classifiers.

    python -m sepme_adapter.demo.build --out src/sepme_adapter/demo/assets

Stages (each seeded and timed; the recipe, timings and measured accuracies go to
`recipe.json`):

1. the word tokenizer and a frozen, randomly initialised CLIP text encoder
   (width 96 over 10 tokens, near SD's 768 / 77);
2. a small `AutoencoderKL` (32x32x3 <-> 16x16x4), trained as an autoencoder on renders;
   its `scaling_factor` gives the latents unit standard deviation;
3. a small `UNet2DConditionModel` with cross-attention, trained with the DDPM epsilon loss
   and caption dropout (so classifier-free guidance works), with an EMA of its weights;
4. the object and style classifiers;
5. the quality gate: the classifiers' accuracy on images the pipeline generates from each
   concept's prompts, and a grid of samples (`samples.png`).

It runs on CPU in a few tens of minutes on one thread; `--quick` is a smoke test.

`--model sdxl` builds the SDXL-architecture world into `assets/sdxl/` from the SD world's
autoencoder and classifiers (which it needs): two frozen random CLIP text encoders (a
`CLIPTextModel` and a `CLIPTextModelWithProjection`, whose penultimate hidden states side by side
are the 96-wide prompt embedding, as SDXL's 768 + 1280), a denoiser with
`addition_embed_type="text_time"` (the pooled embedding and six time ids through `add_embedding`),
trained with caption dropout to zero embeddings (SDXL's `force_zeros_for_empty_prompt`) (and, with
`--sdxl-token-dropout p`, per-token embeddings zeroed with the pooled one kept: a stress-test world
whose pooled path alone carries concepts), warm-started from the SD world's denoiser (every weight of equal name and shape), then its own
quality gate.

`--model flux` builds the FLUX-architecture world into `assets/flux/` from the SD world's autoencoder
(re-saved with FLUX's `shift_factor` 0.0), tokenizer, CLIP text encoder (its pooled output enters
`time_text_embed`) and classifiers: a frozen random `T5EncoderModel` over a word-level T5 tokenizer of the
demo vocabulary (its rows enter `context_embedder`), and a `FluxTransformer2DModel` without guidance embedding
(`sepme demo` samples it with true classifier-free guidance against the blank prompt), trained with the
rectified-flow loss (`x_t = (1 - sigma) x_0 + sigma eps`, target velocity `eps - x_0`, sigma shifted as the
sampler's) on packed latents (16x16x4 -> 64 tokens of 16 channels), caption dropout and EMA, in the same loop
as the UNets (`train_denoiser`). Its quality gate also gates every paraphrase (`flux_min_accuracy`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..generation import pipeline_arguments
from ..testing.random_pipelines import t5_encoder, t5_word_tokenizer
from ..testing.tokenizer import write_word_tokenizer
from ..training.denoise import FlowCall, FlowSchedule, flux_image_ids
from . import world_sized
from .classifier import ConceptClassifier, Sampler, held_out_accuracy, train_classifier
from .world import (
    CONCEPTS,
    IMAGE_SIZE,
    LABELS,
    OBJECTS,
    PLAIN,
    STYLES,
    VOCABULARY,
    CaptionBatch,
    render_array,
    sample_caption_batch,
    to_tensor,
)


@dataclass
class Recipe:
    """Every setting of the build; written to `recipe.json` with the results."""

    seed: int = 0
    # text encoder (frozen, random)
    max_tokens: int = 10
    text_width: int = 96
    text_layers: int = 2
    text_heads: int = 4
    # autoencoder
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # denoiser
    unet_channels: tuple[int, ...] = (32, 64, 96)
    unet_head_dim: int = 16
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    unet_warmup: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 100  # a killed build resumes from its last checkpoint
    caption_dropout: float = 0.1
    # Min-SNR-gamma loss weight min(SNR, gamma) / SNR (Hang et al. 2023; 0: unweighted) and the share of
    # timesteps drawn from the upper 60% of the schedule, where a caption decides what is drawn (0: uniform).
    # The demo world uses neither; the zoo's short builds use Min-SNR (`benchmarks/worlds/build.py`)
    min_snr_gamma: float = 0.0
    high_timestep_share: float = 0.0
    # classifiers
    classifier_steps: int = 2000
    classifier_batch: int = 64
    classifier_width: int = 16
    # quality gate
    eval_seeds: int = 20
    eval_extra_seeds: int = 40  # more seeds (from 100), reported for the first setting, not gated
    # (DDIM steps, guidance); the first is the sampler `sepme demo` uses and gates
    eval_settings: tuple[tuple[int, float], ...] = ((20, 5.0), (25, 7.5))
    min_accuracy: float = 0.9
    # the SDXL-architecture world (`--model sdxl`); its prompt embedding is as wide as `text_width`
    sdxl_text_widths: tuple[int, int] = (32, 64)
    sdxl_time_embed_dim: int = 8
    sdxl_unet_steps: int = 1500
    sdxl_unet_lr: float = 1e-3
    # share of training captions whose per-token embeddings are zeroed while their pooled embedding is kept,
    # so the denoiser learns to draw a concept from the pooled path alone: the stress-test build of
    # `benchmarks/pooled_path.py` (0.3). The shipped world uses 0: its denoiser then ignores the pooled path
    sdxl_token_dropout: float = 0.0
    # the FLUX-architecture world (`--model flux`): a T5 encoder as wide as `text_width` (its `text_layers` /
    # `text_heads`) and a FluxTransformer2DModel of `flux_width` (= heads x head width) with that many double-
    # and single-stream blocks, trained `flux_steps` x `flux_batch`; sized to build in about an hour of one CPU
    # thread (`recipe.json` records each stage's CPU seconds)
    flux_width: int = 128
    flux_heads: int = 4
    flux_double_layers: int = 2
    flux_single_layers: int = 4
    flux_steps: int = 4400  # pilots of 1200 steps: batch 32 learns the objects faster than 600 x 64, lr 2e-3 than 1e-3
    flux_batch: int = 32
    flux_lr: float = 2e-3
    flux_min_accuracy: float = 0.85  # gated on every concept's canonical prompt and each paraphrase


QUICK = {
    "vae_steps": 20,
    "unet_steps": 20,
    "sdxl_unet_steps": 20,
    "flux_steps": 20,
    "classifier_steps": 20,
    "eval_seeds": 2,
    "eval_extra_seeds": 2,
    "eval_settings": ((2, 5.0),),
}


@contextmanager
def _timed(timings: dict[str, dict[str, float]], stage: str) -> Iterator[None]:
    """Record wall-clock and CPU seconds (CPU time is what a loaded machine does not inflate)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[stage] = {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    print(f"[build] {stage}: {timings[stage]}", flush=True)


def _to_model(images: torch.Tensor) -> torch.Tensor:
    return images * 2.0 - 1.0  # [0, 1] -> [-1, 1], the range SD's autoencoder works in


# ---------------------------------------------------------------- stage 1: text


def random_text_encoder(recipe: Recipe, tokenizer: CLIPTokenizer, width: int, cls: type = CLIPTextModel):
    """A random, frozen CLIP text encoder of `width` over the word tokenizer (seeded by the caller)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=recipe.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return cls(config).eval().requires_grad_(False)


def build_text(recipe: Recipe, folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """The word tokenizer over every caption word, and a random frozen CLIP text encoder."""
    tokenizer = write_word_tokenizer(folder, VOCABULARY, recipe.max_tokens)
    torch.manual_seed(recipe.seed)
    return tokenizer, random_text_encoder(recipe, tokenizer, recipe.text_width)


@torch.no_grad()
def encode_captions(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]
) -> torch.Tensor:
    """Text embeddings (N x tokens x width) as the pipeline computes them."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids).last_hidden_state


Conditioning = Callable[[list[str], np.random.Generator], tuple[torch.Tensor, dict | None]]
"""(captions, the build's random stream) -> (prompt embeddings, the UNet's `added_cond_kwargs` or None)."""


def sd_conditioning(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> Conditioning:
    """SD v1: the encoder's last hidden state; a dropped caption is the blank prompt."""
    return lambda captions, rng: (encode_captions(tokenizer, text_encoder, captions), None)


def sdxl_conditioning(tokenizer: CLIPTokenizer, encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
                      time_ids: list[int], token_dropout: float = 0.0) -> Conditioning:
    """SDXL, as `StableDiffusionXLPipeline.encode_prompt` computes it: both encoders' penultimate hidden
    states side by side, the second's projected pooled output, the size / crop time ids; a dropped
    (blank) caption becomes zeros, the unconditional branch under `force_zeros_for_empty_prompt`.
    `token_dropout`: the share of other captions whose per-token embeddings are zeroed, pooled kept."""

    @torch.no_grad()
    def condition(captions: list[str], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
        context = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        pooled = outputs[1].text_embeds
        keep = torch.tensor([c != "" for c in captions], dtype=context.dtype)
        tokens = keep
        if token_dropout > 0:  # (no draw at 0: the random stream, and so the build, stay as without it)
            tokens = keep * torch.from_numpy(rng.random(len(captions)) >= token_dropout).to(context.dtype)
        context, pooled = context * tokens[:, None, None], pooled * keep[:, None]
        return context, {"text_embeds": pooled, "time_ids": torch.tensor([time_ids] * len(captions)).float()}

    return condition


# ---------------------------------------------------------------- stage 2: autoencoder


def train_vae(recipe: Recipe, rng: np.random.Generator) -> AutoencoderKL:
    """A small KL autoencoder trained on renders (reconstruction + a light KL term)."""
    torch.manual_seed(recipe.seed)
    levels = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,  # attention at 16x16 would triple the cost on CPU
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps
    )
    progress = tqdm(range(recipe.vae_steps), desc="autoencoder")
    for _ in progress:
        images = _to_model(sample_caption_batch(recipe.vae_batch, rng, caption_dropout=0.0).images)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (
            torch.nn.functional.mse_loss(reconstruction, images)
            + recipe.vae_kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # Unit-variance latents, as SD's scaling_factor (0.18215) gives its autoencoder.
    with torch.no_grad():
        latents = vae.encode(_to_model(sample_caption_batch(1024, rng, 0.0).images)).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


# ---------------------------------------------------------------- stage 3: denoiser


def make_unet(recipe: Recipe, sdxl: bool = False) -> UNet2DConditionModel:
    """Cross-attention at 8x8, 4x4 and in the middle block: 7 `attn2` layers over 96-wide text.

    `sdxl`: SDXL's added conditions too (`addition_embed_type="text_time"`: the pooled text embedding
    and six time ids, each embedded in `sdxl_time_embed_dim` sinusoids, through `add_embedding`)."""
    torch.manual_seed(recipe.seed)
    added = {} if not sdxl else dict(
        addition_embed_type="text_time",
        addition_time_embed_dim=recipe.sdxl_time_embed_dim,
        projection_class_embeddings_input_dim=recipe.sdxl_text_widths[1] + 6 * recipe.sdxl_time_embed_dim,
    )
    return UNet2DConditionModel(
        **added,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        cross_attention_dim=recipe.text_width,
        attention_head_dim=recipe.unet_head_dim,
        norm_num_groups=32,
    )


def _draw_timesteps(recipe: Recipe, scheduler: DDPMScheduler, count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, a `high_timestep_share` of them redrawn from the schedule's upper 60%."""
    total = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, total, (count,), generator=generator)
    if recipe.high_timestep_share > 0:
        high = torch.randint(int(0.4 * total), total, (count,), generator=generator)
        pick = torch.rand(count, generator=generator) < recipe.high_timestep_share
        timesteps = torch.where(pick, high, timesteps)
    return timesteps


def _weighted_mse(recipe: Recipe, scheduler: DDPMScheduler, prediction: torch.Tensor, target: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """The MSE to `target` (epsilon, or v for a v-prediction `scheduler`), per sample weighted by Min-SNR when
    `min_snr_gamma` > 0: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    if recipe.min_snr_gamma <= 0:
        return torch.nn.functional.mse_loss(prediction, target)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    clamped = snr.clamp(max=recipe.min_snr_gamma)
    weight = clamped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clamped / snr
    per_sample = (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim)))
    return (weight * per_sample).mean()


Loss = Callable[[torch.nn.Module, CaptionBatch, torch.Generator], torch.Tensor]
"""(the denoiser in training, a batch of renders and captions, the loop's noise generator) -> the batch's loss."""


def train_denoiser(
    recipe: Recipe,
    model: torch.nn.Module,
    loss_of: Loss,
    rng: np.random.Generator,
    total: int,
    lr: float,
    batch_size: int,
    checkpoint: Path | None = None,
    sample_batch: Callable[[int, np.random.Generator, float], CaptionBatch] = sample_caption_batch,
    name: str = "unet",
) -> tuple[torch.nn.Module, list[float]]:
    """The loop every demo denoiser trains in: AdamW at `lr` with linear warm-up (`unet_warmup`) and cosine decay
    to 10%, gradients clipped to norm 1, an EMA of the weights (`ema_decay`), `total` steps of `batch_size` fresh
    renders (`sample_batch(batch_size, rng, caption_dropout)`) scored by `loss_of`; returns the EMA and the
    loss curve. With `checkpoint`, the whole training state (weights, optimiser, random streams) is saved there
    every `recipe.checkpoint_every` steps and training resumes from it, with the same result as an uninterrupted
    run."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < recipe.unet_warmup:
            return (step + 1) / recipe.unet_warmup
        progress = (step - recipe.unet_warmup) / max(1, total - recipe.unet_warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    first = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["unet"])  # (the key of every denoiser: killed UNet builds still resume)
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        rng.bit_generator.state = json.loads(state["rng"])
        losses, first = state["losses"].tolist(), state["step"]
        print(f"[build] {name}: resuming at step {first}", flush=True)
    progress = tqdm(range(first, total), desc=name, initial=first, total=total)
    for step in progress:
        loss = loss_of(model, sample_batch(batch_size, rng, recipe.caption_dropout), generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(current, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if checkpoint is not None and (step + 1) % recipe.checkpoint_every == 0:
            state = {
                "step": step + 1,
                "unet": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "rng": json.dumps(rng.bit_generator.state),
                "losses": torch.tensor(losses),
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # never leave a half-written checkpoint
    return ema.eval(), losses


def train_unet(
    recipe: Recipe,
    vae: AutoencoderKL,
    condition: Conditioning,
    noise_scheduler: DDPMScheduler,
    rng: np.random.Generator,
    checkpoint: Path | None = None,
    sdxl: bool = False,
    warm_start: dict[str, torch.Tensor] | None = None,
    sample_batch: Callable[[int, np.random.Generator, float], CaptionBatch] = sample_caption_batch,
) -> tuple[UNet2DConditionModel, list[float]]:
    """Train with the DDPM epsilon loss on fresh renders (`train_denoiser`); return the EMA weights and the loss
    curve.

    `condition` encodes a batch's captions; `sdxl` builds the SDXL-architecture denoiser (trained for
    `sdxl_unet_steps` at `sdxl_unet_lr`), starting from every tensor of `warm_start` whose name and
    shape it shares. `checkpoint`: see `train_denoiser`. `sample_batch(batch_size, rng, caption_dropout)` draws
    the training images and captions (default: the demo world's `sample_caption_batch`; other worlds pass their
    own).
    """
    unet = make_unet(recipe, sdxl)
    if warm_start is not None:
        own = unet.state_dict()
        shared = {k: v for k, v in warm_start.items() if k in own and own[k].shape == v.shape}
        unet.load_state_dict(shared, strict=False)
        print(f"[build] unet: warm start, {len(shared)} of {len(own)} tensors", flush=True)

    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"

    def loss_of(model: torch.nn.Module, batch: CaptionBatch, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(_to_model(batch.images)).latent_dist.mean * vae.config.scaling_factor
            context, added = condition(batch.captions, rng)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = _draw_timesteps(recipe, noise_scheduler, latents.shape[0], generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, context, added_cond_kwargs=added).sample
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
        return _weighted_mse(recipe, noise_scheduler, prediction, target, timesteps)

    total = recipe.sdxl_unet_steps if sdxl else recipe.unet_steps
    lr = recipe.sdxl_unet_lr if sdxl else recipe.unet_lr
    return train_denoiser(recipe, unet, loss_of, rng, total, lr, recipe.unet_batch, checkpoint, sample_batch)


# ---------------------------------------------------------------- stage 4: classifiers


def classifier_sampler(family: str) -> Sampler:
    """Renders of random objects in random styles (or plain), labelled by `family`."""

    def sample(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
        objects = rng.choice(list(OBJECTS), size=n)
        styles = rng.choice([*STYLES, PLAIN], size=n)
        images = to_tensor([render_array(str(o), str(s), rng) for o, s in zip(objects, styles)])
        return images, [str(x) for x in (objects if family == "object" else styles)]

    return sample


# ---------------------------------------------------------------- stage 5: quality gate


def generate(
    pipe: DiffusionPipeline, prompt: str, seeds: list[int], steps: int, guidance_scale: float
) -> torch.Tensor:
    """Images (NCHW in [0, 1]) for `prompt`, one per seed, as `sepme` evaluation generates them (guidance as
    `generation.pipeline_arguments` passes it: on the FLUX world true classifier-free guidance)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        [prompt] * len(seeds),
        num_inference_steps=steps,
        generator=generators,
        output_type="pt",
        **pipeline_arguments(pipe, guidance_scale, len(seeds)),
    ).images


def save_grid(rows: dict[str, torch.Tensor], path: Path, columns: int = 8, zoom: int = 3) -> None:
    """One row per prompt, its label on the left."""
    cell, label_width = 32 * zoom, 200
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), label or '"" (blank)', fill="black")
        for c, image in enumerate(images[:columns]):
            array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + c * cell, r * cell))
    grid.save(path)


def _accuracy(classifier: ConceptClassifier, name: str, images: torch.Tensor) -> float:
    return float(np.mean([p == name for p in classifier.predict(images)]))


def quality_gate(out: Path, recipe: Recipe, world: Path | None = None, min_accuracy: float | None = None,
                 paraphrases: bool = False) -> dict:
    """Classifier accuracy on generated images for every concept prompt, per sampler setting.

    Loads the saved pipeline and classifiers (what users load). The gate passes when every
    canonical prompt (and with `paraphrases` every paraphrase too) reaches `min_accuracy` (default
    `recipe.min_accuracy`) in the first setting (the sampler `sepme demo` uses); the others are
    reported. The first setting's canonical images (and the blank prompt's) go to `samples.png`.
    The first setting is also measured on `recipe.eval_extra_seeds` further seeds and reported
    without gating. `world`: the folder of another world's `pipeline` (the SDXL or FLUX one),
    judged by the same classifiers; default `out`.
    """
    world = world or out
    threshold = recipe.min_accuracy if min_accuracy is None else min_accuracy
    pipe = world_sized(DiffusionPipeline.from_pretrained(world / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    classifiers = {family: ConceptClassifier.load(out / "classifiers", family) for family in LABELS}
    seeds = list(range(recipe.eval_seeds))
    settings = []
    rows: dict[str, torch.Tensor] = {}
    for steps, guidance in recipe.eval_settings:
        canonical: dict[str, float] = {}
        paraphrases: dict[str, dict[str, float]] = {}
        for name, concept in tqdm(CONCEPTS.items(), desc=f"quality gate ({steps} steps, cfg {guidance})"):
            paraphrases[name] = {}
            for prompt in (concept.prompt, *concept.paraphrases):
                images = generate(pipe, prompt, seeds, steps, guidance)
                accuracy = _accuracy(classifiers[concept.family], name, images)
                if prompt == concept.prompt:
                    canonical[name] = accuracy
                    rows.setdefault(prompt, images)
                else:
                    paraphrases[name][prompt] = accuracy
        settings.append(
            {"steps": steps, "guidance_scale": guidance, "canonical": canonical, "paraphrases": paraphrases}
        )
    steps, guidance = recipe.eval_settings[0]
    extra_seeds = list(range(100, 100 + recipe.eval_extra_seeds))
    extra = {
        name: _accuracy(classifiers[c.family], name, generate(pipe, c.prompt, extra_seeds, steps, guidance))
        for name, c in (CONCEPTS.items() if extra_seeds else ())
    }
    rows[""] = generate(pipe, "", list(range(8)), steps, guidance)
    save_grid(rows, world / "samples.png")
    gated = list(settings[0]["canonical"].values())
    if paraphrases:
        gated += [a for found in settings[0]["paraphrases"].values() for a in found.values()]
    passed = all(a >= threshold for a in gated)
    return {
        "min_accuracy": threshold,
        "gated": "canonical prompts and paraphrases" if paraphrases else "canonical prompts",
        "seeds": len(seeds),
        "settings": settings,
        "passed": passed,
        "extra_seeds": {
            "seeds": f"100-{99 + len(extra_seeds)}",
            "steps": steps,
            "guidance_scale": guidance,
            "canonical": extra,
        },
    }


# ---------------------------------------------------------------- the whole build


def train_classifiers(out: Path, recipe: Recipe) -> dict[str, float]:
    """Train and save both classifiers; return their accuracy on 1000 fresh renders each."""
    accuracy: dict[str, float] = {}
    for i, family in enumerate(LABELS):
        classifier = train_classifier(
            family,
            classifier_sampler(family),
            steps=recipe.classifier_steps,
            batch_size=recipe.classifier_batch,
            width=recipe.classifier_width,
            seed=recipe.seed + 10 + i,
        )
        classifier.save(out / "classifiers")
        accuracy[family] = held_out_accuracy(
            classifier, classifier_sampler(family), 1000, recipe.seed + 11 + i
        )
    return accuracy


def train_pipeline(out: Path, recipe: Recipe, timings: dict) -> dict:
    """Stages 1-3: tokenizer, text encoder, autoencoder and denoiser, saved to `out/pipeline`."""
    pipeline_folder = out / "pipeline"
    # Work in progress (the trained autoencoder, the denoiser's checkpoint) lives in `_work`
    # until the pipeline is saved, so a killed build resumes where it stopped.
    work = _work_folder(out / "_work", recipe)
    with _timed(timings, "text"):
        tokenizer, text_encoder = build_text(recipe, pipeline_folder / "tokenizer")
    with _timed(timings, "autoencoder"):
        if (work / "vae" / "config.json").exists():
            vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
        else:
            vae = train_vae(recipe, np.random.default_rng([recipe.seed, 1]))
            vae.save_pretrained(work / "vae")
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    with _timed(timings, "unet"):
        unet, losses = train_unet(
            recipe,
            vae,
            sd_conditioning(tokenizer, text_encoder),
            noise_scheduler,
            np.random.default_rng([recipe.seed, 2]),
            checkpoint=work / "unet_checkpoint.pt",
        )
    scheduler = DDIMScheduler(  # SD v1's schedule, sampled with DDIM
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(pipeline_folder, safe_serialization=True)
    shutil.rmtree(work)
    return {
        "unet_loss_last_200": float(np.mean(losses[-200:])),
        "autoencoder_scaling_factor": vae.config.scaling_factor,
    }


def _work_folder(work: Path, recipe: Recipe) -> Path:
    """`work`, emptied unless it holds a killed build of this same recipe (which then resumes)."""
    recipe_json = json.dumps(asdict(recipe), sort_keys=True)
    if work.exists() and (work / "recipe.json").read_text() != recipe_json:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(recipe_json)
    return work


SDXL_TIME_IDS = [32, 32, 0, 0, 32, 32]
"""Original size, crop top-left and target size, as the SDXL pipeline builds them for 32x32 images."""


def train_sdxl_pipeline(out: Path, recipe: Recipe, timings: dict) -> dict:
    """The SDXL-architecture world, saved to `out/sdxl/pipeline`: the SD world's autoencoder and
    tokenizer, two new random text encoders, and a `text_time` denoiser warm-started from the SD one."""
    base = StableDiffusionPipeline.from_pretrained(_require_built(out / "pipeline"))
    work = _work_folder(out / "sdxl" / "_work", recipe)
    with _timed(timings, "text"):
        torch.manual_seed(recipe.seed + 20)
        encoder = random_text_encoder(recipe, base.tokenizer, recipe.sdxl_text_widths[0])
        torch.manual_seed(recipe.seed + 21)
        encoder_2 = random_text_encoder(recipe, base.tokenizer, recipe.sdxl_text_widths[1], CLIPTextModelWithProjection)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    with _timed(timings, "unet"):
        unet, losses = train_unet(
            recipe,
            base.vae,
            sdxl_conditioning(base.tokenizer, (encoder, encoder_2), SDXL_TIME_IDS, recipe.sdxl_token_dropout),
            noise_scheduler,
            np.random.default_rng([recipe.seed, 3]),
            checkpoint=work / "unet_checkpoint.pt",
            sdxl=True,
            warm_start=base.unet.state_dict(),
        )
    pipe = StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=encoder,
        text_encoder_2=encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,  # the same DDIM sampler as the SD world
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out / "sdxl" / "pipeline", safe_serialization=True)
    shutil.rmtree(work)
    return {"unet_loss_last_200": float(np.mean(losses[-200:])), "warm_start": "pipeline/unet"}


FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
"""FLUX.1's `FlowMatchEulerDiscreteScheduler`: the shift follows the number of image tokens (64 here: mu 0.47,
sigma -> 1.6 sigma / (1 + 0.6 sigma)); training draws its noise levels with the same shift."""


def make_flux_transformer(recipe: Recipe, text_width: int, pooled_width: int, latent_channels: int = 4
                          ) -> FluxTransformer2DModel:
    """A `FluxTransformer2DModel` of `flux_width` (`flux_heads` heads), `flux_double_layers` double-stream and
    `flux_single_layers` single-stream blocks, over packed 2x2 latents (`4 * latent_channels` wide), T5 rows of
    `text_width` and a pooled CLIP embedding of `pooled_width`; no guidance embedding. Its rotary axes split
    each head as FLUX.1's (16, 56, 56) of 128."""
    if recipe.flux_width % recipe.flux_heads:
        raise ValueError(f"flux_width ({recipe.flux_width}) must be a multiple of flux_heads ({recipe.flux_heads})")
    head = recipe.flux_width // recipe.flux_heads
    side = head * 7 // 16 // 2 * 2
    torch.manual_seed(recipe.seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=recipe.flux_double_layers,
        num_single_layers=recipe.flux_single_layers, attention_head_dim=head, num_attention_heads=recipe.flux_heads,
        joint_attention_dim=text_width, pooled_projection_dim=pooled_width, guidance_embeds=False,
        axes_dims_rope=(head - 2 * side, side, side),
    )


def train_flux_transformer(recipe: Recipe, pipe: FluxPipeline, rng: np.random.Generator,
                           checkpoint: Path | None = None) -> tuple[FluxTransformer2DModel, list[float]]:
    """Train `pipe.transformer` with the rectified-flow loss on fresh renders (`train_denoiser`): the packed,
    scaled latent `x_0`, `x_t = (1 - sigma) x_0 + sigma eps` with sigma uniform in (0, 1] then shifted as the
    sampler shifts it, the velocity target `eps - x_0`; the captions encoded by the pipeline's own
    `encode_prompt` (a dropped caption is the blank prompt, the negative prompt of true CFG). The call is
    training's `FlowCall`, as the pipeline makes it. Returns the EMA weights and the loss curve."""
    vae, length = pipe.vae, recipe.max_tokens
    ids = flux_image_ids(pipe, IMAGE_SIZE, torch.device("cpu"), torch.float32)
    schedule = FlowSchedule.of(pipe.scheduler.config, len(ids))
    call = FlowCall(pipe.transformer, schedule, ids)  # (the `model` train_denoiser trains)

    def loss_of(model: torch.nn.Module, batch: CaptionBatch, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(_to_model(batch.images)).latent_dist.mean
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            x0 = FluxPipeline._pack_latents(latents, *latents.shape)
            text, pooled, _ = pipe.encode_prompt(batch.captions, prompt_2=None, max_sequence_length=length)
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = schedule.shifted(torch.rand(len(x0), generator=generator).clamp(min=1e-3))
        noisy = (1 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
        return torch.nn.functional.mse_loss(call(noisy, sigmas, text, pooled), noise - x0)

    return train_denoiser(recipe, pipe.transformer, loss_of, rng, recipe.flux_steps, recipe.flux_lr,
                          recipe.flux_batch, checkpoint, name="transformer")


def train_flux_pipeline(out: Path, recipe: Recipe, timings: dict) -> dict:
    """The FLUX-architecture world, saved to `out/flux/pipeline`: the SD world's autoencoder (with
    `shift_factor` 0.0, which FLUX's decoding adds), tokenizer and CLIP text encoder (pooled path), a random
    T5 encoder over a word-level T5 tokenizer of the demo vocabulary, and a trained `FluxTransformer2DModel`."""
    base = StableDiffusionPipeline.from_pretrained(_require_built(out / "pipeline"))
    work = _work_folder(out / "flux" / "_work", recipe)
    with _timed(timings, "text"):
        tokenizer_2 = t5_word_tokenizer(VOCABULARY, recipe.max_tokens)
        torch.manual_seed(recipe.seed + 30)
        encoder_2 = t5_encoder(tokenizer_2, recipe.text_width, recipe.text_layers, recipe.text_heads,
                               4 * recipe.text_width).requires_grad_(False)
    vae = base.vae
    vae.register_to_config(shift_factor=0.0)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=base.text_encoder,
                 tokenizer=base.tokenizer, text_encoder_2=encoder_2, tokenizer_2=tokenizer_2)
    transformer = make_flux_transformer(recipe, recipe.text_width, base.text_encoder.config.hidden_size,
                                        vae.config.latent_channels)
    with _timed(timings, "transformer"):
        trained, losses = train_flux_transformer(recipe, FluxPipeline(**parts, transformer=transformer),
                                                 np.random.default_rng([recipe.seed, 4]),
                                                 checkpoint=work / "transformer_checkpoint.pt")
    FluxPipeline(**parts, transformer=trained).save_pretrained(out / "flux" / "pipeline", safe_serialization=True)
    shutil.rmtree(work)
    return {"transformer_loss_last_200": float(np.mean(losses[-200:])),
            "transformer_parameters": sum(p.numel() for p in trained.parameters()),
            "autoencoder": "pipeline/vae, shift_factor 0.0", "clip": "pipeline/text_encoder"}


def _require_built(folder: Path) -> Path:
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is missing: build the SD world first (`--model sd`)")
    return folder


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _start_report(recipe_file: Path, recipe: Recipe, stages: str) -> tuple[dict, dict]:
    """The report to fill and its timings: fresh with the recipe for a full build, else the saved one."""
    if stages == "all":
        report: dict = {"recipe": asdict(recipe)}
    else:
        report = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    return report, report.setdefault("timings", {})


VARIANTS = {"sdxl": train_sdxl_pipeline, "flux": train_flux_pipeline}
"""The worlds built on the SD world's autoencoder and classifiers, into `assets/<model>/`."""


def build_variant(out: Path, recipe: Recipe, stages: str = "all", model: str = "sdxl") -> dict:
    """The SDXL- or FLUX-architecture world into `out/<model>` (pipeline, `recipe.json`, `samples.png`); it
    needs the SD world's assets in `out`. `stages`: "all" or "gate". The FLUX world's gate also gates
    every paraphrase, at `flux_min_accuracy`."""
    folder = out / model
    recipe_file = folder / "recipe.json"
    report, timings = _start_report(recipe_file, recipe, stages)
    wall, cpu = time.perf_counter(), time.process_time()
    if stages == "all":
        report["pipeline"] = VARIANTS[model](out, recipe, timings)
    elif stages == "classifiers":
        raise ValueError(f"the {model} world uses the SD world's classifiers: rebuild them with --model sd")
    gate = dict(min_accuracy=recipe.flux_min_accuracy, paraphrases=True) if model == "flux" else {}
    with _timed(timings, "quality_gate"):
        report["quality_gate"] = quality_gate(out, recipe, world=folder, **gate)
    timings["total"] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    report["torch_threads"] = torch.get_num_threads()
    report["passed"] = report["quality_gate"]["passed"]
    report["sizes_bytes"] = {"pipeline": _folder_bytes(folder / "pipeline")}
    recipe_file.write_text(json.dumps(report, indent=2))
    return report


def build(out: str | Path, recipe: Recipe | None = None, stages: str = "all", model: str = "sd") -> dict:
    """Build the assets into `out` and write `recipe.json`; return its content.

    `stages`: "all", "classifiers" (retrain the classifiers, then rerun the gate) or "gate"
    (rerun the quality gate on the saved assets); earlier results in `recipe.json` are kept.
    `model`: "sd" (the SD v1 world), "sdxl" or "flux" (the SDXL- or FLUX-architecture world, `build_variant`).
    """
    recipe = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model in VARIANTS:
        return build_variant(out, recipe, stages, model)
    if model != "sd":
        raise ValueError(f"model must be 'sd', 'sdxl' or 'flux', got {model!r}")
    recipe_file = out / "recipe.json"
    report, timings = _start_report(recipe_file, recipe, stages)
    wall, cpu = time.perf_counter(), time.process_time()
    if stages == "all":
        report["pipeline"] = train_pipeline(out, recipe, timings)
    else:
        report.setdefault("recipe", {}).update(
            {k: v for k, v in asdict(recipe).items() if "eval" in k or "classifier" in k}
        )
    if stages in ("all", "classifiers"):
        with _timed(timings, "classifiers"):
            report["classifier_held_out_accuracy"] = train_classifiers(out, recipe)
    with _timed(timings, "quality_gate"):
        report["quality_gate"] = quality_gate(out, recipe)
    if stages == "all":
        timings["total"] = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
    report["torch_threads"] = torch.get_num_threads()
    report["passed"] = report["quality_gate"]["passed"] and all(
        a >= 0.97 for a in report["classifier_held_out_accuracy"].values()
    )
    report["sizes_bytes"] = {name: _folder_bytes(out / name) for name in ("pipeline", "classifiers")}
    recipe_file.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets"), help="assets folder to write")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument(
        "--stages", choices=("all", "classifiers", "gate"), default="all", help="what to (re)build"
    )
    parser.add_argument("--model", choices=("sd", *VARIANTS), default="sd",
                        help="which world: SD v1 (default), the SDXL or the FLUX architecture (these need the SD world)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    for field, value in asdict(Recipe()).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = QUICK.copy() if args.quick else {}
    overrides.update(
        {k: v for k, v in vars(args).items() if k in Recipe.__dataclass_fields__ and v is not None}
    )
    report = build(args.out, Recipe(**overrides), stages=args.stages, model=args.model)
    summary = ("timings", "classifier_held_out_accuracy", "quality_gate", "passed", "sizes_bytes")
    print(json.dumps({k: report[k] for k in summary if k in report}, indent=2))


if __name__ == "__main__":
    main()
