"""sepme-adapter: separable, reversible multi-concept erasure (SepME) for diffusers.

Example:
    >>> import sepme_adapter
    >>> pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(MODEL))
    >>> pipe.load_sepme("vangogh.safetensors")
    >>> pipe.set_erased([])  # the original model, bit for bit
"""

import os as _os
import sys as _sys

# The `sepme` command on a busy machine: OpenMP threads that spin-wait for a descheduled peer made
# training steps 7x slower (README, "Threads"); passive waiting avoids it. Only for the command (a
# library import leaves the user's process alone), and only before torch is first imported.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "sepme" and "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .basis import null_space_basis  # noqa: E402
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
from .loader import (
    SepMELoaderMixin,
    SepMEStableDiffusionPipeline,
    SepMEStableDiffusionXLPipeline,
    SepMEWarning,
    attach,
)
from .runtime import ErasureRuntime

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "EmptyNullSpaceError",
    "Eraser",
    "EraserFileError",
    "ErasureNotAppliedError",
    "ErasureRuntime",
    "SepMEError",
    "SepMELoaderMixin",
    "SepMEStableDiffusionPipeline",
    "SepMEStableDiffusionXLPipeline",
    "SepMEStateError",
    "SepMEWarning",
    "TrainingError",
    "attach",
    "export_lora",
    "null_space_basis",
    "push_to_hub",
]
