"""The null-space basis `S_p` of stacked prompt embeddings (paper Eq. 8).

For concept i, `A_i = [c_0; c_j for j != i]` stacks the blank prompt and every other known
prompt (each an `L x d_in` text-encoder output). Any increment `dW = beta * w @ S_p.T` with
`S_p` spanning the null space of `A_i` satisfies `A_i @ dW.T = 0`: the keys and values of
those prompts are untouched. The paper solves for `S_p` symbolically; an SVD in float64 gives
an orthonormal basis of the same space in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import EmptyNullSpaceError


def stack_embeddings(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack prompt embeddings (`L x d`, `1 x L x d` or `n x L x d` each) into one `rows x d` float64 matrix."""
    parts = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    if not parts:
        raise ValueError("null_space_basis needs at least one embedding; got an empty list")
    rows = []
    for part in parts:
        if not isinstance(part, torch.Tensor) or part.ndim < 1:
            raise TypeError(f"embeddings must be tensors of shape (rows, d_in); got {type(part).__name__}")
        rows.append(part.detach().to(device="cpu", dtype=torch.float64).reshape(-1, part.shape[-1]))
    widths = {r.shape[-1] for r in rows}
    if len(widths) != 1:
        raise ValueError(f"all embeddings must have the same width; got widths {sorted(widths)}")
    return torch.cat(rows, dim=0)


def default_rtol(rows: int, width: int) -> float:
    """Rank tolerance relative to the largest singular value: float32 round-off of the encoder."""
    return max(rows, width) * torch.finfo(torch.float32).eps


def null_space_basis(
    embeddings: torch.Tensor | Sequence[torch.Tensor], rtol: float | None = None
) -> torch.Tensor:
    """Orthonormal basis `S_p` (`d_in x m`, float32) of the null space of the stacked embeddings (Eq. 8).

    Singular values below `rtol * sigma_max` count as zero (default: `max(rows, d_in) * eps_float32`,
    the round-off of float32 text encoders). Raise `EmptyNullSpaceError` when nothing is left.

    Example:
        >>> basis = null_space_basis([blank_embedding, picasso_embedding])  # (768, 614) on SD v1
    """
    matrix = stack_embeddings(embeddings)
    rows, width = matrix.shape
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    tol = (default_rtol(rows, width) if rtol is None else float(rtol)) * (
        float(singular[0]) if singular.numel() else 0.0
    )
    rank = int((singular > tol).sum())
    if rank >= width:
        raise EmptyNullSpaceError(
            f"the {rows} x {width} stacked prompt embeddings have rank {rank}: their null space is empty, "
            f"so no increment can leave all of them untouched. Use fewer known or protected prompts "
            f"(each prompt adds up to its token count of rows), or a larger rtol."
        )
    return vh[rank:].T.contiguous().to(torch.float32)
