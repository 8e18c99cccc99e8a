"""The exceptions sepme-adapter raises: every one says what was wrong and what to do."""

from __future__ import annotations


class SepMEError(Exception):
    """Base class of every sepme-adapter error."""


class EraserFileError(SepMEError, ValueError):
    """An eraser file (or in-memory eraser) is malformed: truncated, wrong shapes, bad metadata."""


class BaseModelMismatchError(SepMEError, ValueError):
    """An eraser was trained on another base model (or another architecture) than the pipeline's."""


class EmptyNullSpaceError(SepMEError, ValueError):
    """The stacked prompt embeddings leave no null space, so no separable increment exists (Eq. 8)."""


class SepMEStateError(SepMEError, RuntimeError):
    """An operation is not allowed in the pipeline's current state (e.g. `set_erased` while fused)."""


class ErasureNotAppliedError(SepMEError, RuntimeError):
    """Concepts are erased but the erasers are not in place (a processor was replaced or bypassed)."""


class TrainingError(SepMEError, RuntimeError):
    """Training cannot start or cannot go on (bad configuration, non-finite loss)."""
