"""Deprecated import path (0.1): use `unet`, `text`, `fingerprint` and `pipelines`."""

from .fingerprint import FINGERPRINT_RTOL, fingerprint, fingerprint_mismatch
from .pipelines import load_pipeline
from .text import encode_prompts
from .unet import base_linear, cross_attention_modules

__all__ = ["FINGERPRINT_RTOL", "base_linear", "cross_attention_modules", "encode_prompts", "fingerprint",
           "fingerprint_mismatch", "load_pipeline"]
