"""Small Stable Diffusion (v1 / v2 / XL) pipelines with random weights, for tests, benchmarks and examples.

Real architectures (diffusers `UNet2DConditionModel`, `AutoencoderKL`, transformers
`CLIPTextModel`), shrunk; the text width to token count ratio stays near SD's 768 / 77 so the
null-space budget behaves as on SD. `sd15_unet_config()` is SD v1.5's UNet, for benchmarks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import write_word_tokenizer

DEFAULT_WORDS = (
    "a painting by of the in style photo van gogh picasso cezanne monet dog cat church parachute "
    "watermark drawing"
).split()


def _two_level_unet(text_width: int, blocks: Sequence[int], **extra: Any) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(blocks),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def tiny_unet(text_width: int = 64, seed: int = 0, blocks: Sequence[int] = (16, 32)) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention in every block (4 `attn2` layers)."""
    torch.manual_seed(seed)
    return _two_level_unet(text_width, blocks)


def _text_encoder(cls: type, tokenizer: Any, width: int, max_length: int, projection_dim: int | None = None) -> Any:
    """A 2-layer random CLIP text encoder (`CLIPTextModel` or `CLIPTextModelWithProjection`) for `tokenizer`."""
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    encoder = cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **extra,
        )
    )
    with torch.no_grad():  # a trained encoder's final LayerNorm has a bias; with none, rows sum to zero
        final_norm = next(m for n, m in encoder.named_modules() if n.endswith("final_layer_norm"))
        final_norm.bias.normal_(0.0, 0.1)
    return encoder


def tiny_vae() -> AutoencoderKL:
    """A 2-level `AutoencoderKL` (16x16 images <-> 4x8x8 latents)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )


def tiny_sdxl_unet(text_width: int = 64, pooled_width: int = 32, seed: int = 0, blocks: Sequence[int] = (16, 32),
                   time_embed_dim: int = 8) -> UNet2DConditionModel:
    """An SDXL-architecture UNet: `addition_embed_type="text_time"` (pooled text + 6 time ids through
    `add_embedding`), linear projections, 2 transformer layers in the lower block (11 `attn2` layers)."""
    torch.manual_seed(seed)
    return _two_level_unet(
        text_width, blocks, transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
    )


def sd15_unet_config() -> dict:
    """Stable Diffusion v1.5's UNet configuration (860M parameters)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


def word_tokenizer(words: Sequence[str], max_length: int, folder: str | Path | None = None) -> Any:
    """The package's word tokenizer for `words`, written to `folder` (default: a temporary folder, removed
    once the tokenizer is loaded: it keeps its vocabulary in memory)."""
    if folder is not None:
        return write_word_tokenizer(Path(folder), words, model_max_length=max_length)
    with tempfile.TemporaryDirectory(prefix="sepme-tokenizer-") as temporary:
        return write_word_tokenizer(Path(temporary), words, model_max_length=max_length)


def tiny_pipeline(
    text_width: int = 64,
    max_length: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    folder: str | Path | None = None,
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A random-weight `StableDiffusionPipeline` producing 16x16 images (latents 4x8x8).

    `prediction_type="v_prediction"` makes it an SD 2.x-style v-prediction model (the scheduler's setting)."""
    tokenizer = word_tokenizer(words, max_length, folder)
    torch.manual_seed(seed)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, text_width, max_length)
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              **({} if prediction_type == "epsilon" else {"prediction_type": prediction_type}))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(text_width, seed + 2),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(
    text_widths: tuple[int, int] = (32, 32),
    max_length: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    folder: str | Path | None = None,
    prediction_type: str = "epsilon",
    force_zeros_for_empty_prompt: bool = True,
    scheduler: str = "euler",
) -> StableDiffusionXLPipeline:
    """A random-weight `StableDiffusionXLPipeline` producing 16x16 images (latents 4x8x8).

    Two text encoders as SDXL's: a `CLIPTextModel` (`text_widths[0]`) and a `CLIPTextModelWithProjection`
    (`text_widths[1]`, its projection gives the pooled embedding); the prompt embedding is both encoders'
    penultimate hidden states side by side, `sum(text_widths)` wide (SDXL: 768 + 1280 = 2048). Both use the
    package's word tokenizer. `scheduler`: "euler" (SDXL's `EulerDiscreteScheduler`) or "ddim".
    """
    tokenizer = word_tokenizer(words, max_length, folder)
    torch.manual_seed(seed)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, text_widths[0], max_length)
    torch.manual_seed(seed + 3)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, tokenizer, text_widths[1], max_length,
                                   projection_dim=text_widths[1])
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    settings = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                    prediction_type=prediction_type)
    if scheduler == "euler":
        noise_scheduler: Any = EulerDiscreteScheduler(timestep_spacing="leading", **settings)
    elif scheduler == "ddim":
        noise_scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **settings)
    else:
        raise ValueError(f"scheduler must be 'euler' or 'ddim', got {scheduler!r}")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=tiny_sdxl_unet(sum(text_widths), text_widths[1], seed + 2),
        scheduler=noise_scheduler, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
