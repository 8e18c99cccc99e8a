"""Small Stable Diffusion pipelines with random weights, for tests, benchmarks and examples.

Real architectures (diffusers `UNet2DConditionModel`, `AutoencoderKL`, transformers
`CLIPTextModel`), shrunk; the text width to token count ratio stays near SD's 768 / 77 so the
null-space budget behaves as on SD. `sd15_unet_config()` is SD v1.5's UNet, for benchmarks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..demo.tokenizer import write_word_tokenizer

DEFAULT_WORDS = (
    "a painting by of the in style photo van gogh picasso cezanne monet dog cat church parachute "
    "watermark drawing"
).split()


def tiny_unet(text_width: int = 64, seed: int = 0, blocks: Sequence[int] = (16, 32)) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention in every block (4 `attn2` layers)."""
    torch.manual_seed(seed)
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


def tiny_pipeline(
    text_width: int = 64,
    max_length: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    folder: str | Path | None = None,
) -> StableDiffusionPipeline:
    """A random-weight `StableDiffusionPipeline` producing 16x16 images (latents 4x8x8)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="sepme-tokenizer-"))
    tokenizer = write_word_tokenizer(folder, words, model_max_length=max_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with torch.no_grad():  # a trained encoder's final LayerNorm has a bias; with none, rows sum to zero
        final_norm = next(m for n, m in text_encoder.named_modules() if n.endswith("final_layer_norm"))
        final_norm.bias.normal_(0.0, 0.1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(text_width, seed + 2),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
