"""Test and benchmark tooling: tiny Stable Diffusion (v1 / v2 / XL), SD3 and FLUX pipelines with random weights.

Not for producing images anyone wants: these models are untrained. They have the real
architectures (diffusers `UNet2DConditionModel`, `AutoencoderKL`, transformers `CLIPTextModel`),
shrunk, so every code path of the plugin runs on them in seconds and offline.
"""

from .random_pipelines import (
    DEFAULT_WORDS,
    sd15_unet_config,
    t5_word_tokenizer,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_sdxl_unet,
    tiny_unet,
)

__all__ = ["DEFAULT_WORDS", "sd15_unet_config", "t5_word_tokenizer", "tiny_flux_pipeline", "tiny_pipeline",
           "tiny_sd3_pipeline", "tiny_sdxl_pipeline", "tiny_sdxl_unet", "tiny_unet"]
