"""Small Stable Diffusion (v1 / v2 / XL), SD3 and FLUX pipelines with random weights, for tests, benchmarks and
examples.

Real architectures (diffusers `UNet2DConditionModel`, `AutoencoderKL`, transformers
`CLIPTextModel`), shrunk; the text width to token count ratio stays near SD's 768 / 77 so the
null-space budget behaves as on SD. `sd15_unet_config()` is SD v1.5's UNet, for benchmarks. The FLUX and SD3
pipelines (`tiny_flux_pipeline`, `tiny_sd3_pipeline`) have a random `T5EncoderModel` with a word-level
`T5Tokenizer` built offline (`t5_word_tokenizer`), and a T5 length of `max_length` tokens (call them with
`max_sequence_length=max_length`, as `text.text_sequence_length` encodes them).
"""

from __future__ import annotations

import string
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

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


def t5_word_tokenizer(words: Sequence[str], max_length: int) -> T5Tokenizer:
    """A word-level `T5Tokenizer` (a unigram model, built in memory: no download): each of `words` is one token,
    anything else falls back to characters; `</s>` ends every prompt and `<pad>` pads, as T5's."""
    chars = string.ascii_lowercase + string.digits + ".,'-!?"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def t5_encoder(tokenizer: T5Tokenizer, width: int, layers: int = 2, heads: int = 4, ff_width: int | None = None
               ) -> T5EncoderModel:
    """A random `T5EncoderModel` for `tokenizer`, `width` wide (`layers` blocks of `heads` heads, feed-forward
    `ff_width`, default `2 * width`), in eval mode (no dropout, as loaded)."""
    return T5EncoderModel(T5Config(dropout_rate=0.0,
        vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=ff_width or 2 * width, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    """A one-level `AutoencoderKL` without quant convs, as FLUX's and SD3's (scale factor 1: 16x16 images)."""
    return AutoencoderKL(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_flux_pipeline(
    text_width: int = 64,
    clip_width: int = 32,
    max_length: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    guidance_embeds: bool = False,
) -> FluxPipeline:
    """A random-weight `FluxPipeline` (16x16 images; call it with `height=16, width=16,
    max_sequence_length=max_length`).

    FLUX's layout: a `CLIPTextModel` (`clip_width`; its pooled output enters `time_text_embed`) and a
    `T5EncoderModel` (`text_width`; its rows enter `context_embedder`), a `FluxTransformer2DModel` with one
    double-stream and one single-stream block. `guidance_embeds=True`: FLUX.1-dev's guidance embedding.
    """
    tokenizer = word_tokenizer(words, max_length)
    torch.manual_seed(seed)
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, clip_width, max_length)
    tokenizer_2 = t5_word_tokenizer(words, max_length)
    torch.manual_seed(seed + 3)
    text_encoder_2 = t5_encoder(tokenizer_2, text_width)
    torch.manual_seed(seed + 1)
    vae = _flow_vae(latent_channels=1)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_width, pooled_projection_dim=clip_width, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(
    text_width: int = 96,
    clip_widths: tuple[int, int] = (16, 16),
    max_length: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
) -> StableDiffusion3Pipeline:
    """A random-weight `StableDiffusion3Pipeline` (16x16 images; call it with `height=16, width=16,
    max_sequence_length=max_length`).

    SD3's layout: two `CLIPTextModelWithProjection` (`clip_widths`; their penultimate states side by side,
    zero-padded to `text_width`, then the T5 rows along the sequence enter `context_embedder`; their projected
    outputs side by side are the pooled embedding) and a `T5EncoderModel` (`text_width`), an
    `SD3Transformer2DModel` with one joint block. `text_width` must be at least `sum(clip_widths)`.
    """
    if text_width < sum(clip_widths):
        raise ValueError(f"text_width ({text_width}) must be at least the CLIP widths side by side ({sum(clip_widths)})")
    tokenizer = word_tokenizer(words, max_length)
    torch.manual_seed(seed)
    text_encoder = _text_encoder(CLIPTextModelWithProjection, tokenizer, clip_widths[0], max_length,
                                 projection_dim=clip_widths[0])
    torch.manual_seed(seed + 4)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, tokenizer, clip_widths[1], max_length,
                                   projection_dim=clip_widths[1])
    tokenizer_3 = t5_word_tokenizer(words, max_length)
    torch.manual_seed(seed + 3)
    text_encoder_3 = t5_encoder(tokenizer_3, text_width)
    torch.manual_seed(seed + 1)
    vae = _flow_vae(latent_channels=4)
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=text_width, pooled_projection_dim=sum(clip_widths),
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
