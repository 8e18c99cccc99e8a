"""sepme-adapter: separable, reversible multi-concept erasure (SepME) for diffusers.

Example:
    >>> import sepme_adapter
    >>> pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(MODEL))
    >>> pipe.load_sepme("vangogh.safetensors")
    >>> pipe.set_erased([])  # the original model, bit for bit
"""

from .basis import null_space_basis
from .eraser import Eraser
from .errors import (
    BaseModelMismatchError,
    EmptyNullSpaceError,
    EraserFileError,
    ErasureNotAppliedError,
    SepMEError,
    SepMEStateError,
    TrainingError,
)
from .hub import export_lora, push_to_hub
from .loader import SepMELoaderMixin, SepMEStableDiffusionPipeline, SepMEWarning, attach
from .processor import ErasureRuntime, SepMEAttnProcessor

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "EmptyNullSpaceError",
    "Eraser",
    "EraserFileError",
    "ErasureNotAppliedError",
    "ErasureRuntime",
    "SepMEAttnProcessor",
    "SepMEError",
    "SepMELoaderMixin",
    "SepMEStableDiffusionPipeline",
    "SepMEStateError",
    "SepMEWarning",
    "TrainingError",
    "attach",
    "export_lora",
    "null_space_basis",
    "push_to_hub",
]
