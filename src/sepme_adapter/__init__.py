"""sepme-adapter: separable, reversible multi-concept erasure (SepME) for diffusers.

Example:
    >>> import sepme_adapter
    >>> pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained(MODEL))
    >>> pipe.load_sepme("vangogh.safetensors")
    >>> pipe.set_erased([])  # the original model, bit for bit
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from .lazy import lazy_exports

# Names are imported on first use (PEP 562), so `import sepme_adapter.cli` and `sepme --help` do not load
# torch and diffusers; `from sepme_adapter import attach` works as before.
_EXPORTS = {
    "null_space_basis": ".basis",
    "Eraser": ".eraser",
    "BaseModelMismatchError": ".errors",
    "EmptyNullSpaceError": ".errors",
    "EraserFileError": ".errors",
    "ErasureNotAppliedError": ".errors",
    "SepMEError": ".errors",
    "SepMEStateError": ".errors",
    "TrainingError": ".errors",
    "export_lora": ".hub",
    "push_to_hub": ".hub",
    "SepMEFluxPipeline": ".loader",
    "SepMELoaderMixin": ".loader",
    "SepMEStableDiffusion3Pipeline": ".loader",
    "SepMEStableDiffusionPipeline": ".loader",
    "SepMEStableDiffusionXLPipeline": ".loader",
    "SepMEWarning": ".loader",
    "attach": ".loader",
    "ErasureRuntime": ".runtime",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if _TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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
    from .loader import (
        SepMEFluxPipeline,
        SepMELoaderMixin,
        SepMEStableDiffusion3Pipeline,
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
    "SepMEFluxPipeline",
    "SepMELoaderMixin",
    "SepMEStableDiffusion3Pipeline",
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
